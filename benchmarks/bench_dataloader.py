"""Images/s of the data pipelines: DALI vs fastenc's torch path vs open_clip's own webdataset pipeline, same shards.

    python benchmarks/bench_dataloader.py                        # CPU: clip + dino; dali-cpu, torch, open_clip; T 1, 2
    python benchmarks/bench_dataloader.py --transforms clip --threads 2 --window 30   # one comparison
    python benchmarks/bench_dataloader.py --summarize            # redraw the PNG, print the markdown tables
    python benchmarks/bench_dataloader.py --tiny --results-dir /tmp/x      # smoke run (tests/test_bench_dataloader.py)
    python benchmarks/bench_dataloader.py --device gpu --backends dali-gpu,torch --threads 4,8 --batch-size 256
                                                                 # GPU machine (benchmarks/gpu_data.sh)

What is measured. One case = (transform, backend, threads T), each in its own fresh subprocess (thread pools,
worker processes, numba's compiled kernel and the allocator never carry over from one case to the next):
- transform `clip`: ImageTextSpec(224, train=True): RandomResizedCrop scale (0.9, 1.0) bicubic, uint8 CHW out, and the
  caption read and decoded to a string. Tokenization is NOT part of this benchmark for the fastenc backends (the
  trainer tokenizes once per batch with CaptionCollate: in the loader worker on the torch path, in the training
  process after DALI; one sentencepiece call per batch); open_clip's pipeline tokenizes every caption inside its
  workers (`map_dict(text=tokenizer)`), so its rows include that cost, and `tokenize_ms_per_image` (open_clip's
  tokenizer, one caption per call, measured in the case's process) says how much it is.
- transform `dino`: MultiCropSpec(global_size=224, local_size=96, num_global=2, num_local=10): DINO's multi-crop
  (2 global + 10 local crops, color jitter, grayscale, blur, solarize, flip; uint8 out). No captions.
- backends: `dali-cpu` = fastenc.data.dali.DaliLoader(device="cpu", num_threads=T); `torch` =
  fastenc.data.loader.build_loader(sample_fn=torch_sample_fn(spec), num_workers=T) (PIL + torchvision in T worker
  processes); `open_clip` (clip only) = open_clip_train.data.get_wds_dataset with open_clip's train preprocess
  (`open_clip.image_transform(224, is_train=True)`) and tokenizer, `--workers T`, `--dataset-resampled`;
  `dali-gpu` (--device gpu) = DaliLoader(device="gpu"): nvJPEG "mixed" decoding and GPU augmentation, batches
  arrive as CUDA tensors. With --device gpu the torch and open_clip batches are copied to the GPU too
  (non_blocking; build_loader pins memory when CUDA is present), and CUDA is synchronized before every clock read.
- shards: 4000 synthetic 448 px JPEGs (fastenc.datatools.synth, quality 90, ~18 KB each) with their captions, 500 per
  shard, generated once under --data-dir (one folder per shard, seeded by its number, written in parallel; ~1 min
  on 2 cores) and DALI-indexed. All backends read the same files, shards drawn with replacement (resampled), a
  shuffle buffer of --shuffle-buffer samples for the fastenc backends (open_clip keeps its own: 5000, 1000
  initially). DaliLoader builds a new pipeline for every epoch (one pass over the samples); rows record how many
  epochs began in the window (`dali_epochs_started`) and the wait for a new epoch's first batch
  (`dali_epoch_switch_s_median`, against `batch_gap_s_median`), so too small a sample set shows.

Timing. After warm-up (at least --warmup batches, rounded up to a multiple of T, and at least --warmup-s seconds:
worker start, shuffle-buffer fill, DALI pipeline build and, for dali-cpu dino, numba's compile of the fused crop
kernel, ~seconds once per process; `first_batch_s` records that start-up), batches are taken as fast as they come for
--window seconds (stopping at a multiple of T batches, since T torch workers deliver their batches in turn).
images_per_s = images / time from the end of warm-up to the last batch. The per-batch arrival gaps and the
throughput of each group of T consecutive batches give the robust stats (median, p10, p90). CPU: the CPU seconds of
the case's whole process tree (the benchmark process, DALI's threads, DataLoader worker processes) over the window,
read from /proc through harness.CpuMonitor (resource.getrusage's RUSAGE_CHILDREN counts only reaped children, not
live DataLoader workers) -> `cpu_ms_per_image` and `own_cpu_cores`; `foreign_cpu_cores` is what other processes
used meanwhile (0 = a clean measurement); `peak_rss_mb` is the case's main process alone (DataLoader workers not
counted). Before each case the parent waits for an idle machine (--wait-idle) and redoes a case that other
processes disturbed (--retries).

Output: one row per case appended to <results-dir>/bench_dataloader.csv (harness environment fields: CPU, cores,
GPU name, versions, git revision; plus `device`), <results-dir>/bench_dataloader.png redrawn from the CSV (latest
row per case: grouped bars, images/s per backend, one panel per device and transform, one bar per thread count),
and markdown tables with the DALI / torch and DALI / open_clip ratios against the project's targets (DALI-cpu
>= 1.2 x the torch path for CLIP, >= 1.5 x for DINO multi-crop, at the same thread budget; reported, not asserted).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import harness  # noqa: E402

BENCH = "bench_dataloader"
TARGETS = {"clip": 1.2, "dino": 1.5}  # DALI / torch images/s at the same thread budget (the project's issue)
BACKENDS = ("dali-cpu", "dali-gpu", "torch", "open_clip")
BUSY_CORES = 0.25  # other processes' CPU use above which a measurement is redone (see --retries)
EXTRA_PACKAGES = ("nvidia-dali-cuda130", "numba", "webdataset", "open_clip_torch", "torchvision", "pillow")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--summarize", action="store_true",
                   help="only redraw the PNG and print the markdown tables from the CSV in --results-dir")
    p.add_argument("--tiny", action="store_true",
                   help="smoke run: 64 samples of 96 px, output 64 px (dino: 32 px local crops, 2 of them), batch 8, "
                        "2 s windows, no idle wait; use with --results-dir")
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu",
                   help="gpu: DALI decodes and augments on the GPU (backend dali-gpu) and every batch ends on it")
    p.add_argument("--transforms", default="clip,dino", help="comma-separated: clip, dino")
    p.add_argument("--backends", default="",
                   help="comma-separated of " + ", ".join(BACKENDS) + " (default: dali-cpu,torch,open_clip on cpu, "
                        "dali-gpu,torch on gpu); open_clip runs the clip transform only")
    p.add_argument("--threads", default="1,2", help="comma-separated thread / worker counts T")
    p.add_argument("--batch-size", type=int, default=None, help="images per batch (default 64; --tiny: 8)")
    p.add_argument("--window", type=float, default=None, help="seconds of measured batches per case (default 20; "
                                                               "--tiny: 2)")
    p.add_argument("--warmup", type=int, default=None, help="batches dropped first, rounded up to a multiple of T "
                                                            "(default 5; --tiny: 2)")
    p.add_argument("--warmup-s", type=float, default=None, help="and at least this many seconds (default 3; "
                                                                "--tiny: 0)")
    p.add_argument("--samples", type=int, default=None,
                   help="synthetic samples (default 4000; --tiny: 64). Each DALI epoch (one pass over them) builds a "
                        "new pipeline: too few samples and that rebuild weighs on DALI's rate")
    p.add_argument("--image-size", type=int, default=None, help="synthetic JPEG side in px (default 448; --tiny: 96)")
    p.add_argument("--samples-per-shard", type=int, default=None, help="default 500 (--tiny: 16)")
    p.add_argument("--shuffle-buffer", type=int, default=None,
                   help="shuffle buffer of the fastenc backends (default 1000; --tiny: 16)")
    p.add_argument("--data-dir", default=os.path.join(tempfile.gettempdir(), "fastenc-bench-data"),
                   help="cache of generated shards (a subfolder per image size / sample count)")
    p.add_argument("--gen-workers", type=int, default=harness.usable_cores(), help="processes generating shards")
    p.add_argument("--results-dir", default=harness.RESULTS_DIR, help="where the CSV and PNG go")
    p.add_argument("--wait-idle", type=float, default=None,
                   help="before each case wait up to this many seconds for other processes to use < 0.3 cores "
                        "(default 120 on cpu; 0 with --tiny or on gpu)")
    p.add_argument("--retries", type=int, default=None,
                   help="redo a case when other processes used > 0.25 cores during it (default 1; --tiny: 0)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per case before it is recorded as failed")
    p.add_argument("--note", default="", help="free text for the rows' note column")
    args = p.parse_args(argv)
    tiny = args.tiny
    defaults = {"batch_size": (64, 8), "window": (20.0, 2.0), "warmup": (5, 2), "warmup_s": (3.0, 0.0),
                "samples": (4000, 64), "image_size": (448, 96), "samples_per_shard": (500, 16),
                "shuffle_buffer": (1000, 16), "retries": (1, 0)}
    for key, (full, small) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, small if tiny else full)
    if args.wait_idle is None:
        args.wait_idle = 0.0 if tiny or args.device == "gpu" else 120.0
    if not args.backends:
        args.backends = "dali-cpu,torch,open_clip" if args.device == "cpu" else "dali-gpu,torch"
    return args


# ----------------------------------------------------------------------------------------------------------------
# shards


def data_params(args) -> dict:
    return {"samples": args.samples, "image_size": args.image_size, "samples_per_shard": args.samples_per_shard}


def shard_dir(args) -> str:
    return os.path.join(args.data_dir, f"synth{args.image_size}-n{args.samples}-s{args.samples_per_shard}")


def _write_part(job):
    out_dir, n, image_size, seed = job
    from fastenc.datatools.synth import write_synthetic_shards

    write_synthetic_shards(out_dir, n, image_size=image_size, seed=seed, samples_per_shard=n, progress=False)
    return out_dir


def prepare_shards(args) -> list[str]:
    """Synthetic shards (one per part folder, seed = part number, generated in parallel) with DALI indexes, once.

    A `ready.json` written last marks a complete set; its shard list is what every case reads."""
    root = os.path.abspath(shard_dir(args))  # the cases run from the repository root
    marker = os.path.join(root, "ready.json")
    params = data_params(args)
    if os.path.exists(marker):
        with open(marker) as f:
            ready = json.load(f)
        if ready.get("params") == params and all(os.path.exists(s) for s in ready["shards"]):
            return ready["shards"]
    n_shards = math.ceil(args.samples / args.samples_per_shard)
    per = args.samples_per_shard
    jobs = [(os.path.join(root, f"part-{k:04d}"), min(per, args.samples - k * per), args.image_size, k)
            for k in range(n_shards)]
    t0 = time.perf_counter()
    print(f"generating {args.samples} synthetic samples of {args.image_size} px in {n_shards} shards under {root}",
          flush=True)
    # Small sets are written in this process (a spawned pool costs seconds of imports).
    workers = max(1, min(args.gen_workers, n_shards)) if args.samples * args.image_size ** 2 >= 100 * 448 ** 2 else 1
    if workers > 1:
        import multiprocessing as mp

        pool = mp.get_context("spawn").Pool(workers)
        try:
            pool.map(_write_part, jobs)
            pool.close()  # let the workers exit on their own (terminate() leaves semaphores to the resource tracker)
        except BaseException:
            pool.terminate()
            raise
        finally:
            pool.join()
    else:
        for job in jobs:
            _write_part(job)
    from fastenc.data.index import ensure_indexes
    from fastenc.data.shards import expand_shards

    shards = [os.path.join(d, "shard-00000.tar") for d, *_ in jobs]
    reports, failed = ensure_indexes(expand_shards(shards), workers=workers, progress=False)
    if failed:
        raise RuntimeError(f"could not index the synthetic shards: {failed[:3]}")
    with open(marker, "w") as f:
        json.dump({"params": params, "shards": shards}, f, indent=1)
    print(f"shards ready in {time.perf_counter() - t0:.0f} s", flush=True)
    return shards


# ----------------------------------------------------------------------------------------------------------------
# one case (runs in its own subprocess: `bench_dataloader.py --worker CASE_JSON`)


def make_spec(case: dict):
    from fastenc.data.spec import ImageTextSpec, MultiCropSpec

    if case["transform"] == "clip":
        return ImageTextSpec(case["out_size"], train=True)
    return MultiCropSpec(global_size=case["out_size"], local_size=case["local_size"], num_global=case["num_global"],
                         num_local=case["num_local"])


class Skip(Exception):
    """The case cannot run here (a missing optional package); recorded as a row with status 'skipped: ...'."""


def _open_clip_loader(case: dict, extra: dict):
    """open_clip_train's own training webdataset pipeline and open_clip's train preprocess and tokenizer."""
    try:
        import open_clip

        from open_clip_peer import _import_open_clip_train_main

        _import_open_clip_train_main()  # stands in for pandas (imported by open_clip_train.data, unused here)
        import open_clip_train.data as oc_data
    except Exception as e:  # noqa: BLE001 - any import failure means the peer cannot run here
        raise Skip(f"open_clip_train not importable: {type(e).__name__}: {str(e).splitlines()[0][:150]}") from e
    import functools
    import inspect

    # open_clip_train 3.3.0 vs webdataset 1.0.2's end-of-shard marker (KeyError 'fname'), as in open_clip_peer.py
    if "eof_value" in inspect.signature(oc_data.tar_file_expander).parameters:
        oc_data.tar_file_expander = functools.partial(oc_data.tar_file_expander, eof_value=None)
    preprocess = open_clip.image_transform(case["out_size"], is_train=True)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    captions = ["a photo of a red star on a striped background", 'the word "kite" on a blue hexagon'] * 128
    t0 = time.perf_counter()
    for c in captions:
        tokenizer(c)
    extra["tokenize_ms_per_image"] = (time.perf_counter() - t0) / len(captions) * 1e3
    ns = argparse.Namespace(
        train_data="::".join(case["shards"]), val_data=None, dataset_resampled=True,
        train_num_samples=10**9,  # one "epoch" outlasts any window (the loader stops at its end)
        train_data_upsampling_factors=None, seed=0, batch_size=case["batch_size"], world_size=1,
        workers=case["threads"], distributed=False, rank=0)
    data = oc_data.get_wds_dataset(ns, preprocess, is_train=True, epoch=0, tokenizer=tokenizer)
    return iter(data.dataloader), None


def open_backend(case: dict, spec, extra: dict):
    """(iterator of batches, the DaliLoader or None) for the case's backend."""
    backend, T, B = case["backend"], case["threads"], case["batch_size"]
    if backend in ("dali-cpu", "dali-gpu"):
        from fastenc.utils.optional import is_available

        for module in ("nvidia.dali",) + (("numba",) if case["transform"] == "dino" and backend == "dali-cpu" else ()):
            if not is_available(module):
                raise Skip(f"{module} not importable")
        from fastenc.data.dali import DaliLoader

        loader = DaliLoader(case["shards"], spec, batch_size=B, num_threads=T, device=backend.split("-")[1],
                            shuffle_buffer=case["shuffle_buffer"], seed=0)
        return loader, loader
    if backend == "torch":
        from fastenc.data.loader import build_loader
        from fastenc.data.transforms import torch_sample_fn

        return iter(build_loader(case["shards"], sample_fn=torch_sample_fn(spec), batch_size=B, num_workers=T,
                                 shuffle_buffer=case["shuffle_buffer"])), None
    if backend == "open_clip":
        return _open_clip_loader(case, extra)
    raise ValueError(f"unknown backend {backend!r}")


def batch_images(case: dict, batch, check: bool) -> int:
    """Images in a batch; with check, that the batch holds what the transform promises (shapes, captions)."""
    if case["backend"] == "open_clip":
        images, texts = batch
        tensors = [images, texts]
    else:
        key = "image" if case["transform"] == "clip" else "global"
        images = batch[key]
        tensors = [batch[k] for k in ("image", "global", "local") if k in batch]
    n = int(images.shape[0])
    if check:
        S = case["out_size"]
        if tuple(images.shape[-3:]) != (3, S, S):
            raise RuntimeError(f"{case['backend']}: images of shape {tuple(images.shape)}, expected [..., 3, {S}, {S}]")
        if case["transform"] == "dino":
            g, loc = batch["global"], batch.get("local")
            want = (n, case["num_local"], 3, case["local_size"], case["local_size"])
            if g.shape[1] != case["num_global"] or (case["num_local"] and tuple(loc.shape) != want):
                raise RuntimeError(f"{case['backend']}: multi-crop shapes {tuple(g.shape)}, "
                                   f"{None if loc is None else tuple(loc.shape)}")
        elif case["backend"] == "open_clip":
            if texts.shape[0] != n:
                raise RuntimeError(f"open_clip: {texts.shape[0]} token rows for {n} images")
        elif len(batch["caption"]) != n or not all(isinstance(c, str) and c for c in batch["caption"]):
            raise RuntimeError(f"{case['backend']}: captions missing or not strings: {batch['caption'][:3]!r}")
    if case["device"] == "gpu":
        import torch

        if case["backend"] not in ("dali-gpu",):
            tensors = [t.to("cuda", non_blocking=True) for t in tensors]
        elif not images.is_cuda:
            raise RuntimeError("dali-gpu delivered a CPU tensor")
        torch.cuda.synchronize()
    return n


def measure(case: dict) -> dict:
    import torch

    torch.set_num_threads(case["threads"])
    if case["device"] == "gpu" and not torch.cuda.is_available():
        raise RuntimeError("--device gpu but torch sees no CUDA device")
    spec = make_spec(case)
    extra: dict = {}
    T = case["threads"]
    t_start = time.perf_counter()
    it, dali = open_backend(case, spec, extra)
    n_warm = max(1, math.ceil(case["warmup"] / T)) * T
    first_batch_s = None
    done = 0
    while done < n_warm or time.perf_counter() - t_start < case["warmup_s"] or done % T:
        batch = next(it)
        batch_images(case, batch, check=done == 0)
        del batch
        done += 1
        if first_batch_s is None:
            first_batch_s = time.perf_counter() - t_start
    warmup_s = time.perf_counter() - t_start
    epoch0 = epoch = dali.epoch if dali is not None else None
    gaps, counts, images, switch_gaps = [], [], 0, []
    harness.reset_peak_rss()
    with harness.CpuMonitor() as mon:
        t0 = last = time.perf_counter()
        while True:
            batch = next(it)
            n = batch_images(case, batch, check=False)
            del batch
            now = time.perf_counter()
            gaps.append(now - last)
            counts.append(n)
            last = now
            images += n
            if dali is not None and dali.epoch != epoch:  # this batch came from a freshly built pipeline
                switch_gaps.append(gaps[-1])
                epoch = dali.epoch
            if now - t0 >= case["window"] and len(gaps) % T == 0:
                break
    elapsed = last - t0
    groups = [sum(counts[i:i + T]) / sum(gaps[i:i + T]) for i in range(0, len(gaps), T)]
    per_group, gap = harness.spread(groups), harness.spread(gaps)
    cpu_s = mon.own_cores * mon.wall_s
    out = {
        "status": "ok", "images_per_s": images / elapsed,
        "images_per_s_median": per_group["median"], "images_per_s_p10": per_group["p10"],
        "images_per_s_p90": per_group["p90"], "batch_gap_s_median": gap["median"], "batch_gap_s_p10": gap["p10"],
        "batch_gap_s_p90": gap["p90"], "batches": len(gaps), "images": images, "elapsed_s": elapsed,
        "warmup_batches": done, "warmup_s": warmup_s, "first_batch_s": first_batch_s,
        "cpu_ms_per_image": cpu_s / images * 1e3, "own_cpu_cores": mon.own_cores,
        "foreign_cpu_cores": mon.foreign_cores, "load1_start": mon.load_start, "load1_end": mon.load_end,
        "peak_rss_mb": harness.peak_rss_mb(), **extra,
    }
    if dali is not None:
        # Each new epoch builds a new DALI pipeline (the old one's prefetched batches are dropped): how often that
        # happened in the window, and the wait for the first batch of a new epoch (vs batch_gap_s_median).
        out["dali_epochs_started"] = dali.epoch - epoch0
        out["dali_epoch_switch_s_median"] = harness.median(switch_gaps) if switch_gaps else float("nan")
        out["dali_batches_per_epoch"] = getattr(dali, "_batches_per_epoch", float("nan"))
    return out


def worker_main(case_json: str) -> None:
    case = json.loads(case_json)
    try:
        out = measure(case)
    except Skip as e:
        out = {"status": f"skipped: {e}"}
    except Exception as e:  # noqa: BLE001 - recorded in the CSV row instead
        import traceback

        traceback.print_exc()
        out = {"status": f"error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
    print("RESULT " + json.dumps(out), flush=True)
    sys.stdout.flush()
    os._exit(0)  # DataLoader workers / DALI threads: do not wait for interpreter teardown


# ----------------------------------------------------------------------------------------------------------------
# the parent: cases in subprocesses, rows, plot, summary


def run_case(case: dict, timeout_s: float) -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(case["threads"])
    env["PYTHONPATH"] = os.pathsep.join([harness.REPO_ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(case)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env, cwd=harness.REPO_ROOT,
                              start_new_session=True)
        stdout, stderr, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        stdout, stderr, rc = out, "", None
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            res = json.loads(line[len("RESULT "):])
            if res["status"].startswith("error"):
                print(stderr[-3000:], file=sys.stderr)
            return res
    tail = " | ".join((stderr or stdout).strip().splitlines()[-3:])
    why = f"timeout after {timeout_s:.0f} s" if rc is None else f"exit {rc}: {tail[-300:]}"
    print(stderr[-3000:], file=sys.stderr)
    return {"status": f"error: {why}"}


def build_cases(args, shards: list[str]) -> list[dict]:
    transforms = [t for t in args.transforms.split(",") if t]
    backends = [b for b in args.backends.split(",") if b]
    for t in transforms:
        if t not in ("clip", "dino"):
            raise SystemExit(f"unknown transform {t!r} (clip, dino)")
    for b in backends:
        if b not in BACKENDS:
            raise SystemExit(f"unknown backend {b!r} ({', '.join(BACKENDS)})")
        if b == "dali-gpu" and args.device != "gpu" or b == "dali-cpu" and args.device == "gpu":
            raise SystemExit(f"backend {b} does not go with --device {args.device}")
    sizes = {"out_size": 64, "local_size": 32, "num_global": 2, "num_local": 2} if args.tiny else \
        {"out_size": 224, "local_size": 96, "num_global": 2, "num_local": 10}
    cases = []
    # Backends alternate inside each (transform, threads): a slow drift of a shared machine hits them alike.
    for transform in transforms:
        for threads in (int(t) for t in args.threads.split(",") if t):
            for backend in backends:
                if backend == "open_clip" and transform != "clip":
                    continue
                cases.append({"transform": transform, "backend": backend, "threads": threads, "device": args.device,
                              "batch_size": args.batch_size, "window": args.window, "warmup": args.warmup,
                              "warmup_s": args.warmup_s, "shuffle_buffer": args.shuffle_buffer, "shards": shards,
                              **sizes})
    return cases


def row_for(case: dict, res: dict, args, env: dict, busy_before: float) -> dict:
    row = {"timestamp": harness.utc_now(), "bench": BENCH, "device": case["device"], "transform": case["transform"],
           "backend": case["backend"], "threads": case["threads"], "batch_size": case["batch_size"],
           "status": res.get("status", "error"), "images_per_s": res.get("images_per_s", float("nan"))}
    row.update({k: v for k, v in res.items() if k not in row})
    row.update({"busy_cores_before": busy_before, "window_s": case["window"], "samples": args.samples,
                "image_size": args.image_size, "samples_per_shard": args.samples_per_shard,
                "shards": len(case["shards"]), "out_size": case["out_size"],
                "local_size": case["local_size"] if case["transform"] == "dino" else "",
                "crops": f"{case['num_global']}+{case['num_local']}" if case["transform"] == "dino" else "",
                "shuffle_buffer": case["shuffle_buffer"] if case["backend"] != "open_clip" else "5000 (open_clip's)",
                "tiny": int(args.tiny), "note": note_for(case, args), **env})
    return row


def note_for(case: dict, args) -> str:
    parts = []
    if case["transform"] == "clip":
        parts.append("open_clip tokenizes each caption in its workers (see tokenize_ms_per_image)"
                     if case["backend"] == "open_clip" else "captions decoded to str, not tokenized")
    if case["device"] == "gpu" and case["backend"] != "dali-gpu":
        parts.append("batches copied to the GPU")
    if args.note:
        parts.append(args.note)
    return "; ".join(parts)


def _is_dali(backend: str) -> bool:
    return backend.startswith("dali")


def latest_ok(csv_path: str) -> list[dict]:
    rows = [r for r in harness.read_rows(csv_path) if r.get("bench", BENCH) == BENCH]
    rows = harness.latest_by(rows, lambda r: (r.get("device") or "cpu", r["transform"], r["backend"], r["threads"]))
    return [r for r in rows if r.get("status") == "ok"]


def plot(csv_path: str, png_path: str) -> str | None:
    """Grouped bars from the latest ok row per case: one panel per (device, transform), one group per backend, one
    bar per thread count."""
    try:
        import matplotlib
    except ImportError:
        print("bench_dataloader: matplotlib not installed: no PNG (redraw it with --summarize where it is)",
              file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = latest_ok(csv_path)
    if not rows:
        return None
    panels = sorted({(r.get("device") or "cpu", r["transform"]) for r in rows},
                    key=lambda p: (p[0] != "cpu", p[0], p[1]))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.8 * len(panels), 4.4), squeeze=False)
    for ax, (device, transform) in zip(axes[0], panels):
        prow = [r for r in rows if (r.get("device") or "cpu") == device and r["transform"] == transform]
        backends = [b for b in BACKENDS if any(r["backend"] == b for r in prow)]
        threads = sorted({int(r["threads"]) for r in prow})
        width = 0.8 / len(threads)
        for j, t in enumerate(threads):
            xs, ys, lo, hi = [], [], [], []
            for i, b in enumerate(backends):
                r = next((r for r in prow if r["backend"] == b and int(r["threads"]) == t), None)
                if r is None:
                    continue
                y = float(r["images_per_s"])
                xs.append(i - 0.4 + width * (j + 0.5))
                ys.append(y)
                p10, p90 = harness._float(r.get("images_per_s_p10")), harness._float(r.get("images_per_s_p90"))
                lo.append(max(0.0, y - p10) if not math.isnan(p10) else 0.0)
                hi.append(max(0.0, p90 - y) if not math.isnan(p90) else 0.0)
            bars = ax.bar(xs, ys, width=width * 0.95, yerr=[lo, hi], capsize=3, color=f"C{j}",
                          label=f"T = {t} {'workers / threads'}")
            ax.bar_label(bars, labels=[f"{y:.0f}" for y in ys], padding=2, fontsize=7)
        ax.set_xticks(range(len(backends)), backends, fontsize=9)
        ref = prow[0]
        crops = f", {ref['crops']} crops ({ref['out_size']}/{ref['local_size']} px)" if transform == "dino" else \
            f", {ref['out_size']} px"
        ax.set_title(f"{transform} on {device}{crops}, batch {ref['batch_size']}", fontsize=9)
        ax.set_ylabel("images / s (window; bars: p10-p90 per T batches)", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    ref = rows[-1]
    gpu = f", {ref['gpu']}" if any((r.get("device") or "cpu") == "gpu" for r in rows) and ref.get("gpu") else ""
    fig.suptitle(f"data pipelines, {ref['image_size']} px synthetic JPEGs; {ref['cpu']}, {ref['cores']} cores{gpu}; "
                 f"git {ref['git_rev']}", fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return png_path


def markdown(csv_path: str) -> str:
    """The latest ok rows, and DALI / torch and DALI / open_clip per (device, transform, threads)."""
    rows = latest_ok(csv_path)
    if not rows:
        return f"(no ok rows in {csv_path})"

    def f(r, k, fmt="{:.1f}"):
        v = harness._float(r.get(k))
        return "-" if math.isnan(v) else fmt.format(v)

    order = {b: i for i, b in enumerate(BACKENDS)}
    rows = sorted(rows, key=lambda r: ((r.get("device") or "cpu") != "cpu", r["transform"], int(r["threads"]),
                                       order.get(r["backend"], 9)))
    lines = ["| device | transform | backend | T | batch | images/s | p10-p90 | CPU ms / image | first batch s "
             "| other procs (cores) | date (UTC) | git |", "|" + " --- |" * 12]
    for r in rows:
        lines.append(f"| {r.get('device') or 'cpu'} | {r['transform']} | {r['backend']} | {r['threads']} "
                     f"| {r['batch_size']} | {f(r, 'images_per_s')} | {f(r, 'images_per_s_p10')}-"
                     f"{f(r, 'images_per_s_p90')} | {f(r, 'cpu_ms_per_image', '{:.2f}')} "
                     f"| {f(r, 'first_batch_s')} | {f(r, 'foreign_cpu_cores', '{:.2f}')} "
                     f"| {r['timestamp'][:16].replace('T', ' ')} | {r['git_rev']} |")
    lines += ["", "| device | transform | T | DALI / torch | target | DALI / open_clip | DALI CPU ms/img / torch's |",
              "|" + " --- |" * 7]
    keys = sorted({((r.get("device") or "cpu"), r["transform"], int(r["threads"])) for r in rows},
                  key=lambda k: (k[0] != "cpu", k))
    for device, transform, t in keys:
        at = {r["backend"]: r for r in rows
              if (r.get("device") or "cpu") == device and r["transform"] == transform and int(r["threads"]) == t}
        dali = next((r for b, r in at.items() if _is_dali(b)), None)

        def ratio(peer, col="images_per_s"):
            if dali is None or peer not in at:
                return float("nan")
            return harness._float(dali[col]) / harness._float(at[peer][col])

        vs_torch, vs_oc, cpu = ratio("torch"), ratio("open_clip"), ratio("torch", "cpu_ms_per_image")
        if math.isnan(vs_torch) and math.isnan(vs_oc):
            continue
        target = TARGETS[transform]
        verdict = "-" if math.isnan(vs_torch) else (f">= {target} met" if vs_torch >= target else f"BELOW {target}")
        lines.append(f"| {device} | {transform} | {t} | {'-' if math.isnan(vs_torch) else f'{vs_torch:.2f}'} "
                     f"| {verdict} | {'-' if math.isnan(vs_oc) else f'{vs_oc:.2f}'} "
                     f"| {'-' if math.isnan(cpu) else f'{cpu:.2f}'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker_main(args.worker)
        return 0
    csv_path = os.path.join(args.results_dir, f"{BENCH}.csv")
    png_path = os.path.join(args.results_dir, f"{BENCH}.png")
    if args.summarize:
        png = plot(csv_path, png_path)
        print(markdown(csv_path))
        print(f"\nplot: {png}")
        return 0
    if args.device == "gpu":
        import torch

        if not torch.cuda.is_available():
            print("bench_dataloader: --device gpu but torch sees no CUDA device (torch "
                  f"{torch.__version__}, CUDA build {torch.version.cuda}); run without --device gpu for the CPU "
                  "benchmark", file=sys.stderr)
            return 2
    shards = prepare_shards(args)  # before any clock; cached
    cases = build_cases(args, shards)
    env = harness.env_fields(extra_packages=EXTRA_PACKAGES)
    print(f"{len(cases)} cases, {len(shards)} shards of {args.samples_per_shard} x {args.image_size} px, "
          f"batch {args.batch_size}, {args.window:.0f} s windows; rows -> {csv_path}", flush=True)
    rows = []
    for case in cases:
        what = f"{case['transform']:>4} {case['backend']:>9} T={case['threads']}"
        for attempt in range(args.retries + 1):
            busy = harness.wait_for_idle(args.wait_idle) if args.wait_idle > 0 else float("nan")
            res = run_case(case, args.timeout)
            foreign = harness._float(res.get("foreign_cpu_cores"))
            if not (res.get("status") == "ok" and foreign > BUSY_CORES and attempt < args.retries):
                break
            print(f"   {what}: other processes used {foreign:.2f} cores; measuring again", flush=True)
        row = row_for(case, res, args, env, busy)
        harness.append_rows(csv_path, [row])  # row by row: an interrupted sweep keeps what it measured
        rows.append(row)
        if row["status"] == "ok":
            print(f"{what}: {row['images_per_s']:8.1f} images/s ({row['images']} in {row['elapsed_s']:.1f} s; "
                  f"{row['cpu_ms_per_image']:.2f} CPU ms/image, first batch {row['first_batch_s']:.1f} s)", flush=True)
        else:
            print(f"{what}: {row['status']}", flush=True)
    png = plot(csv_path, png_path)
    print()
    print(markdown(csv_path))
    print(f"\nrows appended to {csv_path}; plot {png}; git {env['git_rev']}")
    return 0 if all(r["status"] == "ok" or r["status"].startswith("skipped") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
