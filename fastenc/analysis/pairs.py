"""Where two encoders disagree: image pairs one encoder calls similar and the other does not.

The comparison of "Data or Language Supervision: What Makes CLIP Better than DINO?": embed the same images with
both encoders (L2-normalized CLS features), draw random image pairs, and look at the pairs that are close under
one encoder and far under the other. "CLIP-high" pairs have cosine > 0.7 under CLIP and < 0.5 under DINO;
"DINO-high" pairs > 0.8 under DINO and < 0.5 under CLIP (a strict variant: 0.9 / 0.5 and 0.95 / 0.2); about 100
of each kind are inspected by eye. The paper finds CLIP pairs sharing object category and written text, DINO
pairs sharing color and visual style. On fastenc's synthetic data every image has known attributes (category,
color, style, word; fastenc.data.synth), so the same inspection becomes a number: the fraction of pairs of each
kind whose two images share each attribute, against the fraction among all sampled pairs.

Encoders are "A" and "B" throughout (A = CLIP, B = DINO in the paper, whose thresholds are the defaults):
    A-high / B-low:  cos_a > a_high and cos_b < b_low      (defaults 0.7, 0.5)
    B-high / A-low:  cos_b > b_high and cos_a < a_low      (defaults 0.8, 0.5)
Each side keeps its top `max_pairs` pairs ranked by the gap (cos_a - cos_b for A-high, cos_b - cos_a for B-high);
ties are broken by the smaller pair (i, j), then by the earlier position in the scanned stream, so the kept pairs
and their order are a deterministic function of the pairs scanned, not of chunk sizes.

Memory. Nothing here builds an N x N matrix. Features are used as given (no normalized copy: cosines are the
raw dot products times the rows' inverse norms, an [N] vector per encoder), pairs are scanned in chunks whose
gathered rows take about `chunk_bytes` (16 MiB by default), and the selection keeps a running top-k per side.
With M sampled pairs the memory beyond the input features is at most about 48 * M bytes (sampling; the pair
list kept for the scan is 16 * M) plus two chunks and 16 MiB: `memory_bound_bytes` states the bound term by
term, and benchmarks/bench_pairs.py measures it (N = 100,000 images per encoder, M = 2,000,000 pairs: seconds,
about 100 MiB). `mode="exhaustive"` scans all N (N - 1) / 2 pairs i < j in row blocks instead, for small N
(tests check it against a brute-force N x N matrix).

Outputs of `analyze_pairs(..., out_dir=...)`:
    pairs.json             thresholds, counts, cosine statistics, the kept pairs of each side, attribute sharing
    sharing.md             the counts and the attribute-sharing table in markdown
    pairs_<a>_high.png     the kept A-high pairs, two images side by side each, captioned (with load_image)
    pairs_<b>_high.png     the same for B-high
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import time
from typing import Callable, Iterator, Mapping, Sequence

import torch

DEFAULT_CHUNK_BYTES = 16 * 2**20  # gathered feature rows per scan chunk (the wider encoder's two [C, D] blocks)
_EXHAUSTIVE_BYTES_PER_PAIR = 64  # the exhaustive iterator's own tensors per pair of a row block (sims, mask, ij)
_CONSUMER_BYTES_PER_PAIR, _CONSUMER_BYTES_PER_ATTRIBUTE = 128, 32  # scan_pairs' temporaries per pair of a chunk
_ALLOCATOR_SLACK = 16 * 2**20
_EPS = 1e-12  # F.normalize's: a zero feature has cosine 0 with everything
_SETS = ("all", "a_high", "a_high_top", "b_high", "b_high_top")


# ----------------------------------------------------------------------------------------------------------------
# thresholds


@dataclasses.dataclass(frozen=True)
class PairThresholds:
    """The two disagreement criteria. A-high: cos_a > a_high and cos_b < b_low; B-high: cos_b > b_high and
    cos_a < a_low. Defaults: the paper's, with A = CLIP and B = DINO. Comparisons are strict and happen in the
    cosines' precision (float32 features: the thresholds rounded to float32)."""

    a_high: float = 0.7
    b_low: float = 0.5
    b_high: float = 0.8
    a_low: float = 0.5

    def __post_init__(self):
        _check_cuts(self, "threshold", -1.0, "a finite cosine in [-1, 1]")

    def describe(self, names: Sequence[str] = ("a", "b"), quantiles: "QuantileThresholds | None" = None) -> dict:
        """Human-readable criteria per side, keyed "<a>_high" / "<b>_high" (with the quantiles the cuts came from)."""
        a, b = names

        def cut(field):
            v = f"{getattr(self, field):.4g}" if quantiles else f"{getattr(self, field):g}"
            return v + (f" (q{getattr(quantiles, field):g})" if quantiles else "")

        return {f"{a}_high": f"cos_{a} > {cut('a_high')} and cos_{b} < {cut('b_low')}",
                f"{b}_high": f"cos_{b} > {cut('b_high')} and cos_{a} < {cut('a_low')}"}


def _check_cuts(cuts, what: str, lowest: float, allowed: str) -> None:
    """Both threshold dataclasses: every field a finite number in [lowest, 1] (stored as float), and each encoder's
    'high' cut not under its 'low' cut (the two sides could then overlap)."""
    for field in dataclasses.fields(cuts):
        v = getattr(cuts, field.name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lowest <= v <= 1:
            raise ValueError(f"{what} {field.name}={v!r}: must be {allowed}")
        object.__setattr__(cuts, field.name, float(v))
    for hi, lo in (("a_high", "a_low"), ("b_high", "b_low")):
        if getattr(cuts, hi) < getattr(cuts, lo):
            raise ValueError(f"{what} {hi}={getattr(cuts, hi)} is below {lo}={getattr(cuts, lo)}: an encoder's "
                             f"'high' cut must not be under its 'low' cut (the two sides could then overlap)")


PAPER_THRESHOLDS = PairThresholds()
STRICT_THRESHOLDS = PairThresholds(a_high=0.9, b_low=0.5, b_high=0.95, a_low=0.2)
_PRESETS = {"paper": PAPER_THRESHOLDS, "strict": STRICT_THRESHOLDS}


@dataclasses.dataclass(frozen=True)
class QuantileThresholds:
    """The same criteria with each cut given as a quantile of that encoder's own cosine distribution over the
    pairs (e.g. a_high=0.95: the top 5 % of pairs under A), for encoders whose cosine scales differ: a small ViT's
    CLS features can sit at cosine 0.6-1.0 for every pair, where the paper's absolute cuts select nothing.
    `resolve` turns them into absolute PairThresholds from a sample of pair cosines (resolve_quantiles: at most
    QUANTILE_PAIRS of the scanned pairs, an even stride through them, or a seeded sample of that size when every
    pair is scanned and there are more)."""

    a_high: float = 0.95
    b_low: float = 0.5
    b_high: float = 0.95
    a_low: float = 0.5

    def __post_init__(self):
        _check_cuts(self, "quantile", 0.0, "in [0, 1]")

    def resolve(self, cos_a: torch.Tensor, cos_b: torch.Tensor) -> PairThresholds:
        """Absolute cuts: the quantiles of cos_a (a_high, a_low) and cos_b (b_high, b_low), float64."""
        if cos_a.numel() == 0:
            raise ValueError("quantile thresholds need at least one pair to estimate the cosine quantiles from")
        # float32 cosines of near-identical images can round past 1: the cuts stay valid cosines
        qa = torch.quantile(cos_a.double(), torch.tensor([self.a_high, self.a_low], dtype=torch.float64)).clamp(-1, 1)
        qb = torch.quantile(cos_b.double(), torch.tensor([self.b_high, self.b_low], dtype=torch.float64)).clamp(-1, 1)
        return PairThresholds(a_high=float(qa[0]), a_low=float(qa[1]), b_high=float(qb[0]), b_low=float(qb[1]))


QUANTILE_PAIRS = 1 << 20  # pairs whose cosines estimate QuantileThresholds (quantile error ~ 1e-3 in rank)


def as_thresholds(thresholds) -> PairThresholds | QuantileThresholds:
    """A PairThresholds from itself, a preset name ("paper", "strict"), or a mapping of the fields to change; a
    QuantileThresholds from itself, "quantile" (its defaults) or {"quantile": {fields to change}}."""
    if isinstance(thresholds, QuantileThresholds) or thresholds == "quantile":
        return QuantileThresholds() if thresholds == "quantile" else thresholds
    if isinstance(thresholds, Mapping) and set(thresholds) == {"quantile"}:
        q = thresholds["quantile"] or {}
        if not isinstance(q, Mapping):
            raise ValueError(f"thresholds {{quantile: ...}} takes a mapping of quantiles, got {q!r}")
        known = {f.name for f in dataclasses.fields(QuantileThresholds)}
        if set(q) - known:
            raise ValueError(f"unknown quantile field(s) {sorted(set(q) - known)} (known: {sorted(known)})")
        return QuantileThresholds(**q)
    return _as_absolute(thresholds)


def _as_absolute(thresholds: PairThresholds | Mapping[str, float] | str | None) -> PairThresholds:
    """A PairThresholds from itself, a preset name ("paper", "strict"), or a mapping of the fields to change."""
    if thresholds is None:
        return PAPER_THRESHOLDS
    if isinstance(thresholds, PairThresholds):
        return thresholds
    if isinstance(thresholds, str):
        if thresholds not in _PRESETS:
            raise ValueError(f"unknown threshold preset {thresholds!r} (known: {', '.join(_PRESETS)}, quantile)")
        return _PRESETS[thresholds]
    if isinstance(thresholds, Mapping):
        known = {f.name for f in dataclasses.fields(PairThresholds)}
        unknown = sorted(set(thresholds) - known)
        if unknown:
            raise ValueError(f"unknown threshold field(s) {unknown} (known: {sorted(known)}, or {{quantile: ...}})")
        return PairThresholds(**thresholds)
    raise ValueError(f"thresholds must be a PairThresholds, a preset name or a mapping, "
                     f"not {type(thresholds).__name__}")


# ----------------------------------------------------------------------------------------------------------------
# pair sampling


def num_unordered_pairs(n: int) -> int:
    return n * (n - 1) // 2


def pairs_from_linear_index(k: torch.Tensor, n: int) -> torch.Tensor:
    """[K, 2] pairs (i, j), i < j, from linear indices into the row-major list of all pairs i < j of n items.

    Row i holds n - 1 - i pairs starting at s(i) = i (2n - i - 1) / 2; i is the root of s(i) = k in float64
    (exact enough up to n ~ 4e7), then corrected by one step either way."""
    k = k.to(torch.int64)
    b = 2 * n - 1
    i = ((b - torch.sqrt((b * b - 8 * k).to(torch.float64))) / 2).floor().to(torch.int64).clamp_(0, max(n - 2, 0))

    def start(r):
        return r * (2 * n - r - 1) // 2

    for _ in range(2):
        i -= (start(i) > k).to(torch.int64)
        i += (start(i + 1) <= k).to(torch.int64)
    return torch.stack([i, k - start(i) + i + 1], dim=1)


def sample_pairs(n: int, num_pairs: int, *, seed: int = 0, unique: bool = True,
                 generator: torch.Generator | None = None, decode_chunk: int = 1 << 20) -> torch.Tensor:
    """[num_pairs, 2] int64 uniformly random unordered pairs (i, j) of n images, i < j (never i == j).

    Each pair is a uniform draw from the n (n - 1) / 2 pairs (a linear index, decoded). unique=True draws without
    duplicate pairs: draws with replacement until enough distinct ones exist, then a uniformly random subset of
    them (by symmetry, a uniformly random set of num_pairs distinct pairs); when more than half of all pairs are
    asked for, a random permutation of all of them is cut instead. Rows come sorted by (i, j): reproducible for a
    seed and friendly to the row gathers of the scan. `generator` (a seeded torch.Generator) overrides `seed`.
    Memory: about 48 bytes per pair at the peak (the result holds 16)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"need an integer number of images n >= 2, got {n!r}")
    if isinstance(num_pairs, bool) or not isinstance(num_pairs, int) or num_pairs < 0:
        raise ValueError(f"num_pairs must be a non-negative integer, got {num_pairs!r}")
    total = num_unordered_pairs(n)
    if unique and num_pairs > total:
        raise ValueError(f"{num_pairs} distinct pairs asked of {n} images, which have only {total}: ask for fewer, "
                         f"pass unique=False, or scan all pairs (mode='exhaustive')")
    g = generator if generator is not None else torch.Generator().manual_seed(int(seed))
    if not unique:
        keys = torch.randint(0, total, (num_pairs,), generator=g, dtype=torch.int64).sort().values
    elif 2 * num_pairs > total:
        keys = torch.randperm(total, generator=g)[:num_pairs].sort().values
    else:
        keys = torch.empty(0, dtype=torch.int64)
        while keys.numel() < num_pairs:
            need = num_pairs - keys.numel()
            draw = torch.randint(0, total, (need + int(need * 2 * num_pairs / total) + 16,), generator=g)
            keys = torch.unique(torch.cat([keys, draw]))  # sorted
            del draw
        if keys.numel() > num_pairs:
            keys = keys[torch.randperm(keys.numel(), generator=g)[:num_pairs]].sort().values
    out = torch.empty(num_pairs, 2, dtype=torch.int64)
    for s in range(0, num_pairs, decode_chunk):
        out[s:s + decode_chunk] = pairs_from_linear_index(keys[s:s + decode_chunk], n)
    return out


# ----------------------------------------------------------------------------------------------------------------
# cosines of pairs, in chunks


def _as_features(x, name: str) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.dim() != 2:
        raise ValueError(f"{name} must be [N, D] features, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {x.dtype}")
    return x


def check_features(feats_a, feats_b) -> tuple[torch.Tensor, torch.Tensor]:
    """The two feature matrices as tensors, checked: [N, Da] and [N, Db], the same N >= 2 images, one device."""
    a, b = _as_features(feats_a, "feats_a"), _as_features(feats_b, "feats_b")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"feats_a has {a.shape[0]} rows and feats_b {b.shape[0]}: both must hold the same N images "
                         f"in the same order")
    if a.shape[0] < 2:
        raise ValueError(f"need at least 2 images to form a pair, got {a.shape[0]}")
    if a.device != b.device:
        raise ValueError(f"feats_a is on {a.device} and feats_b on {b.device}: put both on one device")
    return a, b


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32  # half / bfloat16 upcast per chunk


def inverse_norms(x: torch.Tensor, name: str = "features", *, block: int = 8192) -> torch.Tensor:
    """[N] 1 / max(||x_i||, 1e-12) in the compute precision, by row blocks; rejects non-finite features."""
    dtype = _compute_dtype(x)
    inv = torch.empty(x.shape[0], dtype=dtype, device=x.device)
    for r0 in range(0, x.shape[0], block):
        xb = x[r0:r0 + block].to(dtype)
        finite = torch.isfinite(xb).all(dim=1)
        if not bool(finite.all()):
            bad = r0 + int((~finite).nonzero()[0, 0])
            raise ValueError(f"{name} row {bad} has non-finite values (NaN or inf)")
        inv[r0:r0 + block] = torch.linalg.vector_norm(xb, dim=1).clamp_min_(_EPS).reciprocal_()
    return inv


def _pair_chunk_rows(dims_bytes: int, chunk_bytes: int) -> int:
    return max(1, int(chunk_bytes) // (2 * dims_bytes))


def _check_pairs(pairs, n: int) -> torch.Tensor:
    pairs = torch.as_tensor(pairs)
    if pairs.dim() != 2 or pairs.shape[1] != 2:
        raise ValueError(f"pairs must be [M, 2] image indices, got shape {tuple(pairs.shape)}")
    if pairs.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise ValueError(f"pairs must be integer indices, got {pairs.dtype}")
    pairs = pairs.to(torch.int64)
    if pairs.numel():
        lo, hi = int(pairs.min()), int(pairs.max())
        if lo < 0 or hi >= n:
            raise ValueError(f"pair indices span [{lo}, {hi}], outside the {n} images")
        same = (pairs[:, 0] == pairs[:, 1]).nonzero()
        if same.numel():
            r = int(same[0, 0])
            raise ValueError(f"pairs row {r} pairs image {int(pairs[r, 0])} with itself")
    return pairs


def iter_pair_cosines(feats_a, feats_b, pairs=None, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES
                      ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Chunks (i, j, cos_a, cos_b) over the given [M, 2] pairs in order, or over all pairs i < j in row-major
    order when pairs is None (O(N^2) time: small N). Cosines are CPU tensors in a common precision (float64 when
    a feature matrix is float64, else float32); i and j are CPU int64.

    Sampled pairs: a chunk gathers C rows per side of each encoder, C = chunk_bytes / (2 * row bytes of the
    wider encoder), one encoder at a time. Exhaustive: a row block of b images against all later ones, b chosen so
    the block's [b, N] similarities, mask and pair indices take about chunk_bytes (64 bytes per pair)."""
    a, b = check_features(feats_a, feats_b)
    n, device = a.shape[0], a.device
    inv_a, inv_b = inverse_norms(a, "feats_a"), inverse_norms(b, "feats_b")
    da, db = _compute_dtype(a), _compute_dtype(b)
    out_dtype = torch.promote_types(da, db)
    if pairs is not None:
        pairs = _check_pairs(pairs, n)
        widest = max(a.shape[1] * torch.finfo(da).bits // 8, b.shape[1] * torch.finfo(db).bits // 8)
        step = _pair_chunk_rows(widest, chunk_bytes)
        for s in range(0, pairs.shape[0], step):
            i, j = pairs[s:s + step, 0], pairs[s:s + step, 1]
            idx_i, idx_j = i.to(device), j.to(device)
            cos = []
            for x, inv, dtype in ((a, inv_a, da), (b, inv_b, db)):
                xi, xj = x.index_select(0, idx_i).to(dtype), x.index_select(0, idx_j).to(dtype)
                dot = torch.bmm(xi.unsqueeze(1), xj.unsqueeze(2)).view(-1)
                del xi, xj
                cos.append((dot * inv[idx_i] * inv[idx_j]).to(out_dtype).cpu())
            yield i, j, cos[0], cos[1]
        return
    rows = max(1, int(chunk_bytes) // (_EXHAUSTIVE_BYTES_PER_PAIR * n))
    for r0 in range(0, n - 1, rows):
        r1 = min(n - 1, r0 + rows)
        cols = torch.arange(r0 + 1, n, device=device)
        mask = cols[None, :] > torch.arange(r0, r1, device=device)[:, None]
        cos = []
        for x, inv, dtype in ((a, inv_a, da), (b, inv_b, db)):
            sim = (x[r0:r1].to(dtype) @ x[r0 + 1:].to(dtype).T) * inv[r0:r1, None] * inv[None, r0 + 1:]
            cos.append(sim[mask].to(out_dtype).cpu())
            del sim
        ij = mask.nonzero().cpu()
        yield ij[:, 0] + r0, ij[:, 1] + r0 + 1, cos[0], cos[1]


def pair_cosines(feats_a, feats_b, pairs, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos_a [M], cos_b [M]) of the given pairs: memory O(M) for the results plus one chunk of gathered rows."""
    pairs = torch.as_tensor(pairs)
    parts = list(iter_pair_cosines(feats_a, feats_b, pairs, chunk_bytes=chunk_bytes))
    if not parts:
        dtype = torch.promote_types(_compute_dtype(torch.as_tensor(feats_a)), _compute_dtype(torch.as_tensor(feats_b)))
        return torch.empty(0, dtype=dtype), torch.empty(0, dtype=dtype)
    return torch.cat([p[2] for p in parts]), torch.cat([p[3] for p in parts])


# ----------------------------------------------------------------------------------------------------------------
# streaming selection


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
        pairs = _check_pairs(pairs, int(pairs.max()) + 1 if pairs.numel() else 1)
    sel = PairSelector(PairThresholds(a_high=a_high, b_low=b_low, b_high=b_high, a_low=a_low), max_pairs=max_pairs,
                       dtype=torch.promote_types(cos_a.dtype, cos_b.dtype))
    for s in range(0, cos_a.shape[0], max(1, int(chunk))):
        ij = (pairs[s:s + chunk, 0], pairs[s:s + chunk, 1]) if pairs is not None else (None, None)
        sel.update(cos_a[s:s + chunk], cos_b[s:s + chunk], *ij)
    return sel.result()


# ----------------------------------------------------------------------------------------------------------------
# attribute sharing


def check_attributes(attributes: Mapping[str, object] | None, n: int) -> dict[str, torch.Tensor]:
    """{name: int64 [N]} from a mapping of per-image integer values (tensors, arrays, lists); -1 means absent."""
    if attributes is None:
        return {}
    if not isinstance(attributes, Mapping):
        raise ValueError(f"attributes must be a mapping name -> [N] integer values, not {type(attributes).__name__}")
    out = {}
    for name, values in attributes.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"attribute names must be non-empty strings, got {name!r}")
        v = torch.as_tensor(values)
        if v.dim() != 1 or v.shape[0] != n:
            raise ValueError(f"attribute {name!r} has shape {tuple(v.shape)}: need one value per image, [{n}]")
        if v.is_floating_point() or v.is_complex() or v.dtype == torch.bool:
            raise ValueError(f"attribute {name!r} must hold integer ids (-1 = absent), got {v.dtype}")
        v = v.to(torch.int64).cpu()
        if v.numel() and int(v.min()) < -1:
            raise ValueError(f"attribute {name!r} has value {int(v.min())}: ids are >= 0, and -1 means absent")
        out[name] = v
    return out


def _has_absent(v: torch.Tensor) -> bool:
    return bool((v < 0).any())


class _SharingCounter:
    """Per pair set and attribute: pairs, pairs sharing a present value, pairs with both values present."""

    def __init__(self, attributes: dict[str, torch.Tensor]):
        self.attributes = attributes
        self.counts: dict[str, dict[str, list[int]]] = {}

    def add(self, set_name: str, i: torch.Tensor, j: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        per = self.counts.setdefault(set_name, {a: [0, 0, 0] for a in self.attributes})
        if mask is not None:
            i, j = i[mask], j[mask]
        for name, v in self.attributes.items():
            vi, vj = v[i], v[j]
            present = (vi >= 0) & (vj >= 0)
            c = per[name]
            c[0] += int(i.numel())
            c[1] += int(((vi == vj) & present).sum())
            c[2] += int(present.sum())

    def table(self) -> dict:
        out = {}
        for set_name, per in self.counts.items():
            out[set_name] = {}
            for name, (n, shared, both) in per.items():
                row = {"pairs": n, "shared": shared, "share": shared / n if n else None}
                if _has_absent(self.attributes[name]):
                    row.update(both_present=both / n if n else None, share_if_present=shared / both if both else None)
                out[set_name][name] = row
        return out


def attribute_sharing(attributes: Mapping[str, object], pair_sets: Mapping[str, object], *,
                      num_images: int | None = None) -> dict:
    """{set: {attribute: row}} for explicit [k, 2] pair sets; row = {"pairs", "shared" (pairs whose two images
    have the same present value), "share" (= shared / pairs)} and, for attributes with absent (-1) values,
    "both_present" (fraction of pairs where both images have a value) and "share_if_present" (shared / both
    present). Fractions are None for an empty set."""
    if num_images is None:
        num_images = len(next(iter(attributes.values()))) if attributes else 0
    attrs = check_attributes(attributes, num_images)
    counter = _SharingCounter(attrs)
    for set_name, pairs in pair_sets.items():
        pairs = _check_pairs(torch.as_tensor(pairs, dtype=torch.int64).reshape(-1, 2), num_images)
        counter.add(set_name, pairs[:, 0], pairs[:, 1])
    return counter.table()


def attribute_summary(attributes: Mapping[str, torch.Tensor]) -> dict:
    """Per attribute: distinct present values, fraction of images with a value, and the exact chance that two
    distinct random images share a present value (sum_v c_v (c_v - 1) / (N (N - 1))): the baseline to expect."""
    out = {}
    for name, v in attributes.items():
        n = v.shape[0]
        counts = torch.bincount(v[v >= 0]).to(torch.float64) if bool((v >= 0).any()) else torch.zeros(0)
        out[name] = {"values": int((counts > 0).sum()), "present": float((v >= 0).sum()) / n if n else None,
                     "chance_share": float((counts * (counts - 1)).sum()) / (n * (n - 1)) if n > 1 else None}
    return out


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def sharing_markdown(sharing: Mapping[str, Mapping[str, Mapping]], *, labels: Mapping[str, str] | None = None,
                     chance: Mapping[str, Mapping] | None = None) -> str:
    """Markdown table: one row per attribute (two more for attributes with absent values), one column per pair
    set (headed by labels[set] or the set's name, with its pair count). chance: attribute_summary's output, for
    an extra "chance" column."""
    sets = list(sharing)
    if not sets:
        return "(no pair sets)\n"
    attrs = list(next(iter(sharing.values())))
    if not attrs:
        return "(no attributes)\n"
    labels = labels or {}
    head = ["attribute"] + [f"{labels.get(s, s)} ({next(iter(sharing[s].values()))['pairs']:,})" for s in sets]
    if chance:
        head.append("chance")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for a in attrs:
        rows = [(f"{a}: same", "share", "chance_share")]
        if "both_present" in next(iter(sharing.values()))[a]:
            rows = [(f"{a}: both present", "both_present", None),
                    (f"{a}: same (both present)", "share", "chance_share"),
                    (f"{a}: same, given both present", "share_if_present", None)]
        for title, key, chance_key in rows:
            cells = [title] + [_pct(sharing[s][a].get(key)) for s in sets]
            if chance:
                cells.append(_pct(chance.get(a, {}).get(chance_key)) if chance_key else "")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------
# one pass: selection, sharing, statistics


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
    dtype = torch.promote_types(_compute_dtype(a), _compute_dtype(b))
    selector = PairSelector(thresholds, max_pairs=max_pairs, dtype=dtype)
    counter = _SharingCounter(attrs)
    sums = torch.zeros(5, dtype=torch.float64)  # sum a, b, a^2, b^2, ab
    for i, j, ca, cb in iter_pair_cosines(a, b, pairs, chunk_bytes=chunk_bytes):
        mask_a, mask_b = selector.update(ca, cb, i, j)
        ca64, cb64 = ca.double(), cb.double()
        sums += torch.stack([ca64.sum(), cb64.sum(), (ca64 * ca64).sum(), (cb64 * cb64).sum(), (ca64 * cb64).sum()])
        if attrs:
            counter.add("all", i, j)
            counter.add("a_high", i, j, mask_a)
            counter.add("b_high", i, j, mask_b)
    sel = selector.result()
    m = sel.num_pairs
    stats = {"pairs": m}
    if m:
        sa, sb, saa, sbb, sab = (float(x) for x in sums)
        va, vb = max(saa / m - (sa / m) ** 2, 0.0), max(sbb / m - (sb / m) ** 2, 0.0)
        stats.update(mean_a=sa / m, std_a=math.sqrt(va), mean_b=sb / m, std_b=math.sqrt(vb),
                     corr=(sab / m - sa * sb / m / m) / math.sqrt(va * vb) if va > 0 and vb > 0 else None)
    if attrs:
        for side, key in ((sel.a_high, "a_high_top"), (sel.b_high, "b_high_top")):
            top = side.pairs if side.pairs is not None else torch.empty(0, 2, dtype=torch.int64)
            counter.add(key, top[:, 0], top[:, 1])
    table = counter.table()
    sharing = {s: table[s] for s in _SETS if s in table}
    return PairScan(n, m, pairs is None, thresholds, sel.a_high, sel.b_high, stats, sharing, attrs, quantiles)


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
    rows = _pair_chunk_rows(max(dim_a, dim_b) * itemsize, chunk_bytes)
    if exhaustive:
        block_pairs = max(chunk_bytes // _EXHAUSTIVE_BYTES_PER_PAIR, num_images)
        scanning = chunk_bytes + block_pairs * per_pair
        q = min(num_unordered_pairs(num_images), QUANTILE_PAIRS)
        quantile = (64 + 40) * q + chunk_bytes + max(rows, block_pairs) * per_pair if quantiles else 0
        return per_image + max(scanning, quantile) + kept + slack
    sampling = 48 * num_pairs
    scanning = 16 * num_pairs + chunk_bytes + rows * per_pair
    quantile = 16 * num_pairs + 40 * min(num_pairs, QUANTILE_PAIRS) + chunk_bytes + rows * per_pair if quantiles else 0
    return per_image + max(sampling, scanning, quantile) + kept + slack


# ----------------------------------------------------------------------------------------------------------------
# rendering


_PAD, _GAP, _CAPTION_LINES = 8, 4, 3


def _font_size(cell: int) -> int:
    return max(10, cell // 10)


def pair_grid_size(num_pairs: int, *, cell: int = 128, columns: int = 2, title: bool = True) -> tuple[int, int]:
    """(width, height) in px of render_pairs' PNG. Each pair is a panel of two cell x cell images 4 px apart above
    a caption of 3 lines (line height = max(10, cell // 10) + 3, plus 4 px); panels sit in min(columns, pairs)
    columns with 8 px around and between them; a title adds one line height + 8 px at the top. No pairs: one
    panel's space (holding a "no pairs" note)."""
    line_h = _font_size(cell) + 3
    panel_w, panel_h = 2 * cell + _GAP, cell + _CAPTION_LINES * line_h + 4
    cols = max(1, min(columns, num_pairs))
    rows = max(1, math.ceil(num_pairs / cols))
    top = (line_h + _PAD) if title else 0
    return _PAD + cols * (panel_w + _PAD), top + _PAD + rows * (panel_h + _PAD)


@functools.lru_cache(maxsize=4)
def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow's bundled font (>= 10.1): no system font needed
    except (TypeError, OSError):  # older Pillow, or no FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _fit(draw, text: str, font, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def render_pairs(pairs, load_image: Callable[[int], object], out_png: str, *, cos_a=None, cos_b=None,
                 names: Sequence[str] = ("a", "b"), attributes: Mapping[str, object] | None = None,
                 title: str | None = None, cell: int = 128, columns: int = 2) -> str:
    """Draw each pair (i, j) of `pairs` ([k, 2], best first) as two images side by side, captioned with its rank,
    the two cosines (when given: "cos_a / cos_b"), the image indices and the attributes the two images share
    (present and equal; "_id" dropped from their names).
    load_image(index) -> PIL.Image; each image is fitted into a cell x cell square. Size: pair_grid_size.
    Written to a temporary file renamed into place; returns out_png."""
    from PIL import Image, ImageDraw, ImageOps

    if isinstance(cell, bool) or not isinstance(cell, int) or cell < 8:
        raise ValueError(f"cell must be an integer >= 8 px, got {cell!r}")
    if isinstance(columns, bool) or not isinstance(columns, int) or columns < 1:
        raise ValueError(f"columns must be a positive integer, got {columns!r}")
    pairs = torch.as_tensor(pairs, dtype=torch.int64).reshape(-1, 2)
    k = pairs.shape[0]
    for name, cos in (("cos_a", cos_a), ("cos_b", cos_b)):
        if cos is not None and len(cos) != k:
            raise ValueError(f"{name} has {len(cos)} values for {k} pairs")
    attrs = {}
    if attributes:
        attrs = check_attributes(attributes, len(next(iter(attributes.values()))))
        n = next(iter(attrs.values())).shape[0]
        if k and int(pairs.max()) >= n:
            raise ValueError(f"pair index {int(pairs.max())} is outside the attribute table's {n} images")
    font_size = _font_size(cell)
    font, line_h = _font(font_size), font_size + 3
    width, height = pair_grid_size(k, cell=cell, columns=columns, title=bool(title))
    cols = max(1, min(columns, k))
    panel_w, panel_h = 2 * cell + _GAP, cell + _CAPTION_LINES * line_h + 4
    top = (line_h + _PAD) if title else 0
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((_PAD, _PAD), _fit(draw, title, font, width - 2 * _PAD), font=font, fill=(0, 0, 0))
    if k == 0:
        draw.text((_PAD, top + _PAD), _fit(draw, "no pairs passed", font, panel_w), font=font, fill=(160, 0, 0))
    thumbs: dict[int, object] = {}

    def thumb(index: int):
        if index not in thumbs:
            img = load_image(index)
            if not isinstance(img, Image.Image):
                raise ValueError(f"load_image({index}) returned {type(img).__name__}, not a PIL.Image")
            thumbs[index] = ImageOps.contain(img.convert("RGB"), (cell, cell), Image.Resampling.BICUBIC)
        return thumbs[index]

    a_name, b_name = names
    for r in range(k):
        i, j = int(pairs[r, 0]), int(pairs[r, 1])
        x, y = _PAD + (r % cols) * (panel_w + _PAD), top + _PAD + (r // cols) * (panel_h + _PAD)
        for slot, index in enumerate((i, j)):
            cx = x + slot * (cell + _GAP)
            img = thumb(index)
            draw.rectangle([cx, y, cx + cell - 1, y + cell - 1], fill=(235, 235, 235))
            sheet.paste(img, (cx + (cell - img.width) // 2, y + (cell - img.height) // 2))
        head = f"#{r + 1}"
        if cos_a is not None and cos_b is not None:  # compact, so that small cells keep both numbers
            head += f"  {float(cos_a[r]):.3f} / {float(cos_b[r]):.3f}"
        elif cos_a is not None or cos_b is not None:
            name, cos = (a_name, cos_a) if cos_a is not None else (b_name, cos_b)
            head += f"  {name}={float(cos[r]):.3f}"
        lines = [head, f"images {i} & {j}"]
        if attrs:
            shared = [a.replace("_id", "") for a, v in attrs.items() if int(v[i]) >= 0 and int(v[i]) == int(v[j])]
            lines.append("same: " + (", ".join(shared) if shared else "-"))
        for li, text in enumerate(lines):
            draw.text((x, y + cell + 2 + li * line_h), _fit(draw, text, font, panel_w), font=font,
                      fill=(0, 0, 0) if li == 0 else (70, 70, 70))
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    tmp = out_png + ".tmp.png"
    try:
        sheet.save(tmp, format="PNG")
        os.replace(tmp, out_png)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return out_png


# ----------------------------------------------------------------------------------------------------------------
# everything at once


_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _write_text(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _side_records(side: SideSelection, names: Sequence[str], attrs: dict[str, torch.Tensor]) -> list[dict]:
    a, b = names
    out = []
    for r in range(len(side)):
        rec = {"rank": r + 1}
        if side.pairs is not None:
            i, j = int(side.pairs[r, 0]), int(side.pairs[r, 1])
            rec.update(i=i, j=j)
        rec.update({f"cos_{a}": float(side.cos_a[r]), f"cos_{b}": float(side.cos_b[r]), "gap": float(side.gap[r])})
        if attrs and side.pairs is not None:
            rec["same"] = [n for n, v in attrs.items() if int(v[i]) >= 0 and int(v[i]) == int(v[j])]
            rec["attributes"] = {n: [int(v[i]), int(v[j])] for n, v in attrs.items()}
        out.append(rec)
    return out


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
    names = tuple(names)
    if len(names) != 2 or not all(isinstance(x, str) and _NAME_RE.match(x) for x in names) or names[0] == names[1]:
        raise ValueError(f"names must be two distinct file-name-safe labels (letters, digits, _ . -), got {names!r}")
    if mode not in ("auto", "sample", "exhaustive"):
        raise ValueError(f"mode must be 'auto', 'sample' or 'exhaustive', got {mode!r}")
    if isinstance(max_pairs, bool) or not isinstance(max_pairs, int) or max_pairs < 0:
        raise ValueError(f"max_pairs must be a non-negative integer, got {max_pairs!r}")
    a, b = check_features(feats_a, feats_b)
    n = a.shape[0]
    thresholds = as_thresholds(thresholds)
    attrs = check_attributes(attributes, n)  # validate before the long pass
    if load_image is not None and not callable(load_image):
        raise ValueError("load_image must be a callable index -> PIL.Image")
    exhaustive = mode == "exhaustive" or (mode == "auto" and num_unordered_pairs(n) <= num_pairs)
    pairs = None
    if not exhaustive:
        pairs = sample_pairs(n, num_pairs, seed=seed, unique=unique)
    t_sampled = time.perf_counter()
    scan = scan_pairs(a, b, pairs, thresholds=thresholds, max_pairs=max_pairs, attributes=attrs,
                      chunk_bytes=chunk_bytes, seed=seed)
    del pairs
    t_scanned = time.perf_counter()

    an, bn = names
    rename = {"all": "all", "a_high": f"{an}_high", "a_high_top": f"{an}_high_top", "b_high": f"{bn}_high",
              "b_high_top": f"{bn}_high_top"}
    st = scan.stats
    result = {
        "names": list(names), "num_images": n, "dims": [int(a.shape[1]), int(b.shape[1])],
        "mode": "exhaustive" if exhaustive else "sample", "num_pairs": scan.num_pairs,
        "seed": None if exhaustive else seed, "unique": None if exhaustive else unique,
        "thresholds": dataclasses.asdict(scan.thresholds), "criteria": scan.thresholds.describe(names, scan.quantiles),
        "quantiles": dataclasses.asdict(scan.quantiles) if scan.quantiles else None, "max_pairs": max_pairs,
        "cosine_stats": {"pairs": st["pairs"], **({f"mean_{an}": st["mean_a"], f"std_{an}": st["std_a"],
                                                    f"mean_{bn}": st["mean_b"], f"std_{bn}": st["std_b"],
                                                    "corr": st["corr"]} if st["pairs"] else {})},
        "sides": {},
    }
    for key, side in ((f"{an}_high", scan.a_high), (f"{bn}_high", scan.b_high)):
        result["sides"][key] = {"criterion": result["criteria"][key], "count": side.count,
                                "fraction": side.count / scan.num_pairs if scan.num_pairs else None,
                                "kept": len(side), "top": _side_records(side, names, attrs)}
    if attrs:
        result["attributes"] = attribute_summary(attrs)
        result["sharing"] = {rename[s]: rows for s, rows in scan.sharing.items()}
    timing = {"sample": t_sampled - t_start, "scan": t_scanned - t_sampled}

    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        files = {}
        t0 = time.perf_counter()
        if load_image is not None:
            for key, side in ((f"{an}_high", scan.a_high), (f"{bn}_high", scan.b_high)):
                path = os.path.join(out_dir, f"pairs_{key}.png")
                top = side.pairs if side.pairs is not None else torch.empty(0, 2, dtype=torch.int64)
                title = (f"{key}: {result['criteria'][key]}; top {len(side)} of {side.count:,} passing "
                         f"({scan.num_pairs:,} pairs); captions: cos_{an} / cos_{bn}")
                render_pairs(top, load_image, path, cos_a=side.cos_a, cos_b=side.cos_b, names=names,
                             attributes=attrs or None, title=title, cell=cell, columns=columns)
                files[f"png_{key}"] = path
        timing["render"] = time.perf_counter() - t0
        files["markdown"] = os.path.join(out_dir, "sharing.md")
        files["json"] = os.path.join(out_dir, "pairs.json")
        result["files"] = files
        timing["total"] = time.perf_counter() - t_start
        result["timing_s"] = timing
        _write_text(files["markdown"], report_markdown(result))
        _write_text(files["json"], json.dumps(result, indent=1) + "\n")
    else:
        timing["total"] = time.perf_counter() - t_start
        result["timing_s"] = timing
    return result


def report_markdown(result: Mapping) -> str:
    """sharing.md: the setup, the count of each side, and the attribute-sharing table of an analyze_pairs result."""
    an, bn = result["names"]
    lines = [f"# {an} vs {bn}: pairs one encoder finds similar and the other does not", "",
             f"{result['num_images']:,} images, {result['num_pairs']:,} pairs ({result['mode']}"
             + (f", seed {result['seed']}" if result["mode"] == "sample" else "") + ").", ""]
    cs = result.get("cosine_stats", {})
    if cs.get("pairs"):
        corr = cs.get("corr")
        lines += [f"Cosine over all pairs: {an} {cs[f'mean_{an}']:.3f} +- {cs[f'std_{an}']:.3f}, "
                  f"{bn} {cs[f'mean_{bn}']:.3f} +- {cs[f'std_{bn}']:.3f}, correlation "
                  + ("-" if corr is None else f"{corr:.3f}") + ".", ""]
    lines += ["| pair set | criterion | pairs | fraction of all |", "|---|---|---|---|"]
    for key, side in result["sides"].items():
        lines.append(f"| {key} | {side['criterion']} | {side['count']:,} | {_pct(side['fraction'])} |")
    lines.append("")
    if result.get("sharing"):
        k = result["max_pairs"]
        labels = {"all": "all pairs", f"{an}_high": f"{an}-high", f"{an}_high_top": f"{an}-high top {k}",
                  f"{bn}_high": f"{bn}-high", f"{bn}_high_top": f"{bn}-high top {k}"}
        lines += ["Fraction of pairs whose two images share each attribute (\"same\": equal and present):", "",
                  sharing_markdown(result["sharing"], labels=labels, chance=result.get("attributes"))]
    else:
        lines += ["(no attribute table: no sharing statistics)", ""]
    return "\n".join(lines)
