"""What can any objective reach on the synthetic shape category within the CPU recipe's budget? A supervised ceiling.

    python benchmarks/shape_ceiling.py [--steps 300] [--eval-every 50] [section.key=value ...]

The study's k-NN probes ask whether an encoder learned the shape category. Before blaming an objective for a flat
probe, this measures the best case: the recipe's ViT trained *with the category labels* (a linear classifier on
the pooled feature, cross-entropy), on the recipe's shards, batch, optimizer (AdamW with the recipe's lr, betas,
eps, weight decay, global grad-norm clip) and warmup-cosine schedule, with open_clip's train transform. One process,
no DeepSpeed: this is a calibration, not a fastenc feature.

Every --eval-every steps: the weighted k-NN (k 20, T 0.07, as benchmarks/dino_knn.py) on category and color with
the frozen encoder, --knn-train samples of the train shards against the held-out set (seed 1), and the training
accuracy over the last --eval-every batches. One CSV row per evaluation in results/shape_ceiling.csv, and
results/shape_ceiling.png.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import harness  # noqa: E402

RECIPE = os.path.join(ROOT, "configs", "cpu", "dino_tiny.yaml")  # any CPU recipe: only model/data/optim/schedule are used


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default=RECIPE)
    p.add_argument("--steps", type=int, default=None, help="default: the recipe's schedule.steps")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--knn-train", type=int, default=2000)
    p.add_argument("--val-samples", type=int, default=1000)
    p.add_argument("--data-root", default=os.path.join(HERE, ".cache"))
    p.add_argument("--out", default=os.path.join(harness.RESULTS_DIR, "shape_ceiling.csv"))
    p.add_argument("overrides", nargs="*")
    return p.parse_args(argv)


def load_eval_set(shards, image_size, n):
    """Eval-transformed images [n, 3, S, S] and labels [n, 2] (category, color), decoded once: the k-NN runs every
    --eval-every steps, and fastenc.eval.knn.extract_features would decode the JPEGs again each time."""
    import torch

    from fastenc.data.loader import build_loader
    from fastenc.eval.knn import LabelledImage

    loader = build_loader(shards, sample_fn=LabelledImage(image_size, ["category_id", "color_id"]), batch_size=256,
                          num_workers=0, shuffle_buffer=0, resampled=False, drop_last=False)
    xs, ys, got = [], [], 0
    for b in loader:
        xs.append(b["image"])
        ys.append(b["label"])
        got += len(b["image"])
        if got >= n:
            break
    return torch.cat(xs)[:n], torch.cat(ys)[:n]


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from fastenc.config import load_config
    from fastenc.data.loader import build_loader
    from fastenc.datatools.synth import is_stale, write_synthetic_shards
    from fastenc.engine.distributed import DistInfo
    from fastenc.engine.schedules import warmup_cosine
    from fastenc.engine.trainer import prepare_data
    from fastenc.eval.knn import LabelledImage, knn_accuracy
    from fastenc.objectives.base import build_encoder

    train_shards = os.path.join(args.data_root, "synth_cpu")
    val_shards = os.path.join(args.data_root, "synth_cpu_val")
    cfg = load_config(args.recipe, [f"data.train_shards={train_shards}", *args.overrides])
    steps = args.steps or cfg.schedule.steps
    prepare_data(cfg, DistInfo(0, 1, 0, torch.device("cpu")))  # the trainer's own: generates the recipe's synthetic shards if missing
    if not os.path.exists(os.path.join(val_shards, "manifest.json")) or is_stale(val_shards):
        write_synthetic_shards(val_shards, args.val_samples, image_size=cfg.data.synth.image_size, seed=1)

    torch.manual_seed(cfg.run.seed)
    encoder = build_encoder(cfg.model)
    size = int(encoder.img_size)
    classifier = torch.nn.Linear(encoder.embed_dim, 10)
    params = [*encoder.parameters(), *classifier.parameters()]
    o = cfg.optim
    opt = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    lrs = warmup_cosine(o.lr, steps, cfg.schedule.warmup_steps, final=o.lr * cfg.schedule.min_lr_ratio)
    tr_x, tr_y = load_eval_set(train_shards, size, args.knn_train)
    va_x, va_y = load_eval_set(val_shards, size, args.val_samples)

    @torch.no_grad()
    def knn():
        encoder.eval()
        feats = [torch.nn.functional.normalize(torch.cat([encoder(x[i:i + 256]) for i in range(0, len(x), 256)]),
                                               dim=-1) for x in (tr_x, va_x)]
        encoder.train()
        return [knn_accuracy(feats[0], tr_y[:, i], feats[1], va_y[:, i], num_classes=int(tr_y[:, i].max()) + 1)
                for i in range(2)]

    loader = iter(build_loader(train_shards, sample_fn=LabelledImage(size, "category_id", train=True),
                               batch_size=cfg.data.batch_size,
                               num_workers=cfg.data.num_workers, shuffle_buffer=cfg.data.shuffle_buffer,
                               seed=cfg.run.seed))
    chance = [float(va_y[:, i].bincount().max()) / len(va_y) for i in range(2)]
    env = harness.env_fields()
    rows, losses, correct, seen = [], [], 0, 0

    def record(step, wall):
        cat, color = knn()
        row = {"timestamp": harness.utc_now(), "bench": "shape_ceiling", "recipe": os.path.basename(args.recipe),
               "steps": steps, "step": step, "batch": cfg.data.batch_size, "lr": o.lr, "wall_s": round(wall, 1),
               "train_loss": round(sum(losses) / len(losses), 4) if losses else "",
               "train_acc": round(correct / seen, 4) if seen else "",
               "knn_category": cat, "knn_color": color, "knn_category_chance": chance[0],
               "knn_color_chance": chance[1], "knn_train_samples": len(tr_x), "knn_val_samples": len(va_x),
               "overrides": " ".join(args.overrides), **env}
        rows.append(row)
        print(f"step {step}: train loss {row['train_loss']} acc {row['train_acc']}  k-NN category {cat:.3f} "
              f"(chance {chance[0]:.3f}) color {color:.3f}", flush=True)

    t0 = time.time()
    record(0, 0.0)
    for step in range(1, steps + 1):
        for g in opt.param_groups:
            g["lr"] = float(lrs[step - 1])
        batch = next(loader)
        labels = batch["label"][:, 0]
        logits = classifier(encoder(batch["image"]))
        loss = torch.nn.functional.cross_entropy(logits, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if o.clip_grad:
            torch.nn.utils.clip_grad_norm_(params, o.clip_grad)
        opt.step()
        losses.append(loss.item())
        correct += int((logits.argmax(-1) == labels).sum())
        seen += len(labels)
        if step % args.eval_every == 0 or step == steps:
            record(step, time.time() - t0)
            losses, correct, seen = [], 0, 0
    harness.append_rows(args.out, rows)
    plot(rows, args.out[:-4] + ".png")
    return 0


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].plot(steps, [r["knn_category"] for r in rows], "o-", label="k-NN category (10)")
    axes[0].plot(steps, [r["knn_color"] for r in rows], "o-", label="k-NN color (11)")
    axes[0].axhline(rows[0]["knn_category_chance"], color="gray", ls="--", label="category majority class")
    axes[0].set(title="supervised on category: frozen-feature k-NN", xlabel="step", ylim=(0, 1))
    axes[0].legend()
    tr = [r for r in rows if r["train_loss"] != ""]
    axes[1].plot([r["step"] for r in tr], [r["train_loss"] for r in tr], "o-", label="train CE")
    axes[1].axhline(math.log(10), color="gray", ls="--", label="ln 10 (chance)")
    axes[1].plot([r["step"] for r in tr], [r["train_acc"] for r in tr], "o-", label="train accuracy")
    axes[1].set(title=f"recipe ViT, batch {rows[0]['batch']}, lr {rows[0]['lr']}", xlabel="step")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print("plot:", path)


if __name__ == "__main__":
    sys.exit(main())
