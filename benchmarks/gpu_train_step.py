"""One training step on a GPU, told truthfully in one run: fastenc's real trainer against the plain PyTorch loop of the
same objective and against open_clip's model + loss in that loop, as samples/s, MFU and peak memory.

    python benchmarks/gpu_train_step.py                      # CUDA: paper recipes (ViT-B/16), results/gpu/
    python benchmarks/gpu_train_step.py --tiny --out-dir D   # CPU: the same cases on the CPU recipes, tiny sizes
    python benchmarks/gpu_train_step.py --cases trainer-clip-z1,plain-clip   # a subset (names: --list)

Run through benchmarks/gpu_train_step.sh on the GPU machine (it installs the carried wheels first).

Cases, each in a fresh process (DeepSpeed and torch.compile keep global state):
  trainer-<objective>-z<stage>[-compile]  `fastenc.engine.trainer.train` on the recipe: DeepSpeed engine (bf16 on
      CUDA), torch DataLoader decoding the JPEG shards (DALI's wheel cannot travel to the GPU machine), metrics
      every --log-every steps; the first interval (warmup, compile) is dropped and the others' medians reported,
      with the data-wait fraction the trainer logs.
  plain-<objective>[-compile]  the same objective module, bf16 autocast, fused torch AdamW, one real batch from the
      objective's own pipeline kept on the device: the loop anyone would write by hand. CUDA-event timing.
  open_clip-<clip|siglip>  open_clip's CLIP model of the same tower sizes with its ClipLoss / SigLipLoss in that
      loop (needs open_clip_torch; a row says so when it is missing).

Text is padded to the context length (77 on the paper recipes) everywhere, as open_clip does. MFU = model FLOP/s /
989 TFLOP/s (dense bf16 peak of an H100/H200 SXM), model FLOPs from bench_train_step.train_flops_per_sample:
3 x forward of both towers (DINO: student 3 x forward over all crops + teacher forward over the global crops).
Rows are appended to <out-dir>/gpu_train_step.csv with the hardware, versions and git revision; the PNG beside
it is redrawn. Ratios: each row's `vs_plain` divides its samples/s by the plain loop of the same objective.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import harness  # noqa: E402

BENCH = "gpu_train_step"
PEAK_FLOPS = 989e12  # H100/H200 SXM dense bf16
OBJECTIVES = ("clip", "siglip", "dino")
CASES = [  # most telling first, so that a run cut short still answers "trainer vs plain loop vs open_clip"
    "plain-clip", "trainer-clip-z1", "open_clip-clip", "trainer-clip-z2", "trainer-clip-z3",
    "plain-siglip", "trainer-siglip-z1", "open_clip-siglip", "plain-dino", "trainer-dino-z1",
    "plain-clip-compile", "trainer-clip-z1-compile",
]


def parse_case(name: str) -> dict:
    parts = name.split("-")
    kind, objective, rest = parts[0], parts[1], parts[2:]
    if kind not in ("trainer", "plain", "open_clip") or objective not in OBJECTIVES:
        raise SystemExit(f"unknown case {name!r}; cases: {', '.join(CASES)}")
    case = {"name": name, "kind": kind, "objective": objective, "compile": "compile" in rest, "zero": None}
    for r in rest:
        if r.startswith("z"):
            case["zero"] = int(r[1:])
    if kind == "open_clip" and objective == "dino":
        raise SystemExit("open_clip has no DINO objective")
    return case


def recipe(objective: str, tiny: bool) -> str:
    root = os.path.dirname(HERE)
    name = f"{objective}_{'tiny' if tiny else 'vit_b16'}.yaml"
    return os.path.join(root, "configs", "cpu" if tiny else "paper", name)


def data_overrides(objective: str, a) -> list[str]:
    """Shards, tokenizer, batch and loader settings shared by every case of one objective."""
    batch = a.dino_batch if objective == "dino" else a.batch
    out = [f"data.train_shards={a.data_dir}", "data.synth.num_samples=0", f"data.batch_size={batch}",
           f"engine.micro_batch_size={batch}", f"data.num_workers={a.workers}", "data.backend=torch",
           "data.shuffle_buffer=256"]
    if objective != "dino":
        out += [f"objective.tokenizer={a.tokenizer}", f"objective.vocab_size={a.vocab}",
                "objective.text_padding=max_length"]
    return out


# ----------------------------------------------------------------------------------------------------------------
# the cases (each runs in its own process: `--run-case NAME --result FILE`)


def flops_per_sample(cfg, batch: int) -> float:
    from bench_train_step import tower_dims, train_flops_per_sample

    return train_flops_per_sample(tower_dims(cfg), batch)


def one_batch(obj, cfg, device, dtype):
    """One real batch from the objective's own pipeline (decode + augment + collate), on the device, normalized."""
    import torch

    from fastenc.data.loader import build_dataset
    from fastenc.data.spec import ImageNormalizer

    batch = next(iter(build_dataset(cfg.data.train_shards, sample_fn=obj.sample_fn(train=True),
                                    batch_size=cfg.data.batch_size, num_workers=0, shuffle_buffer=0,
                                    collate_fn=obj.collate_fn(train=True))))
    batch.pop("num_skipped", None)
    batch = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
    return ImageNormalizer.of(obj.data_spec(train=True))(batch, dtype)


def time_steps(step, warmup: int, iters: int, cuda: bool) -> float:
    """Seconds per step: CUDA events around `iters` steps after `warmup` (CPU: wall clock)."""
    import torch

    for _ in range(warmup):
        step()
    if not cuda:
        t = time.perf_counter()
        for _ in range(iters):
            step()
        return (time.perf_counter() - t) / iters
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def run_plain(case: dict, a) -> dict:
    import torch

    from fastenc.config import load_config
    from fastenc.engine.optim import build_optimizer
    from fastenc.objectives import build_objective

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    cfg = load_config(recipe(case["objective"], a.tiny), data_overrides(case["objective"], a))
    torch.manual_seed(0)
    obj = build_objective(cfg).to(device)
    if case["compile"]:
        from fastenc.models.layers.block import compile_blocks

        compile_blocks(obj)
    opt = build_optimizer(obj, cfg.optim, obj.no_weight_decay())  # torch AdamW, fused on CUDA
    # bf16 inputs under autocast, as the trainer hands them over (DINO's teacher keys its autocast on them)
    batch = one_batch(obj, cfg, device, torch.bfloat16 if cuda else torch.float32)
    state = {"step": 0}

    def step():
        obj.on_step_start(state["step"])
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss, _ = obj(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        obj.on_step_end(state["step"])
        state["step"] += 1

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    sec = time_steps(step, a.warmup, a.iters, cuda)
    return {"step_time": sec, "batch": cfg.data.batch_size,
            "flops_per_sample": flops_per_sample(cfg, cfg.data.batch_size),
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "note": f"{'compiled blocks, ' if case['compile'] else ''}autocast bf16, fused AdamW" if cuda else "fp32"}


def run_open_clip(case: dict, a) -> dict:
    import torch

    try:
        import open_clip
        from open_clip.loss import ClipLoss, SigLipLoss
    except ImportError as e:
        raise RuntimeError(f"open_clip_torch is not installed ({e}): pip install open_clip_torch") from e
    from bench_train_step import open_clip_model_config, tower_dims

    from fastenc.config import load_config
    from fastenc.objectives import build_objective

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    cfg = load_config(recipe(case["objective"], a.tiny), data_overrides(case["objective"], a))
    fe = build_objective(cfg)  # for the real batch only (same images and token ids as fastenc's rows)
    batch = one_batch(fe, cfg, device, torch.float32)
    del fe
    name = f"fastenc_{case['objective']}_{'tiny' if a.tiny else 'b16'}"
    model_cfg = open_clip_model_config(tower_dims(cfg), a.vocab)
    if case["objective"] == "siglip":
        model_cfg["init_logit_bias"] = -10.0
    open_clip.factory._MODEL_CONFIGS[name] = model_cfg  # the same towers as fastenc's recipe
    torch.manual_seed(0)
    model = open_clip.create_model(name, pretrained=None, output_dict=True).to(device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=cuda)
    loss_fn = ClipLoss() if case["objective"] == "clip" else SigLipLoss()
    text = batch["text"] % a.vocab

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            out = model(batch["image"], text)
            if case["objective"] == "clip":
                loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
            else:
                loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"], out["logit_bias"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    sec = time_steps(step, a.warmup, a.iters, cuda)
    return {"step_time": sec, "batch": cfg.data.batch_size,
            "flops_per_sample": flops_per_sample(cfg, cfg.data.batch_size),
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "note": f"open_clip {open_clip.__version__} {'ClipLoss' if case['objective'] == 'clip' else 'SigLipLoss'}"}


def run_trainer(case: dict, a) -> dict:
    import torch

    from fastenc.config import load_config
    from fastenc.run.metrics import read_metrics
    from fastenc.engine.trainer import train

    cuda = torch.cuda.is_available()
    steps = a.log_every * a.intervals
    overrides = data_overrides(case["objective"], a) + [
        f"engine.zero_stage={case['zero']}", f"engine.compile={str(case['compile']).lower()}",
        f"engine.precision={'bf16' if cuda else 'fp32'}", f"engine.log_every={a.log_every}",
        "engine.checkpoint_every=0", "engine.tensorboard=false", "engine.detailed_timing=false",
        f"run.output_dir={a.run_root}", f"run.name={case['name']}", f"schedule.steps={max(steps, 1000)}",
        "schedule.warmup_steps=10"]
    cfg = load_config(recipe(case["objective"], a.tiny), overrides)
    res = train(cfg, max_steps=steps, export=False, plot=False, final_checkpoint=False)
    rows = read_metrics(res.metrics_path)[1:]  # the first interval holds warmup (and compile)
    if not rows:
        raise RuntimeError(f"no measured interval in {res.metrics_path}")
    med = lambda key: harness.median([r[key] for r in rows if r.get(key) is not None])  # noqa: E731
    peak = max((r.get("peak_mem_gib") or 0.0) for r in rows) or None
    return {"step_time": med("step_time"), "batch": cfg.data.batch_size,
            "flops_per_sample": flops_per_sample(cfg, cfg.data.batch_size), "peak_mem_gib": peak,
            "data_wait_frac": med("data_wait_frac"), "intervals": len(rows),
            "note": f"ZeRO-{case['zero']} {cfg.engine.precision}, torch loader {cfg.data.num_workers} workers"
                    + (", compiled blocks" if case["compile"] else "")}


def run_case(name: str, a, result_path: str) -> None:
    case = parse_case(name)
    run = {"trainer": run_trainer, "plain": run_plain, "open_clip": run_open_clip}[case["kind"]]
    try:
        out = run(case, a)
    except Exception as e:  # noqa: BLE001 - recorded as the row's error, the parent goes on
        traceback.print_exc()
        out = {"error": f"{type(e).__name__}: {e}"[:400]}
    with open(result_path, "w") as f:
        json.dump(out, f)


# ----------------------------------------------------------------------------------------------------------------
# the driver


def prepare_data(a) -> None:
    """Synthetic JPEG shards at the recipe's image size and a BPE tokenizer on their captions (once)."""
    from fastenc.datatools.synth import write_synthetic_shards
    from fastenc.data.tokenizer import train_tokenizer

    if not os.path.exists(os.path.join(a.data_dir, "manifest.json")):
        print(f"[{BENCH}] writing {a.samples} synthetic {a.image_size} px samples to {a.data_dir}", flush=True)
        write_synthetic_shards(a.data_dir, a.samples, image_size=a.image_size, seed=0,
                               samples_per_shard=a.samples_per_shard, progress=False)
    if not os.path.exists(a.tokenizer):
        train_tokenizer(a.data_dir, a.tokenizer[: -len(".model")], vocab_size=a.vocab)


def row_of(case: dict, out: dict, a, wall_s: float) -> dict:
    row = {"timestamp": harness.utc_now(), "bench": BENCH, "case": case["name"], "impl": case["kind"],
           "objective": case["objective"], "zero_stage": case["zero"] if case["zero"] is not None else "",
           "compile": case["compile"], "recipe": "tiny" if a.tiny else "paper", "wall_s": round(wall_s, 1)}
    if "error" in out:
        return {**row, "status": "error", "error": out["error"]}
    sps = out["batch"] / out["step_time"]
    tflops = sps * out["flops_per_sample"] / 1e12
    row.update(status="ok", batch=out["batch"], step_ms=out["step_time"] * 1e3, samples_per_s=sps,
               model_tflops=tflops, mfu=tflops * 1e12 / PEAK_FLOPS if not a.tiny else "",
               peak_mem_gib=out.get("peak_mem_gib") or "", data_wait_frac=out.get("data_wait_frac", ""),
               gflop_per_sample=out["flops_per_sample"] / 1e9, note=out.get("note", ""))
    return row


def add_ratio(row: dict, rows: list[dict]) -> None:
    """row's samples/s over the plain loop of the same objective (the plain cases run first)."""
    plain = [r for r in [*rows, row] if r["case"] == f"plain-{row['objective']}" and r.get("status") == "ok"]
    if row.get("status") == "ok" and plain:
        row["vs_plain"] = row["samples_per_s"] / plain[-1]["samples_per_s"]


def plot(csv_path: str) -> str | None:
    return harness.plot_from_csv(
        csv_path, csv_path[:-4] + ".png",
        panels=[{"y": "samples_per_s", "ylabel": "samples/s (DINO: images/s)", "title": "throughput",
                 "where": lambda r: r.get("status") == "ok"},
                {"y": "mfu", "ylabel": "MFU (989 TFLOP/s peak)", "title": "model FLOPs utilization",
                 "where": lambda r: r.get("status") == "ok" and r.get("mfu") not in ("", None)},
                {"y": "peak_mem_gib", "ylabel": "GiB", "title": "peak GPU memory",
                 "where": lambda r: r.get("status") == "ok" and r.get("peak_mem_gib") not in ("", None)}],
        where=lambda r: r.get("bench") == BENCH, label=lambda r: r["case"].replace("-", "\n", 1),
        title="fastenc trainer vs plain loop vs open_clip, one GPU")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CPU recipes, tiny sizes (a check that every case runs)")
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated case names")
    p.add_argument("--list", action="store_true", help="print the case names and exit")
    p.add_argument("--out-dir", default=os.path.join(harness.RESULTS_DIR, "gpu"))
    p.add_argument("--data-dir", default=None, help="synthetic shards (default: a temp dir per image size)")
    p.add_argument("--samples", type=int, default=None, help="synthetic samples (default 4096; tiny 256)")
    p.add_argument("--workers", type=int, default=None, help="loader workers of the trainer (default cores - 2)")
    p.add_argument("--batch", type=int, default=None, help="CLIP/SigLIP batch (default 256; tiny 16)")
    p.add_argument("--dino-batch", type=int, default=None, help="DINO images per step (default 64; tiny 8)")
    p.add_argument("--log-every", type=int, default=None, help="trainer steps per metrics interval (default 10)")
    p.add_argument("--intervals", type=int, default=None, help="trainer intervals, the first dropped (default 3)")
    p.add_argument("--warmup", type=int, default=None, help="plain-loop warmup steps (default 3)")
    p.add_argument("--iters", type=int, default=None, help="plain-loop timed steps (default 15)")
    p.add_argument("--timeout", type=int, default=300, help="seconds per case before it is recorded as an error")
    p.add_argument("--run-case", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--run-root", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    tiny = a.tiny
    defaults = dict(samples=256 if tiny else 4096, batch=16 if tiny else 256, dino_batch=8 if tiny else 64,
                    log_every=2 if tiny else 10, intervals=2 if tiny else 3, warmup=1 if tiny else 3,
                    iters=2 if tiny else 15, workers=1 if tiny else max(1, (os.cpu_count() or 4) - 2))
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.image_size = 64 if tiny else 224
    a.samples_per_shard = 64 if tiny else 256
    a.vocab = 256
    a.data_dir = a.data_dir or os.path.join(tempfile.gettempdir(), f"fastenc_{BENCH}_{a.image_size}px")
    a.tokenizer = os.path.join(a.data_dir, f"bpe{a.vocab}.model")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.list:
        print("\n".join(CASES))
        return 0
    if a.run_case:
        run_case(a.run_case, a, a.result)
        return 0
    import torch

    if not a.tiny and not torch.cuda.is_available():
        print(f"[{BENCH}] no CUDA device: run with --tiny for the CPU check", file=sys.stderr)
        return 2
    cases = [parse_case(n) for n in a.cases.split(",") if n]
    prepare_data(a)
    os.makedirs(a.out_dir, exist_ok=True)
    csv_path = os.path.join(a.out_dir, f"{BENCH}.csv")
    env = harness.env_fields(["open_clip_torch", "triton"])
    rows, status = [], 0
    with tempfile.TemporaryDirectory(prefix=f"fastenc_{BENCH}_runs_") as run_root:
        for case in cases:
            result = os.path.join(run_root, f"{case['name']}.json")
            cmd = [sys.executable, os.path.abspath(__file__), "--run-case", case["name"], "--result", result,
                   "--run-root", run_root] + (argv if argv is not None else sys.argv[1:])
            t0 = time.time()
            print(f"[{BENCH}] {case['name']} ...", flush=True)
            out = harness.run_json_subprocess(cmd, result, a.timeout)
            row = row_of(case, out, a, time.time() - t0)
            add_ratio(row, rows)
            rows.append(row)
            harness.append_rows(csv_path, [{**row, **env}])  # row by row: a run cut short keeps what it measured
            print(f"[{BENCH}] {case['name']}: " + (f"{row['samples_per_s']:.1f} samples/s, {row['step_ms']:.1f} ms/step"
                  if row["status"] == "ok" else row["error"]), flush=True)
            status |= row["status"] != "ok"
    harness.print_table(rows, ["case", "samples_per_s", "step_ms", "mfu", "vs_plain", "peak_mem_gib",
                               "data_wait_frac", "status"])
    try:
        print(f"[{BENCH}] rows: {csv_path}; plot: {plot(csv_path)}")
    except ImportError:
        print(f"[{BENCH}] rows: {csv_path}; matplotlib missing, no plot")
    return status


if __name__ == "__main__":
    sys.exit(main())
