"""Choosing a loss implementation by name, and the input checks every loss shares.

Each loss keeps a registry `{name: Impl}` ordered fastest first. `impl="auto"` takes the first available entry
(and warns once if it had to skip a faster one); an explicitly requested entry whose dependency is missing raises
`MissingDependency` (ARCHITECTURE.md, principle 4). A new fast path ("chunked", "native", "triton") is one more
registry entry plus its name in `LOSS_IMPLS`.
Shapes: B = local batch, D = feature dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from fastenc.utils.optional import is_available, require, warn_once

# Every value the `impl=` argument of a loss accepts; a given loss may implement a subset (its error lists which).
LOSS_IMPLS = ("auto", "reference", "chunked")


@dataclass(frozen=True)
class Impl:
    """One implementation of a loss: `fn` and the optional module it needs (None: always available)."""

    fn: Callable
    requires: str | None = None

    def available(self) -> bool:
        return self.requires is None or is_available(self.requires)


def resolve_impl(loss: str, impl: str, registry: dict[str, Impl]) -> Callable:
    """The function registered under `impl` ("auto": the first available one, registry order = preference)."""
    if impl == "auto":
        for name, entry in registry.items():
            if entry.available():
                return entry.fn
            warn_once(f"{loss}:{name}", f"{loss}: impl '{name}' unavailable ({entry.requires} missing), falling back")
        raise RuntimeError(f"{loss}: no implementation is available")  # unreachable while 'reference' is registered
    if impl not in registry:
        choices = ", ".join(repr(n) for n in ("auto", *registry))
        raise ValueError(f"{loss}: unknown impl {impl!r}; valid choices: {choices}")
    entry = registry[impl]
    if not entry.available():
        require(entry.requires, f"{loss}(impl={impl!r})")  # raises MissingDependency with the install hint
    return entry.fn


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
