"""Training-step throughput of fastenc's real trainer, against open_clip's own trainer on a model of identical size.

    python benchmarks/bench_train_step.py --config configs/cpu/clip_tiny.yaml [--steps 20] [--warmup 5]
        [--peer/--no-peer] [--peer-data synthetic|shards|both] [--repeats N] [--threads 2]
        [--out benchmarks/results/train_step.csv] [section.key=value ...]
    python benchmarks/bench_train_step.py --markdown      # latest rows as the table in benchmarks/README.md

fastenc: `fastenc.engine.trainer.train` runs in this process (DeepSpeed engine, webdataset loader decoding the
recipe's JPEG shards, the objective, AdamW) with engine.log_every=1 and engine.detailed_timing=true, so its
metrics.jsonl holds one row per step: step time, data wait, forward, backward and optimizer-step time. Synthetic
shards and the tokenizer are prepared before the clock starts (under benchmarks/.cache/ unless --data-root '').

open_clip: `open_clip_train.main` (through benchmarks/open_clip_peer.py, which registers the model config JSON) in
a subprocess with the same towers, global batch, precision, thread budget, one process and one loader worker; its
per-step "Data (t) ... Batch (t) ..." log lines give step and data time. Its data (--peer-data): its synthetic
dataset (one constant PIL image through its train transforms, no JPEG decode) and/or the same JPEG shards as
fastenc through its webdataset pipeline.

Both: the first --warmup steps of every run are dropped; --repeats alternates the implementations and pools the
measured steps; medians with p10/p90. Each run waits for an idle machine first and is redone if other processes
used CPU during it (see harness.CpuMonitor). One CSV row per (impl, recipe, data) is appended to --out, with the
training process's peak RSS, and the PNG next to it is redrawn from the CSV. Throughput in model FLOP/s uses the
formula in `train_flops_per_sample` (no MFU: a CPU has no meaningful dense peak to divide by).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import harness  # noqa: E402

BENCH = "train_step"

PEER_NOTES = {
    "synthetic": "open_clip: open_clip_train.main --dataset-type synthetic (one constant PIL image through its train "
                 "transforms, no JPEG decode), 1 loader worker, token ids folded into fastenc's vocab size",
    "shards": "open_clip: open_clip_train.main --dataset-type webdataset --dataset-resampled on the same JPEG shards "
              "as fastenc (decode + its train transforms), 1 loader worker, token ids folded into fastenc's vocab "
              "size, webdataset end-of-shard marker disabled (open_clip_train 3.3.0 KeyError 'fname' otherwise)",
}
FASTENC_NOTE = ("fastenc: real trainer, webdataset shards of 64 px JPEGs decoded + augmented in 1 loader worker, "
                "DeepSpeed ZeRO-{zero} engine")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="fastenc recipe (configs/cpu/clip_tiny.yaml, ...)")
    p.add_argument("--markdown", action="store_true",
                   help="print the latest rows of --out as a markdown table (for benchmarks/README.md) and exit")
    p.add_argument("--steps", type=int, default=20, help="measured steps (after warmup)")
    p.add_argument("--warmup", type=int, default=5, help="steps run and dropped first (loader start, allocator)")
    p.add_argument("--peer", action=argparse.BooleanOptionalAction, default=True,
                   help="also run open_clip's trainer on the same model size (CLIP and SigLIP recipes)")
    p.add_argument("--fastenc", action=argparse.BooleanOptionalAction, default=True, help="run fastenc")
    p.add_argument("--peer-data", choices=["synthetic", "shards", "both"], default="synthetic",
                   help="open_clip's input: its synthetic dataset (no decode), the recipe's JPEG shards through its "
                        "webdataset pipeline (the same decode work as fastenc), or both")
    p.add_argument("--repeats", type=int, default=1,
                   help="training runs per implementation, alternating fastenc and open_clip; steps are pooled")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads of each training process")
    p.add_argument("--out", default=os.path.join(harness.RESULTS_DIR, f"{BENCH}.csv"), help="CSV to append to")
    p.add_argument("--plot", default=None, help="PNG (default: the CSV's path with .png)")
    p.add_argument("--data-root", default=os.path.join("benchmarks", ".cache"),
                   help="where the recipe's synthetic shards and tokenizer live for the benchmark ('' = the "
                        "recipe's own paths)")
    p.add_argument("--wait-idle", type=float, default=600.0,
                   help="before each measurement, wait up to this many seconds for other processes to use < 0.3 "
                        "cores (0 = do not wait)")
    p.add_argument("--retries", type=int, default=2,
                   help="re-run a measurement (after waiting for idle) when other processes used > 0.25 cores "
                        "during it; the last try is kept either way")
    p.add_argument("--keep", action="store_true", help="keep the temporary run dirs (printed)")
    p.add_argument("--note", default="", help="free text appended to the rows' note")
    p.add_argument("overrides", nargs="*", help="fastenc dotted overrides (section.key=value)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------------
# model size and FLOPs, from the fastenc config (the peer is built to the same numbers)


def tower_dims(cfg) -> dict:
    from fastenc.models import _TEXT_PRESETS, _VIT_PRESETS

    vit = {**_VIT_PRESETS[cfg.model.name], **cfg.model.overrides}
    if cfg.model.img_size:
        vit["img_size"] = cfg.model.img_size
    if cfg.objective.name == "dino":
        o = cfg.objective
        return {"vit": vit, "dino": {"global": o.num_global_crops, "local": o.local_crops, "local_size": o.local_crop_size,
                                     "hidden": o.hidden_dim, "bottleneck": o.bottleneck_dim, "out": o.out_dim,
                                     "layers": o.head_layers}}
    text = {**_TEXT_PRESETS[cfg.objective.text.name], **cfg.objective.text.overrides}
    return {"vit": vit, "text": text, "embed_dim": cfg.objective.embed_dim}


def _vit_forward_flops(v: dict, img_size: int) -> float:
    n_patch = (img_size // v["patch_size"]) ** 2
    tv, dv = n_patch + 1, v["embed_dim"]
    block_v = 2 * tv * (4 + 2 * v.get("mlp_ratio", 4.0)) * dv**2 + 4 * tv**2 * dv
    return v["depth"] * block_v + 2 * n_patch * 3 * v["patch_size"] ** 2 * dv


def dino_flops_per_sample(dims: dict) -> float:
    """DINO: the student's forward + backward (3 x forward) over every crop (global crops at the model's size,
    local crops at theirs) and its head, plus the teacher's forward only over the global crops and its head."""
    v, d = dims["vit"], dims["dino"]
    hidden = [v["embed_dim"]] + [d["hidden"]] * (d["layers"] - 1) + [d["bottleneck"]]
    head = 2 * sum(a * b for a, b in zip(hidden[:-1], hidden[1:])) + 2 * d["bottleneck"] * d["out"]
    glob = _vit_forward_flops(v, v["img_size"]) + head
    local = _vit_forward_flops(v, d["local_size"]) + head
    return 3.0 * (d["global"] * glob + d["local"] * local) + d["global"] * glob


def train_flops_per_sample(dims: dict, batch: int) -> float:
    """Model FLOPs of one training sample: 3 x forward (backward = 2 x forward), 2 FLOPs per multiply-add.

    Per transformer block of width D over T tokens: 2*T*12*D^2 (qkv 3D^2, proj D^2, MLP 8D^2 at ratio 4) plus
    attention 4*T^2*D (QK^T and AV, counted dense also for the causal text tower, as SDPA computes it). Plus the
    patch embedding 2*N*(3*p^2)*D, both projections 2*D*E, and the B x B logits 2*B*E per sample.
    """
    if "dino" in dims:
        return dino_flops_per_sample(dims)
    v, t, e = dims["vit"], dims["text"], dims["embed_dim"]
    n_patch = (v["img_size"] // v["patch_size"]) ** 2
    tv, dv = n_patch + 1, v["embed_dim"]
    mlp_v = v.get("mlp_ratio", 4.0)
    block_v = 2 * tv * (4 + 2 * mlp_v) * dv**2 + 4 * tv**2 * dv
    fwd = v["depth"] * block_v + 2 * n_patch * 3 * v["patch_size"] ** 2 * dv + 2 * dv * e
    lt, dt = t["context_length"], t["width"]
    mlp_t = t.get("mlp_ratio", 4.0)
    block_t = 2 * lt * (4 + 2 * mlp_t) * dt**2 + 4 * lt**2 * dt
    fwd += t["layers"] * block_t + 2 * dt * e + 2 * batch * e
    return 3.0 * fwd


def open_clip_model_config(dims: dict, vocab_size: int) -> dict:
    """open_clip model JSON of the same towers: no ln_pre (timm's ViT has none), CLS-token pooling, GELU."""
    v, t = dims["vit"], dims["text"]
    return {
        "embed_dim": dims["embed_dim"],
        "vision_cfg": {"image_size": v["img_size"], "layers": v["depth"], "width": v["embed_dim"],
                       "head_width": v["embed_dim"] // v["num_heads"], "patch_size": v["patch_size"],
                       "mlp_ratio": v.get("mlp_ratio", 4.0), "no_ln_pre": True, "pool_type": "tok"},
        "text_cfg": {"context_length": t["context_length"], "vocab_size": vocab_size, "width": t["width"],
                     "heads": t["heads"], "layers": t["layers"], "mlp_ratio": t.get("mlp_ratio", 4.0)},
    }


# ----------------------------------------------------------------------------------------------------------------
# fastenc


def _data_overrides(cfg_raw_paths: tuple[str, str], data_root: str) -> list[str]:
    """Point the recipe's shards (and a tokenizer stored beside them) at data_root/<shard dir name>."""
    shards, tokenizer = cfg_raw_paths
    if not data_root:
        return []
    name = os.path.basename(shards.rstrip("/")) or "shards"
    new_shards = os.path.join(data_root, name)
    out = [f"data.train_shards={new_shards}"]
    if tokenizer and os.path.normpath(tokenizer).startswith(os.path.normpath(shards) + os.sep):
        out.append(f"objective.tokenizer={os.path.join(new_shards, os.path.relpath(tokenizer, shards))}")
    return out


def load_bench_config(args, output_dir: str, total_steps: int):
    from fastenc.config import load_config

    base = load_config(args.config, args.overrides)
    forced = [
        "engine.log_every=1", "engine.detailed_timing=true", "engine.checkpoint_every=0",
        "engine.tensorboard=false", f"run.output_dir={output_dir}",
        f"schedule.steps={max(base.schedule.steps, total_steps)}",
    ]
    data = _data_overrides((base.data.train_shards, getattr(base.objective, "tokenizer", "")), args.data_root)
    # Forced settings last: the per-step logging and timing are what this benchmark reads.
    return load_config(args.config, data + list(args.overrides) + forced)


def prepare_untimed(cfg) -> None:
    """Synthetic shards and tokenizer (minutes on first use) before any clock starts."""
    import torch

    from fastenc.engine.distributed import DistInfo
    from fastenc.engine.trainer import prepare_data

    prepare_data(cfg, DistInfo(0, 1, 0, torch.device("cpu")))


def measure_fastenc(args, cfg) -> tuple[list[dict], dict]:
    """One fastenc training run: per-step rows after warmup (metrics.jsonl keys) and the CPU monitor's fields."""
    import torch

    from fastenc.run.metrics import read_metrics
    from fastenc.engine.trainer import train

    total = args.warmup + args.steps
    tmp = tempfile.mkdtemp(prefix="bench_fastenc_")
    try:
        cfg = copy.deepcopy(cfg)
        cfg.run.output_dir = tmp
        torch.set_num_threads(args.threads)
        idle_before = harness.wait_for_idle(args.wait_idle) if args.wait_idle > 0 else float("nan")
        harness.reset_peak_rss()  # this process also prepared the data; count the training run only
        with harness.CpuMonitor() as mon:
            result = train(cfg, max_steps=total, export=False, plot=False)
        peak_rss_mb = harness.peak_rss_mb()  # the training process, loader workers excluded
        steps = [r for r in read_metrics(result.metrics_path) if r["step"] > args.warmup]
    finally:
        if args.keep:
            print(f"fastenc run dir kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    if len(steps) != args.steps:
        raise RuntimeError(f"expected {args.steps} measured rows in metrics.jsonl, got {len(steps)}")
    return steps, {**mon.fields(), "busy_cores_before": idle_before, "peak_rss_mb": peak_rss_mb}


def fastenc_row(args, cfg, recipe: str, runs: list[tuple[list[dict], dict]]) -> dict:
    import torch

    from fastenc.objectives import build_objective

    steps = [s for run, _ in runs for s in run]
    col = {k: [r[k] for r in steps] for k in ("step_time", "data_wait", "data_wait_frac", "forward_time",
                                              "backward_time", "optim_step_time")}
    other = [s - d - f - b - o for s, d, f, b, o in zip(col["step_time"], col["data_wait"], col["forward_time"],
                                                        col["backward_time"], col["optim_step_time"])]
    row = {
        "impl": "fastenc", "recipe": recipe, "data": "shards", "objective": cfg.objective.name, "status": "ok",
        "num_params": sum(p.numel() for p in build_objective(cfg).parameters()),
        "batch": cfg.data.batch_size, "precision": cfg.engine.precision, "world_size": 1,
        "zero_stage": cfg.engine.zero_stage, "attn_impl": cfg.model.attn_impl, "num_workers": cfg.data.num_workers,
        "threads": torch.get_num_threads(),
        **step_stats(cfg, runs, data_key="data_wait", warmup=args.warmup),
        "data_wait_frac_median": harness.median(col["data_wait_frac"]),
        "forward_median": harness.median(col["forward_time"]),
        "backward_median": harness.median(col["backward_time"]),
        "optim_step_median": harness.median(col["optim_step_time"]),
        "other_median": harness.median(other),
        "note": FASTENC_NOTE.format(zero=cfg.engine.zero_stage),
    }
    return row


def step_stats(cfg, runs: list[tuple[list[dict], dict]], data_key: str, warmup: int) -> dict:
    """Medians and spread over the measured steps of all repeats, per-repeat medians, and the monitors' fields."""
    batch = cfg.data.batch_size
    steps = [s for run, _ in runs for s in run]
    step_time = [s["step_time"] for s in steps]
    data = [s[data_key] for s in steps]
    sps, st = harness.spread([batch / t for t in step_time]), harness.spread(step_time)
    mons = [m for _, m in runs]
    return {
        "repeats": len(runs), "warmup_steps": warmup, "steps_measured": len(steps),
        "samples_per_s_median": sps["median"], "samples_per_s_p10": sps["p10"], "samples_per_s_p90": sps["p90"],
        "samples_per_s_per_repeat": ";".join(f"{batch / harness.median([s['step_time'] for s in run]):.2f}"
                                             for run, _ in runs),
        "step_time_median": st["median"], "step_time_p10": st["p10"], "step_time_p90": st["p90"],
        "step_time_iqr": st["iqr"],
        "data_wait_median": harness.median(data),
        "samples_per_s_excl_data": batch / harness.median([t - d for t, d in zip(step_time, data)]),
        "train_gflop_per_sample": train_flops_per_sample(tower_dims(cfg), batch) / 1e9,
        "loss_first": steps[0].get("loss", float("nan")), "loss_last": steps[-1].get("loss", float("nan")),
        "load1_start": mons[0]["load1_start"], "load1_end": mons[-1]["load1_end"],
        "load1_max": max(max(m["load1_start"], m["load1_end"]) for m in mons),
        "own_cpu_cores": harness.median([m["own_cpu_cores"] for m in mons]),
        "foreign_cpu_cores": max(m["foreign_cpu_cores"] for m in mons),
        "busy_cores_before": max(m["busy_cores_before"] for m in mons),
        "peak_rss_mb": max(m["peak_rss_mb"] for m in mons),
        "wall_s": sum(m["wall_s"] for m in mons),
    }


# ----------------------------------------------------------------------------------------------------------------
# open_clip peer

# "Data (t): 0.012 Batch (t): 3.456, 37.0370/s, 37.0370/s/gpu"
_OC_LINE = re.compile(r"Data \(t\): (?P<data>[0-9.]+) Batch \(t\): (?P<batch>[0-9.]+), (?P<sps>[0-9.eE+]+)/s")
_OC_LOSS = re.compile(r"(?:Contrastive_loss|Loss): (?P<loss>[0-9.eE+-]+)")


def parse_open_clip_log(text: str, batch: int) -> list[dict]:
    """Per-step rows from open_clip_train's log (one line per step with --log-every-n-steps 1).

    Its samples/s is printed to 6 significant digits, its times to 1 ms: step time comes from samples/s."""
    rows = []
    for line in text.splitlines():
        m = _OC_LINE.search(line)
        if m:
            loss = _OC_LOSS.search(line)
            rows.append({"data_time": float(m["data"]), "step_time": batch / float(m["sps"]),
                         "loss": float(loss["loss"]) if loss else float("nan")})
    return rows


def open_clip_command(args, cfg, model_json: str, logs: str, data: str) -> list[str]:
    from fastenc.data.shards import expand_shards

    o, total = cfg.optim, args.warmup + args.steps
    if data == "synthetic":
        dataset = ["--dataset-type", "synthetic"]
    else:
        # webdataset's url list syntax: "::" joins sources, each brace-expanded. Resampled like fastenc's recipe.
        urls = "::".join(os.path.abspath(u) for u in expand_shards(cfg.data.train_shards))
        dataset = ["--dataset-type", "webdataset", "--dataset-resampled", "--train-data", urls]
    cmd = [sys.executable, os.path.join(HERE, "open_clip_peer.py"), "--model-config", model_json,
           *(["--wds-no-eof-marker"] if data == "shards" else []), "--",
           "--model", os.path.splitext(os.path.basename(model_json))[0], "--device", "cpu", "--precision", "fp32",
           *dataset, "--train-num-samples", str(total * cfg.data.batch_size),
           "--batch-size", str(cfg.data.batch_size), "--workers", "1", "--epochs", "1",
           "--lr", str(o.lr), "--wd", str(o.weight_decay), "--beta1", str(o.betas[0]), "--beta2", str(o.betas[1]),
           "--eps", str(o.eps), "--warmup", str(cfg.schedule.warmup_steps), "--grad-clip-norm", str(o.clip_grad),
           "--log-every-n-steps", "1", "--report-to", "", "--logs", logs, "--name", "run",
           "--seed", str(cfg.run.seed), "--save-frequency", "0"]
    if cfg.objective.name == "siglip":
        cmd.append("--siglip")
    return cmd


def measure_open_clip(args, cfg, recipe: str, data: str) -> tuple[list[dict] | None, dict, str]:
    """One open_clip_train run in a subprocess: (per-step rows after warmup or None, monitor fields, log text)."""
    from fastenc.data.tokenizer import Tokenizer

    vocab = Tokenizer(cfg.objective.tokenizer, 8).vocab_size
    total = args.warmup + args.steps
    tmp = tempfile.mkdtemp(prefix=f"bench_open_clip_{recipe}_")
    # A neutral model name: open_clip picks tokenizers (and losses) by sniffing names for "siglip", "coca", ...
    model_json = os.path.join(tmp, "fastenc_bench_towers.json")
    with open(model_json, "w") as f:
        json.dump(open_clip_model_config(tower_dims(cfg), vocab), f, indent=1)
    cmd = open_clip_command(args, cfg, model_json, tmp, data)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    print("open_clip:", " ".join(cmd[1:])[:600], flush=True)
    idle_before = harness.wait_for_idle(args.wait_idle) if args.wait_idle > 0 else float("nan")
    try:
        with harness.CpuMonitor() as mon:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp, timeout=3600)
        log_text = proc.stdout + proc.stderr
    finally:
        if args.keep:
            print(f"open_clip run dir kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    steps = parse_open_clip_log(log_text, cfg.data.batch_size)
    m = re.search(r"open_clip_peer: peak rss ([0-9.]+) MiB", log_text)
    fields = {**mon.fields(), "busy_cores_before": idle_before, "peak_rss_mb": float(m[1]) if m else float("nan")}
    if proc.returncode != 0 or len(steps) < total:
        errors = [line.strip() for line in log_text.splitlines() if re.match(r"\s*\w+(Error|Exception)\b", line)]
        tail = errors[-1] if errors else " | ".join(line.strip() for line in log_text.strip().splitlines()[-3:])
        fields["failure"] = f"failed: open_clip_train exit {proc.returncode}, {len(steps)}/{total} step lines; {tail}"
        print("\n".join(log_text.splitlines()[-40:]), file=sys.stderr)
        print(fields["failure"], file=sys.stderr)
        return None, fields, log_text
    return steps[args.warmup:total], fields, log_text


def open_clip_row(args, cfg, recipe: str, data: str, runs: list[tuple[list[dict], dict]], log_text: str) -> dict:
    row = {"impl": "open_clip", "recipe": recipe, "data": data, "objective": cfg.objective.name, "status": "ok",
           "batch": cfg.data.batch_size, "precision": "fp32", "world_size": 1, "zero_stage": "",
           "attn_impl": "nn.MultiheadAttention", "num_workers": 1, "threads": args.threads, "note": PEER_NOTES[data]}
    m = re.search(r"open_clip_peer: params (\d+)", log_text)
    row["num_params"] = int(m[1]) if m else ""
    m = re.search(r"open_clip_peer: torch threads (\d+)", log_text)
    row["threads"] = int(m[1]) if m else args.threads
    if "open_clip_peer: pandas not installed" in log_text:
        row["note"] += "; pandas missing, stand-in module used (CSV dataset only)"
    steps = [s for run, _ in runs for s in run]
    row.update(step_stats(cfg, runs, data_key="data_time", warmup=args.warmup))
    row["data_wait_frac_median"] = harness.median([s["data_time"] / s["step_time"] for s in steps])
    return row


def peer_skip_reason(cfg) -> str | None:
    if cfg.objective.name not in ("clip", "siglip"):
        return f"skipped: open_clip's trainer has no '{cfg.objective.name}' objective"
    return None


# ----------------------------------------------------------------------------------------------------------------


def plot(csv_path: str, png_path: str) -> str | None:
    ok = lambda r: r.get("status") == "ok"  # noqa: E731
    return harness.plot_from_csv(
        csv_path, png_path, where=ok,
        label=lambda r: f"{r['impl']}\n{r['recipe']}\n{r.get('data') or ''} data" + (
            f"\n{r['overrides']}" if r.get("overrides") else ""),
        panels=[
            {"y": "samples_per_s_median", "err": ("samples_per_s_p10", "samples_per_s_p90"),
             "ylabel": "samples / s (median, p10-p90 of steps)", "title": "training throughput, 1 process",
             "color": lambda r: "tab:blue" if r.get("impl") == "fastenc" else "tab:orange"},
            {"stack": ["data_wait_median", "forward_median", "backward_median", "optim_step_median", "other_median"],
             "stack_labels": ["data wait", "forward", "backward", "optimizer step", "other"],
             "total": "step_time_median", "ylabel": "seconds / step (medians)",
             "title": "fastenc step time breakdown", "where": lambda r: r.get("impl") == "fastenc"},
        ],
        title=f"latest rows of {os.path.basename(csv_path)}")


def summarize(rows: list[dict]) -> None:
    print("\n== train step ==")
    harness.print_table(rows, ["impl", "recipe", "data", "status", "steps_measured", "samples_per_s_median",
                               "samples_per_s_p10", "samples_per_s_p90", "samples_per_s_per_repeat",
                               "step_time_median", "data_wait_median", "forward_median", "backward_median",
                               "optim_step_median", "other_median", "samples_per_s_excl_data"])
    harness.print_table(rows, ["impl", "data", "threads", "num_params", "peak_rss_mb", "busy_cores_before",
                               "foreign_cpu_cores",
                               "own_cpu_cores", "load1_start", "load1_end", "load1_max", "wall_s"])
    ok = [r for r in rows if r.get("status") == "ok"]
    for r in rows:
        if r.get("status") != "ok":
            print(f"  {r['impl']} {r['recipe']}: {r['status']}")
    for r in ok:
        print(f"  {r['impl']} ({r['data']}): {r['samples_per_s_median'] * r['train_gflop_per_sample']:.1f} model "
              f"GFLOP/s ({r['train_gflop_per_sample']:.3f} GFLOP/sample), {r.get('num_params', '?')} params")
    fe = next((r for r in ok if r["impl"] == "fastenc"), None)
    for oc in (r for r in ok if r["impl"] == "open_clip"):
        if fe is None:
            break
        ratio = fe["samples_per_s_median"] / oc["samples_per_s_median"]
        per_rep = [float(a) / float(b) for a, b in zip(fe["samples_per_s_per_repeat"].split(";"),
                                                     oc["samples_per_s_per_repeat"].split(";"))]
        print(f"  fastenc / open_clip ({oc['data']} data) samples/s: {ratio:.3f} "
              f"({'meets' if ratio >= 1 else 'BELOW'} the >= 1.0 target); excluding data wait: "
              f"{fe['samples_per_s_excl_data'] / oc['samples_per_s_excl_data']:.3f}"
              + (f"; per repeat: {' '.join(f'{x:.3f}' for x in per_rep)}" if len(per_rep) > 1 else ""))
    for r in rows:
        if r.get("foreign_cpu_cores", 0) > BUSY_CORES:  # NaN compares False
            print(f"  WARNING: other processes used up to {r['foreign_cpu_cores']:.2f} cores during the {r['impl']} "
                  "runs: timings are not clean, measure again on an idle machine")


def markdown_table(csv_path: str) -> str:
    """The latest ok row per (impl, recipe, data, overrides) as a markdown table, with the ratio to fastenc's row
    without overrides (rows with overrides are ablations of the recipe)."""
    rows = [r for r in harness.read_rows(csv_path) if r.get("status") == "ok"]
    rows = harness.latest_by(rows, lambda r: (r["recipe"], r["impl"], r.get("data", ""), r.get("overrides") or ""))
    fe = {r["recipe"]: float(r["samples_per_s_median"]) for r in rows
          if r["impl"] == "fastenc" and not r.get("overrides")}

    def f(r, k, fmt="{:.2f}"):
        return fmt.format(float(r[k])) if r.get(k) not in (None, "") else "-"

    lines = ["| recipe | impl | data | overrides | samples/s median (p10-p90) | per repeat | fastenc / this | step s "
             "| data wait s | fwd s | bwd s | optim s | steps | other procs (cores) | date (UTC) | git |",
             "|" + " --- |" * 16]
    for r in sorted(rows, key=lambda r: (r["recipe"], r["impl"] != "fastenc", r.get("overrides") or "",
                                         r.get("data", ""))):
        ratio = fe.get(r["recipe"], float("nan")) / float(r["samples_per_s_median"])
        lines.append(
            f"| {r['recipe']} | {r['impl']} | {r.get('data', '')} | {r.get('overrides') or ''} "
            f"| {f(r, 'samples_per_s_median', '{:.1f}')} "
            f"({f(r, 'samples_per_s_p10', '{:.1f}')}-{f(r, 'samples_per_s_p90', '{:.1f}')}) "
            f"| {r.get('samples_per_s_per_repeat', '').replace(';', ', ')} | {ratio:.3f} | {f(r, 'step_time_median')} "
            f"| {f(r, 'data_wait_median', '{:.3f}')} | {f(r, 'forward_median')} | {f(r, 'backward_median')} "
            f"| {f(r, 'optim_step_median', '{:.3f}')} | {r['steps_measured']} ({r.get('repeats', '1')} x) "
            f"| {f(r, 'foreign_cpu_cores', '{:.2f}')} | {r['timestamp'][:16].replace('T', ' ')} | {r['git_rev']} |")
    return "\n".join(lines)


BUSY_CORES = 0.25  # other processes' CPU use above which a measurement is not clean (2-core machine)


def with_retries(args, what: str, measure):
    """Run measure() (returning a tuple whose second item holds the CpuMonitor fields) until no other process
    used more than BUSY_CORES meanwhile, at most 1 + args.retries times."""
    for attempt in range(args.retries + 1):
        print(f"== {what}" + (f" (retry {attempt})" if attempt else ""), flush=True)
        result = measure()
        foreign = result[1].get("foreign_cpu_cores", float("nan"))
        if not foreign > BUSY_CORES:  # NaN (no /proc) counts as clean
            return result
        print(f"   other processes used {foreign:.2f} cores during this run", flush=True)
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.markdown:
        print(markdown_table(args.out))
        return 0
    if not args.config:
        raise SystemExit("--config is required (or --markdown)")
    # Thread budget before torch is imported (OpenMP reads it once); the peer gets the same through its env.
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    os.chdir(harness.REPO_ROOT)  # recipes' relative paths (data/, runs/) resolve as with `make demo`
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    recipe = os.path.splitext(os.path.basename(args.config))[0]
    env = harness.env_fields(extra_packages=["open_clip_torch"])
    stamp = harness.utc_now()

    cfg = load_bench_config(args, tempfile.gettempdir(), args.warmup + args.steps)
    prepare_untimed(cfg)  # shards + tokenizer before any clock; the peer reads the tokenizer's vocabulary size
    skip = peer_skip_reason(cfg) if args.peer else None
    if skip:
        print(f"open_clip peer {skip}")
    peer_data = ["synthetic", "shards"] if args.peer_data == "both" else [args.peer_data]
    peer_data = peer_data if args.peer and not skip else []
    fe_runs: list = []
    oc_runs: dict = {d: [] for d in peer_data}
    oc_failure: dict = {}
    oc_log: dict = {}
    # Repeats alternate the implementations, so slow drifts of a shared machine hit all of them alike.
    for rep in range(args.repeats):
        if args.fastenc:
            fe_runs.append(with_retries(args, f"fastenc {recipe}, repeat {rep + 1}/{args.repeats}",
                                        lambda: measure_fastenc(args, cfg)))
        for data in peer_data:
            if data in oc_failure:
                continue
            steps, fields, oc_log[data] = with_retries(
                args, f"open_clip ({data} data) {recipe}, repeat {rep + 1}/{args.repeats}",
                lambda: measure_open_clip(args, cfg, recipe, data))
            if steps is None:
                oc_failure[data] = fields["failure"]
            else:
                oc_runs[data].append((steps, fields))
    rows = []
    if fe_runs:
        rows.append(fastenc_row(args, cfg, recipe, fe_runs))
    if skip:
        rows.append({"impl": "open_clip", "recipe": recipe, "objective": cfg.objective.name, "status": skip,
                     "batch": cfg.data.batch_size, "note": ""})
    for data in peer_data:
        if data in oc_failure:
            rows.append({"impl": "open_clip", "recipe": recipe, "data": data, "objective": cfg.objective.name,
                         "status": oc_failure[data], "batch": cfg.data.batch_size, "note": PEER_NOTES[data]})
        else:
            rows.append(open_clip_row(args, cfg, recipe, data, oc_runs[data], oc_log[data]))
    for r in rows:
        r.update({"timestamp": stamp, "bench": BENCH, "config": args.config,
                  "overrides": " ".join(args.overrides), **env})
        if args.note:
            r["note"] = f"{r['note']}; {args.note}"
    # Fixed leading columns, then the rest in insertion order (harness keeps existing CSV order).
    lead = ["timestamp", "bench", "impl", "recipe", "data", "status"]
    rows = [{**{k: r.get(k, "") for k in lead}, **r} for r in rows]
    harness.append_rows(args.out, rows)
    png = plot(args.out, args.plot or os.path.splitext(args.out)[0] + ".png")
    summarize(rows)
    print(f"  rows appended to {args.out}; plot {png}; git {env['git_rev']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
