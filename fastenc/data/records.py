"""LLaVA-style training data read as is: one JSON file (a list of records) and the image folder its paths are in.

    [{"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
      "conversations": [{"from": "human", "value": "<image>\\nWhat are the colors of the bus?"},
                        {"from": "gpt", "value": "The bus is white and red."}, ...]}, ...]

`data.train_shards` names the .json and `data.image_folder` the folder (a record without "image" is text-only). The
torch data path reads it (RecordStream); DALI reads webdataset shards, which carry the same records as .json.

Order and resume. Epoch e visits the records in a permutation seeded by (seed, e); rank r takes every world_size-th
of them, and its batch b is records [b * B, (b + 1) * B) of that share, whichever loader worker makes it (from start
batch s, worker w makes s + w, s + w + W, ...). The stream's position is therefore (epoch, next batch): a resumed
run continues with exactly the batch the interrupted one would have trained on next, for any number of workers. A
record that cannot be used (missing image, bad conversation) is skipped and counted; its batch is one sample
smaller, not refilled, so the batches of later steps stay where they were.

The records live in one byte buffer with offsets (not a list of Python dicts), so the loader's forked workers share
it without copy-on-write of reference counts.
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from fastenc.data.transforms import IMAGE_EXTENSIONS, CorruptSample

log = logging.getLogger(__name__)

_NUM_LOGGED_SKIPS = 10


def is_record_file(spec) -> bool:
    """Whether a data.train_shards value names a LLaVA-style .json (rather than webdataset shards)."""
    return isinstance(spec, str) and spec.endswith(".json") and "," not in spec and "{" not in spec


class RecordTable:
    """The records of a LLaVA-style JSON file, each kept as its JSON bytes: table[i] -> bytes."""

    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"records file {path!r} does not exist (data.train_shards names a LLaVA-style "
                                    "JSON: a list of {id, image, conversations} records)")
        with open(path, "rb") as f:
            try:
                records = json.load(f)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{path} is not a JSON file ({e})") from e
        if not isinstance(records, list) or not records:
            raise ValueError(f"{path} must hold a non-empty JSON list of records, got "
                             f"{type(records).__name__ if records else 'an empty list'}")
        blobs = [json.dumps(r, ensure_ascii=False).encode("utf-8") for r in records]
        self.path = path
        self.offsets = np.cumsum([0] + [len(b) for b in blobs])
        self.data = np.frombuffer(b"".join(blobs), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> bytes:
        return self.data[self.offsets[i]:self.offsets[i + 1]].tobytes()

    def record(self, i: int):
        return json.loads(self[i])


def check_image_folder(table: RecordTable, image_folder: str, probe: int = 100) -> None:
    """A clear error before training when the records' images are not where data.image_folder says: the first
    `probe` records that name an image all miss it."""
    named = [r["image"] for r in map(table.record, range(min(len(table), probe * 10)))
             if isinstance(r, dict) and isinstance(r.get("image"), str)][:probe]
    if named and not any(os.path.isfile(os.path.join(image_folder, p)) for p in named):
        raise FileNotFoundError(f"none of the first {len(named)} images of {table.path} is in data.image_folder "
                                f"{image_folder!r} (first: {os.path.join(image_folder, named[0])!r}); set "
                                "data.image_folder to the folder the records' image paths are relative to")


def raw_sample(table: RecordTable, i: int, image_folder: str) -> dict:
    """Record i as a raw sample, like a shard's: {"__key__", "__url__", "json": the record, <ext>: image bytes}."""
    data = table[i]
    record = json.loads(data)
    # The parsed record itself (ConversationSample takes a dict or a shard's bytes): parsed once per sample.
    sample = {"__key__": str(record.get("id", i)) if isinstance(record, dict) else str(i), "__url__": table.path,
              "json": record if isinstance(record, dict) else data}
    image = record.get("image") if isinstance(record, dict) else None
    if image:
        ext = os.path.splitext(image)[1].lower().lstrip(".")
        if ext not in IMAGE_EXTENSIONS:
            raise CorruptSample(f"image {image!r} is not one of {', '.join(IMAGE_EXTENSIONS)}")
        try:
            with open(os.path.join(image_folder, image), "rb") as f:
                sample[ext] = f.read()
        except OSError as e:
            raise CorruptSample(f"image {image!r} cannot be read from {image_folder!r} ({e.strerror or e})") from e
    return sample


def epoch_share(num_records: int, seed: int, epoch: int, rank: int, world_size: int) -> np.ndarray:
    """Rank `rank`'s records of epoch `epoch`, in order."""
    order = np.random.default_rng([seed, epoch]).permutation(num_records)
    return order[rank::world_size]


class RecordBatches(IterableDataset):
    """One epoch's batches of this rank from batch `start` on, each worker making every num_workers-th batch (see
    the module docstring). Yields collate_fn's batch dict plus "num_skipped" and "batch_index" (0-dim int64); a batch
    whose every record failed yields only those two."""

    def __init__(self, table: RecordTable, image_folder: str, *, sample_fn, collate_fn, batch_size: int, seed: int,
                 epoch: int, rank: int, world_size: int, start: int = 0, max_consecutive_skips: int = 1000):
        self.table, self.image_folder = table, image_folder
        self.sample_fn, self.collate_fn, self.batch_size = sample_fn, collate_fn, int(batch_size)
        self.seed, self.epoch, self.rank, self.world_size, self.start = seed, epoch, rank, world_size, int(start)
        self.max_consecutive_skips = max_consecutive_skips

    def num_batches(self) -> int:
        return len(epoch_share(len(self.table), self.seed, self.epoch, self.rank, self.world_size)) // self.batch_size

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        share = epoch_share(len(self.table), self.seed, self.epoch, self.rank, self.world_size)
        # The DataLoader takes one batch from each worker in turn, worker 0 first; so worker w makes start + w,
        # start + w + W, ... (b % W == w would come out swapped from a start that is not a multiple of W).
        first = self.start + worker
        skipped_total, consecutive = 0, 0
        for b in range(first, len(share) // self.batch_size, num_workers):
            samples, skipped = [], 0
            for i in share[b * self.batch_size:(b + 1) * self.batch_size]:
                try:
                    samples.append(self.sample_fn(raw_sample(self.table, int(i), self.image_folder)))
                    consecutive = 0
                except Exception as e:  # noqa: BLE001 - any per-record failure is a counted skip
                    skipped, consecutive = skipped + 1, consecutive + 1
                    self._report(skipped_total + skipped, consecutive, int(i), e)
            skipped_total += skipped
            batch = self.collate_fn(samples) if samples else {}
            batch.update(num_skipped=torch.tensor(skipped), batch_index=torch.tensor(b))
            yield batch

    def _report(self, num: int, consecutive: int, index: int, error: Exception) -> None:
        reason = str(error) if isinstance(error, CorruptSample) else f"{type(error).__name__}: {error}"
        message = f"skipping record {index} of {self.table.path}: {reason}"
        if num <= _NUM_LOGGED_SKIPS:
            log.warning(message + (" (further skips are counted, not logged)" if num == _NUM_LOGGED_SKIPS else ""))
        if self.max_consecutive_skips and consecutive >= self.max_consecutive_skips:
            raise RuntimeError(f"{consecutive} consecutive records failed; the last: {message}. This looks like the "
                               "wrong data.image_folder or data format, not a few bad records.")


class RecordStream:
    """The trainer's endless stream over a records file (fastenc.data.stream's interface): epochs follow each other,
    and state_dict() is the exact position (epoch, next batch)."""

    backend = "torch"
    num_excluded = 0

    def __init__(self, path: str, image_folder: str, *, sample_fn, collate_fn, batch_size: int, num_workers: int,
                 seed: int, rank: int, world_size: int):
        self.table = RecordTable(path)
        check_image_folder(self.table, image_folder)
        self.image_folder, self.num_workers = image_folder, int(num_workers)
        self._kw = dict(sample_fn=sample_fn, collate_fn=collate_fn, batch_size=batch_size, seed=seed, rank=rank,
                        world_size=world_size)
        if len(self.table) // world_size < batch_size:
            raise ValueError(f"{path} has {len(self.table)} records: fewer than one batch of {batch_size} per rank "
                             f"({world_size} ranks)")
        self.epoch, self.next_batch, self._it, self._pending_skipped = 0, 0, None, 0

    def _start(self):
        dataset = RecordBatches(self.table, self.image_folder, epoch=self.epoch, start=self.next_batch, **self._kw)
        self._it = iter(DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                                   pin_memory=torch.cuda.is_available(),
                                   prefetch_factor=2 if self.num_workers > 0 else None))

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        while True:
            if self._it is None:
                self._start()
            try:
                batch = next(self._it)
            except StopIteration:
                self.epoch, self.next_batch, self._it = self.epoch + 1, 0, None
                continue
            self.next_batch = int(batch.pop("batch_index")) + 1
            self._pending_skipped += int(batch.pop("num_skipped"))
            if batch:  # else every record of the batch failed: its skips go with the next batch
                batch["num_skipped"] = torch.tensor(self._pending_skipped, dtype=torch.int64)
                self._pending_skipped = 0
                return batch
            if self._pending_skipped >= len(self.table) // self._kw["world_size"]:
                # A whole epoch's share failed in a row: a small file never reaches max_consecutive_skips (counted
                # per epoch and worker), and the stream would go round its epochs forever.
                raise RuntimeError(f"{self._pending_skipped} records of {self.table.path} in a row could not be "
                                   "used, a whole epoch without one batch (the log names the first ones' reasons): "
                                   "check data.image_folder and that these are LLaVA-style conversation records")

    def state_dict(self) -> dict:
        return {"backend": "records", "epoch": self.epoch, "next_batch": self.next_batch}

    def load_state_dict(self, state: dict) -> None:
        if not state or state.get("backend") != "records":
            raise ValueError(f"not a records-stream position: {state!r:.80}")
        self.epoch, self.next_batch, self._it = int(state["epoch"]), int(state["next_batch"]), None
