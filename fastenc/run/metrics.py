"""A run's metrics: metrics.jsonl (one JSON object per logged step), TensorBoard events, a tqdm bar on rank 0; and
the readers that evaluation, analysis and the study runner use."""

from __future__ import annotations

import json
import math
import os
import sys

from fastenc.run.layout import RunDir
from fastenc.utils.optional import is_available, warn_once


class MetricsLogger:
    """Rank 0 writes; other ranks get a logger whose methods do nothing."""

    def __init__(self, run_dir: RunDir, *, enabled: bool, total_steps: int, start_step: int = 0,
                 tensorboard: bool = True):
        self.enabled = enabled
        self.path = run_dir.metrics
        self._file = None
        self._tb = None
        self._bar = None
        if not enabled:
            return
        self._file = open(self.path, "a", buffering=1)
        if tensorboard:
            if is_available("tensorboard"):
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(run_dir.tensorboard)
            else:
                warn_once("tensorboard", "tensorboard is not installed: no event files (pip install tensorboard)")
        from tqdm import tqdm

        # Redraw at most every 2 s so non-terminal logs (CI, nohup) stay short.
        self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                         mininterval=2.0, file=sys.stderr)

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: (float(v) if isinstance(v, (int, float)) else v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(f"train/{k}", v, step)
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.4f}",
                                  sps=f"{metrics.get('samples_per_s', 0):.0f}", refresh=False)

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def message(self, text: str) -> None:
        if self.enabled:
            (self._bar.write if self._bar is not None else print)(text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._file is not None:
            self._file.close()


def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def metrics_history(path: str) -> list[dict]:
    """The run's rows as one history: metrics.jsonl is appended to on resume, so steps logged after the checkpoint
    a run resumed from appear twice; keep the last row of each step (the resumed run's), in step order. Rows
    without a step (messages) are dropped."""
    by_step = {}
    for row in read_metrics(path):
        if "step" in row:
            by_step[row["step"]] = row
    return [by_step[k] for k in sorted(by_step)]


def last_metrics(run_dir: RunDir) -> dict:
    """The last logged row with a loss ({} for a run that logged none yet)."""
    rows = [r for r in metrics_history(run_dir.metrics) if "loss" in r] if os.path.isfile(run_dir.metrics) else []
    return rows[-1] if rows else {}
