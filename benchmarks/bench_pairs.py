"""fastenc.analysis.pairs at scale: time and peak memory of analyze_pairs on 100,000 images per encoder.

    python benchmarks/bench_pairs.py                                   # N 100,000, D 256 (A) / 512 (B), M 2,000,000
    python benchmarks/bench_pairs.py --pairs 5000000 --dim-b 768       # any size
    python benchmarks/bench_pairs.py --thresholds quantile             # per-encoder quantile cuts (one more pass)
    python benchmarks/bench_pairs.py --tiny                            # seconds: N 2,000, M 20,000 (CSV in a tmp dir)

Data: random unit vectors, N per encoder, float32. By default they are drawn around planted cluster centres (A:
--clusters-a category values, B: --clusters-b color values, noise of norm --noise) so that both disagreement
sides have thousands of passing pairs and the selection, top-k and attribute-sharing paths all do real work;
--plain draws i.i.d. unit vectors instead (then no pair passes the paper's thresholds). The measured call is
analyze_pairs(mode="sample", unique pairs, paper thresholds (or --thresholds quantile), top 100 per side, attributes category and color,
no images, no out_dir): sampling the M pairs and one streaming pass over them.

Memory: VmHWM (this process's resident high-water mark, reset through /proc/self/clear_refs just before the call)
minus the resident size just before it (torch, the features, the attributes; after a warm-up call on 500 images
pages in the library code used): the analysis's own peak, compared
with fastenc.analysis.pairs.memory_bound_bytes, the bound the module states. One CSV row per run in
results/bench_pairs.csv (harness fields: hardware, versions, git revision, other processes' CPU use meanwhile).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import harness  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=None, help="N images per encoder (default 100000; --tiny: 2000)")
    p.add_argument("--pairs", type=int, default=None, help="M sampled pairs (default 2000000; --tiny: 20000)")
    p.add_argument("--dim-a", type=int, default=256, help="encoder A feature width")
    p.add_argument("--dim-b", type=int, default=512, help="encoder B feature width")
    p.add_argument("--chunk-mb", type=float, default=None,
                   help="scan chunk budget (analyze_pairs chunk_bytes) in MiB (default: the module's, 16)")
    p.add_argument("--clusters-a", type=int, default=100, help="planted category values seen by A")
    p.add_argument("--clusters-b", type=int, default=20, help="planted color values seen by B")
    p.add_argument("--noise", type=float, default=0.45, help="norm of the noise around a cluster centre")
    p.add_argument("--plain", action="store_true", help="i.i.d. random unit vectors, no planted clusters")
    p.add_argument("--thresholds", choices=("paper", "quantile"), default="paper",
                   help="analyze_pairs thresholds: the paper's cuts, or per-encoder quantiles (QuantileThresholds)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=harness.usable_cores())
    p.add_argument("--tiny", action="store_true", help="smoke run: N 2000, M 20000, no idle wait, CSV in a tmp dir")
    p.add_argument("--wait-idle", type=float, default=None,
                   help="seconds to wait for other processes to go quiet first (default 60; --tiny: 0)")
    p.add_argument("--out", default=None, help="CSV appended to (default results/bench_pairs.csv; --tiny: a tmp dir)")
    p.add_argument("--note", default="")
    args = p.parse_args(argv)
    args.images = args.images or (2000 if args.tiny else 100_000)
    args.pairs = args.pairs or (20_000 if args.tiny else 2_000_000)
    if args.wait_idle is None:
        args.wait_idle = 0.0 if args.tiny else 60.0
    if args.out is None:
        args.out = (os.path.join(tempfile.gettempdir(), "fastenc-bench-pairs", "bench_pairs.csv") if args.tiny
                    else os.path.join(harness.RESULTS_DIR, "bench_pairs.csv"))
    return args


def make_features(n: int, dim: int, labels, clusters: int, noise: float, plain: bool, g):
    """[n, dim] float32 unit vectors: i.i.d. (plain) or a random unit centre per label plus noise of norm ~noise,
    built in row blocks so no float64 or second full-size copy is ever resident."""
    import torch

    out = torch.empty(n, dim)
    centres = torch.nn.functional.normalize(torch.randn(clusters, dim, generator=g), dim=1)
    for r0 in range(0, n, 16384):
        x = torch.randn(min(16384, n - r0), dim, generator=g)
        if not plain:
            x = centres[labels[r0:r0 + len(x)]] + x * (noise / dim ** 0.5)
        out[r0:r0 + len(x)] = torch.nn.functional.normalize(x, dim=1)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    from fastenc.analysis.pairs import analyze_pairs, memory_bound_bytes

    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(args.seed)
    n = args.images
    attrs = {"category": torch.randint(0, args.clusters_a, (n,), generator=g),
             "color": torch.randint(0, args.clusters_b, (n,), generator=g)}
    fa = make_features(n, args.dim_a, attrs["category"], args.clusters_a, args.noise, args.plain, g)
    fb = make_features(n, args.dim_b, attrs["color"], args.clusters_b, args.noise, args.plain, g)
    from fastenc.analysis.pairs import DEFAULT_CHUNK_BYTES

    chunk_bytes = int(args.chunk_mb * 2**20) if args.chunk_mb else DEFAULT_CHUNK_BYTES
    args.chunk_mb = chunk_bytes / 2**20
    bound_mb = memory_bound_bytes(n, args.dim_a, args.dim_b, args.pairs, chunk_bytes=chunk_bytes, max_pairs=100,
                                  num_attributes=len(attrs), quantiles=args.thresholds == "quantile") / 2**20
    env = harness.env_fields()
    foreign_before = harness.wait_for_idle(args.wait_idle) if args.wait_idle > 0 else float("nan")

    # warm-up on a few images: library code paged in on first use (BLAS kernels, sort) is not the analysis's memory
    analyze_pairs(fa[:500], fb[:500], attributes={k: v[:500] for k, v in attrs.items()}, num_pairs=5000,
                  mode="sample", chunk_bytes=chunk_bytes, thresholds=args.thresholds)
    gc.collect()
    base_mb = harness.rss_mb()
    harness.reset_peak_rss()
    with harness.CpuMonitor() as mon:
        res = analyze_pairs(fa, fb, names=("a", "b"), attributes=attrs, num_pairs=args.pairs, mode="sample",
                            seed=args.seed, chunk_bytes=chunk_bytes, thresholds=args.thresholds)
    peak_mb = harness.peak_rss_mb()
    extra_mb = peak_mb - base_mb
    features_mb = (fa.numel() + fb.numel()) * 4 / 2**20
    sh = res["sharing"]
    row = {"timestamp": harness.utc_now(), "bench": "bench_pairs", "tiny": int(args.tiny), "images": n,
           "pairs": args.pairs, "dim_a": args.dim_a, "dim_b": args.dim_b, "plain": int(args.plain),
           "chunk_mb": args.chunk_mb, "thresholds": args.thresholds, "threads": args.threads,
           "sample_s": res["timing_s"]["sample"], "scan_s": res["timing_s"]["scan"],
           "total_s": res["timing_s"]["total"], "pairs_per_s": args.pairs / res["timing_s"]["total"],
           "features_mb": features_mb, "base_rss_mb": base_mb, "peak_rss_mb": peak_mb, "extra_peak_mb": extra_mb,
           "bound_mb": bound_mb, "within_bound": int(extra_mb <= bound_mb),
           "a_high": res["sides"]["a_high"]["count"], "b_high": res["sides"]["b_high"]["count"],
           "a_high_top_category": sh["a_high_top"]["category"]["share"],
           "b_high_top_color": sh["b_high_top"]["color"]["share"],
           "foreign_cores_before": foreign_before, **{k: v for k, v in mon.fields().items() if k != "wall_s"},
           "note": args.note, **env}
    harness.append_rows(args.out, [row])
    print(f"bench_pairs: N {n:,} D {args.dim_a}/{args.dim_b} M {args.pairs:,}: {row['total_s']:.2f} s "
          f"(sample {row['sample_s']:.2f} s, scan {row['scan_s']:.2f} s; {row['pairs_per_s'] / 1e6:.2f} M pairs/s, "
          f"{args.threads} threads), peak RSS {peak_mb:.0f} MiB = {base_mb:.0f} before "
          f"(features {features_mb:.0f}) + {extra_mb:.0f} MiB for the analysis (stated bound {bound_mb:.0f} MiB: "
          f"{'within' if row['within_bound'] else 'EXCEEDED'}); A-high {row['a_high']:,}, B-high {row['b_high']:,}; "
          f"other processes {mon.foreign_cores:.2f} cores; row -> {args.out}", flush=True)
    return 0 if row["within_bound"] else 1


if __name__ == "__main__":
    sys.exit(main())
