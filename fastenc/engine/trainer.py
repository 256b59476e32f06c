"""The training loop: identical for every objective.

    fetch batch -> objective forward -> engine.backward -> engine.step -> objective.on_step_end -> log

The hot loop never syncs the host except on logging steps (loss and metrics are accumulated as device tensors and
read with one all-reduce + .tolist() every `engine.log_every` steps).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass

import torch

from fastenc.config import Config, batch_layout, config_hash, config_to_yaml
from fastenc.data.spec import ImageNormalizer
from fastenc.engine.checkpoint import (
    atomic_write_text,
    export_from_state_dict,
    fp32_state_dict,
    load_checkpoint,
    load_data_state,
    save_checkpoint,
)
from fastenc.engine.deepspeed_config import build_engine
from fastenc.engine.distributed import DistInfo, barrier, broadcast_object, init_distributed
from fastenc.engine.logging import MetricsLogger
from fastenc.engine.optim import clip_grad_per_param_

log = logging.getLogger("fastenc")


@dataclass
class TrainResult:
    run_dir: str
    steps: int
    final_loss: float
    metrics_path: str
    plot_path: str | None
    export_paths: dict


def _pick_run_dir(cfg: Config, resume: str | None) -> str:
    """Resume: the named (or configured) run dir. Fresh run: output_dir/name, suffixed -2, -3 ... if taken."""
    if resume:
        return cfg_run_dir(cfg) if resume == "auto" else resume
    base = cfg_run_dir(cfg)
    path, i = base, 2
    while os.path.exists(path):
        path, i = f"{base}-{i}", i + 1
    return path


def cfg_run_dir(cfg: Config) -> str:
    return os.path.join(cfg.run.output_dir, cfg.run.name)


def prepare_data(cfg: Config, dist: DistInfo) -> None:
    """Synthetic shards (if configured and absent) and objective assets, made once on rank 0."""
    from fastenc.data.shards import expand_shards
    from fastenc.objectives import get_objective

    if dist.is_main:
        if cfg.data.synth.num_samples > 0:
            try:
                expand_shards(cfg.data.train_shards)
            except FileNotFoundError:
                from fastenc.data.synth import write_synthetic_shards

                out = cfg.data.train_shards.rstrip("/")
                log.warning("no shards at %s: generating %d synthetic samples there", out, cfg.data.synth.num_samples)
                write_synthetic_shards(out, cfg.data.synth.num_samples, image_size=cfg.data.synth.image_size,
                                       seed=cfg.run.seed, samples_per_shard=cfg.data.synth.samples_per_shard)
        expand_shards(cfg.data.train_shards)  # clear error now rather than inside a worker
        from fastenc.data.stream import prepare_indexes

        prepare_indexes(cfg)  # DALI index files, validated (data.backend=dali)
        get_objective(cfg.objective.name).prepare(cfg)
    barrier()


def _describe_stream(stream) -> str:
    if stream.backend == "dali":
        text = f"dali-{stream.device} ({stream.num_threads} threads)"
        if stream.num_excluded:
            text += f", {stream.num_excluded} corrupt samples left out by index validation"
        return text
    return "torch (PIL + torchvision workers)"


def _to_device(batch: dict, device: torch.device, float_dtype: torch.dtype, normalize: ImageNormalizer) -> dict:
    """The batch on the device (non-blocking from the loader's pinned memory), its uint8 images normalized there
    and every floating tensor in the engine's precision."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, non_blocking=True)
            if v.is_floating_point():
                v = v.to(float_dtype)
        out[k] = v
    return normalize(out, float_dtype)


def train(cfg: Config, *, resume: str | None = None, local_rank: int | None = None, max_steps: int | None = None,
          export: bool = True, plot: bool = True, final_checkpoint: bool = True) -> TrainResult:
    """Train `cfg` to cfg.schedule.steps (or stop after `max_steps` more steps, for tests and benchmarks).

    export / plot / final_checkpoint=False skip the encoder export, the loss plot and the checkpoint at the last
    step (benchmarks; engine.checkpoint_every still applies)."""
    from fastenc.data.stream import build_train_stream
    from fastenc.objectives import build_objective

    dist = init_distributed(local_rank)
    run_dir = broadcast_object(_pick_run_dir(cfg, resume) if dist.is_main else None)
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    if dist.is_main:
        os.makedirs(run_dir, exist_ok=True)
        atomic_write_text(os.path.join(run_dir, "config.yaml"), config_to_yaml(cfg))
    prepare_data(cfg, dist)
    if dist.is_main:
        from fastenc.study import fingerprint

        # What a controlled comparison must share (everything but the objective), with the shards on disk.
        atomic_write_text(os.path.join(run_dir, "fingerprint.json"),
                          json.dumps(fingerprint(cfg, with_shards=True), indent=1, default=str) + "\n")

    torch.manual_seed(cfg.run.seed)
    objective = build_objective(cfg)
    if cfg.engine.compile:
        from fastenc.models.layers.block import compile_blocks

        compile_blocks(objective)
    micro, accum = batch_layout(cfg, dist.world_size)
    engine, scheduler = build_engine(cfg, objective, dist.world_size)
    module = engine.module
    float_dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float32

    start_step, samples_seen, skipped_total = 0, 0, 0
    data_state = None
    if resume:
        state = load_checkpoint(engine, ckpt_dir, module)
        if state is not None:
            start_step, samples_seen = state["step"], state["samples_seen"]
            skipped_total = state.get("num_skipped", 0)
            data_state = load_data_state(ckpt_dir, dist.rank)
            if dist.is_main and state.get("config_hash") != config_hash(cfg):
                log.warning("resuming with a config that differs from the checkpoint's (see config.yaml history)")
        elif dist.is_main:
            log.warning("--resume: no checkpoint in %s, starting from step 0", ckpt_dir)

    stream = build_train_stream(cfg, module, batch_size=micro, dist=dist, start_step=start_step, run_dir=run_dir)
    if data_state is not None:
        try:
            stream.load_state_dict(data_state)
        except ValueError as e:  # another data setup than the checkpoint's: say so, start the stream afresh
            log.warning("rank %d: data position not restored (%s); the data stream starts afresh", dist.rank, e)
    next_batch = stream.__next__
    normalize = ImageNormalizer.of(module.data_spec(train=True))

    end_step = cfg.schedule.steps if max_steps is None else min(cfg.schedule.steps, start_step + max_steps)
    logger = MetricsLogger(run_dir, enabled=dist.is_main, total_steps=cfg.schedule.steps, start_step=start_step,
                           tensorboard=cfg.engine.tensorboard)
    if dist.is_main:
        logger.message(f"fastenc: {cfg.objective.name} on {cfg.model.name}, world {dist.world_size}, "
                       f"global batch {cfg.data.batch_size} = {micro} x {accum} accum x {dist.world_size} ranks, "
                       f"ZeRO-{cfg.engine.zero_stage} {cfg.engine.precision}, device {dist.device.type}, "
                       f"data {_describe_stream(stream)}; run dir {run_dir}")

    sync = cfg.engine.detailed_timing and dist.device.type == "cuda"
    acc: dict[str, torch.Tensor] = {}
    t_fwd = t_bwd = t_step = t_data = 0.0
    interval_start, interval_steps = time.perf_counter(), 0
    last_loss = float("nan")
    engine.train()
    for step in range(start_step, end_step):
        module.on_step_start(step)
        for _ in range(accum):
            t0 = time.perf_counter()
            batch = next_batch()
            t1 = time.perf_counter()
            batch = _to_device(batch, dist.device, float_dtype, normalize)
            skipped = batch.pop("num_skipped", None)
            loss, metrics = engine(batch)
            if sync:
                torch.cuda.synchronize()
            t2 = time.perf_counter()
            engine.backward(loss)
            if cfg.optim.clip_grad_per_param and engine.is_gradient_accumulation_boundary():
                clip_grad_per_param_(module.parameters(), cfg.optim.clip_grad_per_param)  # ZeRO-0: grads averaged
            if sync:
                torch.cuda.synchronize()
            t3 = time.perf_counter()
            engine.step()  # optimizer + scheduler step only at the accumulation boundary
            if sync:
                torch.cuda.synchronize()
            t4 = time.perf_counter()
            t_data, t_fwd, t_bwd, t_step = t_data + t1 - t0, t_fwd + t2 - t1, t_bwd + t3 - t2, t_step + t4 - t3
            for k, v in {"loss": loss.detach(), **metrics}.items():
                acc[k] = acc.get(k, 0) + v.detach().float() / accum
            if skipped is not None:
                acc["_skipped"] = acc.get("_skipped", 0) + skipped.float()
        module.on_step_end(step)
        samples_seen += cfg.data.batch_size
        interval_steps += 1
        logger.advance()
        done = step + 1
        if done % cfg.engine.log_every == 0 or done == end_step:
            # The one host sync of the interval: mean over ranks of every metric, sum of skipped samples.
            keys = sorted(acc)
            vec = torch.stack([acc[k].reshape(()) for k in keys]).to(dist.device)
            if dist.world_size > 1:
                torch.distributed.all_reduce(vec)
            vals = dict(zip(keys, vec.tolist()))
            skipped_total += int(round(vals.pop("_skipped", 0.0)))
            row = {k: v / (interval_steps * dist.world_size) for k, v in vals.items()}
            elapsed = time.perf_counter() - interval_start
            row.update(
                samples_seen=samples_seen,
                lr=scheduler.get_last_lr()[0],
                samples_per_s=interval_steps * cfg.data.batch_size / elapsed,
                step_time=elapsed / interval_steps,
                data_wait=t_data / interval_steps,
                data_wait_frac=t_data / elapsed,
                forward_time=t_fwd / interval_steps,
                backward_time=t_bwd / interval_steps,
                optim_step_time=t_step / interval_steps,
                num_skipped=skipped_total,
                num_excluded=stream.num_excluded,
            )
            if dist.device.type == "cuda":  # a host-side counter: no sync
                row["peak_mem_gib"] = torch.cuda.max_memory_allocated(dist.device) / 2**30
            grad_norm = engine.get_global_grad_norm()
            if grad_norm is not None:
                row["grad_norm"] = float(grad_norm)
            last_loss = row["loss"]
            logger.log(done, row)
            acc, t_fwd, t_bwd, t_step, t_data = {}, 0.0, 0.0, 0.0, 0.0
            interval_start, interval_steps = time.perf_counter(), 0
        if (cfg.engine.checkpoint_every and done % cfg.engine.checkpoint_every == 0) or (
                done == end_step and final_checkpoint):
            save_checkpoint(engine, ckpt_dir, done,
                            {"step": done, "samples_seen": samples_seen, "num_skipped": skipped_total,
                             "config_hash": config_hash(cfg)},
                            is_main=dist.is_main, keep=cfg.engine.keep_checkpoints,
                            extra_state=module.extra_state(), data_state=stream.state_dict(), rank=dist.rank)
    logger.close()

    export_paths: dict = {}
    if export and end_step > start_step:
        state = fp32_state_dict(engine)  # every rank: a gather under ZeRO-3
        state.update(module.extra_state())  # e.g. DINO's teacher and center
        if dist.is_main:
            export_paths = export_from_state_dict(state, os.path.join(run_dir, "export"), cfg,
                                                  encoder_prefix=module.export_prefix)
        barrier()
    plot_path = None
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    if plot and dist.is_main and os.path.exists(metrics_path):
        from fastenc.analysis.curves import plot_loss_curves

        plot_path = plot_loss_curves([metrics_path], os.path.join(run_dir, "loss.png"), labels=[cfg.run.name])
    if dist.is_main:
        print(f"fastenc: done at step {end_step}. run dir: {run_dir}\n  metrics: {metrics_path}\n"
              f"  plot: {plot_path}\n  encoder: {export_paths.get('encoder')}", flush=True)
    return TrainResult(run_dir, end_step, last_loss, metrics_path, plot_path, export_paths)
