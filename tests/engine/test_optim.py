"""Per-parameter gradient clipping (DINO's clip_gradients) and its config guard."""

import os

import pytest
import torch

from fastenc.config import ConfigError, load_config
from fastenc.engine.optim import clip_grad_per_param_

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_clip_grad_per_param_matches_reference():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)] + [torch.nn.Parameter(torch.randn(2))]
    grads = [torch.randn(5, 3) * 10, torch.randn(5, 3) * 0.01, torch.zeros(5, 3), torch.randn(2)]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    no_grad = torch.nn.Parameter(torch.randn(4))
    clip_grad_per_param_(params + [no_grad], 1.0)
    for p, g in zip(params, grads):  # facebookresearch/dino utils.clip_gradients, written out
        norm = g.norm(2)
        coef = 1.0 / (norm + 1e-6)
        want = g * coef if coef < 1 else g
        torch.testing.assert_close(p.grad, want)
    assert params[0].grad.norm() == pytest.approx(1.0, rel=1e-5) and no_grad.grad is None


def test_needs_zero_stage_0():
    recipe = os.path.join(ROOT, "configs/cpu/dino_tiny.yaml")
    load_config(recipe, ["optim.clip_grad_per_param=3.0", "engine.zero_stage=0"])
    with pytest.raises(ConfigError, match="clip_grad_per_param needs engine.zero_stage=0"):
        load_config(recipe, ["optim.clip_grad_per_param=3.0", "engine.zero_stage=2"])
