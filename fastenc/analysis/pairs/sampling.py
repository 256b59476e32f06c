"""Which pairs to look at: uniformly random unordered pairs (i, j), i < j, of N images (sample_pairs), drawn as
linear indices into the row-major list of all pairs and decoded (pairs_from_linear_index). Depends on nothing else in
the package."""

from __future__ import annotations

import torch


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
