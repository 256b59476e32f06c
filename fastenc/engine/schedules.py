"""Per-step schedules, precomputed once (DINOv2 style): no schedule math in the hot loop, exact on resume."""

from __future__ import annotations

import math

import numpy as np
import torch


def warmup_cosine(base: float, steps: int, warmup_steps: int, final: float = 0.0, start: float = 0.0) -> np.ndarray:
    """Linear warmup start -> base over warmup_steps, then cosine base -> final; value at step i is out[i]."""
    warm = np.linspace(start, base, warmup_steps, endpoint=False) if warmup_steps else np.zeros(0)
    n = steps - warmup_steps
    t = np.arange(n) / max(n, 1)
    cos = final + 0.5 * (base - final) * (1 + np.cos(math.pi * t))
    return np.concatenate([warm, cos])


class PrecomputedLR(torch.optim.lr_scheduler.LRScheduler):
    """Sets every param group's lr from a precomputed table (times the group's `lr_scale`, default 1).

    DeepSpeed calls step() once per optimizer step and saves/restores state_dict() with its checkpoints, so the
    schedule resumes exactly.
    """

    def __init__(self, optimizer, table: np.ndarray, last_epoch: int = -1):
        self.table = [float(x) for x in table]
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        i = min(max(self.last_epoch, 0), len(self.table) - 1)
        return [self.table[i] * g.get("lr_scale", 1.0) for g in self.optimizer.param_groups]
