"""Image-text retrieval recall@K in both directions, on precomputed embeddings, without an N x N matrix.

Scores are cosine similarities (both sides L2-normalized here). Image -> text: an image is a hit at K when one of
its captions ranks within the top K texts; text -> image: a caption is a hit at K when its image ranks within the
top K images. Rank of the true match = number of NON-matching candidates scoring at least as high, so ties count
against the query (pessimistic, as in zeroshot.py; a collapsed encoder whose scores all tie gets recall ~0, not
K/N) and the result does not depend on sort order. "At least as high" allows `tie_tol` (default 64 machine epsilons
of the compute dtype): the true pair's score and its competitors' come from different products whose rounding
differs, and a duplicate caption (same text, another image) must still tie rather than win or lose on rounding.
`ties` picks another convention: "optimistic" counts only candidates scoring strictly higher (beyond tie_tol),
"expected" gives the recall expected under uniformly random tie-breaking (the true match equally likely at any of
its tied positions: a collapsed encoder then scores K/N, chance). Without ties all three agree. Ties are not
academic on the synthetic study data: about 45 % of its captions have an exact duplicate ("there is a ring in this
image"), so pessimistic i2t recall is capped by the unique-caption fraction; "expected" is the fair choice there.
For an image with several captions, its best-scoring caption is the true match and its other captions are not
counted as competitors (CLIP_benchmark's "any caption in the top K").

The similarity matrix is visited in [chunk, chunk] blocks and only per-query counts are kept: memory O(chunk^2 + N).
Arithmetic runs in the inputs' dtype (at least fp32; fp64 inputs stay fp64) on their device.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


@torch.no_grad()
def retrieval_recall(image_emb: torch.Tensor, text_emb: torch.Tensor, ks: Sequence[int] = (1, 5, 10), *,
                     chunk: int = 1024, text_image_ids: torch.Tensor | None = None,
                     tie_tol: float | None = None, ties: str = "pessimistic") -> dict[str, float]:
    """{"i2t_R@1": ..., "t2i_R@1": ..., ...} for each K in ks (fractions in [0, 1]).

    image_emb [N, E], text_emb [M, E]. Without text_image_ids the pairing is row to row (M == N, text i describes
    image i); with it, text_image_ids [M] gives the image row each text describes (several captions per image; every
    image needs at least one). tie_tol: scores this close to the true one count as ties (module docstring); 0 makes
    the comparison exact. ties: "pessimistic" | "expected" | "optimistic" (module docstring)."""
    ks = _check_args(image_emb, text_emb, ks, ties, chunk)
    dtype = torch.promote_types(torch.promote_types(image_emb.dtype, text_emb.dtype), torch.float32)
    ids = _pair_ids(text_image_ids, len(image_emb), len(text_emb), image_emb.device)
    if tie_tol is None:
        tie_tol = 64 * torch.finfo(dtype).eps
    elif tie_tol < 0:
        raise ValueError(f"tie_tol must be >= 0 (got {tie_tol})")
    img = F.normalize(image_emb.to(dtype), dim=-1)
    txt = F.normalize(text_emb.to(device=image_emb.device, dtype=dtype), dim=-1)
    if not (bool(torch.isfinite(img).all()) and bool(torch.isfinite(txt).all())):
        raise ValueError("image_emb or text_emb has NaN/inf values")
    counts = _competitor_counts(img, txt, ids, chunk, tie_tol, need_gt=ties != "pessimistic")
    return _recalls(counts, ks, ties)


def _check_args(image_emb: torch.Tensor, text_emb: torch.Tensor, ks: Sequence[int], ties: str, chunk: int) -> list[int]:
    """Validate shapes and options (ValueError naming the problem); return ks as a list of ints."""
    if image_emb.ndim != 2 or text_emb.ndim != 2:
        raise ValueError(f"image_emb and text_emb must be [N, E] and [M, E] (got {tuple(image_emb.shape)} and "
                         f"{tuple(text_emb.shape)})")
    N, M = len(image_emb), len(text_emb)
    if N == 0 or M == 0:
        raise ValueError(f"empty retrieval set ({N} images, {M} texts)")
    if image_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(f"embedding widths differ: image_emb has {image_emb.shape[1]} dims, text_emb "
                         f"{text_emb.shape[1]} (the image and text projections must share one embedding space)")
    ks = [int(k) for k in ks]
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"ks must be a non-empty list of ints >= 1 (got {ks})")
    if ties not in ("pessimistic", "expected", "optimistic"):
        raise ValueError(f"ties must be 'pessimistic', 'expected' or 'optimistic' (got {ties!r})")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1 (got {chunk})")
    return ks


def _pair_ids(text_image_ids: torch.Tensor | None, N: int, M: int, device: torch.device) -> torch.Tensor:
    """The image row of each of the M texts, [M] long on `device` (row to row without text_image_ids); checked."""
    if text_image_ids is None:
        if M != N:
            raise ValueError(f"{N} images but {M} texts: row-to-row pairing needs one text per image; pass "
                             "text_image_ids (the image row of each text) for several captions per image")
        return torch.arange(N, device=device)
    ids = text_image_ids.to(device)
    if ids.shape != (M,) or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"text_image_ids must be [M={M}] integer image rows (got shape {tuple(ids.shape)}, "
                         f"dtype {ids.dtype})")
    ids = ids.long()
    if int(ids.min()) < 0 or int(ids.max()) >= N:
        raise ValueError(f"text_image_ids go from {int(ids.min())} to {int(ids.max())} but there are {N} images")
    captions = torch.bincount(ids, minlength=N)
    if bool((captions == 0).any()):
        raise ValueError(f"{int((captions == 0).sum())} of {N} images have no text in text_image_ids (e.g. row "
                         f"{int((captions == 0).nonzero()[0])}): every image needs a caption")
    return ids


def _competitor_counts(img: torch.Tensor, txt: torch.Tensor, ids: torch.Tensor, chunk: int, tie_tol: float, *,
                       need_gt: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{"i2t": (ge_i, gt_i), "t2i": (ge_t, gt_t)}: per query, the non-matching candidates scoring >= the true match
    (ties included) and > it (ties excluded; left zero unless need_gt), visiting [chunk, chunk] blocks."""
    N, M, device, dtype = len(img), len(txt), img.device, img.dtype
    # score of each text with its own image, and each image's best caption score
    true_t = torch.cat([(txt[s:s + chunk] * img[ids[s:s + chunk]]).sum(-1) for s in range(0, M, chunk)])
    true_i = torch.full((N,), float("-inf"), dtype=dtype, device=device).scatter_reduce(0, ids, true_t, "amax")
    ge_i, gt_i = torch.zeros(N, dtype=torch.long, device=device), torch.zeros(N, dtype=torch.long, device=device)
    ge_t, gt_t = torch.zeros(M, dtype=torch.long, device=device), torch.zeros(M, dtype=torch.long, device=device)
    for i0 in range(0, N, chunk):
        rows = torch.arange(i0, min(i0 + chunk, N), device=device)
        ti = true_i[i0:i0 + chunk, None]
        for t0 in range(0, M, chunk):
            s = img[i0:i0 + chunk] @ txt[t0:t0 + chunk].T  # [ni, nt]
            other = ids[t0:t0 + chunk][None, :] != rows[:, None]  # non-matching pairs
            tt = true_t[None, t0:t0 + chunk]
            ge_i[i0:i0 + chunk] += ((s >= ti - tie_tol) & other).sum(dim=1)
            ge_t[t0:t0 + chunk] += ((s >= tt - tie_tol) & other).sum(dim=0)
            if need_gt:
                gt_i[i0:i0 + chunk] += ((s > ti + tie_tol) & other).sum(dim=1)
                gt_t[t0:t0 + chunk] += ((s > tt + tie_tol) & other).sum(dim=0)
    return {"i2t": (ge_i, gt_i), "t2i": (ge_t, gt_t)}


def _recalls(counts: dict[str, tuple[torch.Tensor, torch.Tensor]], ks: list[int], ties: str) -> dict[str, float]:
    """Recall@K per direction from the competitor counts, under the `ties` convention (module docstring)."""
    out = {}
    for direction, (ge, gt) in counts.items():
        for k in ks:
            if ties == "pessimistic":
                hit = (ge < k).double()
            elif ties == "optimistic":
                hit = (gt < k).double()
            else:  # the true match's rank is uniform over gt .. ge: P(rank < k)
                hit = ((k - gt).clamp(0) / (ge - gt + 1)).clamp(max=1).double()
            out[f"{direction}_R@{k}"] = float(hit.mean())
    return out
