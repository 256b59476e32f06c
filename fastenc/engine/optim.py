"""AdamW parameter groups: no weight decay on biases, norms (all 1-D params), embeddings and logit scale/bias.

The groups are laid out so that every parameter stays 16-byte aligned once DeepSpeed flattens them. ZeRO-1/2 and
the bf16 optimizer concatenate each parameter group into one flat buffer and turn the module's parameters into
views of it, in group order. A parameter whose size is not a multiple of ALIGN_ELEMS (a 1-element logit scale)
shifts every parameter after it off the 16-byte boundary, and cuBLAS then leaves its Hopper GEMMs for a generic
kernel on every biased Linear (measured on an H200: 959 us instead of 208 us per addmm, the whole step 2.3x slower).
So each group holds its aligned parameters first and at most one ragged parameter, last; every further ragged
parameter gets a group of its own with the same hyperparameters. The flat buffers start aligned (allocations are).
"""

from __future__ import annotations

import torch
from torch import nn

ALIGN_BYTES = 16
ALIGN_ELEMS = 8
"""Parameters whose numel is a multiple of this keep the next one 16-byte aligned at 2-byte (bf16/fp16) and
4-byte (fp32) element sizes alike."""


def aligned_groups(group: dict) -> list[dict]:
    """Split one parameter group so that, flattened in order, every parameter starts 16-byte aligned: the aligned
    parameters plus one ragged one (last), then one group per remaining ragged parameter (named name.ragged<i>)."""
    params = list(group["params"])
    aligned = [p for p in params if p.numel() % ALIGN_ELEMS == 0]
    ragged = [p for p in params if p.numel() % ALIGN_ELEMS != 0]
    hyper = {k: v for k, v in group.items() if k != "params"}
    groups = [{**hyper, "params": aligned + ragged[:1]}] if aligned or ragged else []
    for i, p in enumerate(ragged[1:], start=1):
        groups.append({**hyper, "params": [p], "name": f"{hyper.get('name', 'group')}.ragged{i}"})
    return groups


def param_groups(module: nn.Module, weight_decay: float, no_decay_names: set[str] = frozenset()) -> list[dict]:
    """Trainable parameters in groups by weight decay (none on biases, norms and no_decay_names) and by the
    module's `lr_scale(name)` where it has one (fastenc.objectives.base.Objective); frozen ones are left out."""
    lr_scale = getattr(module, "lr_scale", lambda name: 1.0)
    groups: dict[tuple[bool, float], list] = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        decay = not (p.ndim <= 1 or name in no_decay_names or name.endswith(".bias"))
        groups.setdefault((decay, float(lr_scale(name))), []).append(p)
    out = []
    for (decay, scale), params in sorted(groups.items(), key=lambda kv: (not kv[0][0], kv[0][1] != 1.0, kv[0][1])):
        group = {"params": params, "weight_decay": weight_decay if decay else 0.0,
                 "name": ("decay" if decay else "no_decay") + (f"@lr_scale{scale:g}" if scale != 1.0 else "")}
        if scale != 1.0:
            group["lr_scale"] = scale
        out += aligned_groups(group)
    return out


def order_parameters_for_alignment(module: nn.Module) -> None:
    """Within every submodule, register the parameters whose numel is a multiple of ALIGN_ELEMS first.

    ZeRO-3 gathers one module's own parameters into one buffer in registration order while it runs; with the
    ragged ones last, all the others start aligned. (Two ragged parameters of one module, such as SigLIP's one-element
    logit scale and bias, cannot both be: scalars, which never reach a GEMM.)"""
    for sub in module.modules():
        params = sub._parameters
        if any(p is not None and p.numel() % ALIGN_ELEMS for p in params.values()):
            order = sorted(params, key=lambda n: params[n] is not None and params[n].numel() % ALIGN_ELEMS != 0)
            sub._parameters = type(params)((n, params[n]) for n in order)


def misaligned_parameters(module: nn.Module) -> list[tuple[str, int]]:
    """(name, data_ptr % ALIGN_BYTES) of every parameter holding data that does not start on a 16-byte boundary."""
    return [(n, p.data_ptr() % ALIGN_BYTES) for n, p in module.named_parameters()
            if p.numel() and p.data_ptr() % ALIGN_BYTES]


def build_optimizer(module: nn.Module, optim_cfg, no_decay_names: set[str]) -> torch.optim.Optimizer:
    """torch AdamW, fused: DeepSpeed wraps it, so no DeepSpeed op has to be JIT-built on CPU.

    Fused on CPU and CUDA alike: one kernel over all parameters (5x faster than the default on a CPU), and its step
    counter lives on the parameters' device, where the default's CPU counter is read with .item() every step."""
    groups = param_groups(module, optim_cfg.weight_decay, no_decay_names)
    return torch.optim.AdamW(groups, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps, fused=True)


@torch.no_grad()
def clip_grad_per_param_(parameters, max_norm: float) -> None:
    """facebookresearch/dino's clip_gradients: scale each gradient whose norm exceeds max_norm to about max_norm
    (factor max_norm / (norm + 1e-6)), parameter by parameter, in place."""
    for p in parameters:
        if p.grad is None:
            continue
        norm = p.grad.detach().norm(2)
        factor = max_norm / (norm + 1e-6)
        p.grad.mul_(torch.where(factor < 1, factor, torch.ones_like(factor)))
