"""The DINO objective: multi-resolution forward equals the reference loss, EMA, center, last-layer freezing."""

import os

import pytest
import torch

from fastenc.config import load_config
from fastenc.losses.dino import dino_loss_ref

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
B, G, N = 3, 2, 3


def _cfg(*overrides):
    return load_config(os.path.join(ROOT, "configs/cpu/dino_tiny.yaml"),
                       ["model.name=vit_test", "model.attn_impl=math", "objective.out_dim=50",
                        "objective.hidden_dim=32", "objective.bottleneck_dim=16", f"objective.local_crops={N}",
                        "objective.local_crop_size=16", "schedule.steps=10", "schedule.warmup_steps=2",
                        *overrides])


def _build(*overrides):
    from fastenc.objectives import build_objective

    torch.manual_seed(0)
    return build_objective(_cfg(*overrides))


def _batch(seed=1, size=32):
    g = torch.Generator().manual_seed(seed)
    return {"global": torch.randn(B, G, 3, size, size, generator=g),
            "local": torch.randn(B, N, 3, 16, 16, generator=g)}


def test_forward_equals_reference_over_two_resolutions():
    obj = _build("objective.warmup_teacher_temp_steps=4", "objective.warmup_teacher_temp=0.04",
                 "objective.teacher_temp=0.07", "objective.freeze_last_layer_steps=0")
    obj.on_step_start(2)
    batch = _batch()
    # Make the teacher differ from the student and the center non-zero, so both matter.
    with torch.no_grad():
        for p in obj.teacher.parameters():
            p.add_(0.01 * torch.randn_like(p))
        obj.center.copy_(0.1 * torch.randn_like(obj.center))
    loss, metrics = obj(batch)
    loss.backward()
    got = {n: p.grad.clone() for n, p in obj.named_parameters() if p.grad is not None}

    obj.zero_grad()
    glob = batch["global"].transpose(0, 1).reshape(G * B, 3, 32, 32)  # crop-major
    loc = batch["local"].transpose(0, 1).reshape(N * B, 3, 16, 16)
    student = torch.cat([obj.head(obj.encoder(glob)), obj.head(obj.encoder(loc))])
    with torch.no_grad():
        teacher = obj.teacher.head(obj.teacher.encoder(glob))
    temp = 0.04 + (0.07 - 0.04) * 2 / 4
    assert metrics["teacher_temp"].item() == pytest.approx(temp)
    want = dino_loss_ref(student, teacher, obj.center, 0.1, temp, G)
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    for n, p in obj.named_parameters():
        if p.grad is None:
            assert n not in got
            continue
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-5 * p.grad.abs().max().item() + 1e-9,
                                   msg=lambda m: f"{n}: {m}")
    assert not any(n.startswith("teacher") for n, _ in obj.named_parameters())  # not optimized, not registered


def test_ema_center_and_schedules():
    obj = _build("objective.momentum_teacher=0.9", "objective.center_momentum=0.8")
    assert obj.teacher_momentum(0) == pytest.approx(0.9) and obj.teacher_momentum(10) == pytest.approx(1.0)
    assert obj.teacher_momentum(5) == pytest.approx(0.95)
    # Teacher starts as a copy of the student (without drop-path).
    for (n, s), t in zip(obj.encoder.state_dict().items(), obj.teacher.encoder.state_dict().values()):
        assert torch.equal(s, t), n
    with torch.no_grad():
        for p in obj.encoder.parameters():
            p.add_(1.0)
    before = {k: v.clone() for k, v in obj.teacher.state_dict().items()}
    obj.on_step_start(0)
    _, _ = obj(_batch())
    with torch.no_grad():
        glob = _batch()["global"].transpose(0, 1).reshape(G * B, 3, 32, 32)
        teacher_mean = obj.teacher.head(obj.teacher.encoder(glob)).mean(0, keepdim=True)
    old_center = obj.center.clone()
    obj.on_step_end(0)
    torch.testing.assert_close(obj.center, 0.8 * old_center + 0.2 * teacher_mean, rtol=1e-5, atol=1e-6)
    m = obj.teacher_momentum(0)
    student = {f"encoder.{k}": v for k, v in obj.encoder.state_dict().items()}
    student.update({f"head.{k}": v for k, v in obj.head.state_dict().items()})
    for k, v in obj.teacher.state_dict().items():
        torch.testing.assert_close(v, m * before[k] + (1 - m) * student[k], msg=k)


def test_last_layer_frozen_for_the_first_steps():
    obj = _build("objective.freeze_last_layer_steps=2")
    for step, frozen in ((0, True), (1, True), (2, False)):
        obj.zero_grad()
        obj.on_step_start(step)
        loss, _ = obj(_batch())
        loss.backward()
        g = obj.head.last_layer_v.grad
        assert (g is None or not g.any()) == frozen, step
        assert obj.head.mlp[0].weight.grad.abs().sum() > 0


def test_extra_state_roundtrip():
    a, b = _build(), _build("run.seed=3")
    with torch.no_grad():
        for p in a.teacher.parameters():
            p.mul_(1.5)
        a.center.add_(0.3)
    b.load_extra_state(a.extra_state())
    for (k, va), vb in zip(a.teacher.state_dict().items(), b.teacher.state_dict().values()):
        assert torch.equal(va, vb), k
    assert torch.equal(a.center, b.center)
    with pytest.raises(RuntimeError):
        b.load_extra_state({k: v for k, v in a.extra_state().items() if "blocks.0" not in k})


def test_config_errors():
    from fastenc.config import ConfigError

    with pytest.raises(ConfigError, match="local_crop_size=15 is not a multiple of the patch size"):
        _build("objective.local_crop_size=15")
    with pytest.raises(ConfigError, match="objective.teacher_tmp.*teacher_temp"):
        _cfg("objective.teacher_tmp=0.1")
