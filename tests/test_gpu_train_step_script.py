"""benchmarks/gpu_train_step.sh runs end to end here with --tiny: every case of the GPU run (the real trainer under
ZeRO-1/2/3 and compile, the plain loop, open_clip's peer) on the CPU recipes, so the script a lent GPU runs is known
to work before a GPU is spent on it."""

import csv
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_train_step_script_tiny_runs_every_case(tmp_path):
    pytest.importorskip("open_clip")
    cases = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_train_step.py"), "--list"],
                           capture_output=True, text=True, check=True).stdout.split()
    env = dict(os.environ, PY=sys.executable)
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_train_step.sh"), "--tiny", str(tmp_path)],
                          capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = list(csv.DictReader(open(tmp_path / "gpu_train_step.csv")))
    assert [r["case"] for r in rows] == cases
    for r in rows:
        assert r["status"] == "ok", r
        assert float(r["samples_per_s"]) > 0 and float(r["vs_plain"]) > 0 and r["git_rev"], r
        if r["impl"] == "trainer":
            assert 0 <= float(r["data_wait_frac"]) < 1 and r["zero_stage"] in {"1", "2", "3"}, r
    assert {r["zero_stage"] for r in rows if r["impl"] == "trainer"} == {"1", "2", "3"}
    assert {r["compile"] for r in rows if r["objective"] == "clip"} == {"True", "False"}
    assert (tmp_path / "gpu_train_step.png").stat().st_size > 0
