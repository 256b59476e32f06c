"""AdamW parameter groups: no weight decay on biases, norms (all 1-D params), embeddings and logit scale/bias."""

from __future__ import annotations

import torch
from torch import nn


def param_groups(module: nn.Module, weight_decay: float, no_decay_names: set[str] = frozenset()) -> list[dict]:
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name in no_decay_names or name.endswith(".bias"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


def build_optimizer(module: nn.Module, optim_cfg, no_decay_names: set[str]) -> torch.optim.Optimizer:
    """torch AdamW (fused on CUDA): DeepSpeed wraps it, so no DeepSpeed op has to be JIT-built on CPU."""
    groups = param_groups(module, optim_cfg.weight_decay, no_decay_names)
    fused = torch.cuda.is_available()
    return torch.optim.AdamW(groups, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps, fused=fused)


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
