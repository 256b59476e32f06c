"""End-to-end training through the engine: each objective learns, resume continues, corrupt samples are counted,
and the real launchers (deepspeed, torchrun) run 2 gloo ranks under ZeRO-2 and ZeRO-3."""

import os
import subprocess
import sys

import numpy as np
import pytest

from fastenc.engine.distributed import free_port
from fastenc.run.metrics import read_metrics
from tests.engine.conftest import ROOT, tiny_overrides, train_isolated

RECIPE = {"clip": "configs/cpu/clip_tiny.yaml", "siglip": "configs/cpu/siglip_tiny.yaml"}
_train = train_isolated


@pytest.mark.parametrize("objective", ["clip", "siglip"])
def test_objective_trains_loss_decreases(objective, tiny_data, tmp_path):
    res = _train(RECIPE[objective], tiny_overrides(tiny_data, tmp_path, "schedule.steps=25", "engine.zero_stage=0",
                                                   f"run.name={objective}"))
    rows = read_metrics(res.metrics_path)
    losses = np.array([r["loss"] for r in rows])
    assert len(rows) == 25 and np.all(np.isfinite(losses))
    assert losses[-5:].mean() < 0.8 * losses[:3].mean(), losses
    # run dir contents promised by launch/README.md (fastenc.run.layout)
    for name in ("config.yaml", "metrics.jsonl", "loss.png", "export/encoder.safetensors", "checkpoints/latest"):
        assert os.path.exists(os.path.join(res.run_dir, name)), name
    assert {"lr", "samples_per_s", "step_time", "data_wait", "num_skipped", "logit_scale"} <= set(rows[-1])


@pytest.mark.parametrize("stage,precision,micro", [(0, "fp32", None), (1, "fp32", 8), (2, "bf16", None),
                                                   (3, "bf16", 8), (1, "bf16", None)])
def test_zero_stages_precisions_accumulation_and_export(stage, precision, micro, tiny_data, tmp_path):
    """Every ZeRO stage / precision trains (with gradient accumulation when micro < global batch) and exports an
    fp32 encoder that loads strictly into create_vit; bf16 and ZeRO>0 exports come from the fp32 master weights."""
    import torch

    from fastenc.run.weights import load_encoder_state
    from fastenc.models import create_vit

    extra = [f"engine.zero_stage={stage}", f"engine.precision={precision}", "schedule.steps=3"]
    extra += [f"engine.micro_batch_size={micro}"] if micro else []
    res = _train(RECIPE["clip"], tiny_overrides(tiny_data, tmp_path, *extra))
    rows = read_metrics(res.metrics_path)
    assert [r["samples_seen"] for r in rows] == [16, 32, 48]
    assert all(np.isfinite(r["loss"]) for r in rows)
    state = load_encoder_state(res.export_paths["encoder"])
    model = create_vit("vit_test")
    model.load_state_dict(state, strict=True)
    assert all(v.dtype == torch.float32 for v in state.values())
    if precision == "bf16":  # master weights, not bf16-rounded copies: some value is not representable in bf16
        assert any((v != v.bfloat16().float()).any() for v in state.values())


def test_resume_continues_step_schedule_and_metrics(tiny_data, tmp_path):
    ov = tiny_overrides(tiny_data, tmp_path, "schedule.steps=6", "engine.zero_stage=2", "run.name=r",
                        "engine.checkpoint_every=3")
    first = _train(RECIPE["clip"], ov, max_steps=3)
    assert first.steps == 3
    second = _train(RECIPE["clip"], ov, resume=first.run_dir)
    assert second.run_dir == first.run_dir and second.steps == 6
    rows = read_metrics(second.metrics_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["samples_seen"] for r in rows] == [16 * s for s in range(1, 7)]
    # The precomputed schedule resumed exactly: lr logged after step 4 is the table's value for step 4.
    from fastenc.engine.schedules import warmup_cosine

    table = warmup_cosine(2e-3, 6, 2)
    assert np.allclose([r["lr"] for r in rows], [table[min(s, 5)] for s in range(1, 7)])
    kept = sorted(d for d in os.listdir(os.path.join(first.run_dir, "checkpoints")) if not d.endswith(".py"))
    assert kept == ["latest", "step00000003", "step00000006"]


def test_fresh_run_never_overwrites(tiny_data, tmp_path):
    ov = tiny_overrides(tiny_data, tmp_path, "schedule.steps=1", "schedule.warmup_steps=0", "run.name=same")
    a = _train(RECIPE["clip"], ov, export=False, plot=False)
    b = _train(RECIPE["clip"], ov, export=False, plot=False)
    assert a.run_dir != b.run_dir and b.run_dir.endswith("same-2")


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_one_percent_corrupt_samples_run_completes_and_counts_them(tiny_data, corrupt_shard, tmp_path, backend):
    """516 good samples and 4 corrupt ones (truncated JPEG, text in .jpg, no .txt, non-UTF-8 caption): 0.8 %."""
    if backend == "dali":
        pytest.importorskip("nvidia.dali", reason="DALI is not installed")
    shards = f"{tiny_data['shards']},{corrupt_shard}"
    ov = tiny_overrides(tiny_data, tmp_path, "schedule.steps=33", f"data.train_shards={shards}",
                        "data.resampled=false", "data.shuffle_buffer=1", f"data.backend={backend}",
                        f"data.index_dir={tmp_path / 'idx'}", "engine.log_every=11")
    res = _train(RECIPE["clip"], ov, export=False, plot=False)
    rows = read_metrics(res.metrics_path)
    assert [r["step"] for r in rows] == [11, 22, 33] and all(np.isfinite(r["loss"]) for r in rows)
    if backend == "torch":
        # Skipped as they are met: one epoch is 516 // 16 = 32 batches and step 33 starts the next, so the corrupt
        # shard was read once (4 skips) or, if the next epoch's order starts with it, twice (8).
        assert rows[-1]["num_skipped"] in (4, 8) and rows[-1]["num_excluded"] == 0
    else:
        # Left out by the index validation before training (2 bad images, 2 bad captions), reported on every row.
        assert rows[-1]["num_skipped"] == 0 and all(r["num_excluded"] == 4 for r in rows)


def _launch(cmd, tmp_path, timeout=420):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def _check_run(run_dir, steps):
    rows = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    assert [r["step"] for r in rows][-1] == steps
    assert all(np.isfinite(r["loss"]) for r in rows)
    cfg_text = open(os.path.join(run_dir, "config.yaml")).read()
    return rows, cfg_text


@pytest.mark.distributed
@pytest.mark.parametrize("objective,stage", [("clip", 2), ("siglip", 3)])
def test_deepspeed_launcher_two_ranks(objective, stage, tiny_data, tmp_path):
    steps = 4
    ov = tiny_overrides(tiny_data, tmp_path, f"schedule.steps={steps}", f"engine.zero_stage={stage}", "run.name=ds")
    bin_dir = os.path.dirname(sys.executable)
    _launch([os.path.join(bin_dir, "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
             "launch/pretrain.py", "--config", RECIPE[objective], *ov], tmp_path)
    rows, _ = _check_run(os.path.join(tmp_path, "ds"), steps)
    assert os.path.exists(os.path.join(tmp_path, "ds", "export", "encoder.safetensors"))


@pytest.mark.distributed
def test_torchrun_two_ranks(tiny_data, tmp_path):
    steps = 3
    ov = tiny_overrides(tiny_data, tmp_path, f"schedule.steps={steps}", "engine.zero_stage=2", "run.name=tr")
    _launch([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
             str(free_port()), "launch/pretrain.py", "--config", RECIPE["clip"], *ov], tmp_path)
    _check_run(os.path.join(tmp_path, "tr"), steps)


def _dino_overrides(tiny_data, tmp_path, *extra):
    return ["model.name=vit_test", "data.batch_size=16", "data.num_workers=0", "data.shuffle_buffer=64",
            "data.synth.num_samples=0", "engine.log_every=1", "engine.tensorboard=false", "schedule.warmup_steps=2",
            "optim.lr=2e-3", f"data.train_shards={tiny_data['shards']}", f"run.output_dir={tmp_path}",
            "objective.out_dim=64", "objective.hidden_dim=64", "objective.bottleneck_dim=32",
            "objective.local_crops=2", "objective.local_crop_size=16", "objective.freeze_last_layer_steps=1",
            *extra]


def test_dino_trains_resumes_and_exports_the_teacher(tiny_data, tmp_path):
    import json

    import torch
    from safetensors.torch import load_file

    ov = _dino_overrides(tiny_data, tmp_path, "schedule.steps=6", "engine.zero_stage=2", "run.name=d",
                         "engine.checkpoint_every=3")
    first = _train("configs/cpu/dino_tiny.yaml", ov, max_steps=3)
    ckpt = os.path.join(first.run_dir, "checkpoints", "step00000003", "objective_extra.safetensors")
    saved = load_file(ckpt)
    assert "center" in saved and any(k.startswith("teacher.encoder.blocks") for k in saved)
    second = _train("configs/cpu/dino_tiny.yaml", ov, resume=first.run_dir)
    rows = read_metrics(second.metrics_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and all(np.isfinite(r["loss"]) for r in rows)
    assert {"teacher_mean_entropy", "teacher_entropy", "teacher_temp", "teacher_momentum"} <= set(rows[-1])
    # momentum schedule continued from the resumed step: cosine 0.99 -> 1 over 6 steps, logged for steps 0..5
    want = [1 - 0.01 * (np.cos(np.pi * s / 6) + 1) / 2 for s in range(6)]
    assert np.allclose([r["teacher_momentum"] for r in rows], want, atol=1e-6)
    # the exported encoder is the teacher's backbone, and it loads strictly into the ViT
    enc = load_file(second.export_paths["encoder"])
    obj = load_file(second.export_paths["objective"])
    assert all(torch.equal(v, obj[f"teacher.encoder.{k}"]) for k, v in enc.items())
    assert not all(torch.equal(v, obj[f"encoder.{k}"]) for k, v in enc.items())  # not the student
    from fastenc.models import create_vit

    create_vit("vit_test").load_state_dict(enc, strict=True)
    fp = json.load(open(os.path.join(first.run_dir, "fingerprint.json")))
    assert fp["keys"]["data.shard_listing"] and "objective.name" not in fp["keys"]


def test_dino_per_parameter_clipping_under_zero_0(tiny_data, tmp_path):
    res = _train("configs/cpu/dino_tiny.yaml", _dino_overrides(tiny_data, tmp_path, "schedule.steps=2",
                                                                "engine.zero_stage=0", "optim.clip_grad_per_param=0.5",
                                                                "optim.clip_grad=0"), export=False, plot=False)
    rows = read_metrics(res.metrics_path)
    assert len(rows) == 2 and all(np.isfinite(r["loss"]) for r in rows)
