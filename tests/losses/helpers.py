"""Shared helpers for the loss tests: inputs, value+gradient capture, error measures, dtype tolerances."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from fastenc.utils.optional import is_available


def fast_impls() -> list[str]:
    """The fast implementations that run here: chunked always, native when fastenc._C is built, triton on CUDA or
    under the interpreter (tests/conftest.py sets TRITON_INTERPRET=1 when there is no GPU)."""
    out = ["chunked"]
    if is_available("fastenc._C"):
        out.append("native")
    if is_available("triton") and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        out.append("triton")
    return out


# bf16 keeps 8 significant bits: one rounding has relative error at most u = 2^-8 (eps = 2^-7 = 2u).
BF16_U = 2.0**-8


def unit_features(B: int, D: int, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Two [B, D] sets of random L2-normalized features (normalized in fp32, then cast)."""
    img = F.normalize(torch.randn(B, D), dim=1)
    txt = F.normalize(torch.randn(B, D), dim=1)
    return img.to(dtype), txt.to(dtype)


def value_and_grads(fn, *inputs: torch.Tensor) -> list[torch.Tensor]:
    """[loss, d loss/d input for each input], every input a fresh leaf that requires grad; all returned in fp32."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    loss = fn(*leaves)
    loss.backward()
    return [loss.detach().float()] + [t.grad.float() for t in leaves]


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| (0 when both are exactly zero, e.g. CLIP gradients at B = 1)."""
    diff = (got - want).norm().item()
    return 0.0 if diff == 0.0 else diff / max(want.norm().item(), 1e-30)
