"""The trainer's data stream: one interface over the DALI and torch backends.

    stream = build_train_stream(cfg, objective, shards, batch_size=micro, dist=dist, start_step=step)
    batch = next(stream)              # {objective's keys..., "num_skipped"}
    stream.state_dict() / load_state_dict(state)   # per-rank position, saved with each checkpoint

Resume. dali: exact (DALI's own pipeline checkpoint: the stream continues with the batch the interrupted run would
have produced next). torch: statistical; the worker streams are re-seeded from the resume step (resampled shards),
so the continued stream neither replays the old order nor tracks which samples were seen.
"""

from __future__ import annotations

import logging
import os

from fastenc.utils.optional import MissingDependency, is_available, require, warn_once

log = logging.getLogger(__name__)


def resolve_backend(backend: str) -> str:
    """'auto' -> 'dali' when nvidia.dali (and numba, for its CPU multi-crop kernel) import, else 'torch'."""
    if backend == "torch":
        return "torch"
    missing = [m for m in ("nvidia.dali", "numba") if not is_available(m)]
    if backend == "dali":
        if missing:
            require(missing[0], "data.backend=dali")
        return "dali"
    if backend != "auto":
        raise ValueError(f"data.backend must be auto, dali or torch, got {backend!r}")
    if missing:
        warn_once("data-backend-auto", f"data.backend=auto: {', '.join(missing)} not installed, using the torch data "
                  "path (PIL + torchvision). Install them (`pip install nvidia-dali-cuda130 numba`, or `make setup`) "
                  "for DALI decoding.")
        return "torch"
    return "dali"


class TorchStream:
    """fastenc.data.loader.build_loader as an endless stream: a finite pass (resampled=False) starts the next
    epoch with a new shard order."""

    backend = "torch"
    num_excluded = 0

    def __init__(self, shards, *, sample_fn, collate_fn, batch_size: int, num_workers: int, shuffle_buffer: int,
                 resampled: bool, seed: int, rank: int, world_size: int, epoch: int = 0):
        self._kw = dict(sample_fn=sample_fn, collate_fn=collate_fn, batch_size=batch_size, num_workers=num_workers,
                        shuffle_buffer=shuffle_buffer, resampled=resampled, seed=seed, rank=rank,
                        world_size=world_size)
        self.shards, self.epoch = shards, int(epoch)
        self._it = None

    def _start(self):
        from fastenc.data.loader import build_loader

        self._it = iter(build_loader(self.shards, epoch=self.epoch, **self._kw))

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._it is None:
            self._start()
        try:
            return next(self._it)
        except StopIteration:
            self.epoch += 1
            self._start()
            return next(self._it)

    def state_dict(self) -> dict:
        return {"backend": "torch", "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        """The torch path does not restore positions (see the module docstring); the epoch counter is kept."""
        if state and state.get("backend") == "torch":
            self.epoch = int(state.get("epoch", self.epoch))
            self._it = None


def expand_train_data(cfg) -> list[str]:
    """cfg.data.train_shards as the list of files a run reads: its shards (fastenc.data.shards.expand_shards), or the
    one LLaVA-style records .json (fastenc.data.records)."""
    from fastenc.data.records import is_record_file
    from fastenc.data.shards import expand_shards

    spec = cfg.data.train_shards
    if not is_record_file(spec):
        return expand_shards(spec)
    if cfg.data.backend == "dali":
        raise ValueError(f"data.backend=dali reads webdataset shards; {spec} is a records .json, which the torch "
                         "path reads (set data.backend to torch or auto), or write the records into shards")
    if not os.path.isfile(spec):
        raise FileNotFoundError(f"records file {spec!r} does not exist")
    return [spec]


def build_train_stream(cfg, objective, shards: list[str], *, batch_size: int, dist, start_step: int = 0,
                       work_dir: str | None = None):
    """The training stream of `objective` over `shards` (expand_train_data's list), for this rank. work_dir:
    where the DALI backend keeps this rank's working files (the run dir provides one per rank)."""
    from fastenc.data.records import RecordStream, is_record_file

    collate = objective.collate_fn(train=True)
    if is_record_file(cfg.data.train_shards):  # exact resume (fastenc.data.records)
        return RecordStream(shards[0], cfg.data.image_folder, sample_fn=objective.sample_fn(train=True),
                            collate_fn=collate, batch_size=batch_size, num_workers=cfg.data.num_workers,
                            seed=cfg.run.seed, rank=dist.rank, world_size=dist.world_size)
    backend = resolve_backend(cfg.data.backend)
    if backend == "dali":
        from fastenc.data.dali import DaliLoader

        return DaliLoader(shards, objective.data_spec(train=True), batch_size=batch_size,
                          num_threads=max(1, cfg.data.num_workers), device=cfg.data.dali_device, seed=cfg.run.seed,
                          rank=dist.rank, world_size=dist.world_size, shuffle_buffer=cfg.data.shuffle_buffer,
                          resampled=cfg.data.resampled, index_dir=cfg.data.index_dir or None,
                          finish=getattr(collate, "finish", None), torch_device=dist.device,
                          work_dir=work_dir)
    # Resampled shards: the stream is re-seeded from the resume step (no sample order is replayed exactly).
    return TorchStream(shards, sample_fn=objective.sample_fn(train=True), collate_fn=collate,
                       batch_size=batch_size, num_workers=cfg.data.num_workers,
                       shuffle_buffer=cfg.data.shuffle_buffer, resampled=cfg.data.resampled, seed=cfg.run.seed,
                       rank=dist.rank, world_size=dist.world_size, epoch=start_step)


def prepare_indexes(cfg, shards: list[str]) -> dict | None:
    """For data.backend=dali: build missing or stale DALI index files (validating every sample) and return the
    summary of what the indexes hold (fastenc.data.index.summarize); None for the torch backend."""
    from fastenc.data.records import is_record_file

    if is_record_file(cfg.data.train_shards) or resolve_backend(cfg.data.backend) != "dali":
        return None
    from fastenc.data.index import ensure_indexes, summarize

    try:
        reports, failed = ensure_indexes(shards, index_dir=cfg.data.index_dir or None, validate=True)
    except PermissionError as e:
        raise PermissionError(f"cannot write DALI index files next to the shards ({e}); set data.index_dir to a "
                              "writable folder") from e
    summary = summarize(reports, failed)
    if failed:
        log.warning("%d shard(s) cannot be read and are left out: %s", len(failed),
                    "; ".join(f"{s}: {why}" for s, why in failed[:3]))
    if summary["num_excluded"]:
        log.warning("index validation left out %d sample(s) with unusable images (%s); the .idx.json reports next "
                    "to the indexes list them", summary["num_excluded"],
                    ", ".join(f"{k}: {v}" for k, v in summary["excluded_reasons"].items()))
    return summary


__all__ = ["MissingDependency", "TorchStream", "build_train_stream", "expand_train_data",
           "prepare_indexes", "resolve_backend"]
