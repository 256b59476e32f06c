"""The whole comparison in one call (analyze_pairs): check the arguments, sample the pairs (or scan all of them),
scan, build the result, and with out_dir render both sides and write sharing.md and pairs.json through
fastenc.utils.atomic. The top of the package: depends on every other module in it, none depends on it."""

from __future__ import annotations

import os
import re
import time
from typing import Callable, Mapping, Sequence

import torch

from fastenc.analysis.pairs.cosines import DEFAULT_CHUNK_BYTES, check_features
from fastenc.analysis.pairs.render import render_pairs
from fastenc.analysis.pairs.report import pairs_result, report_markdown
from fastenc.analysis.pairs.sampling import num_unordered_pairs, sample_pairs
from fastenc.analysis.pairs.scan import PairScan, scan_pairs
from fastenc.analysis.pairs.sharing import check_attributes
from fastenc.analysis.pairs.thresholds import PairThresholds, as_thresholds
from fastenc.utils import atomic

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _check_options(names: Sequence[str], mode: str, max_pairs: int) -> tuple[str, str]:
    """The encoder labels as a tuple, checked with the mode and max_pairs before any work is done."""
    names = tuple(names)
    if len(names) != 2 or not all(isinstance(x, str) and _NAME_RE.match(x) for x in names) or names[0] == names[1]:
        raise ValueError(f"names must be two distinct file-name-safe labels (letters, digits, _ . -), got {names!r}")
    if mode not in ("auto", "sample", "exhaustive"):
        raise ValueError(f"mode must be 'auto', 'sample' or 'exhaustive', got {mode!r}")
    if isinstance(max_pairs, bool) or not isinstance(max_pairs, int) or max_pairs < 0:
        raise ValueError(f"max_pairs must be a non-negative integer, got {max_pairs!r}")
    return names


def _render_sides(scan: PairScan, result: dict, names: tuple[str, str], load_image: Callable[[int], object],
                  out_dir: str, *, cell: int, columns: int) -> dict[str, str]:
    """pairs_<a>_high.png and pairs_<b>_high.png in out_dir, titled with result's criteria: {"png_<side>": path}."""
    an, bn = names
    files = {}
    for key, side in ((f"{an}_high", scan.a_high), (f"{bn}_high", scan.b_high)):
        path = os.path.join(out_dir, f"pairs_{key}.png")
        top = side.pairs if side.pairs is not None else torch.empty(0, 2, dtype=torch.int64)
        title = (f"{key}: {result['criteria'][key]}; top {len(side)} of {side.count:,} passing "
                 f"({scan.num_pairs:,} pairs); captions: cos_{an} / cos_{bn}")
        render_pairs(top, load_image, path, cos_a=side.cos_a, cos_b=side.cos_b, names=names,
                     attributes=scan.attributes or None, title=title, cell=cell, columns=columns)
        files[f"png_{key}"] = path
    return files


def analyze_pairs(feats_a, feats_b, *, names: Sequence[str] = ("clip", "dino"),
                  attributes: Mapping[str, object] | None = None, num_pairs: int = 2_000_000, mode: str = "auto",
                  thresholds: PairThresholds | Mapping[str, float] | str | None = None, max_pairs: int = 100,
                  unique: bool = True, seed: int = 0, load_image: Callable[[int], object] | None = None,
                  out_dir: str | None = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES, cell: int = 128,
                  columns: int = 4) -> dict:
    """The whole comparison of encoder A (feats_a) and B (feats_b) on the same N images; returns a JSON-ready dict.

    mode: "sample" (num_pairs random pairs, seeded, distinct when unique), "exhaustive" (all pairs i < j) or
    "auto" (exhaustive when N (N - 1) / 2 <= num_pairs, else sample). thresholds: PairThresholds, "paper" (the
    default) or "strict", or a mapping of fields; or per-encoder quantiles: "quantile", {"quantile": {...}} or a
    QuantileThresholds (the cuts used are recorded in "thresholds", the quantiles in "quantiles"). attributes:
    {name: [N] int ids, -1 = absent} for the sharing
    table. names label encoder A and B in keys and files (letters, digits, _ . -). With out_dir: pairs.json,
    sharing.md, and (with load_image) pairs_<a>_high.png and pairs_<b>_high.png."""
    t_start = time.perf_counter()
    names = _check_options(names, mode, max_pairs)
    a, b = check_features(feats_a, feats_b)
    n = a.shape[0]
    thresholds = as_thresholds(thresholds)
    attrs = check_attributes(attributes, n)  # validate before the long pass
    if load_image is not None and not callable(load_image):
        raise ValueError("load_image must be a callable index -> PIL.Image")
    exhaustive = mode == "exhaustive" or (mode == "auto" and num_unordered_pairs(n) <= num_pairs)
    pairs = None if exhaustive else sample_pairs(n, num_pairs, seed=seed, unique=unique)
    t_sampled = time.perf_counter()
    scan = scan_pairs(a, b, pairs, thresholds=thresholds, max_pairs=max_pairs, attributes=attrs,
                      chunk_bytes=chunk_bytes, seed=seed)
    del pairs
    t_scanned = time.perf_counter()
    result = pairs_result(scan, names, dims=(a.shape[1], b.shape[1]), max_pairs=max_pairs, seed=seed, unique=unique)
    timing = {"sample": t_sampled - t_start, "scan": t_scanned - t_sampled}
    if out_dir is not None:
        t0 = time.perf_counter()
        files = {} if load_image is None else _render_sides(scan, result, names, load_image, out_dir, cell=cell,
                                                            columns=columns)
        timing["render"] = time.perf_counter() - t0
        result["files"] = {**files, "markdown": os.path.join(out_dir, "sharing.md"),
                           "json": os.path.join(out_dir, "pairs.json")}
    timing["total"] = time.perf_counter() - t_start
    result["timing_s"] = timing
    if out_dir is not None:
        atomic.write_text(result["files"]["markdown"], report_markdown(result))
        atomic.write_json(result["files"]["json"], result, indent=1)
    return result
