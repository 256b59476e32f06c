#!/usr/bin/env bash
# The CPU recipes under the real multi-rank launchers, 2 gloo ranks each, and a summary of their loss curves:
#   deepspeed --num_gpus 2 launch/pretrain.py --config configs/cpu/{clip,siglip}_tiny.yaml   (ZeRO-2, the recipe's)
#   torchrun --nproc_per_node 2 launch/pretrain.py --config configs/cpu/{clip,siglip}_tiny.yaml
# Each run stops after STEPS steps (--max-steps; the recipe's schedule is unchanged). Writes
# benchmarks/results/launch_check.md (first/last losses per run) and launch_check.png (the curves).
# Usage: bash benchmarks/launch_check.sh [STEPS]   (default 40: about 3 minutes per run on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-40}
PY=${PY:-.venv/bin/python}
BIN=$(dirname "$PY")
OUT=${OUT:-runs/launch_check}
rm -rf "$OUT"
port() { "$PY" -c "from fastenc.engine.distributed import free_port; print(free_port())"; }
common=(run.output_dir="$OUT" engine.checkpoint_every=0)
for obj in clip siglip; do
  "$BIN/deepspeed" --num_gpus 2 --master_port "$(port)" launch/pretrain.py --config "configs/cpu/${obj}_tiny.yaml" \
    --max-steps "$STEPS" "${common[@]}" run.name="deepspeed_${obj}"
  "$BIN/torchrun" --nproc_per_node 2 --master_port "$(port)" launch/pretrain.py --config "configs/cpu/${obj}_tiny.yaml" \
    --max-steps "$STEPS" "${common[@]}" run.name="torchrun_${obj}"
done
"$PY" - "$OUT" "$STEPS" <<'PYEOF'
import datetime, os, subprocess, sys
from fastenc.analysis.curves import plot_loss_curves
from fastenc.run.metrics import read_metrics

out, steps = sys.argv[1], int(sys.argv[2])
runs = ["deepspeed_clip", "torchrun_clip", "deepspeed_siglip", "torchrun_siglip"]
rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
lines = [f"# Launcher check ({datetime.date.today()}, git {rev}): 2 gloo ranks, ZeRO-2, fp32, CPU recipes, {steps} steps",
         "", "Made by `bash benchmarks/launch_check.sh`.", "",
         "Losses are logged every 5 steps (each row averages its 5 steps).", "",
         "| run | loss, first 2 logs | loss, last 2 logs | decreased | samples/s (median) | data wait frac (median) |",
         "| --- | --- | --- | --- | --- | --- |"]
for r in runs:
    rows = read_metrics(os.path.join(out, r, "metrics.jsonl"))
    loss = [x["loss"] for x in rows]
    sps = sorted(x["samples_per_s"] for x in rows[1:])
    dw = sorted(x["data_wait_frac"] for x in rows[1:])
    a, b = sum(loss[:2]) / 2, sum(loss[-2:]) / 2
    lines.append(f"| {r} | {a:.3f} | {b:.3f} | {'yes' if b < a else 'NO'} | {sps[len(sps)//2]:.1f} | {dw[len(dw)//2]:.3f} |")
open("benchmarks/results/launch_check.md", "w").write("\n".join(lines) + "\n")
plot_loss_curves([os.path.join(out, r, "metrics.jsonl") for r in runs], "benchmarks/results/launch_check.png", labels=runs)
print("\n".join(lines))
PYEOF
