"""The cosines of image pairs under both encoders, streamed in chunks of bounded memory: the feature and pair checks,
the rows' inverse norms (no normalized copy of the features), and iter_pair_cosines over given pairs or over all
pairs i < j. Depends on nothing else in the package."""

from __future__ import annotations

from typing import Iterator

import torch

DEFAULT_CHUNK_BYTES = 16 * 2**20  # gathered feature rows per scan chunk (the wider encoder's two [C, D] blocks)
EXHAUSTIVE_BYTES_PER_PAIR = 64  # the exhaustive iterator's own tensors per pair of a row block (sims, mask, ij)
_EPS = 1e-12  # F.normalize's: a zero feature has cosine 0 with everything


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


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32  # half / bfloat16 upcast per chunk


def inverse_norms(x: torch.Tensor, name: str = "features", *, block: int = 8192) -> torch.Tensor:
    """[N] 1 / max(||x_i||, 1e-12) in the compute precision, by row blocks; rejects non-finite features."""
    dtype = compute_dtype(x)
    inv = torch.empty(x.shape[0], dtype=dtype, device=x.device)
    for r0 in range(0, x.shape[0], block):
        xb = x[r0:r0 + block].to(dtype)
        finite = torch.isfinite(xb).all(dim=1)
        if not bool(finite.all()):
            bad = r0 + int((~finite).nonzero()[0, 0])
            raise ValueError(f"{name} row {bad} has non-finite values (NaN or inf)")
        inv[r0:r0 + block] = torch.linalg.vector_norm(xb, dim=1).clamp_min_(_EPS).reciprocal_()
    return inv


def pair_chunk_rows(dims_bytes: int, chunk_bytes: int) -> int:
    return max(1, int(chunk_bytes) // (2 * dims_bytes))


def check_pairs(pairs, n: int) -> torch.Tensor:
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
    da, db = compute_dtype(a), compute_dtype(b)
    out_dtype = torch.promote_types(da, db)
    if pairs is not None:
        pairs = check_pairs(pairs, n)
        widest = max(a.shape[1] * torch.finfo(da).bits // 8, b.shape[1] * torch.finfo(db).bits // 8)
        step = pair_chunk_rows(widest, chunk_bytes)
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
    rows = max(1, int(chunk_bytes) // (EXHAUSTIVE_BYTES_PER_PAIR * n))
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
        dtype = torch.promote_types(compute_dtype(torch.as_tensor(feats_a)), compute_dtype(torch.as_tensor(feats_b)))
        return torch.empty(0, dtype=dtype), torch.empty(0, dtype=dtype)
    return torch.cat([p[2] for p in parts]), torch.cat([p[3] for p in parts])
