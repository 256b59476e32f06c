"""benchmarks/gpu_kernels.sh runs end to end here, at tiny sizes on CPU with Triton under the interpreter: the script
a lent GPU runs is known to work before a GPU is spent on it."""

import csv
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="the CPU memory measurement reads /proc")
def test_gpu_kernels_script_tiny_runs_every_benchmark(tmp_path):
    pytest.importorskip("triton")
    env = dict(os.environ, PY=sys.executable, GPU_KERNELS_TESTS="0")  # the kernel tests already run in this suite
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_kernels.sh"), "--tiny", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for bench, impls in (("bench_contrastive", {"reference", "chunked", "triton"}),
                         ("bench_sigmoid", {"reference", "chunked", "triton"}),
                         ("bench_dino", {"reference_loop", "reference", "chunked", "triton"})):
        rows = list(csv.DictReader(open(tmp_path / f"{bench}.csv")))
        assert {r["impl"] for r in rows} >= impls, (bench, rows)
        for r in rows:
            assert not r.get("error"), (bench, r)
            assert float(r["time_ms"]) > 0 and r["device"] == "cpu" and r["git_rev"], (bench, r)
        assert (tmp_path / f"{bench}.png").stat().st_size > 0
