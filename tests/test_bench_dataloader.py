"""benchmarks/bench_dataloader.py runs end to end at tiny sizes: every backend (DALI-cpu, the torch path, open_clip's
webdataset pipeline) for the CLIP transform and DINO multi-crop, one thread / worker, each case in its own process;
one CSV row per case, the PNG drawn from the CSV and the ratio table printed by --summarize (~35 s on 2 cores)."""

import csv
import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "bench_dataloader.py")


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


@pytest.mark.skipif(not _importable("nvidia.dali"),
                    reason="nvidia.dali is not importable (pip install nvidia-dali-cuda130): the DALI rows need it")
@pytest.mark.skipif(not _importable("numba"), reason="numba is not importable: DALI-cpu multi-crop needs it")
@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="the CPU-time measurement reads /proc")
def test_bench_dataloader_tiny_every_backend(tmp_path):
    results = tmp_path / "results"
    cmd = [sys.executable, SCRIPT, "--tiny", "--threads", "1", "--results-dir", str(results),
           "--data-dir", str(tmp_path / "data")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    rows = list(csv.DictReader(open(results / "bench_dataloader.csv")))
    cases = [(r["transform"], r["backend"]) for r in rows]
    expected = {("clip", "dali-cpu"), ("clip", "torch"), ("clip", "open_clip"), ("dino", "dali-cpu"),
                ("dino", "torch")}
    assert sorted(cases) == sorted(expected), cases  # one row per (transform, backend), open_clip for clip only
    open_clip_here = _importable("open_clip") and _importable("open_clip_train")
    for r in rows:
        if r["backend"] == "open_clip" and not open_clip_here:
            assert r["status"].startswith("skipped"), r
            continue
        assert r["status"] == "ok", r
        assert float(r["images_per_s"]) > 0 and int(r["images"]) > 0, r
        assert r["threads"] == "1" and r["device"] == "cpu" and r["tiny"] == "1" and r["git_rev"], r
        assert float(r["cpu_ms_per_image"]) > 0, r
    assert (results / "bench_dataloader.png").stat().st_size > 0

    summary = subprocess.run([sys.executable, SCRIPT, "--summarize", "--results-dir", str(results)],
                             capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert summary.returncode == 0, summary.stderr[-3000:]
    assert "| cpu | clip | 1 |" in summary.stdout and "| cpu | dino | 1 |" in summary.stdout, summary.stdout
