"""Shared helpers for the loss tests: inputs, value+gradient capture, error measures, dtype tolerances."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastenc.losses.dispatch import usable_impls


def fast_impls() -> list[str]:
    """The fast implementations that run here (fastenc.losses.dispatch.usable_impls on CPU tensors): chunked always,
    native when fastenc._C is built, triton on CPU under the interpreter (tests/conftest.py sets TRITON_INTERPRET=1
    when there is no GPU). The three losses register the same names."""
    from fastenc.losses.contrastive import _CLIP_IMPLS

    return [name for name in usable_impls(_CLIP_IMPLS, "cpu") if name != "reference"]


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


def saved_not_inputs(fn, student, teacher, center) -> int:
    """Elements autograd keeps for backward that are not (views of) the inputs: what the loss allocates to keep."""
    student = student.clone().requires_grad_()
    inputs = {t.untyped_storage().data_ptr() for t in (student, teacher, center)}
    own = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in inputs:
            own.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(student, teacher, center)
    return sum(own)
