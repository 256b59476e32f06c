"""Pairs two encoders disagree on (fastenc.analysis.pairs): sampling, streaming selection against brute force,
attribute sharing on data with planted attributes, rendering, and input checks."""

import dataclasses
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from fastenc.analysis.pairs import (
    PAPER_THRESHOLDS,
    STRICT_THRESHOLDS,
    PairSelector,
    PairThresholds,
    QuantileThresholds,
    analyze_pairs,
    as_thresholds,
    attribute_sharing,
    iter_pair_cosines,
    pair_cosines,
    pair_grid_size,
    pairs_from_linear_index,
    render_pairs,
    sample_pairs,
    scan_pairs,
    select_pairs,
    sharing_markdown,
)

# ----------------------------------------------------------------------------------------------------------------
# data


def grid_features(labels: torch.Tensor, num_values: int, g: torch.Generator, dim: int = 24) -> torch.Tensor:
    """Features whose cosines are exact in float32: 16 entries +-s per row (s a random power of two, so the
    normalization inside is exercised), the sign pattern of the label's prototype with 0-2 signs flipped. Every
    cosine is a multiple of 1/16 however it is summed, so a gather-and-dot and a matmul agree to the bit, and the
    coarse grid makes many exact ties (for the tie-break) and values on the 0.5 threshold (for the strict "<")."""
    protos = torch.randint(0, 2, (num_values, 16), generator=g).float() * 2 - 1
    x = protos[labels].clone()
    for r in range(len(labels)):
        flips = torch.randperm(16, generator=g)[:int(torch.randint(0, 3, (1,), generator=g))]
        x[r, flips] *= -1
    scale = 2.0 ** torch.randint(-2, 4, (len(labels), 1), generator=g).float()
    return torch.cat([x * scale, torch.zeros(len(labels), dim - 16)], dim=1)


def cluster_features(labels: torch.Tensor, num_values: int, dim: int, noise: float, g: torch.Generator,
                     dtype=torch.float32) -> torch.Tensor:
    """Orthonormal cluster centres plus isotropic noise of norm ~noise: same-label cosine ~1 / (1 + noise^2)."""
    centres = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))[0][:num_values]
    x = centres[labels] + noise * torch.randn(len(labels), dim, generator=g, dtype=torch.float64) / math.sqrt(dim)
    return x.to(dtype)


def brute_force(fa, fb, pairs, th: PairThresholds, k: int):
    """Reference selection: full N x N cosine matrices, then Python's sort on (-gap, i, j, position)."""
    sa = F.normalize(fa, dim=1) @ F.normalize(fa, dim=1).T
    sb = F.normalize(fb, dim=1) @ F.normalize(fb, dim=1).T
    ca, cb = sa[pairs[:, 0], pairs[:, 1]], sb[pairs[:, 0], pairs[:, 1]]
    out = {}
    for side, mask, gap in (("a", (ca > th.a_high) & (cb < th.b_low), ca - cb),
                            ("b", (cb > th.b_high) & (ca < th.a_low), cb - ca)):
        cand = [(-float(gap[p]), int(pairs[p, 0]), int(pairs[p, 1]), p) for p in mask.nonzero().view(-1).tolist()]
        cand.sort()
        top = cand[:k]
        out[side] = {"count": len(cand), "pairs": [(c[1], c[2]) for c in top], "index": [c[3] for c in top],
                     "gap": [-c[0] for c in top], "cos_a": [float(ca[c[3]]) for c in top],
                     "cos_b": [float(cb[c[3]]) for c in top]}
    return out


def assert_matches(side, ref, exact=True):
    assert side.count == ref["count"]
    assert side.pairs.tolist() == [list(p) for p in ref["pairs"]]
    assert side.index.tolist() == ref["index"]
    for key in ("gap", "cos_a", "cos_b"):
        got = getattr(side, key).tolist()
        if exact:
            assert got == ref[key], key
        else:
            assert got == pytest.approx(ref[key], abs=1e-12), key


@pytest.fixture(scope="module")
def grid_data():
    g = torch.Generator().manual_seed(1)
    n = 300
    category, color = torch.randint(0, 5, (n,), generator=g), torch.randint(0, 4, (n,), generator=g)
    return grid_features(category, 5, g), grid_features(color, 4, g, dim=20)


# ----------------------------------------------------------------------------------------------------------------
# sampling


def test_linear_index_decodes_to_all_pairs_in_row_major_order():
    for n in (2, 3, 7, 50):
        k = torch.arange(n * (n - 1) // 2)
        assert torch.equal(pairs_from_linear_index(k, n), torch.triu_indices(n, n, 1).T)
    n = 100_000  # float64 root near the ends of rows, where an off-by-one would show
    total = n * (n - 1) // 2
    k = torch.tensor([0, n - 2, n - 1, total // 2, total - 3, total - 2, total - 1])
    p = pairs_from_linear_index(k, n)
    start = p[:, 0] * (2 * n - p[:, 0] - 1) // 2
    assert torch.equal(start + p[:, 1] - p[:, 0] - 1, k)
    assert bool((p[:, 0] < p[:, 1]).all()) and int(p.max()) < n and p[-1].tolist() == [n - 2, n - 1]


def test_sampled_pairs_are_valid_and_reproducible():
    for unique in (True, False):
        p = sample_pairs(1000, 5000, seed=3, unique=unique)
        assert p.shape == (5000, 2) and p.dtype == torch.int64
        assert bool((p[:, 0] < p[:, 1]).all()) and int(p.min()) >= 0 and int(p.max()) < 1000
        keys = p[:, 0] * 1000 + p[:, 1]
        assert torch.equal(keys, keys.sort().values)  # sorted by (i, j)
        assert torch.equal(p, sample_pairs(1000, 5000, seed=3, unique=unique))
        assert not torch.equal(p, sample_pairs(1000, 5000, seed=4, unique=unique))
        g = torch.Generator().manual_seed(3)
        assert torch.equal(p, sample_pairs(1000, 5000, generator=g, unique=unique))
    p = sample_pairs(1000, 5000, seed=3)
    assert torch.unique(p[:, 0] * 1000 + p[:, 1]).numel() == 5000
    # dense requests (more than half of all pairs: a cut permutation) and the whole set
    q = sample_pairs(30, 400)
    assert torch.unique(q[:, 0] * 30 + q[:, 1]).numel() == 400 and bool((q[:, 0] < q[:, 1]).all())
    assert torch.equal(sample_pairs(30, 435), torch.triu_indices(30, 30, 1).T)
    assert sample_pairs(30, 0).shape == (0, 2)
    with pytest.raises(ValueError, match="only 435"):
        sample_pairs(30, 436)
    assert sample_pairs(30, 436, unique=False).shape == (436, 2)
    with pytest.raises(ValueError, match="n >= 2"):
        sample_pairs(1, 1)


def test_sampled_pairs_are_uniform():
    # with replacement: each of the 190 pairs of 20 images ~ Binomial(M, 1/190); chi-square with 189 dof
    n, m = 20, 190 * 200
    p = sample_pairs(n, m, seed=0, unique=False)
    counts = torch.bincount(p[:, 0] * n + p[:, 1], minlength=n * n).view(n, n)[torch.triu_indices(n, n, 1).unbind()]
    assert int(counts.min()) > 0
    chi2 = float(((counts.double() - 200) ** 2 / 200).sum())
    assert chi2 < 189 + 6 * math.sqrt(2 * 189)
    # each image is in a fraction 2/n of the pairs
    image_freq = torch.bincount(p.view(-1), minlength=n).double() / m
    assert torch.allclose(image_freq, torch.full((n,), 2 / n, dtype=torch.float64), atol=0.01)
    # without replacement (sparse branch: rejection then a random subset): every pair equally often over seeds
    n, m, reps = 40, 200, 300
    freq = torch.zeros(n * n)
    for s in range(reps):
        q = sample_pairs(n, m, seed=s)
        freq += torch.bincount(q[:, 0] * n + q[:, 1], minlength=n * n)
    freq = freq.view(n, n)[torch.triu_indices(n, n, 1).unbind()]
    expect = reps * m / 780
    assert float(freq.sum()) == reps * m
    chi2 = float(((freq.double() - expect) ** 2 / expect).sum())
    assert chi2 < 779 + 6 * math.sqrt(2 * 779)


# ----------------------------------------------------------------------------------------------------------------
# streaming selection against brute force


def test_exhaustive_scan_equals_brute_force(grid_data):
    fa, fb = grid_data
    n = fa.shape[0]
    all_pairs = torch.triu_indices(n, n, 1).T
    for th, k in ((PAPER_THRESHOLDS, 100), (STRICT_THRESHOLDS, 7), (PairThresholds(0.6, 0.5, 0.6, 0.5), 1000)):
        ref = brute_force(fa, fb, all_pairs, th, k)
        assert ref["a"]["count"] > k or k == 1000
        assert ref["a"]["count"] > 0 and ref["b"]["count"] > 0
        # the kept set ends inside a run of equal gaps: the (i, j) tie-break decides which pairs are in
        if k < ref["a"]["count"]:
            assert len(set(ref["a"]["gap"])) < k
        for chunk_bytes in (40_000, 1 << 26):  # ~2-row blocks, then one block
            scan = scan_pairs(fa, fb, None, thresholds=th, max_pairs=k, chunk_bytes=chunk_bytes)
            assert scan.exhaustive and scan.num_pairs == n * (n - 1) // 2
            assert_matches(scan.a_high, ref["a"])
            assert_matches(scan.b_high, ref["b"])
    # cosines sitting exactly on the strict "<" threshold exist and are excluded on both sides
    sa = F.normalize(fa, dim=1) @ F.normalize(fa, dim=1).T
    assert bool((sa == 0.5).any())


def test_sampled_scan_and_select_pairs_equal_brute_force(grid_data):
    fa, fb = grid_data
    n = fa.shape[0]
    # with replacement: the same pair appears at several positions; the tie-break falls back to the position
    pairs = sample_pairs(n, 30_000, seed=5, unique=False)
    assert torch.unique(pairs[:, 0] * n + pairs[:, 1]).numel() < 30_000
    ref = brute_force(fa, fb, pairs, PAPER_THRESHOLDS, 100)
    for chunk_bytes in (20_000, 1 << 26):
        scan = scan_pairs(fa, fb, pairs, max_pairs=100, chunk_bytes=chunk_bytes)
        assert not scan.exhaustive and scan.num_pairs == 30_000
        assert_matches(scan.a_high, ref["a"])
        assert_matches(scan.b_high, ref["b"])
    # select_pairs on precomputed cosines, any chunking, same answer
    ca, cb = pair_cosines(fa, fb, pairs, chunk_bytes=50_000)
    for chunk in (777, 1 << 20):
        sel = select_pairs(ca, cb, pairs=pairs, chunk=chunk)
        assert sel.num_pairs == 30_000
        assert_matches(sel.a_high, ref["a"])
        assert_matches(sel.b_high, ref["b"])
    # a stream not sorted by (i, j): later chunks bring ties with smaller pairs that must displace kept ones
    perm = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(0))
    ref_perm = brute_force(fa, fb, pairs[perm], PAPER_THRESHOLDS, 100)
    assert ref_perm["a"]["pairs"] == ref["a"]["pairs"]  # the same pairs; their stream positions differ
    scan = scan_pairs(fa, fb, pairs[perm], max_pairs=100, chunk_bytes=20_000)
    assert_matches(scan.a_high, ref_perm["a"])
    assert_matches(scan.b_high, ref_perm["b"])
    # one-pair chunks, on a shorter stream
    ref_short = brute_force(fa, fb, pairs[:3000], PAPER_THRESHOLDS, 20)
    sel = select_pairs(ca[:3000], cb[:3000], pairs=pairs[:3000], max_pairs=20, chunk=1)
    assert_matches(sel.a_high, ref_short["a"])
    assert_matches(sel.b_high, ref_short["b"])
    # bare cosines (no indices): ties break by position alone
    sel = select_pairs(ca, cb, max_pairs=50)
    assert sel.a_high.pairs is None and sel.a_high.count == ref["a"]["count"]
    gaps = (ca - cb)[(ca > 0.7) & (cb < 0.5)]
    assert sel.a_high.gap.tolist() == gaps.sort(descending=True).values[:50].tolist()
    pos = sel.a_high.index.tolist()
    for p0, p1, g0, g1 in zip(pos, pos[1:], sel.a_high.gap.tolist(), sel.a_high.gap.tolist()[1:]):
        assert g0 > g1 or (g0 == g1 and p0 < p1)


def test_float64_features_match_brute_force():
    g = torch.Generator().manual_seed(2)
    n = 250
    category, color = torch.randint(0, 4, (n,), generator=g), torch.randint(0, 3, (n,), generator=g)
    fa = cluster_features(category, 4, 16, 0.6, g, torch.float64) * 3.0
    fb = cluster_features(color, 3, 12, 0.5, g, torch.float64)
    all_pairs = torch.triu_indices(n, n, 1).T
    ref = brute_force(fa, fb, all_pairs, PAPER_THRESHOLDS, 60)
    assert ref["a"]["count"] > 60 and ref["b"]["count"] > 60
    scan = scan_pairs(fa, fb, None, max_pairs=60, chunk_bytes=100_000)
    assert scan.a_high.cos_a.dtype == torch.float64
    assert_matches(scan.a_high, ref["a"], exact=False)
    assert_matches(scan.b_high, ref["b"], exact=False)
    # sampled path, and cosines of explicit pairs against the matrix
    pairs = sample_pairs(n, 5000, seed=1)
    ca, cb = pair_cosines(fa, fb, pairs, chunk_bytes=3000)
    sa = F.normalize(fa, dim=1) @ F.normalize(fa, dim=1).T
    assert torch.allclose(ca, sa[pairs[:, 0], pairs[:, 1]], atol=1e-12, rtol=0)
    # half-precision features are upcast per chunk and agree with their float32 version
    ca16, _ = pair_cosines(fa.to(torch.bfloat16), fb.float(), pairs[:100])
    ca32, _ = pair_cosines(fa.to(torch.bfloat16).float(), fb.float(), pairs[:100])
    assert ca16.dtype == torch.float32 and torch.allclose(ca16, ca32, atol=1e-6)


def test_exhaustive_chunks_cover_every_pair_once():
    g = torch.Generator().manual_seed(0)
    fa, fb = torch.randn(37, 5, generator=g), torch.randn(37, 3, generator=g)
    for chunk_bytes in (1, 5000, 1 << 20):
        parts = list(iter_pair_cosines(fa, fb, None, chunk_bytes=chunk_bytes))
        ij = torch.stack([torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])], dim=1)
        assert torch.equal(ij, torch.triu_indices(37, 37, 1).T)
    assert len(list(iter_pair_cosines(fa, fb, None, chunk_bytes=1))) == 36  # one row per block


def test_selector_keeps_at_most_max_pairs_and_counts_all():
    sel = PairSelector(max_pairs=3)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        ca, cb = torch.rand(500, generator=g) * 2 - 1, torch.rand(500, generator=g) * 2 - 1
        sel.update(ca, cb)
        assert len(sel._a.gap) <= 3 and len(sel._b.gap) <= 3
    res = sel.result()
    assert res.num_pairs == 10_000 and len(res.a_high) == 3 and res.a_high.count > 100
    with pytest.raises(ValueError, match="indices"):
        sel.update(torch.zeros(2), torch.zeros(2), torch.tensor([0, 1]), torch.tensor([1, 2]))
    empty = select_pairs(torch.zeros(10), torch.zeros(10), pairs=torch.tensor([[0, 1]] * 10), max_pairs=0)
    assert empty.a_high.count == 0 and empty.a_high.pairs.shape == (0, 2)


# ----------------------------------------------------------------------------------------------------------------
# attribute sharing


@pytest.fixture(scope="module")
def planted():
    """A sees category, B sees color; style and word (half absent) are seen by neither."""
    g = torch.Generator().manual_seed(7)
    n = 600
    attrs = {"category": torch.randint(0, 5, (n,), generator=g), "color": torch.randint(0, 4, (n,), generator=g),
             "style": torch.randint(0, 3, (n,), generator=g)}
    word = torch.randint(0, 6, (n,), generator=g)
    word[torch.rand(n, generator=g) < 0.5] = -1
    attrs["word"] = word
    fa = cluster_features(attrs["category"], 5, 32, 0.4, g)
    fb = cluster_features(attrs["color"], 4, 24, 0.3, g)
    return fa, fb, attrs


def test_attribute_sharing_recovers_planted_attributes(planted):
    fa, fb, attrs = planted
    res = analyze_pairs(fa, fb, attributes=attrs, num_pairs=40_000, mode="sample", seed=0)
    assert res["mode"] == "sample" and res["num_pairs"] == 40_000
    sh, chance = res["sharing"], res["attributes"]
    assert set(sh) == {"all", "clip_high", "clip_high_top", "dino_high", "dino_high_top"}
    assert res["sides"]["clip_high"]["count"] > 1000 and res["sides"]["dino_high"]["count"] > 1000
    for s in ("clip_high", "clip_high_top"):
        assert sh[s]["category"]["share"] > 0.99 and sh[s]["color"]["share"] < 0.02
    for s in ("dino_high", "dino_high_top"):
        assert sh[s]["color"]["share"] > 0.99 and sh[s]["category"]["share"] < 0.02
    assert sh["clip_high_top"]["category"]["pairs"] == 100
    # baseline: ~1 / number of values, and close to the exact chance computed from value counts
    for name, values in (("category", 5), ("color", 4), ("style", 3)):
        assert abs(sh["all"][name]["share"] - 1 / values) < 0.03
        assert abs(sh["all"][name]["share"] - chance[name]["chance_share"]) < 0.01
        assert "both_present" not in sh["all"][name]
    # neither encoder sees style: its sharing stays at the baseline on both sides
    for s in ("clip_high", "dino_high"):
        assert abs(sh[s]["style"]["share"] - 1 / 3) < 0.05
    w = sh["all"]["word"]
    assert abs(w["both_present"] - 0.25) < 0.02
    assert abs(w["share"] - 0.25 / 6) < 0.01 and abs(w["share_if_present"] - 1 / 6) < 0.02
    # every kept record names what its two images share
    top = res["sides"]["clip_high"]["top"]
    assert len(top) == 100 and all("category" in r["same"] and r["i"] < r["j"] for r in top)
    assert top[0]["gap"] >= top[-1]["gap"]
    assert top[0]["cos_clip"] > 0.7 and top[0]["cos_dino"] < 0.5
    assert res["attributes"]["word"]["present"] == pytest.approx(float((attrs["word"] >= 0).float().mean()))


def test_attribute_sharing_on_explicit_sets_and_markdown():
    attrs = {"category": [0, 0, 1, 1], "word": [2, 2, -1, -1]}
    table = attribute_sharing(attrs, {"s": [[0, 1], [2, 3], [0, 2]], "none": torch.empty(0, 2)})
    assert table["s"]["category"] == {"pairs": 3, "shared": 2, "share": 2 / 3}
    assert table["s"]["word"] == {"pairs": 3, "shared": 1, "share": 1 / 3, "both_present": 1 / 3,
                                  "share_if_present": 1.0}
    assert table["none"]["word"]["share"] is None
    md = sharing_markdown(table, labels={"s": "some pairs"})
    assert "| attribute | some pairs (3) | none (0) |" in md
    assert "| word: same, given both present | 100.0% | - |" in md and "| category: same | 66.7% | - |" in md


# ----------------------------------------------------------------------------------------------------------------
# rendering and files


def _colors(index: int):
    return (index * 37 % 256, index * 91 % 256, 200)


def _dummy_image(index: int):
    from PIL import Image

    return Image.new("RGB", (40 + index % 3 * 10, 30), _colors(index))  # non-square: letterboxed into the cell


def test_render_pairs_grid(tmp_path):
    from PIL import Image

    pairs = torch.tensor([[0, 1], [2, 5], [3, 4], [1, 6], [7, 8]])
    out = str(tmp_path / "grid.png")
    assert render_pairs(pairs, _dummy_image, out, cos_a=[0.9] * 5, cos_b=[0.1] * 5, names=("clip", "dino"),
                        attributes={"category": list(range(9))}, title="t", cell=64, columns=2) == out
    assert not os.path.exists(out + ".tmp.png")
    img = Image.open(out)
    # 2 columns x 3 rows of 132 x (64 + 3 * 13 + 4) panels, 8 px around and between, a 21 px title band
    assert img.size == pair_grid_size(5, cell=64, columns=2) == (8 + 2 * (132 + 8), 21 + 8 + 3 * (107 + 8))
    # the second pair (2, 5) sits in column 1, row 0: left image at x = 8 + 140, y = 21 + 8; right 68 px further
    img = img.convert("RGB")
    assert img.getpixel((148 + 32, 29 + 32)) == _colors(2)
    assert img.getpixel((148 + 68 + 32, 29 + 32)) == _colors(5)
    assert img.getpixel((8 + 32, 29 + 115 + 32)) == _colors(3)  # third pair: row 1
    # no pairs: one panel's space with a note
    render_pairs(torch.empty(0, 2), _dummy_image, str(tmp_path / "empty.png"), cell=64, title=None)
    assert Image.open(tmp_path / "empty.png").size == pair_grid_size(0, cell=64, title=False) == (148, 123)
    with pytest.raises(ValueError, match="not a PIL.Image"):
        render_pairs(pairs, lambda i: "x", str(tmp_path / "bad.png"))
    with pytest.raises(ValueError, match="cos_a has 2 values for 5 pairs"):
        render_pairs(pairs, _dummy_image, str(tmp_path / "bad.png"), cos_a=[0.1, 0.2])


def test_analyze_writes_files(planted, tmp_path):
    from PIL import Image

    fa, fb, attrs = planted
    n = 120  # 7140 pairs <= num_pairs: auto mode scans them all
    sub = {k: v[:n] for k, v in attrs.items()}
    res = analyze_pairs(fa[:n], fb[:n], names=("siglip", "dino"), attributes=sub, num_pairs=10_000,
                        thresholds="paper", max_pairs=10, load_image=_dummy_image, out_dir=str(tmp_path),
                        cell=32, columns=3)
    assert res["mode"] == "exhaustive" and res["num_pairs"] == n * (n - 1) // 2 and res["seed"] is None
    names = sorted(os.listdir(tmp_path))
    assert names == ["pairs.json", "pairs_dino_high.png", "pairs_siglip_high.png", "sharing.md"]
    saved = json.loads((tmp_path / "pairs.json").read_text())
    assert saved["sides"]["siglip_high"]["count"] == res["sides"]["siglip_high"]["count"]
    assert saved["thresholds"] == {"a_high": 0.7, "b_low": 0.5, "b_high": 0.8, "a_low": 0.5}
    kept = res["sides"]["siglip_high"]["kept"]
    assert kept == 10
    assert Image.open(tmp_path / "pairs_siglip_high.png").size == pair_grid_size(kept, cell=32, columns=3)
    md = (tmp_path / "sharing.md").read_text()
    assert "siglip_high | cos_siglip > 0.7 and cos_dino < 0.5" in md and "| category: same |" in md
    # without attributes or images: counts only, still a JSON and a markdown summary
    out2 = tmp_path / "plain"
    res2 = analyze_pairs(fa[:n], fb[:n], num_pairs=500, mode="sample", out_dir=str(out2))
    assert sorted(os.listdir(out2)) == ["pairs.json", "sharing.md"] and "sharing" not in res2
    assert res2["num_pairs"] == 500 and "no attribute table" in (out2 / "sharing.md").read_text()


def test_quantile_thresholds_resolve_from_the_pairs_cosines_then_select_like_absolute_cuts(grid_data, monkeypatch):
    """Quantile cuts are each encoder's own cosine quantiles; the scan then selects exactly as with those absolute
    cuts (checked against brute force). Exhaustive with few pairs: quantiles of all pairs; sampled: of an even
    stride through the (sorted) sample, at most QUANTILE_PAIRS of them; exhaustive with many: a seeded sample."""
    import fastenc.analysis.pairs.scan as P  # resolve_quantiles reads QUANTILE_PAIRS there

    fa, fb = grid_data
    n = fa.shape[0]
    q = QuantileThresholds(a_high=0.9, b_low=0.4, b_high=0.8, a_low=0.3)
    all_pairs = torch.triu_indices(n, n, 1).T
    ca, cb = pair_cosines(fa, fb, all_pairs)
    qa, qb = ca.double(), cb.double()
    expect = PairThresholds(a_high=float(torch.quantile(qa, 0.9)), a_low=float(torch.quantile(qa, 0.3)),
                            b_high=float(torch.quantile(qb, 0.8)), b_low=float(torch.quantile(qb, 0.4)))
    scan = scan_pairs(fa, fb, None, thresholds={"quantile": dataclasses.asdict(q)}, max_pairs=50)
    assert scan.quantiles == q and scan.thresholds == expect
    ref = brute_force(fa, fb, all_pairs, expect, 50)
    assert ref["a"]["count"] > 0 and ref["b"]["count"] > 0
    assert_matches(scan.a_high, ref["a"])
    assert_matches(scan.b_high, ref["b"])
    # about the requested share of pairs passes each cut (a coarse grid of cosines: ties make it inexact)
    assert 0.02 < float((ca > expect.a_high).double().mean()) <= 0.1 + 1e-9
    # sampled pairs, more than QUANTILE_PAIRS of them: every k-th pair estimates the quantiles
    monkeypatch.setattr(P, "QUANTILE_PAIRS", 1000)
    pairs = sample_pairs(n, 4500, seed=3)
    sub = pairs[::5]
    assert sub.shape[0] == 900
    sa, sb = pair_cosines(fa, fb, sub)
    scan = scan_pairs(fa, fb, pairs, thresholds="quantile", max_pairs=10)
    assert scan.thresholds == QuantileThresholds().resolve(sa, sb) and scan.num_pairs == 4500
    # exhaustive with more pairs than QUANTILE_PAIRS: a seeded uniform sample (deterministic)
    scan2 = scan_pairs(fa, fb, None, thresholds="quantile", max_pairs=10, seed=4)
    assert scan2.thresholds == QuantileThresholds().resolve(*pair_cosines(fa, fb, sample_pairs(n, 1000, seed=4)))
    # cosines of duplicates round past 1 in float32; a cut at the top quantile stays a valid cosine
    over = torch.tensor([1.0000012, 0.5, 1.0000012])
    assert QuantileThresholds(a_high=1.0, b_high=1.0).resolve(over, over).a_high == 1.0
    # analyze_pairs records both: the cuts used and the quantiles they came from
    res = analyze_pairs(fa, fb, thresholds="quantile", num_pairs=4500, mode="sample", seed=3)
    assert res["thresholds"] == dataclasses.asdict(scan.thresholds) and res["quantiles"]["a_high"] == 0.95
    assert "(q0.95)" in res["criteria"]["clip_high"]
    # errors
    with pytest.raises(ValueError, match="must be in \\[0, 1\\]"):
        QuantileThresholds(a_high=1.5)
    with pytest.raises(ValueError, match="a_high=0.2 is below a_low=0.5"):
        as_thresholds({"quantile": {"a_high": 0.2}})
    with pytest.raises(ValueError, match="unknown quantile field"):
        as_thresholds({"quantile": {"clip_high": 0.9}})
    with pytest.raises(ValueError, match="resolve quantile thresholds first"):
        PairSelector("quantile")


# ----------------------------------------------------------------------------------------------------------------
# input checks


def test_input_errors():
    fa, fb = torch.randn(10, 4), torch.randn(9, 3)
    with pytest.raises(ValueError, match="feats_a has 10 rows and feats_b 9"):
        analyze_pairs(fa, fb)
    with pytest.raises(ValueError, match="must be \\[N, D\\]"):
        scan_pairs(torch.randn(10), torch.randn(10, 3))
    with pytest.raises(ValueError, match="floating point"):
        pair_cosines(torch.ones(10, 4, dtype=torch.long), torch.randn(10, 3), [[0, 1]])
    bad = torch.randn(10, 4)
    bad[6, 2] = float("nan")
    with pytest.raises(ValueError, match="feats_b row 6 has non-finite"):
        pair_cosines(torch.randn(10, 4), bad, [[0, 1]])
    fb = torch.randn(10, 3)
    # thresholds
    with pytest.raises(ValueError, match="a_high=1.5"):
        PairThresholds(a_high=1.5)
    with pytest.raises(ValueError, match="b_low=nan"):
        select_pairs(torch.zeros(3), torch.zeros(3), b_low=float("nan"))
    with pytest.raises(ValueError, match="b_high=0.3 is below b_low=0.5"):
        analyze_pairs(fa, fb, thresholds={"b_high": 0.3})
    with pytest.raises(ValueError, match="unknown threshold field"):
        as_thresholds({"clip_high": 0.7})
    with pytest.raises(ValueError, match="unknown threshold preset"):
        as_thresholds("loose")
    with pytest.raises(ValueError, match="finite cosine"):
        PairThresholds(a_low="0.5")
    assert as_thresholds("strict") == PairThresholds(0.9, 0.5, 0.95, 0.2)
    # attributes
    with pytest.raises(ValueError, match=r"attribute 'color' has shape \(9,\): need one value per image, \[10\]"):
        analyze_pairs(fa, fb, attributes={"category": torch.zeros(10, dtype=torch.long), "color": torch.zeros(9)})
    with pytest.raises(ValueError, match="integer ids"):
        analyze_pairs(fa, fb, attributes={"color": torch.zeros(10)})
    with pytest.raises(ValueError, match="value -2"):
        analyze_pairs(fa, fb, attributes={"word": torch.full((10,), -2)})
    # pairs, names, modes
    with pytest.raises(ValueError, match="pairs row 1 pairs image 3 with itself"):
        pair_cosines(fa, fb, [[0, 1], [3, 3]])
    with pytest.raises(ValueError, match="outside the 10 images"):
        pair_cosines(fa, fb, [[0, 10]])
    with pytest.raises(ValueError, match="names"):
        analyze_pairs(fa, fb, names=("clip", "clip"))
    with pytest.raises(ValueError, match="names"):
        analyze_pairs(fa, fb, names=("clip", "../dino"))
    with pytest.raises(ValueError, match="mode"):
        analyze_pairs(fa, fb, mode="all")
    with pytest.raises(ValueError, match="max_pairs"):
        analyze_pairs(fa, fb, max_pairs=-1)
    with pytest.raises(ValueError, match="equal-length"):
        select_pairs(torch.zeros(3), torch.zeros(4))
