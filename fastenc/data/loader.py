"""The torch DataLoader path: webdataset shards -> per-sample sample_fn in workers -> stacked batch dicts.

Pipeline per (rank, worker), built from webdataset's pieces:

    shard urls (resampled with replacement, or this rank's and worker's slice of one epoch)
      -> tar samples (webdataset's tar iterators) -> shuffle buffer -> sample_fn (skip + count failures)
      -> batch of batch_size (collate_fn in the worker: stacked, captions tokenized, ...)

Every batch carries "num_skipped": how many samples (or unreadable shards) this worker dropped since its previous
batch, so the trainer can sum it into its metrics. A corrupt sample never stops the run; a stream in which
nothing succeeds does (see `max_consecutive_skips`), because that is a bug, not bad luck.
"""

from __future__ import annotations

import functools
import logging
import random

import torch
from torch.utils.data import DataLoader, get_worker_info

from fastenc.data.collate import stack_samples
from fastenc.data.shards import expand_shards, tar_samples
from fastenc.data.transforms import CorruptSample
from fastenc.utils.optional import require

log = logging.getLogger(__name__)

_NUM_LOGGED_SKIPS = 10  # per worker; further skips are counted silently (and logged at debug level)


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def _stream_seed(seed: int, epoch: int, rank: int) -> int:
    """Seed of this (seed, epoch, rank, worker) stream; ints only, so it does not depend on PYTHONHASHSEED."""
    worker, _ = _worker()
    return hash((seed, epoch, rank, worker)) & 0x7FFFFFFF


class _SkipCounter:
    """Counts skipped samples/shards in one worker; shared by the tar handler and the map and batch stages."""

    def __init__(self, max_consecutive: int):
        self.num_skipped = 0
        self.consecutive = 0
        self.max_consecutive = max_consecutive
        self.current_shard = None  # the shard being read, and whether its failure was already counted
        self.shard_failed = False

    def skip(self, what: str, reason: str) -> None:
        self.num_skipped += 1
        self.consecutive += 1
        message = f"skipping {what}: {reason}"
        if self.num_skipped <= _NUM_LOGGED_SKIPS:
            last = self.num_skipped == _NUM_LOGGED_SKIPS
            log.warning(message + (" (further skips are counted, not logged)" if last else ""))
        else:
            log.debug(message)
        if self.max_consecutive and self.consecutive >= self.max_consecutive:
            raise RuntimeError(f"{self.consecutive} consecutive samples or shards failed; the last: {message}. "
                               "This looks like a wrong data format or a bug in sample_fn, not a few corrupt samples.")

    def tar_error(self, exn: BaseException) -> bool:
        """webdataset handler for tar-level errors (unopenable or broken shard): skip the rest of it, count once."""
        # tarfile can raise twice for one broken shard (the member read, then the next header): count it once.
        if not self.shard_failed:
            self.shard_failed = True
            self.skip(f"the rest of shard {self.current_shard}", f"{type(exn).__name__}: {exn}")
        return True

    def start_shard(self, url: str) -> None:
        self.current_shard, self.shard_failed = url, False


def _slice_shards(src, rank: int, world_size: int):
    """This rank's, then this worker's, disjoint share of one epoch's shard list."""
    worker, num_workers = _worker()
    for i, item in enumerate(src):
        if i % world_size == rank and (i // world_size) % num_workers == worker:
            yield item


def _shuffle(src, bufsize: int, seed: int, epoch: int, rank: int):
    if bufsize <= 1:
        yield from src
        return
    wds = require("webdataset", "reading shards")
    rng = random.Random(_stream_seed(seed, epoch, rank) + 1)
    yield from wds.shuffle(bufsize, initial=min(bufsize, 100), rng=rng)(src)


def _map_samples(src, sample_fn, counter: _SkipCounter):
    for sample in src:
        try:
            out = sample_fn(sample)
        except Exception as e:  # noqa: BLE001 - any per-sample failure is a skipped sample (CorruptSample or not)
            # CorruptSample messages already say what is wrong; anything else gets its type for debugging.
            reason = str(e) if isinstance(e, CorruptSample) else f"{type(e).__name__}: {e}"
            counter.skip(f"sample {sample.get('__key__', '?')!r} from {sample.get('__url__', '?')}", reason)
            continue
        counter.consecutive = 0
        yield out


def _batch(src, batch_size: int, drop_last: bool, counter: _SkipCounter, collate_fn):
    """collate_fn over batch_size sample dicts; attach the skip count since this worker's previous batch."""
    reported = counter.num_skipped
    buf = []

    def emit():
        nonlocal reported
        batch = collate_fn(buf)
        batch["num_skipped"] = torch.tensor(counter.num_skipped - reported, dtype=torch.int64)
        reported = counter.num_skipped
        buf.clear()
        return batch

    for sample in src:
        buf.append(sample)
        if len(buf) == batch_size:
            yield emit()
    if buf and not drop_last:
        yield emit()


def _seed_worker_rng(src, seed: int, epoch: int, rank: int):
    """In a DataLoader worker, seed torch's RNG (random augmentations) per (seed, epoch, rank, worker).

    Not done with num_workers=0: that would reseed the training process's own RNG.
    """
    if get_worker_info() is not None:
        torch.manual_seed(_stream_seed(seed, epoch, rank) + 2)
    yield from src


def build_dataset(shards, *, sample_fn, batch_size: int, num_workers: int = 2, shuffle_buffer: int = 1000,
                  resampled: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1, epoch: int = 0,
                  drop_last: bool = True, max_consecutive_skips: int = 1000, collate_fn=None):
    """The webdataset DataPipeline behind build_loader (yields finished batch dicts); see build_loader."""
    wds = require("webdataset", "reading shards")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    urls = expand_shards(shards)
    counter = _SkipCounter(max_consecutive_skips)
    if resampled:
        # Each (rank, worker) draws shards with replacement from its own RNG: streams differ across ranks and
        # workers, yet are reproducible for (seed, epoch).
        source = [wds.ResampledShards(urls, seed=seed, deterministic=True,
                                      worker_seed=functools.partial(_stream_seed, seed, epoch, rank))]
    else:
        num_streams = world_size * max(1, num_workers)
        if len(urls) < num_streams:
            raise ValueError(
                f"{len(urls)} shards cannot be split over {world_size} rank(s) x {max(1, num_workers)} worker(s) "
                f"without leaving a worker with no data: use resampled=True, fewer workers, or more shards "
                f"(e.g. `fastenc data synth --samples-per-shard` smaller)")
        # Same shard permutation on every rank (seeded by seed+epoch), then disjoint slices.
        source = [wds.SimpleShardList(urls, seed=seed + epoch),
                  functools.partial(_slice_shards, rank=rank, world_size=world_size)]
    return wds.DataPipeline(
        *source,
        functools.partial(_seed_worker_rng, seed=seed, epoch=epoch, rank=rank),
        functools.partial(tar_samples, handler=counter.tar_error, on_shard=counter.start_shard),
        functools.partial(_shuffle, bufsize=shuffle_buffer, seed=seed, epoch=epoch, rank=rank),
        functools.partial(_map_samples, sample_fn=sample_fn, counter=counter),
        functools.partial(_batch, batch_size=batch_size, drop_last=drop_last, counter=counter,
                          collate_fn=collate_fn or stack_samples),
    )


def build_loader(shards, *, sample_fn, batch_size: int, num_workers: int = 2, shuffle_buffer: int = 1000,
                 resampled: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1, epoch: int = 0,
                 drop_last: bool = True, max_consecutive_skips: int = 1000, collate_fn=None) -> DataLoader:
    """DataLoader over webdataset shards yielding {key: Tensor[batch_size, ...] for sample_fn's keys, "num_skipped"}.

    shards: anything expand_shards accepts. sample_fn: picklable callable, raw sample dict -> dict of tensors;
    any exception it raises skips (and counts) that sample. collate_fn: picklable, list of sample_fn outputs ->
    batch dict (default stack_samples: tensors stacked, other values listed). resampled=True: an infinite stream, shards drawn with
    replacement per (seed, epoch, rank, worker); False: one epoch, each rank and worker reading a disjoint slice
    of the shards (needs at least world_size * num_workers shards; ranks may see different batch counts).
    Batches are assembled in the workers; num_skipped is a 0-dim int64 per batch (with drop_last, skips after the
    last full batch of an epoch are not reported). More than `max_consecutive_skips` failures in a row (0: no
    limit) raise, since then nothing is being trained on.
    """
    dataset = build_dataset(shards, sample_fn=sample_fn, batch_size=batch_size, num_workers=num_workers,
                            shuffle_buffer=shuffle_buffer, resampled=resampled, seed=seed, rank=rank,
                            world_size=world_size, epoch=epoch, drop_last=drop_last,
                            max_consecutive_skips=max_consecutive_skips, collate_fn=collate_fn)
    return DataLoader(
        dataset,
        batch_size=None,  # batches are built inside the pipeline (per worker)
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
        prefetch_factor=2 if num_workers > 0 else None,
    )

