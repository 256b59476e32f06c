"""Shared runner of the loss benchmarks (bench_contrastive.py, bench_sigmoid.py, bench_dino.py).

Each measurement (one implementation, one size, one mode) runs in its own fresh subprocess, so one case's memory
left in the allocator can never flatter or penalize the next one, and a case that runs out of memory becomes a row
saying so instead of killing the sweep.

Modes: "fwd" = forward with autograd recording (what a training step pays before backward), "bwd" = backward
alone (forward untimed), "fwd+bwd" = both.
Time: median (and p10/p90) over `reps` timed repetitions after `warmup` untimed ones; CUDA is synchronized
around each repetition.
Peak memory, "peak_mb": the most memory the mode's region allocated above what existed before the step
(inputs, their `.grad` from earlier repetitions freed); for "bwd" the baseline is taken before the untimed
forward, so the tensors saved for backward count.
- CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus memory_allocated() before.
- CPU: the process's resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs) minus the
  resident set before the region, on the first repetition at the measured size (after a tiny warm-up that loads
  the libraries). The first repetition is used because glibc keeps freed blocks below 32 MiB in its heap: a
  later repetition would reuse already-resident pages and under-count. One-time allocations (thread pools) land
  in this number too, which can only inflate it, for every implementation alike.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from typing import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import harness  # noqa: E402
from fastenc.utils.optional import cuda_available  # noqa: E402

MODES = ("fwd", "bwd", "fwd+bwd")


class Meter:
    """Peak memory above a baseline, for one region, on CPU (VmHWM) or CUDA (the caching allocator's stats)."""

    def __init__(self, device: str):
        self.device = device

    def start(self):
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated() / 2**20
        else:
            self.base = harness.rss_mb()
            harness.reset_peak_rss()

    def peak(self) -> float:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**20 - self.base
        return harness.peak_rss_mb() - self.base


def _sync(device):
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def measure(make_inputs: Callable, loss_fn: Callable, mode: str, reps: int, warmup: int, device: str,
            tiny_inputs: Callable | None = None) -> dict:
    """Run `loss_fn(*inputs)` (+ backward) in `mode`; returns times and peak memory. `make_inputs()` returns leaf
    tensors (those that need gradients have requires_grad set)."""
    import torch

    if tiny_inputs is not None:  # load kernels / libraries / thread pools before anything is measured
        loss = loss_fn(*tiny_inputs())
        loss.backward()
    inputs = make_inputs()

    def clear_grads():
        for t in inputs:
            if isinstance(t, torch.Tensor):
                t.grad = None

    meter = Meter(device)
    times, peak = [], float("nan")
    for i in range(warmup + reps + 1):
        clear_grads()
        first = i == 0
        if mode == "bwd":
            if first:
                meter.start()
            loss = loss_fn(*inputs)
            _sync(device)
            t0 = time.perf_counter()
            loss.backward()
        else:
            if first:
                meter.start()
            _sync(device)
            t0 = time.perf_counter()
            loss = loss_fn(*inputs)
            if mode == "fwd+bwd":
                loss.backward()
        _sync(device)
        dt = time.perf_counter() - t0
        if first:
            peak = meter.peak()  # forward mode: the graph (saved tensors) is still alive here, as it is in training
        elif i > warmup:
            times.append(dt)
        del loss
    stats = harness.spread(times)
    return {"time_ms": stats["median"] * 1e3, "time_p10_ms": stats["p10"] * 1e3, "time_p90_ms": stats["p90"] * 1e3,
            "reps": len(times), "peak_mb": peak}


# ----------------------------------------------------------------------------------------------------------------
# the parent: sweep cases in subprocesses, append rows, plot


def worker_main(specs_json: str, build: Callable[[dict], tuple[Callable, Callable, Callable | None]]) -> None:
    """Entry of a subprocess: measure each case of the JSON list in turn, print one JSON line per case.

    A case that fails (CUDA out of memory, a missing dependency) prints an error line and the next case runs."""
    import torch

    specs = json.loads(specs_json)
    torch.set_num_threads(specs[0]["threads"])
    for spec in specs:
        torch.manual_seed(0)
        try:
            make_inputs, loss_fn, tiny = build(spec)
            out = measure(make_inputs, loss_fn, spec["mode"], spec["reps"], spec["warmup"], spec["device"], tiny)
        except Exception as e:  # noqa: BLE001 - recorded in the CSV row instead
            kind = "out of memory" if isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e) else \
                type(e).__name__
            out = {"error": f"{kind}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
        if spec["device"] == "cuda":
            torch.cuda.empty_cache()
        print("RESULT " + json.dumps(out), flush=True)


def run_cases(script: str, specs: list[dict], timeout_s: float) -> list[dict]:
    """Measure cases in one fresh subprocess of `script --worker SPECS`; failures become results with `error`."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(specs[0]["threads"]))
    env.setdefault("MKL_NUM_THREADS", str(specs[0]["threads"]))
    cmd = [sys.executable, script, "--worker", json.dumps(specs)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s * len(specs), env=env)
        stdout, stderr, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        stdout, stderr, rc = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), "", None
    results = [json.loads(line[len("RESULT "):]) for line in stdout.splitlines() if line.startswith("RESULT ")]
    if len(results) < len(specs):
        tail = " | ".join((stderr or stdout).strip().splitlines()[-3:])
        if rc is None:
            why = f"timeout after {timeout_s * len(specs):.0f} s"
        elif rc in (-9, 137) or "out of memory" in tail.lower():
            why = "out of memory: " + tail[-200:]
        else:
            why = f"exit {rc}: {tail[-300:]}"
        results += [{"error": why}] * (len(specs) - len(results))
    return results


def common_args(p: argparse.ArgumentParser, default_out: str) -> None:
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--impls", default="", help="comma-separated implementations (default: all that run here)")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--device", default="cuda" if cuda_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=harness.usable_cores())
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--timeout", type=float, default=1800, help="seconds per case before it is recorded as failed")
    p.add_argument("--out", default=os.path.join(harness.RESULTS_DIR, default_out), help="CSV (appended to)")
    p.add_argument("--plot", default="", help="PNG (default: the CSV's name with .png)")
    p.add_argument("--no-wait", action="store_true", help="do not wait for an idle machine before measuring")
    p.add_argument("--note", default="")
    p.add_argument("--one-process", action="store_true",
                   help="measure every case in one subprocess (fast smoke runs; CPU memory numbers are then not "
                        "comparable across cases)")


def sweep(script: str, bench: str, args, impls: list[str], sizes: list[dict], size_key: str,
          extra_packages=("open_clip_torch", "triton")) -> list[dict]:
    """Run every (size, impl, mode) case; append one row each to args.out; return the rows.

    CPU: one subprocess per case (the resident-set measurement needs a fresh process). CUDA: one subprocess per
    implementation for all its sizes and modes (the allocator's peak statistics reset per case; process start-up and
    kernel compilation would otherwise dominate a GPU session)."""
    env = harness.env_fields(extra_packages)
    if args.device == "cpu" and not args.no_wait:
        env["foreign_cores_before"] = harness.wait_for_idle(120)
    cases = [{"impl": impl, "mode": mode, "dtype": args.dtype, "device": args.device, "threads": args.threads,
              "reps": args.reps, "warmup": args.warmup, **size}
             for impl in impls for size in sizes for mode in args.modes.split(",")]
    if args.one_process:
        groups = [cases]
    elif args.device == "cuda":
        groups = [[c for c in cases if c["impl"] == impl] for impl in impls]
    else:
        groups = [[c] for c in cases]
    rows = []
    for group in groups:
        with harness.CpuMonitor() as mon:
            results = run_cases(script, group, args.timeout)
        for spec, res in zip(group, results):
            size = {k: spec[k] for k in sizes[0]}
            row = {"bench": bench, "impl": spec["impl"], "mode": spec["mode"], **size, "dtype": args.dtype,
                   "device": args.device, "threads": args.threads, **res, "foreign_cpu_cores": mon.foreign_cores,
                   "utc": harness.utc_now(), "note": args.note + (" [one process]" if args.one_process else ""),
                   **env}
            rows.append(row)
            shown = res.get("error") or f"{res['time_ms']:.1f} ms, peak {res['peak_mb']:.1f} MiB"
            print(f"{bench} {spec['impl']:>14} {spec['mode']:>7} {size_key}={size[size_key]}: {shown}", flush=True)
        harness.append_rows(args.out, rows[-len(group):])
    return rows


def plot(csv_path: str, png_path: str, bench: str, size_key: str, title: str, where=None) -> str | None:
    """Two panels (fwd+bwd time and peak memory vs size, one line per impl) from the latest row per case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in harness.read_rows(csv_path) if r.get("bench") == bench and not r.get("error")
            and (where is None or where(r))]
    rows = harness.latest_by(rows, lambda r: (r["impl"], r["mode"], r[size_key], r["dtype"], r["device"]))
    if not rows:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    panels = [("fwd+bwd", "time_ms", "fwd+bwd median time (ms)"), ("fwd", "time_ms", "fwd / bwd median time (ms)"),
              ("fwd+bwd", "peak_mb", "fwd+bwd peak memory above inputs (MiB)")]
    impls = sorted({r["impl"] for r in rows})
    colors = {impl: f"C{i}" for i, impl in enumerate(impls)}
    for ax, (mode, col, ylabel) in zip(axes, panels):
        for impl in impls:
            for m, style in ((mode, "-o"), ("bwd", "--x")) if mode == "fwd" else ((mode, "-o"),):
                pts = sorted((float(r[size_key]), float(r[col])) for r in rows
                             if r["impl"] == impl and r["mode"] == m and r.get(col) not in ("", None))
                pts = [(x, y) for x, y in pts if not math.isnan(y)]
                if pts:
                    ax.plot(*zip(*pts), style, color=colors[impl], label=f"{impl} {m}" if mode == "fwd" else impl)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(size_key)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


def summarize(rows: list[dict], size_key: str, peer: str, fast: list[str]) -> list[str]:
    """Lines comparing each fast impl with `peer` at every size (fwd+bwd): memory ratio and time ratio."""
    lines = []
    full = [r for r in rows if r["mode"] == "fwd+bwd" and not r.get("error")]
    for size in sorted({int(r[size_key]) for r in full}):
        at = {r["impl"]: r for r in full if int(r[size_key]) == size}
        if peer not in at or float(at[peer]["peak_mb"]) < 1.0:
            continue  # below 1 MiB the resident-set measurement is page-granular noise: no ratio
        p = at[peer]
        for impl in fast:
            if impl in at:
                r = at[impl]
                lines.append(f"{size_key}={size}: {impl} uses {float(p['peak_mb']) / max(float(r['peak_mb']), 1e-9):.1f}x "
                             f"less peak memory than {peer} ({float(r['peak_mb']):.0f} vs {float(p['peak_mb']):.0f} MiB) "
                             f"at {float(r['time_ms']) / float(p['time_ms']):.2f}x its time "
                             f"({float(r['time_ms']):.0f} vs {float(p['time_ms']):.0f} ms)")
    return lines


def unit_features(B: int, D: int, dtype: str, device: str, num: int = 2) -> list:
    """`num` [B, D] L2-normalized feature sets (normalized in fp32, then cast) that require gradients."""
    import torch
    import torch.nn.functional as F

    cast = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    return [F.normalize(torch.randn(B, D, device=device), dim=1).to(cast).requires_grad_() for _ in range(num)]


def default_impls(device: str) -> list[str]:
    """Every implementation that runs on `device` here (fastenc.losses.dispatch.usable_impls), reference first."""
    from fastenc.losses.contrastive import _CLIP_IMPLS
    from fastenc.losses.dispatch import usable_impls

    return sorted(usable_impls(_CLIP_IMPLS, device), key=lambda name: name != "reference")


def feature_loss_main(doc: str, script: str, bench: str, build) -> None:
    """The command line of a loss on [B, D] features (bench_contrastive, bench_sigmoid): open_clip's module is the
    peer, the sweep axis is the batch."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_args(p, os.path.basename(script).replace(".py", ".csv"))
    p.add_argument("--batch", default="1024,4096,16384", help="comma-separated batch sizes B")
    p.add_argument("--dim", type=int, default=512)
    args = p.parse_args()
    if args.worker:
        return worker_main(args.worker, build)
    impls = args.impls.split(",") if args.impls else ["open_clip"] + default_impls(args.device)
    sizes = [{"batch": int(b), "dim": args.dim} for b in args.batch.split(",")]
    rows = sweep(os.path.abspath(script), bench, args, impls, sizes, "batch")
    png = args.plot or os.path.splitext(args.out)[0] + ".png"
    plot(args.out, png, bench, "batch", f"{bench} fwd+bwd, D={args.dim}, {args.dtype}, {args.device}, "
         f"{args.threads} threads", where=lambda r: r["dtype"] == args.dtype and r["device"] == args.device
         and r["dim"] == str(args.dim))
    for line in summarize(rows, "batch", "open_clip", [i for i in impls if i != "open_clip"]):
        print(line)
