"""The training loop: identical for every objective.

    fetch batch -> objective forward -> engine.backward -> engine.step -> objective.on_step_end -> log

`train` reads top to bottom: open the run dir, prepare the data (the shard list is expanded here, once), build the
objective and its DeepSpeed engine, restore the latest checkpoint, open the data stream, run the steps (each step
its micro-batches; every `engine.log_every` steps one metrics interval is reduced and logged; checkpoints on their
cadence), then export the encoder and plot the loss. The hot loop never syncs the host except on logging steps
(loss and metrics are accumulated as device tensors and read with one all-reduce + .tolist() per interval).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field, replace

import torch

from fastenc.config import Config, batch_layout, config_hash
from fastenc.data.spec import ImageNormalizer
from fastenc.engine.checkpoint import fp32_state_dict, load_checkpoint, load_data_state, save_checkpoint
from fastenc.engine.deepspeed_config import build_engine
from fastenc.engine.distributed import DistInfo, barrier, broadcast_object, init_distributed
from fastenc.engine.optim import clip_grad_per_param_
from fastenc.run.configs import write_config
from fastenc.run.fingerprint import fingerprint
from fastenc.run.layout import RunDir
from fastenc.run.metrics import MetricsLogger
from fastenc.run.weights import export_from_state_dict

log = logging.getLogger("fastenc")


@dataclass
class TrainResult:
    run_dir: str
    steps: int
    final_loss: float
    metrics_path: str
    plot_path: str | None
    export_paths: dict


@dataclass
class Position:
    """Where a run stands: what each checkpoint records and a resumed run continues from."""

    step: int = 0
    samples_seen: int = 0
    num_skipped: int = 0

    def client_state(self, cfg: Config) -> dict:
        return {"step": self.step, "samples_seen": self.samples_seen, "num_skipped": self.num_skipped,
                "config_hash": config_hash(cfg)}


def train(cfg: Config, *, resume: str | None = None, local_rank: int | None = None, max_steps: int | None = None,
          export: bool = True, plot: bool = True, final_checkpoint: bool = True) -> TrainResult:
    """Train `cfg` to cfg.schedule.steps (or stop after `max_steps` more steps, for tests and benchmarks).

    export / plot / final_checkpoint=False skip the encoder export, the loss plot and the checkpoint at the last
    step (benchmarks; engine.checkpoint_every still applies)."""
    dist = init_distributed(local_rank)
    run_dir = open_run_dir(cfg, dist, resume)
    shards = prepare_data(cfg, dist)
    if dist.is_main:  # what a controlled comparison must share (everything but the objective), with the shards
        run_dir.write_fingerprint(fingerprint(cfg, shards=shards))
    engine, scheduler = build_training_engine(cfg, dist)
    start, data_state = restore(cfg, dist, engine, run_dir) if resume else (Position(), None)
    stream = open_stream(cfg, dist, engine.module, shards, run_dir, start.step, data_state)
    end_step = cfg.schedule.steps if max_steps is None else min(cfg.schedule.steps, start.step + max_steps)
    logger = MetricsLogger(run_dir, enabled=dist.is_main, total_steps=cfg.schedule.steps, start_step=start.step,
                           tensorboard=cfg.engine.tensorboard)
    logger.message(describe_run(cfg, dist, stream, run_dir))
    loop = TrainLoop(cfg, dist, engine, scheduler, stream, logger, run_dir)
    loop.run(replace(start), end_step, final_checkpoint=final_checkpoint)
    logger.close()
    export_paths = export_weights(cfg, dist, engine, run_dir) if export and end_step > start.step else {}
    plot_path = plot_loss(cfg, run_dir) if plot and dist.is_main else None
    if dist.is_main:
        print(f"fastenc: done at step {end_step}. run dir: {run_dir.root}\n  metrics: {run_dir.metrics}\n"
              f"  plot: {plot_path}\n  encoder: {export_paths.get('encoder')}", flush=True)
    return TrainResult(run_dir.root, end_step, loop.last_loss, run_dir.metrics, plot_path, export_paths)


# ---------------------------------------------------------------------------------------------------------------
# Setup


def open_run_dir(cfg: Config, dist: DistInfo, resume: str | None) -> RunDir:
    """Resume: the named (or, for "auto", the configured) run dir. A fresh run: a new one (fastenc.run.layout).
    Rank 0 records the config there; every rank gets the same run dir."""
    if dist.is_main:
        run_dir = (RunDir.of(cfg) if resume == "auto" else RunDir(resume)) if resume else RunDir.fresh(cfg)
        write_config(run_dir, cfg)
    return broadcast_object(run_dir if dist.is_main else None)


def prepare_data(cfg: Config, dist: DistInfo) -> list[str]:
    """The expanded shard list, the same on every rank. Rank 0 first makes what is missing: synthetic shards (if
    configured and absent), DALI index files (data.backend=dali) and the objective's assets (tokenizers, ...)."""
    from fastenc.data.stream import expand_train_data, prepare_indexes
    from fastenc.objectives import get_objective

    shards = None
    if dist.is_main:
        if cfg.data.synth.num_samples > 0:
            _synthesize_if_missing(cfg)
        shards = expand_train_data(cfg)  # a clear error now rather than inside a worker
        prepare_indexes(cfg, shards)
        get_objective(cfg.objective.name).prepare(cfg)
    barrier()
    return broadcast_object(shards)


def _synthesize_if_missing(cfg: Config) -> None:
    from fastenc.data.shards import expand_shards
    from fastenc.datatools.synth import is_stale, write_synthetic_shards

    out = cfg.data.train_shards.rstrip("/")
    try:
        expand_shards(cfg.data.train_shards)
        stale = is_stale(out)
        if stale:
            log.warning("%s holds synthetic shards of an older world (fastenc.datatools.synth.VERSION): drawing "
                        "them again", out)
    except FileNotFoundError:
        log.warning("no shards at %s: generating %d synthetic samples there", out, cfg.data.synth.num_samples)
        stale = True
    if stale:
        write_synthetic_shards(out, cfg.data.synth.num_samples, image_size=cfg.data.synth.image_size,
                               seed=cfg.run.seed, samples_per_shard=cfg.data.synth.samples_per_shard)


def build_training_engine(cfg: Config, dist: DistInfo):
    """The objective (seeded by run.seed: every rank and `fastenc eval init:` build the same initial weights),
    its blocks compiled if engine.compile, in a DeepSpeed engine; returns (engine, scheduler)."""
    from fastenc.objectives import build_objective

    torch.manual_seed(cfg.run.seed)
    objective = build_objective(cfg)
    if cfg.engine.compile:
        from fastenc.models.layers.block import compile_blocks

        compile_blocks(objective)
    return build_engine(cfg, objective, dist.world_size)


def restore(cfg: Config, dist: DistInfo, engine, run_dir: RunDir) -> tuple[Position, dict | None]:
    """The latest checkpoint of `run_dir` loaded into the engine (and the objective's extra state); returns its
    position and this rank's data-stream state (Position() and None where there is no checkpoint)."""
    state = load_checkpoint(engine, run_dir.checkpoints, engine.module)
    if state is None:
        if dist.is_main:
            log.warning("--resume: no checkpoint in %s, starting from step 0", run_dir.checkpoints)
        return Position(), None
    if dist.is_main and state.get("config_hash") != config_hash(cfg):
        log.warning("resuming with a config that differs from the checkpoint's: %s now holds the new one",
                    run_dir.config)
    pos = Position(state["step"], state["samples_seen"], state.get("num_skipped", 0))
    return pos, load_data_state(run_dir.checkpoints, dist.rank)


def open_stream(cfg: Config, dist: DistInfo, module, shards: list[str], run_dir: RunDir, start_step: int,
                data_state: dict | None):
    """This rank's training stream, at the checkpoint's data position where it can be restored."""
    from fastenc.data.stream import build_train_stream

    micro, _ = batch_layout(cfg, dist.world_size)
    stream = build_train_stream(cfg, module, shards, batch_size=micro, dist=dist, start_step=start_step,
                                work_dir=run_dir.data_work_dir(dist.rank))
    if data_state is not None:
        try:
            stream.load_state_dict(data_state)
        except ValueError as e:  # another data setup than the checkpoint's: say so, start the stream afresh
            log.warning("rank %d: data position not restored (%s); the data stream starts afresh", dist.rank, e)
    return stream


def describe_run(cfg: Config, dist: DistInfo, stream, run_dir: RunDir) -> str:
    micro, accum = batch_layout(cfg, dist.world_size)
    if stream.backend == "dali":
        data = f"dali-{stream.device} ({stream.num_threads} threads)"
        if stream.num_excluded:
            data += f", {stream.num_excluded} corrupt samples left out by index validation"
    else:
        data = "torch (PIL + torchvision workers)"
    return (f"fastenc: {cfg.objective.name} on {cfg.model.name}, world {dist.world_size}, global batch "
            f"{cfg.data.batch_size} = {micro} x {accum} accum x {dist.world_size} ranks, ZeRO-{cfg.engine.zero_stage} "
            f"{cfg.engine.precision}, device {dist.device.type}, data {data}; run dir {run_dir.root}")


# ---------------------------------------------------------------------------------------------------------------
# The steps


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


@dataclass
class Interval:
    """One metrics interval: device-side sums of every metric (no host sync while it runs) and host timings."""

    acc: dict = field(default_factory=dict)
    times: dict = field(default_factory=lambda: dict(data=0.0, forward=0.0, backward=0.0, optim_step=0.0))
    steps: int = 0
    start: float = field(default_factory=time.perf_counter)

    def add(self, loss: torch.Tensor, metrics: dict, skipped, accum: int) -> None:
        for k, v in {"loss": loss.detach(), **metrics}.items():
            self.acc[k] = self.acc.get(k, 0) + v.detach().float() / accum
        if skipped is not None:
            self.acc["_skipped"] = self.acc.get("_skipped", 0) + skipped.float()

    def reduce(self, dist: DistInfo) -> tuple[dict, int]:
        """The one host sync of the interval: ({metric: mean over steps and ranks}, skipped samples summed)."""
        keys = sorted(self.acc)
        vec = torch.stack([self.acc[k].reshape(()) for k in keys]).to(dist.device)
        if dist.world_size > 1:
            torch.distributed.all_reduce(vec)
        vals = dict(zip(keys, vec.tolist()))
        skipped = int(round(vals.pop("_skipped", 0.0)))
        return {k: v / (self.steps * dist.world_size) for k, v in vals.items()}, skipped


class TrainLoop:
    """The steps of one run: micro-batches per step, a metrics row per interval, checkpoints on their cadence."""

    def __init__(self, cfg: Config, dist: DistInfo, engine, scheduler, stream, logger: MetricsLogger,
                 run_dir: RunDir):
        self.cfg, self.dist, self.engine, self.scheduler = cfg, dist, engine, scheduler
        self.stream, self.logger, self.run_dir = stream, logger, run_dir
        self.module = engine.module
        self.accum = batch_layout(cfg, dist.world_size)[1]
        self.float_dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float32
        self.normalize = ImageNormalizer.of(self.module.data_spec(train=True))
        self.sync = cfg.engine.detailed_timing and dist.device.type == "cuda"
        self.last_loss = float("nan")

    def run(self, pos: Position, end_step: int, *, final_checkpoint: bool) -> Position:
        cfg, interval = self.cfg, Interval()
        self.engine.train()
        for step in range(pos.step, end_step):
            self.step(step, interval)
            pos.step, pos.samples_seen = step + 1, pos.samples_seen + cfg.data.batch_size
            self.logger.advance()
            if pos.step % cfg.engine.log_every == 0 or pos.step == end_step:
                self.log_interval(interval, pos)
                interval = Interval()
            every = cfg.engine.checkpoint_every
            if (every and pos.step % every == 0) or (pos.step == end_step and final_checkpoint):
                self.checkpoint(pos)
        return pos

    def step(self, step: int, interval: Interval) -> None:
        """One optimizer step: `accum` micro-batches forward and backward, the engine steps at the boundary."""
        engine, times = self.engine, interval.times
        self.module.on_step_start(step)
        for _ in range(self.accum):
            t0 = time.perf_counter()
            batch = next(self.stream)
            t1 = time.perf_counter()
            batch = _to_device(batch, self.dist.device, self.float_dtype, self.normalize)
            skipped = batch.pop("num_skipped", None)
            loss, metrics = engine(batch)
            t2 = self._now()
            engine.backward(loss)
            if self.cfg.optim.clip_grad_per_param and engine.is_gradient_accumulation_boundary():
                clip_grad_per_param_(self.module.parameters(), self.cfg.optim.clip_grad_per_param)  # ZeRO-0
            t3 = self._now()
            engine.step()  # optimizer + scheduler step only at the accumulation boundary
            t4 = self._now()
            for key, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                times[key] += dt
            interval.add(loss, metrics, skipped, self.accum)
        self.module.on_step_end(step)
        interval.steps += 1

    def _now(self) -> float:
        if self.sync:  # engine.detailed_timing: per-phase times on CUDA need the queue drained
            torch.cuda.synchronize()
        return time.perf_counter()

    def log_interval(self, interval: Interval, pos: Position) -> None:
        row, skipped = interval.reduce(self.dist)
        pos.num_skipped += skipped
        elapsed, n = time.perf_counter() - interval.start, interval.steps
        row.update(samples_seen=pos.samples_seen, lr=self.scheduler.get_last_lr()[0],
                   samples_per_s=n * self.cfg.data.batch_size / elapsed, step_time=elapsed / n,
                   data_wait=interval.times["data"] / n, data_wait_frac=interval.times["data"] / elapsed,
                   **{f"{k}_time": interval.times[k] / n for k in ("forward", "backward", "optim_step")},
                   num_skipped=pos.num_skipped, num_excluded=self.stream.num_excluded)
        if self.dist.device.type == "cuda":  # a host-side counter: no sync
            row["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.dist.device) / 2**30
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None:
            row["grad_norm"] = float(grad_norm)
        self.last_loss = row["loss"]
        self.logger.log(pos.step, row)

    def checkpoint(self, pos: Position) -> None:
        save_checkpoint(self.engine, self.run_dir.checkpoints, pos.step, pos.client_state(self.cfg),
                        is_main=self.dist.is_main, keep=self.cfg.engine.keep_checkpoints,
                        extra_state=self.module.extra_state(), data_state=self.stream.state_dict(),
                        rank=self.dist.rank)


# ---------------------------------------------------------------------------------------------------------------
# Finish


def export_weights(cfg: Config, dist: DistInfo, engine, run_dir: RunDir) -> dict:
    """The fp32 weights (a gather on every rank under ZeRO-3) exported by rank 0 (fastenc.run.weights)."""
    module = engine.module
    state = fp32_state_dict(engine)
    state.update(module.extra_state())  # e.g. DINO's teacher and center
    paths = {}
    if dist.is_main:
        paths = module.export_files(state, run_dir) or export_from_state_dict(state, run_dir, cfg,
                                                                               encoder_prefix=module.export_prefix)
    barrier()
    return paths


def plot_loss(cfg: Config, run_dir: RunDir) -> str | None:
    from fastenc.analysis.curves import plot_loss_curves

    if not os.path.exists(run_dir.metrics):
        return None
    return plot_loss_curves([run_dir.metrics], run_dir.loss_plot, labels=[cfg.run.name])
