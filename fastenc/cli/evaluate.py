"""`fastenc eval [suite] RUN_DIR... --suite SUITE --out DIR`, `fastenc eval knn ...`, `fastenc eval vqa ...` and
`fastenc plot ...`."""

from __future__ import annotations

import argparse
import logging
import os
import sys


def add_eval_suite_args(p: argparse.ArgumentParser) -> None:
    """The eval suite's arguments (also launch/evaluate.py's)."""
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run dirs (or encoder .safetensors files) to evaluate")
    p.add_argument("--suite", required=True,
                   help="suite YAML, or a name under configs/cpu or configs/paper (eval_synth, eval_imagenet)")
    p.add_argument("--out", required=True, help="output dir: report.md, results.json, PNGs")
    p.add_argument("--cache-dir", default=None, help="feature cache (default: OUT/feature_cache)")
    p.add_argument("--device", default=None,  # resolved when the suite runs: asking torch takes seconds
                   help="where the encoders run (default: cuda when available, else cpu)")
    p.add_argument("--workers", type=int, default=0, help="decoding processes for feature extraction (default 0: "
                   "in this process, right for the toy suite; ImageNet wants about one per core)")
    p.add_argument("--batch-size", type=int, default=256, help="images per encoder call during extraction")
    p.add_argument("--model", default=None, help="ViT preset of bare .safetensors sources that fastenc did not export "
                   "(timm checkpoints, e.g. vit_base_patch16_224; a classifier head is dropped)")


def run_eval_suite(args: argparse.Namespace) -> int:
    """Every protocol of an eval suite on every run: report.md, results.json, PNGs; exit 2 on bad input."""
    from fastenc.eval.features import EvalDataError
    from fastenc.eval.suite import resolve_suite, run_suite, summary_lines
    from fastenc.utils.optional import cuda_available

    device = args.device or ("cuda" if cuda_available() else "cpu")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        results = run_suite(args.runs, resolve_suite(args.suite), args.out, cache_dir=args.cache_dir,
                            device=device, command=getattr(args, "command", None), num_workers=args.workers,
                            batch_size=args.batch_size, model=args.model)
    except EvalDataError as e:
        print(f"fastenc eval: {e}", file=sys.stderr)
        return 2
    for line in summary_lines(results):
        print(line)
    print(f"fastenc eval: {len(results['runs'])} run(s), {len(results['protocols'])} protocol(s) -> "
          f"{os.path.join(args.out, 'report.md')}")
    return 0


def add_eval_vqa_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="finished vision-language (llava) run dirs, each "
                   "optionally NAME=RUN_DIR")
    p.add_argument("--benchmark", required=True, metavar="FILE", help="multiple-choice items in VMCBench's format: "
                   ".parquet (the Hugging Face release), .tsv (VLMEvalKit's), .jsonl or .json (fastenc's)")
    p.add_argument("--images", default=None, metavar="DIR",
                   help="folder the items' image paths are relative to (default: the benchmark file's folder)")
    p.add_argument("--out", required=True, help="output dir: report.md, results.json, predictions-<run>.jsonl")
    p.add_argument("--mode", default="likelihood",
                   help="likelihood: the option letter the run finds most likely as its answer (default, the paper's); "
                   "cloze: the option text it finds most likely (per character) after the bare question; generate: "
                   "its greedy answer, parsed to a letter; a comma list of them, both (likelihood,generate) or all")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="score only the first N items")
    p.add_argument("--by", action="append", default=[], metavar="COLUMN",
                   help="also tabulate accuracy per value of this extra column (e.g. type); repeatable")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the 95%% intervals (0: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    p.add_argument("--max-new-tokens", type=int, default=32, help="generate mode: the answer's token budget")
    p.add_argument("--device", default=None, help="where the runs run (default: cuda when available, else cpu)")


def run_eval_vqa(args: argparse.Namespace) -> int:
    """Multiple-choice VQA accuracy of vision-language runs (fastenc.eval.vqa): report.md, results.json,
    predictions; exit 2 on bad input (a benchmark it cannot read, a run that is not a vision-language run)."""
    from fastenc.eval.features import EvalDataError
    from fastenc.eval.vqa import run_vqa
    from fastenc.utils.optional import cuda_available

    device = args.device or ("cuda" if cuda_available() else "cpu")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        results = run_vqa(args.runs, args.benchmark, args.out, images=args.images, mode=args.mode, limit=args.limit,
                          by=args.by, bootstrap=args.bootstrap, seed=args.seed, max_new_tokens=args.max_new_tokens,
                          device=device, command=getattr(args, "command", None))
    except EvalDataError as e:
        print(f"fastenc eval vqa: {e}", file=sys.stderr)
        return 2
    for run, by_mode in results["results"].items():
        for mode, summary in by_mode.items():
            overall = summary["overall"]
            print(f"{run} ({mode}): {100 * overall['accuracy']:.1f}% of {overall['n']} (chance "
                  f"{100 * overall['chance']:.1f}%)")
    print(f"fastenc eval vqa: {len(results['runs'])} run(s), {results['num_items']} item(s) -> "
          f"{os.path.join(args.out, 'report.md')}")
    return 0


def add_knn_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--encoder", required=True, help="an exported encoder (.safetensors file), or a run dir")
    p.add_argument("--model", default=None, help="ViT preset (default: from the export's metadata)")
    p.add_argument("--train-shards", required=True)
    p.add_argument("--val-shards", required=True)
    p.add_argument("--label", default="category_id", help="integer field of the samples' .json")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument("--max-train", type=int, default=None)
    p.add_argument("--max-val", type=int, default=None)


def run_knn(args: argparse.Namespace) -> int:
    """Weighted k-NN top-1 accuracy of an exported encoder's features (fastenc.eval.knn), beside the majority-class
    baseline; exit 1 when a split has no labelled sample."""
    import torch

    from fastenc.eval.knn import extract_features, knn_accuracy
    from fastenc.run.weights import load_exported_encoder

    encoder = load_exported_encoder(args.encoder, args.model)
    tr_f, tr_y = extract_features(encoder, args.train_shards, args.label, max_samples=args.max_train,
                                  progress="features (train)")
    va_f, va_y = extract_features(encoder, args.val_shards, args.label, max_samples=args.max_val,
                                  progress="features (val)")
    # -1 = attribute absent (e.g. no word in the image): those samples have no class to predict or vote for
    (tr_f, tr_y), (va_f, va_y) = ((f[y >= 0], y[y >= 0]) for f, y in ((tr_f, tr_y), (va_f, va_y)))
    if not len(tr_y) or not len(va_y):
        print(f"fastenc eval knn: no samples with a {args.label!r} label (>= 0) in the "
              f"{'train' if not len(tr_y) else 'val'} shards", file=sys.stderr)
        return 1
    acc = knn_accuracy(tr_f, tr_y, va_f, va_y, k=args.k, temperature=args.temperature,
                       num_classes=int(max(tr_y.max(), va_y.max())) + 1)
    chance = float(torch.bincount(va_y).max()) / len(va_y)
    print(f"knn {args.label}: top-1 {acc:.4f} (k={args.k}, T={args.temperature}; {len(tr_y)} train / {len(va_y)} "
          f"val; majority-class baseline {chance:.4f})")
    return 0


def add_plot_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", help="run dirs, or the metrics (.jsonl) files runs write")
    p.add_argument("--out", required=True)
    p.add_argument("--y", default="loss")


def run_plot(args: argparse.Namespace) -> int:
    from fastenc.analysis.curves import plot_loss_curves
    from fastenc.run.layout import RunDir

    paths = [RunDir(r).metrics if os.path.isdir(r) else r for r in args.runs]
    print(plot_loss_curves(paths, args.out, y=args.y))
    return 0
