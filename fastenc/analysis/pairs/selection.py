"""The streaming top-k of each side: which pairs pass the A-high and B-high criteria, how many, and the best
max_pairs of each ranked by the gap (ties by the smaller pair (i, j), then by the stream position, so the result does
not depend on chunking). PairSelector takes chunks of cosines; select_pairs runs it over precomputed cosines.
Depends on thresholds (the cuts) and cosines (the pair check)."""

from __future__ import annotations

import dataclasses
from typing import Mapping

import torch

from fastenc.analysis.pairs.cosines import check_pairs
from fastenc.analysis.pairs.thresholds import PairThresholds, QuantileThresholds, as_thresholds


@dataclasses.dataclass
class SideSelection:
    """One side's result: `count` pairs passed its criterion; the kept top ones (at most max_pairs), best first.

    index: positions in the scanned stream (exhaustive scans: the row-major rank among all pairs i < j);
    pairs: [k, 2] image indices with i < j (None when the selection ran on bare cosines); gap: the ranking score."""

    count: int
    index: torch.Tensor
    pairs: torch.Tensor | None
    cos_a: torch.Tensor
    cos_b: torch.Tensor
    gap: torch.Tensor

    def __len__(self) -> int:
        return int(self.index.numel())


@dataclasses.dataclass
class PairSelection:
    num_pairs: int
    a_high: SideSelection
    b_high: SideSelection


def _rank(gap: torch.Tensor, pos: torch.Tensor, i: torch.Tensor | None, j: torch.Tensor | None) -> torch.Tensor:
    """Permutation ordering by gap descending, then i, j, stream position ascending (stable sorts, last key first)."""
    order = torch.argsort(pos, stable=True)
    for key in ((j, i) if i is not None else ()):
        order = order[torch.argsort(key[order], stable=True)]
    return order[torch.argsort(gap[order], descending=True, stable=True)]


class _RunningTop:
    """The best k candidates seen so far under _rank's order, and how many passed in all."""

    def __init__(self, k: int, dtype: torch.dtype):
        self.k, self.count = k, 0
        self.gap, self.cos_a, self.cos_b = (torch.empty(0, dtype=dtype) for _ in range(3))
        self.pos = torch.empty(0, dtype=torch.int64)
        self.i = self.j = None

    def push(self, mask, gap, cos_a, cos_b, i, j, offset: int) -> None:
        idx = mask.nonzero().view(-1)
        self.count += int(idx.numel())
        if self.k == 0 or idx.numel() == 0:
            return
        g = gap[idx]
        if self.gap.numel() >= self.k:  # strictly worse than the worst kept: can never enter
            keep = g >= self.gap[-1]
            idx, g = idx[keep], g[keep]
        if g.numel() > self.k:  # at least k candidates of this chunk beat anything below the k-th largest gap
            keep = g >= g.topk(self.k).values[-1]
            idx, g = idx[keep], g[keep]
        if idx.numel() == 0:
            return
        gap_all = torch.cat([self.gap, g.to(self.gap.dtype)])
        pos_all = torch.cat([self.pos, idx + offset])
        ca = torch.cat([self.cos_a, cos_a[idx].to(self.gap.dtype)])
        cb = torch.cat([self.cos_b, cos_b[idx].to(self.gap.dtype)])
        if i is not None:
            ci, cj = i[idx], j[idx]
            ci, cj = torch.minimum(ci, cj), torch.maximum(ci, cj)
            i_all = ci if self.i is None else torch.cat([self.i, ci])
            j_all = cj if self.j is None else torch.cat([self.j, cj])
        else:
            i_all = j_all = None
        order = _rank(gap_all, pos_all, i_all, j_all)[:self.k]
        self.gap, self.pos, self.cos_a, self.cos_b = gap_all[order], pos_all[order], ca[order], cb[order]
        if i_all is not None:
            self.i, self.j = i_all[order], j_all[order]

    def result(self, with_pairs: bool) -> SideSelection:
        pairs = None
        if with_pairs:
            pairs = (torch.stack([self.i, self.j], dim=1) if self.i is not None
                     else torch.empty(0, 2, dtype=torch.int64))
        return SideSelection(self.count, self.pos.clone(), pairs, self.cos_a.clone(), self.cos_b.clone(),
                             self.gap.clone())


class PairSelector:
    """Streaming selection of the A-high and B-high pairs: feed chunks with update(), read result() at the end.

    Keeps at most max_pairs candidates per side plus one chunk, whatever the number of pairs scanned. The kept
    pairs and their order do not depend on how the stream is chunked (see the module docstring for the order)."""

    def __init__(self, thresholds: PairThresholds | Mapping[str, float] | str | None = None, *,
                 max_pairs: int = 100, dtype: torch.dtype = torch.float64):
        if isinstance(max_pairs, bool) or not isinstance(max_pairs, int) or max_pairs < 0:
            raise ValueError(f"max_pairs must be a non-negative integer, got {max_pairs!r}")
        if isinstance(as_thresholds(thresholds), QuantileThresholds):
            raise ValueError("PairSelector needs absolute cuts: resolve quantile thresholds first "
                             "(QuantileThresholds.resolve, or scan_pairs / analyze_pairs, which do it)")
        self.thresholds = as_thresholds(thresholds)
        self.max_pairs, self.num_pairs = max_pairs, 0
        self._a, self._b = _RunningTop(max_pairs, dtype), _RunningTop(max_pairs, dtype)
        self._with_pairs: bool | None = None

    def update(self, cos_a: torch.Tensor, cos_b: torch.Tensor, i: torch.Tensor | None = None,
               j: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Scan one chunk of cosines (and the chunk's image indices i, j, if known); returns the chunk's
        (A-high mask, B-high mask)."""
        if cos_a.shape != cos_b.shape or cos_a.dim() != 1:
            raise ValueError(f"cos_a {tuple(cos_a.shape)} and cos_b {tuple(cos_b.shape)} must be equal-length 1-D")
        if (i is None) != (j is None) or (i is not None and (i.shape != cos_a.shape or j.shape != cos_a.shape)):
            raise ValueError("pass both i and j, each with one index per cosine, or neither")
        if self._with_pairs is None:
            self._with_pairs = i is not None
        elif self._with_pairs != (i is not None):
            raise ValueError("every chunk must carry pair indices, or none may")
        t = self.thresholds
        dtype = torch.promote_types(cos_a.dtype, cos_b.dtype)
        cos_a, cos_b = cos_a.to(dtype), cos_b.to(dtype)
        mask_a = (cos_a > t.a_high) & (cos_b < t.b_low)
        mask_b = (cos_b > t.b_high) & (cos_a < t.a_low)
        # gaps in the cosines' own precision: the ranking does not depend on the selector's storage dtype
        self._a.push(mask_a, cos_a - cos_b, cos_a, cos_b, i, j, self.num_pairs)
        self._b.push(mask_b, cos_b - cos_a, cos_a, cos_b, i, j, self.num_pairs)
        self.num_pairs += int(cos_a.numel())
        return mask_a, mask_b

    def result(self) -> PairSelection:
        with_pairs = bool(self._with_pairs)
        return PairSelection(self.num_pairs, self._a.result(with_pairs), self._b.result(with_pairs))


def select_pairs(cos_a, cos_b, *, pairs=None, a_high: float = 0.7, b_low: float = 0.5, b_high: float = 0.8,
                 a_low: float = 0.5, max_pairs: int = 100, chunk: int = 1 << 20) -> PairSelection:
    """The A-high (cos_a > a_high and cos_b < b_low) and B-high (cos_b > b_high and cos_a < a_low) pairs among
    precomputed cosines: counts, and the top max_pairs of each side by gap, streamed in chunks of `chunk`.

    pairs: the [M, 2] image indices of the cosines (ties then break by (i, j); returned in SideSelection.pairs).
    Defaults: the paper's thresholds with A = CLIP, B = DINO."""
    cos_a, cos_b = torch.as_tensor(cos_a), torch.as_tensor(cos_b)
    if cos_a.dim() != 1 or cos_a.shape != cos_b.shape:
        raise ValueError(f"cos_a {tuple(cos_a.shape)} and cos_b {tuple(cos_b.shape)} must be equal-length 1-D")
    if not (cos_a.is_floating_point() and cos_b.is_floating_point()):
        raise ValueError("cosines must be floating point")
    if pairs is not None:
        pairs = torch.as_tensor(pairs)
        if pairs.dim() != 2 or pairs.shape != (cos_a.shape[0], 2):
            raise ValueError(f"pairs must be [{cos_a.shape[0]}, 2] (one pair per cosine), got {tuple(pairs.shape)}")
        pairs = check_pairs(pairs, int(pairs.max()) + 1 if pairs.numel() else 1)
    sel = PairSelector(PairThresholds(a_high=a_high, b_low=b_low, b_high=b_high, a_low=a_low), max_pairs=max_pairs,
                       dtype=torch.promote_types(cos_a.dtype, cos_b.dtype))
    for s in range(0, cos_a.shape[0], max(1, int(chunk))):
        ij = (pairs[s:s + chunk, 0], pairs[s:s + chunk, 1]) if pairs is not None else (None, None)
        sel.update(cos_a[s:s + chunk], cos_b[s:s + chunk], *ij)
    return sel.result()
