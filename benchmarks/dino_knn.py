"""Does DINO learn on this machine? A short dino_tiny run, then the teacher's k-NN accuracy against its init.

    python benchmarks/dino_knn.py [--steps 80] [--launcher "deepspeed --num_gpus 2"] [section.key=value ...]

1. Synthetic train shards (the recipe's, under benchmarks/.cache/) and a held-out synthetic set (seed 1).
2. Trains configs/cpu/dino_tiny.yaml for --steps steps (schedule.steps = --steps, the recipe's warmup, so the cosine
   completes)
   through --launcher (default: DeepSpeed's launcher with 2 gloo ranks, ZeRO-2).
3. Weighted k-NN (k 20, T 0.07, DINO's protocol) on the synthetic shape category (10 classes) and color (11) with
   frozen features: (a) the encoder at initialization (the recipe's seed; the teacher starts as this copy), (b)
   the exported teacher after training. Train features: --knn-train samples of the training shards; val: the
   held-out set.
4. Collapse check: the entropy of the teacher's batch-mean output distribution H(mean q) from metrics.jsonl,
   against its maximum log K (one prototype taking everything gives 0).
One CSV row per run in results/dino_knn.csv, and results/dino_knn.png (loss, entropies, k-NN bars).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import harness  # noqa: E402

RECIPE = os.path.join(ROOT, "configs", "cpu", "dino_tiny.yaml")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--launcher", default=f"{os.path.join(os.path.dirname(sys.executable), 'deepspeed')} --num_gpus 2",
                   help="command prefix for launch/pretrain.py ('python' for one process)")
    p.add_argument("--knn-train", type=int, default=4000, help="train samples for the k-NN feature bank")
    p.add_argument("--val-samples", type=int, default=1000)
    p.add_argument("--data-root", default=os.path.join(HERE, ".cache"))
    p.add_argument("--out", default=os.path.join(harness.RESULTS_DIR, "dino_knn.csv"))
    p.add_argument("overrides", nargs="*")
    return p.parse_args(argv)


def knn_scores(encoder, train_shards, val_shards, n_train, n_val) -> dict:
    from fastenc.eval.knn import extract_features, knn_accuracy

    labels = ["category_id", "color_id"]
    tr_f, tr_y = extract_features(encoder, train_shards, labels, max_samples=n_train, progress="features (train)")
    va_f, va_y = extract_features(encoder, val_shards, labels, max_samples=n_val, progress="features (val)")
    out = {}
    for i, label in enumerate(labels):
        out[label] = knn_accuracy(tr_f, tr_y[:, i], va_f, va_y[:, i],
                                  num_classes=int(max(tr_y[:, i].max(), va_y[:, i].max())) + 1)
        out[f"{label}_chance"] = float(va_y[:, i].bincount().max()) / len(va_y)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from fastenc.config import load_config
    from fastenc.datatools.synth import is_stale, write_synthetic_shards
    from fastenc.run.metrics import read_metrics
    from fastenc.run.weights import load_exported_encoder
    from fastenc.objectives import build_objective

    train_shards = os.path.join(args.data_root, "synth_cpu")
    val_shards = os.path.join(args.data_root, "synth_cpu_val")
    run_root = tempfile.mkdtemp(prefix="dino_knn_")
    # The recipe's warmup is kept (20 steps): a 5-step warmup collapses CLIP at this lr, too.
    overrides = [f"data.train_shards={train_shards}", f"schedule.steps={args.steps}", f"run.output_dir={run_root}",
                 "engine.checkpoint_every=0", *args.overrides]
    cfg = load_config(RECIPE, overrides)
    if not os.path.exists(os.path.join(val_shards, "manifest.json")) or is_stale(val_shards):
        write_synthetic_shards(val_shards, args.val_samples, image_size=cfg.data.synth.image_size, seed=1)

    # (a) the encoder at init: the trainer seeds with run.seed before building the objective, so this is the copy
    # the teacher starts from.
    torch.manual_seed(cfg.run.seed)
    init_encoder = build_objective(cfg).teacher.encoder.eval()
    env = harness.env_fields()  # before training: the git revision of the code that runs, not of a later commit
    cmd = [*shlex.split(args.launcher), os.path.join(ROOT, "launch", "pretrain.py"), "--config", RECIPE, *overrides]
    print("train:", " ".join(cmd), flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT)
    train_s = time.time() - t0
    run_dir = os.path.join(run_root, cfg.run.name)
    before = knn_scores(init_encoder, train_shards, val_shards, args.knn_train, args.val_samples)
    after = knn_scores(load_exported_encoder(run_dir), train_shards, val_shards, args.knn_train, args.val_samples)

    rows_m = [r for r in read_metrics(os.path.join(run_dir, "metrics.jsonl")) if "loss" in r]
    log_k = math.log(cfg.objective.out_dim)
    row = {
        "timestamp": harness.utc_now(), "bench": "dino_knn", "recipe": "dino_tiny", "steps": args.steps,
        "launcher": args.launcher.split("/")[-1], "batch": cfg.data.batch_size, "out_dim": cfg.objective.out_dim,
        "local_crops": cfg.objective.local_crops, "train_wall_s": round(train_s, 1),
        "samples_per_s_median": harness.median([r["samples_per_s"] for r in rows_m]),
        "loss_first": rows_m[0]["loss"], "loss_last": rows_m[-1]["loss"],
        "teacher_mean_entropy_last": rows_m[-1]["teacher_mean_entropy"],
        "teacher_entropy_last": rows_m[-1]["teacher_entropy"], "log_K": log_k,
        "knn_category_init": before["category_id"], "knn_category_trained": after["category_id"],
        "knn_category_chance": after["category_id_chance"],
        "knn_color_init": before["color_id"], "knn_color_trained": after["color_id"],
        "knn_color_chance": after["color_id_chance"],
        "knn_train_samples": args.knn_train, "knn_val_samples": args.val_samples,
        "overrides": " ".join(args.overrides), **env,
    }
    harness.append_rows(args.out, [row])
    print(json.dumps({k: row[k] for k in row if k.startswith(("knn", "teacher", "loss", "log_K", "samples"))},
                     indent=1))
    plot(rows_m, row, args.out[:-4] + ".png")
    return 0


def plot(rows_m, row, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows_m]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    axes[0].plot(steps, [r["loss"] for r in rows_m])
    axes[0].set(title="DINO loss (dino_tiny)", xlabel="step")
    axes[1].plot(steps, [r["teacher_mean_entropy"] for r in rows_m], label="H(mean teacher q)")
    axes[1].plot(steps, [r["teacher_entropy"] for r in rows_m], label="mean H(teacher q)")
    axes[1].axhline(row["log_K"], color="gray", ls="--", label="log K")
    axes[1].set(title="collapse monitors", xlabel="step")
    axes[1].legend()
    names = ["category", "color"]
    x = range(len(names))
    axes[2].bar([i - 0.25 for i in x], [row[f"knn_{n}_init"] for n in names], width=0.25, label="init")
    axes[2].bar(list(x), [row[f"knn_{n}_trained"] for n in names], width=0.25, label=f"teacher, {row['steps']} steps")
    axes[2].bar([i + 0.25 for i in x], [row[f"knn_{n}_chance"] for n in names], width=0.25, label="majority class")
    axes[2].set_xticks(list(x), names)
    axes[2].set(title="k-NN top-1 (held-out synthetic set)", ylim=(0, 1))
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print("plot:", path)


if __name__ == "__main__":
    sys.exit(main())
