"""Choosing a loss implementation by name, and the input checks every loss shares.

Each loss keeps a registry `{name: Impl}` ordered fastest first. `impl="auto"` (every loss's default) takes the
first entry that is installed and runs on the inputs' device (and warns once if it had to skip a faster one that is
not installed); an explicitly requested entry whose dependency is missing raises `MissingDependency`, and one that
cannot run on the inputs' device raises a ValueError saying which devices it takes (fastenc/ARCHITECTURE.md,
principle 4).

Implementations (every one computes the reference's value and gradients; see tests/losses, tests/kernels):
- "reference": the plain formula, B x N logits (the test oracle and benchmark baseline);
- "chunked":   pure torch, rows in chunks, tiles recomputed in backward (fastenc.losses.chunked; any device);
- "native":    the C++/OpenMP extension fastenc._C (fastenc.losses.native; CPU tensors, built by setup.py);
- "triton":    fused Triton kernels (fastenc.kernels; CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 when
               asked for explicitly: the interpreter is for tests, "auto" never picks it on CPU).
Shapes: B = local batch, D = feature dim.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Callable

import torch

from fastenc.utils.optional import is_available, require, warn_once

# Every value the `impl=` argument of a loss accepts; a given loss may implement a subset (its error lists which).
LOSS_IMPLS = ("auto", "reference", "chunked", "native", "triton")


def lazy(module: str, name: str) -> Callable:
    """`module.name`, imported on first call: fast paths with optional dependencies stay out of `import fastenc`."""
    target: list[Callable] = []

    def call(*args, **kwargs):
        if not target:
            target.append(getattr(importlib.import_module(module), name))
        return target[0](*args, **kwargs)

    call.__qualname__ = call.__name__ = f"lazy({module}.{name})"
    return call


@dataclass(frozen=True)
class Impl:
    """One implementation of a loss: `fn`, the optional module it needs (None: always available) and the device
    types it runs on (None: any). `interpretable`: also runs on CPU tensors when TRITON_INTERPRET=1 (tests only)."""

    fn: Callable
    requires: str | None = None
    devices: tuple[str, ...] | None = None
    interpretable: bool = False

    def available(self) -> bool:
        return self.requires is None or is_available(self.requires)

    def runs_on(self, device_type: str, *, explicit: bool = False) -> bool:
        if self.devices is None or device_type in self.devices:
            return True
        return explicit and self.interpretable and device_type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def resolve_impl(loss: str, impl: str, registry: dict[str, Impl], device: torch.device | str = "cpu") -> Callable:
    """The function registered under `impl` for tensors on `device` ("auto": the first available one that runs
    there, registry order = preference)."""
    device_type = torch.device(device).type
    if impl == "auto":
        for name, entry in registry.items():
            if not entry.runs_on(device_type):
                continue
            if entry.available():
                return entry.fn
            warn_once(f"{loss}:{name}", f"{loss}: impl '{name}' unavailable ({entry.requires} missing), falling back")
        raise RuntimeError(f"{loss}: no implementation is available")  # unreachable while 'reference' is registered
    if impl not in registry:
        choices = ", ".join(repr(n) for n in ("auto", *registry))
        raise ValueError(f"{loss}: unknown impl {impl!r}; valid choices: {choices}")
    entry = registry[impl]
    if not entry.runs_on(device_type, explicit=True):
        where = " or ".join(entry.devices or ())
        extra = " (or cpu under TRITON_INTERPRET=1, for tests)" if entry.interpretable else ""
        raise ValueError(f"{loss}(impl={impl!r}) runs on {where} tensors{extra}, got {device_type} tensors; use "
                         "impl='auto' to pick the best implementation for the device")
    if not entry.available():
        require(entry.requires, f"{loss}(impl={impl!r})")  # raises MissingDependency with the install hint
    return entry.fn


def usable_impls(registry: dict[str, Impl], device: torch.device | str = "cpu") -> list[str]:
    """Names of the implementations in `registry` that are installed and accept tensors on `device` when asked for
    by name (so Triton on CPU only under TRITON_INTERPRET=1), in preference order. For tests and benchmarks."""
    device_type = torch.device(device).type
    return [name for name, e in registry.items() if e.available() and e.runs_on(device_type, explicit=True)]


def as_scalar(value, device) -> torch.Tensor:
    """A logit scale / bias as a 0-dim fp32 tensor on `device`; a tensor argument keeps its graph (so it receives its
    gradient) and is never read on the host (kernels take it by pointer: no sync)."""
    if isinstance(value, torch.Tensor):
        return value.reshape(()).float()
    return torch.tensor(float(value), device=device)


def check_features(loss: str, image_BD: torch.Tensor, text_BD: torch.Tensor) -> None:
    """Image and text features must both be [B, D] with the same B >= 1 and D."""
    for name, t in (("image_features", image_BD), ("text_features", text_BD)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[0] == 0:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{loss}: {name} must be a non-empty [B, D] tensor, got {shape}")
    if image_BD.shape != text_BD.shape:
        raise ValueError(
            f"{loss}: image_features {tuple(image_BD.shape)} and text_features {tuple(text_BD.shape)} must have the "
            "same shape [B, D] (one caption per image, same embedding width)"
        )
    if image_BD.dtype != text_BD.dtype:
        dtypes = f"image_features {image_BD.dtype}, text_features {text_BD.dtype}"
        raise ValueError(f"{loss}: features must share a dtype, got {dtypes}")


def check_scalar(loss: str, name: str, value) -> None:
    """A logit scale or bias is a python number or a one-element tensor (usually a 0-dim nn.Parameter)."""
    if isinstance(value, torch.Tensor) and value.numel() != 1:
        raise ValueError(f"{loss}: {name} must be a python number or a one-element tensor, got {tuple(value.shape)}")
    if not isinstance(value, (torch.Tensor, int, float)):
        raise ValueError(f"{loss}: {name} must be a python number or a one-element tensor, got {type(value).__name__}")
