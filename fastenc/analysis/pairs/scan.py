"""One streaming pass over the pairs (scan_pairs): the quantile cuts resolved first when asked for (one more pass
over at most QUANTILE_PAIRS pairs), then each chunk of cosines feeds the selection of both sides, the attribute
sharing of every pair set and the cosines' mean / std / correlation. Also the memory that this pass and the sampling
before it need (memory_bound_bytes). Depends on thresholds, sampling, cosines, selection and sharing."""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping

import torch

from fastenc.analysis.pairs.cosines import (
    DEFAULT_CHUNK_BYTES,
    EXHAUSTIVE_BYTES_PER_PAIR,
    check_features,
    compute_dtype,
    iter_pair_cosines,
    pair_chunk_rows,
)
from fastenc.analysis.pairs.sampling import num_unordered_pairs, sample_pairs
from fastenc.analysis.pairs.selection import PairSelector, SideSelection
from fastenc.analysis.pairs.sharing import SharingCounter, check_attributes
from fastenc.analysis.pairs.thresholds import PairThresholds, QuantileThresholds, as_thresholds

QUANTILE_PAIRS = 1 << 20  # pairs whose cosines estimate QuantileThresholds (quantile error ~ 1e-3 in rank)
_CONSUMER_BYTES_PER_PAIR, _CONSUMER_BYTES_PER_ATTRIBUTE = 128, 32  # scan_pairs' temporaries per pair of a chunk
_ALLOCATOR_SLACK = 16 * 2**20
_SETS = ("all", "a_high", "a_high_top", "b_high", "b_high_top")


@dataclasses.dataclass
class PairScan:
    """scan_pairs' result. sharing: {set: {attribute: row}} over "all", "a_high", "b_high" (every pair that
    passed) and "a_high_top", "b_high_top" (the kept pairs); empty without attributes."""

    num_images: int
    num_pairs: int
    exhaustive: bool
    thresholds: PairThresholds
    a_high: SideSelection
    b_high: SideSelection
    stats: dict
    sharing: dict
    attributes: dict[str, torch.Tensor]
    quantiles: QuantileThresholds | None = None
    """The requested quantiles when `thresholds` were resolved from them."""


def resolve_quantiles(feats_a, feats_b, pairs, quantiles: QuantileThresholds, *,
                      chunk_bytes: int = DEFAULT_CHUNK_BYTES, seed: int = 0) -> PairThresholds:
    """Absolute cuts from the cosine quantiles of at most QUANTILE_PAIRS pairs: every k-th of `pairs` (a random
    sample, sorted by (i, j), so an even stride covers every row), or, with pairs=None (every pair is scanned), all
    pairs when there are at most QUANTILE_PAIRS, else a uniform sample of QUANTILE_PAIRS of them drawn with `seed`."""
    n = feats_a.shape[0]
    if pairs is not None:
        pairs = torch.as_tensor(pairs)
        est = pairs[::max(1, -(-pairs.shape[0] // QUANTILE_PAIRS))]
    elif num_unordered_pairs(n) <= QUANTILE_PAIRS:
        est = None
    else:
        est = sample_pairs(n, QUANTILE_PAIRS, seed=seed)
    parts = list(iter_pair_cosines(feats_a, feats_b, est, chunk_bytes=chunk_bytes))
    return quantiles.resolve(torch.cat([p[2] for p in parts]) if parts else torch.empty(0),
                             torch.cat([p[3] for p in parts]) if parts else torch.empty(0))


class _CosineMoments:
    """Running float64 sums of cos_a, cos_b, their squares and their product, for mean / std / correlation."""

    def __init__(self):
        self.sums = torch.zeros(5, dtype=torch.float64)  # sum a, b, a^2, b^2, ab

    def add(self, ca: torch.Tensor, cb: torch.Tensor) -> None:
        ca64, cb64 = ca.double(), cb.double()
        self.sums += torch.stack([ca64.sum(), cb64.sum(), (ca64 * ca64).sum(), (cb64 * cb64).sum(),
                                  (ca64 * cb64).sum()])

    def stats(self, m: int) -> dict:
        """{"pairs": m} and, when m > 0, mean_a, std_a, mean_b, std_b and corr (None when a std is 0)."""
        stats = {"pairs": m}
        if m:
            sa, sb, saa, sbb, sab = (float(x) for x in self.sums)
            va, vb = max(saa / m - (sa / m) ** 2, 0.0), max(sbb / m - (sb / m) ** 2, 0.0)
            stats.update(mean_a=sa / m, std_a=math.sqrt(va), mean_b=sb / m, std_b=math.sqrt(vb),
                         corr=(sab / m - sa * sb / m / m) / math.sqrt(va * vb) if va > 0 and vb > 0 else None)
        return stats


def scan_pairs(feats_a, feats_b, pairs=None, *, thresholds: PairThresholds | Mapping | str | None = None,
               max_pairs: int = 100, attributes: Mapping[str, object] | None = None,
               chunk_bytes: int = DEFAULT_CHUNK_BYTES, seed: int = 0) -> PairScan:
    """One streaming pass over the given pairs (or all pairs i < j when pairs is None): the selection of both
    sides, attribute sharing of every pair set, and the cosines' mean / std / correlation over all pairs. Quantile
    thresholds are resolved first (resolve_quantiles: one more pass over at most QUANTILE_PAIRS pairs)."""
    a, b = check_features(feats_a, feats_b)
    n = a.shape[0]
    thresholds, quantiles = as_thresholds(thresholds), None
    if isinstance(thresholds, QuantileThresholds):
        quantiles = thresholds
        thresholds = resolve_quantiles(a, b, pairs, quantiles, chunk_bytes=chunk_bytes, seed=seed)
    attrs = check_attributes(attributes, n)
    dtype = torch.promote_types(compute_dtype(a), compute_dtype(b))
    selector = PairSelector(thresholds, max_pairs=max_pairs, dtype=dtype)
    counter = SharingCounter(attrs)
    moments = _CosineMoments()
    for i, j, ca, cb in iter_pair_cosines(a, b, pairs, chunk_bytes=chunk_bytes):
        mask_a, mask_b = selector.update(ca, cb, i, j)
        moments.add(ca, cb)
        if attrs:
            counter.add("all", i, j)
            counter.add("a_high", i, j, mask_a)
            counter.add("b_high", i, j, mask_b)
    sel = selector.result()
    if attrs:
        for side, key in ((sel.a_high, "a_high_top"), (sel.b_high, "b_high_top")):
            top = side.pairs if side.pairs is not None else torch.empty(0, 2, dtype=torch.int64)
            counter.add(key, top[:, 0], top[:, 1])
    table = counter.table()
    sharing = {s: table[s] for s in _SETS if s in table}
    return PairScan(n, sel.num_pairs, pairs is None, thresholds, sel.a_high, sel.b_high,
                    moments.stats(sel.num_pairs), sharing, attrs, quantiles)


def memory_bound_bytes(num_images: int, dim_a: int, dim_b: int, num_pairs: int, *, exhaustive: bool = False,
                       chunk_bytes: int = DEFAULT_CHUNK_BYTES, max_pairs: int = 100, num_attributes: int = 0,
                       itemsize: int = 4, quantiles: bool = False) -> int:
    """Upper estimate of the memory analyze_pairs needs beyond its input features (and the torch runtime), for
    features of `itemsize` bytes per value (4: float32).

    Sampled mode: the larger of
        sampling: 48 bytes per pair at its peak (draws, their sorted unique copy, the random subset; measured ~40);
        scanning: the pair list (16 bytes per pair), one chunk of gathered rows (chunk_bytes: two [C, D] blocks of
                  the wider encoder, C = chunk_bytes / (2 D itemsize)) and the chunk's per-pair temporaries
                  (indices, cosines, masks, statistics: 128 bytes, plus 32 per attribute);
    exhaustive mode: a row block (chunk_bytes at 64 bytes per pair) plus the same per-pair temporaries for its
    pairs. Both add [N] vectors (inverse norms; 8 bytes per image and attribute), the kept top pairs, and
    allocator slack (one more chunk_bytes and 16 MiB: freed blocks are not always reused at once).
    quantiles (QuantileThresholds): a first pass over q = min(M, QUANTILE_PAIRS) pairs keeps their cosines and the
    quantile's float64 copies (40 bytes per pair; exhaustive mode also samples them, 48 + 16 bytes per pair).
    benchmarks/bench_pairs.py compares this with the measured peak."""
    per_image = num_images * (2 * 8 + 8 * num_attributes)
    kept = 4 * max_pairs * 64
    per_pair = _CONSUMER_BYTES_PER_PAIR + _CONSUMER_BYTES_PER_ATTRIBUTE * num_attributes
    slack = chunk_bytes + _ALLOCATOR_SLACK
    rows = pair_chunk_rows(max(dim_a, dim_b) * itemsize, chunk_bytes)
    if exhaustive:
        block_pairs = max(chunk_bytes // EXHAUSTIVE_BYTES_PER_PAIR, num_images)
        scanning = chunk_bytes + block_pairs * per_pair
        q = min(num_unordered_pairs(num_images), QUANTILE_PAIRS)
        quantile = (64 + 40) * q + chunk_bytes + max(rows, block_pairs) * per_pair if quantiles else 0
        return per_image + max(scanning, quantile) + kept + slack
    sampling = 48 * num_pairs
    scanning = 16 * num_pairs + chunk_bytes + rows * per_pair
    quantile = 16 * num_pairs + 40 * min(num_pairs, QUANTILE_PAIRS) + chunk_bytes + rows * per_pair if quantiles else 0
    return per_image + max(sampling, scanning, quantile) + kept + slack
