"""benchmarks/gpu_vlm_step.sh runs end to end here with --tiny: bench_vlm_step.py's stage-2 LLaVA steps (the engine
with both padding policies, the plain loop) for 2 tiny steps on the CPU, so the command a lent GPU runs is known to
work before a GPU is spent on it (~30 s on 2 cores)."""

import csv
import math
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers", reason="the vision-language stage needs transformers (make setup)")
pytest.importorskip("deepspeed")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_vlm_step_script_tiny_rows_are_finite(tmp_path):
    env = dict(os.environ, PY=sys.executable)
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_vlm_step.sh"), "--tiny", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = list(csv.DictReader(open(tmp_path / "vlm_step.csv")))
    assert [(r["impl"], r["padding"]) for r in rows] == [("engine", "longest"), ("engine", "max_length"),
                                                         ("plain", "longest")]
    for r in rows:
        assert r["status"] == "ok" and r["git_rev"], r
        for key in ("samples_per_s", "tokens_per_s", "positions_per_s", "step_ms", "loss"):
            assert math.isfinite(float(r[key])) and float(r[key]) > 0, (key, r)
        assert 0 <= float(r["padding_frac"]) < 1, r
        assert float(r["tokens_per_s"]) <= float(r["positions_per_s"]), r
    longest, fixed, plain = rows
    assert int(fixed["fixed_length"]) % 64 == 0 and float(fixed["seq_len_mean"]) == int(fixed["fixed_length"])
    assert float(fixed["padding_frac"]) > float(longest["padding_frac"]) == pytest.approx(float(plain["padding_frac"]))
    # the objective's own padding metric (warmup steps included; here there are none) agrees with the rows'
    assert float(longest["padding_frac_metric"]) == pytest.approx(float(longest["padding_frac"]), abs=1e-6)
    for ratio in ("vs_max_length", "vs_plain"):
        assert math.isfinite(float(longest[ratio])) and float(longest[ratio]) > 0, longest
    table = (tmp_path / "vlm_step.md").read_text()
    assert "| engine | longest |" in table and "vs plain loop" in table and "tiny check" in table
