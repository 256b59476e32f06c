"""DINO under the DeepSpeed engine with real gloo ranks.

1. After k optimizer steps on the same global batches, the teacher and the center under 2 ranks with ZeRO-2 and
   ZeRO-3 equal a single-process run (the EMA reads partitioned student weights under ZeRO-3; the center averages
   over the global batch).
2. A checkpoint restores the teacher, the center, the optimizer and the schedules exactly: a fresh engine that
   loads it then takes the same next step as the engine that wrote it.

Each world runs in fresh spawned processes (tests/gloo.py; DeepSpeed keeps process-global state).
"""

import os

import pytest
import torch

from tests.gloo import run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GLOBAL_B, G, N, STEPS = 4, 2, 2, 3

pytestmark = pytest.mark.distributed


def _cfg(*overrides):
    from fastenc.config import load_config

    return load_config(os.path.join(ROOT, "configs/cpu/dino_tiny.yaml"), [
        "model.name=vit_test", "model.attn_impl=math", "objective.out_dim=40", "objective.hidden_dim=32",
        "objective.bottleneck_dim=16", f"objective.local_crops={N}", "objective.local_crop_size=16",
        "objective.momentum_teacher=0.9", "objective.freeze_last_layer_steps=1",
        "objective.warmup_teacher_temp_steps=2", "objective.teacher_temp=0.06",
        f"data.batch_size={GLOBAL_B}", "schedule.steps=10", "schedule.warmup_steps=2", "optim.lr=1e-2",
        *overrides])


def _global_batch(step):
    g = torch.Generator().manual_seed(100 + step)
    return {"global": torch.randn(GLOBAL_B, G, 3, 32, 32, generator=g),
            "local": torch.randn(GLOBAL_B, N, 3, 16, 16, generator=g)}


def _engine(cfg, world, seed=0):
    import deepspeed

    from fastenc.config import batch_layout
    from fastenc.engine.deepspeed_config import build_ds_config
    from fastenc.engine.optim import build_optimizer
    from fastenc.engine.schedules import PrecomputedLR, warmup_cosine
    from fastenc.objectives import build_objective

    torch.manual_seed(seed)
    obj = build_objective(cfg)
    micro, accum = batch_layout(cfg, world)
    opt = build_optimizer(obj, cfg.optim, obj.no_weight_decay())
    sched = PrecomputedLR(opt, warmup_cosine(cfg.optim.lr, cfg.schedule.steps, cfg.schedule.warmup_steps))
    engine, _, _, _ = deepspeed.initialize(model=obj, optimizer=opt, lr_scheduler=sched,
                                           config=build_ds_config(cfg, micro, accum, world), dist_init_required=False)
    return engine, micro


def _step(engine, micro, step, rank):
    module = engine.module
    module.on_step_start(step)
    batch = {k: v[rank * micro:(rank + 1) * micro] for k, v in _global_batch(step).items()}
    loss, _ = engine(batch)
    engine.backward(loss)
    engine.step()
    module.on_step_end(step)


def _snapshot(module):
    return {k: v.clone() for k, v in module.extra_state().items()}


def _worker(rank, world, zero_stage, out_dir, check_resume):
    from fastenc.engine.checkpoint import load_checkpoint, save_checkpoint
    from fastenc.engine.distributed import init_distributed

    init_distributed(None)  # from the env that run_ranks sets, as under the deepspeed launcher
    cfg = _cfg(f"engine.zero_stage={zero_stage}")
    engine, micro = _engine(cfg, world)
    init = _snapshot(engine.module)
    for step in range(STEPS):
        _step(engine, micro, step, rank)
    out = {"state": _snapshot(engine.module), "init": init}
    if check_resume:
        ckpt = os.path.join(out_dir, "ckpt")
        save_checkpoint(engine, ckpt, STEPS, {"step": STEPS}, is_main=rank == 0,
                        extra_state=engine.module.extra_state())
        fresh, _ = _engine(cfg, world, seed=123)  # different init: everything must come from the checkpoint
        client = load_checkpoint(fresh, ckpt, fresh.module)
        out["client_step"] = client["step"]
        out["restored"] = _snapshot(fresh.module)
        _step(engine, micro, STEPS, rank)
        _step(fresh, micro, STEPS, rank)
        out["next_original"], out["next_restored"] = _snapshot(engine.module), _snapshot(fresh.module)
    return out


def _run(world, zero_stage, out_dir, check_resume=False):
    return run_ranks(_worker, world, out_dir, zero_stage, str(out_dir), check_resume, start_method="spawn",
                     timeout_s=300, init_process_group=False)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    res = _run(1, 0, tmp_path_factory.mktemp("single"))[0]
    # The comparison means something only if the teacher and the center moved.
    moved = [k for k, v in res["state"].items() if not torch.allclose(v, res["init"][k])]
    assert "center" in moved and sum(k.startswith("teacher.encoder.blocks") for k in moved) > 4
    return res["state"]


def _assert_state_close(got, want, what):
    assert set(got) == set(want)
    for k, w in want.items():
        atol = 1e-5 * w.abs().max().item() + 1e-7
        torch.testing.assert_close(got[k], w, rtol=1e-4, atol=atol, msg=lambda m: f"{what} {k}: {m}")


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_two_ranks_teacher_and_center_equal_single_process(zero_stage, single, tmp_path):
    ranks = _run(2, zero_stage, tmp_path)
    for r, res in enumerate(ranks):
        _assert_state_close(res["state"], single, f"ZeRO-{zero_stage} rank {r}")


def test_checkpoint_restores_teacher_center_and_schedules_exactly(tmp_path):
    res = _run(1, 2, tmp_path, check_resume=True)[0]
    assert res["client_step"] == STEPS
    for k, v in res["state"].items():
        assert torch.equal(res["restored"][k], v), k
    for k, v in res["next_original"].items():
        assert torch.equal(res["next_restored"][k], v), k
