"""The `fastenc` console command.

    fastenc train --config configs/cpu/clip_tiny.yaml [--resume [RUN_DIR]] [section.key=value ...]
    fastenc data synth --out DIR --num-samples N [--image-size S] [--seed K]
    fastenc data ingest SRC --out DIR [--captions FILE | --captions-from auto|sidecar|filename|none] [--overwrite]
    fastenc data index SHARDS [--index-dir D] [--no-validate] [--force] [--workers N]   exit 1 if a shard is unreadable
    fastenc data inspect SHARDS --out DIR [--num-samples 32] [--seed 0]
    fastenc tokenizer train --shards SPEC --out PREFIX [--vocab-size V] [--model-type bpe|unigram]
    fastenc config show --config FILE [section.key=value ...]
    fastenc config diff RUN_OR_YAML RUN_OR_YAML      exit 0 if controlled (differ only in `objective:`), else 1
    fastenc study check|run|report STUDY.yaml        refuses (exit 1) when the study's runs are not controlled
    fastenc eval RUN_DIR... --suite SUITE --out DIR   every protocol of an eval suite on every run: report.md,
                                                      results.json, PNGs (configs/cpu/eval_synth.yaml; launch/evaluate.py)
    fastenc eval knn --encoder ENCODER.safetensors|RUN_DIR --train-shards S --val-shards S [--label category_id]
    fastenc plot METRICS_OR_RUN_DIR ... --out loss.png
    fastenc objectives | fastenc models

`train` runs in this process; for several ranks use a launcher on launch/pretrain.py (see README).
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML recipe (configs/cpu/*.yaml, configs/paper/*.yaml)")
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue from the latest checkpoint of RUN_DIR (default: run.output_dir/run.name)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (schedule unchanged)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=5e-4 engine.zero_stage=2")


def run_train(args: argparse.Namespace) -> int:
    from fastenc.config import ConfigError, load_config

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"fastenc: config error: {e}", file=sys.stderr)
        return 2
    from fastenc.engine.trainer import train

    train(cfg, resume=args.resume, local_rank=args.local_rank, max_steps=args.max_steps)
    return 0


INGEST_HELP = """\
Write validated webdataset shards (DIR/shard-00000.tar ...), their DALI indexes and DIR/manifest.json from SRC:
  an image folder     .jpg/.jpeg/.png/.webp, searched recursively; captions from --captions FILE (CSV with a
                      header, or JSONL), from sidecar NAME.txt files (img2dataset's "files" output; NAME.json is
                      merged into the sample json), from the file names, or none. Images all in first-level
                      subfolders (ImageNet's class folders) get label / label_id in their json.
  img2dataset output  a folder of webdataset .tar shards (its .parquet and _stats.json files are ignored); the
                      usable samples are re-sharded with their json fields and captions.
Every image is fully decoded once and written with its original bytes. Undecodable images are skipped; images
without a usable caption are kept without .txt (image-only objectives use them) unless --require-captions.
Everything left out is counted by reason in manifest.json.
"""

INDEX_HELP = """\
Build the DALI index files (NAME.idx, DALI's wds2idx format) and their reports (NAME.idx.json) for the shards
that lack a current one: this command plays the role of DALI's wds2idx, and validates each sample on the way
(undecodable images are left out of the index, bad captions out of image-text epochs). Exit 0 if every shard could
be read, 1 otherwise.
"""


def add_data_tool_args(data) -> None:
    """`fastenc data ingest | index | inspect`."""
    # Literal choices (= fastenc.data.ingest's): importing fastenc.data here would load torch for every command.
    caption_sources = ("auto", "file", "sidecar", "filename", "none")
    label_modes, formats = ("auto", "folder", "none"), ("auto", "folder", "webdataset")
    fmt = argparse.RawDescriptionHelpFormatter
    ing = data.add_parser("ingest", help="image folder or img2dataset output -> validated shards + indexes",
                          description=INGEST_HELP, formatter_class=fmt)
    ing.add_argument("src", metavar="SRC", help="image folder, or folder of webdataset .tar shards")
    ing.add_argument("--out", required=True, metavar="DIR", help="output folder for shards, indexes, manifest.json")
    ing.add_argument("--captions", metavar="FILE", default=None,
                     help="CSV (with a header) or JSONL file with one row per image")
    ing.add_argument("--path-column", default="file",
                     help="captions file column with the image path relative to SRC, or its file name (default: file)")
    ing.add_argument("--caption-column", default="caption", help="captions file column with the caption "
                     "(default: caption)")
    ing.add_argument("--captions-from", choices=caption_sources, default="auto",
                     help="image folders: where captions come from; auto = the --captions file if given, else "
                     "sidecar .txt files if any image has one, else none (image-only)")
    ing.add_argument("--labels", choices=label_modes, default="auto",
                     help="record class labels from first-level folder names; auto = when every image sits in a "
                     "first-level folder and there are at least 2 (not img2dataset's numbered folders)")
    ing.add_argument("--format", dest="fmt", choices=formats, default="auto",
                     help="what SRC holds (auto: .tar shards -> webdataset, else folder)")
    ing.add_argument("--require-captions", action="store_true",
                     help="skip images without a usable caption (default: keep them without .txt)")
    ing.add_argument("--samples-per-shard", type=int, default=1000, help="(default: 1000)")
    ing.add_argument("--workers", type=int, default=0,
                     help="with N > 1, decode images in N processes (default: in this one)")
    ing.add_argument("--no-shuffle", dest="shuffle", action="store_false",
                     help="keep a folder's sorted order (default: a seeded shuffle, so class folders mix in shards)")
    ing.add_argument("--seed", type=int, default=0, help="seed of the folder shuffle")
    ing.add_argument("--overwrite", action="store_true",
                     help="replace the shards, indexes and manifest.json already in DIR")

    idx = data.add_parser("index", help="build missing or stale DALI index files (fastenc's wds2idx, validating)",
                          description=INDEX_HELP, formatter_class=fmt)
    idx.add_argument("shards", metavar="SHARDS", help="shard dir, brace pattern, glob or comma-separated list")
    idx.add_argument("--index-dir", default=None, help="write the indexes here (default: next to each shard)")
    idx.add_argument("--no-validate", dest="validate", action="store_false",
                     help="check only image signatures and JPEG end markers instead of decoding every image")
    idx.add_argument("--force", action="store_true", help="rebuild every index, even current ones")
    idx.add_argument("--workers", type=int, default=0, help="with N > 1, index shards in N processes")

    ins = data.add_parser("inspect", help="counts, size and caption statistics and a contact sheet of a shard set",
                          description="Read the shards once and write DIR/inspect.json, DIR/contact_sheet.png (a "
                          "seeded random sample of images with captions) and DIR/caption_lengths.png. Exit 1 if a "
                          "shard could not be read.")
    ins.add_argument("shards", metavar="SHARDS", help="shard dir, brace pattern, glob or comma-separated list")
    ins.add_argument("--out", required=True, metavar="DIR")
    ins.add_argument("--num-samples", type=int, default=32, help="images on the contact sheet (default: 32)")
    ins.add_argument("--seed", type=int, default=0)
    ins.add_argument("--index-dir", default=None, help="where the index reports are (default: next to the shards)")


def run_data_tool(args: argparse.Namespace) -> int:
    from fastenc.data.ingest import DataToolError

    try:
        if args.data_cmd == "ingest":
            from fastenc.data.ingest import format_summary, ingest

            manifest = ingest(args.src, args.out, captions_file=args.captions, path_column=args.path_column,
                              caption_column=args.caption_column, captions_from=args.captions_from,
                              labels=args.labels, fmt=args.fmt, require_captions=args.require_captions,
                              samples_per_shard=args.samples_per_shard, workers=args.workers, shuffle=args.shuffle,
                              seed=args.seed, overwrite=args.overwrite)
            print(format_summary(manifest, args.out))
            return 0 if manifest["num_samples"] else 1
        if args.data_cmd == "index":
            return run_data_index(args)
        from fastenc.data.inspect import format_summary, inspect_shards

        result = inspect_shards(args.shards, args.out, num_samples=args.num_samples, seed=args.seed,
                                index_dir=args.index_dir)
        print(format_summary(result))
        return 1 if result["num_unreadable_shards"] else 0
    except DataToolError as e:
        print(f"fastenc data {args.data_cmd}: {e}", file=sys.stderr)
        return 2


def run_data_index(args: argparse.Namespace) -> int:
    from fastenc.data.index import ensure_indexes, index_path_for, read_report, summarize
    from fastenc.data.shards import expand_shards

    try:
        shards = expand_shards(args.shards, check=False)  # unreadable shards are reported below, not dropped
    except FileNotFoundError as e:
        print(f"fastenc data index: {e}", file=sys.stderr)
        return 2
    remote = [s for s in shards if "://" in s or s.startswith("pipe:")]
    if remote:
        print(f"fastenc data index: DALI reads local shards only, and so does indexing; got {remote[0]!r}. Copy the "
              "shards to a local or mounted file system first.", file=sys.stderr)
        return 2
    current = 0
    if not args.force:
        for s in shards:
            rep = read_report(s, index_path_for(s, args.index_dir))
            current += rep is not None and (rep.validated or not args.validate)
    reports, failed = ensure_indexes(shards, index_dir=args.index_dir, validate=args.validate, force=args.force,
                                     workers=args.workers)
    summ = summarize(reports, failed)

    def reasons(counts):
        return ", ".join(f"{n} {r}" for r, n in sorted(counts.items(), key=lambda kv: -kv[1]))

    built = len(shards) - current
    print(f"{len(shards)} shard(s): {built} indexed{' with validation' if args.validate else ' (quick checks)'}, "
          f"{current} already current. {summ['num_samples']:,} usable sample(s), {summ['num_captioned']:,} with "
          "a caption.")
    if summ["num_excluded"]:
        print(f"excluded {summ['num_excluded']:,} sample(s) (not in the index): {reasons(summ['excluded_reasons'])}")
    if summ["num_no_caption"]:
        print(f"kept {summ['num_no_caption']:,} sample(s) without caption (left out of image-text epochs): "
              f"{reasons(summ['no_caption_reasons'])}")
    empty = [r.shard for r in reports if r.empty and not r.error]
    if empty:
        print(f"{len(empty)} empty shard(s) (no usable sample; the loaders skip them): {', '.join(empty[:5])}"
              + (" ..." if len(empty) > 5 else ""))
    for shard, why in failed:
        print(f"could not read {shard}: {why}", file=sys.stderr)
    if failed:
        print(f"{len(failed)} of {len(shards)} shard(s) could not be read; their indexes are empty (the loaders skip "
              "them, and say why) until the shard files change", file=sys.stderr)
    return 1 if failed else 0


def add_eval_suite_args(p: argparse.ArgumentParser) -> None:
    from fastenc.utils.optional import cuda_available

    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run dirs (or encoder .safetensors files) to evaluate")
    p.add_argument("--suite", required=True,
                   help="suite YAML, or a name under configs/cpu or configs/paper (eval_synth, eval_imagenet)")
    p.add_argument("--out", required=True, help="output dir: report.md, results.json, PNGs")
    p.add_argument("--cache-dir", default=None, help="feature cache (default: OUT/feature_cache)")
    p.add_argument("--device", default="cuda" if cuda_available() else "cpu",
                   help="where the encoders run (default: cuda when available, else cpu)")
    p.add_argument("--workers", type=int, default=0, help="decoding processes for feature extraction (default 0: "
                   "in this process, right for the toy suite; ImageNet wants about one per core)")
    p.add_argument("--batch-size", type=int, default=256, help="images per encoder call during extraction")
    p.add_argument("--model", default=None, help="ViT preset of bare .safetensors sources that fastenc did not export "
                   "(timm checkpoints, e.g. vit_base_patch16_224; a classifier head is dropped)")


def run_eval_suite(args: argparse.Namespace) -> int:
    from fastenc.eval.features import EvalDataError
    from fastenc.eval.suite import resolve_suite, run_suite

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        results = run_suite(args.runs, resolve_suite(args.suite), args.out, cache_dir=args.cache_dir,
                            device=args.device, command=getattr(args, "command", None), num_workers=args.workers,
                            batch_size=args.batch_size, model=args.model)
    except EvalDataError as e:
        print(f"fastenc eval: {e}", file=sys.stderr)
        return 2
    print(f"fastenc eval: {len(results['runs'])} run(s), {len(results['protocols'])} protocol(s) -> "
          f"{os.path.join(args.out, 'report.md')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["eval"] and argv[1:2] != ["knn"] and not {"-h", "--help"} & set(argv[1:2]):
        p = argparse.ArgumentParser(prog="fastenc eval", description="evaluate run dirs with an eval suite "
                                    "(`fastenc eval knn ...` is the single k-NN command)")
        add_eval_suite_args(p)
        args = p.parse_args(argv[1:])
        args.command = shlex.join(["fastenc", *argv])
        return run_eval_suite(args)
    parser = argparse.ArgumentParser(prog="fastenc", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)

    add_train_args(sub.add_parser("train", help="train an encoder (single process; see launch/pretrain.py)"))

    data = sub.add_parser("data", help="dataset tools").add_subparsers(dest="data_cmd", required=True)
    synth = data.add_parser("synth", help="write synthetic webdataset shards for the toy-scale study")
    synth.add_argument("--out", required=True)
    synth.add_argument("--num-samples", type=int, required=True)
    synth.add_argument("--image-size", type=int, default=64)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--samples-per-shard", type=int, default=1000)
    add_data_tool_args(data)

    tok = sub.add_parser("tokenizer", help="tokenizer tools").add_subparsers(dest="tok_cmd", required=True)
    tt = tok.add_parser("train", help="fit a sentencepiece tokenizer on the captions of a shard set")
    tt.add_argument("--shards", required=True, help="shard dir, brace pattern, glob or list")
    tt.add_argument("--out", required=True, help="model prefix: writes PREFIX.model and PREFIX.vocab")
    tt.add_argument("--vocab-size", type=int, default=32000)
    tt.add_argument("--max-sentences", type=int, default=1_000_000)
    tt.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe", help="sentencepiece model type")

    conf = sub.add_parser("config", help="config tools").add_subparsers(dest="conf_cmd", required=True)
    show = conf.add_parser("show", help="print the fully resolved config")
    show.add_argument("--config", required=True)
    show.add_argument("overrides", nargs="*")

    diff = conf.add_parser("diff", help="differences between two configs, and whether the pair is controlled")
    diff.add_argument("a", help="recipe YAML or run dir")
    diff.add_argument("b", help="recipe YAML or run dir")

    study = sub.add_parser("study", help="controlled comparisons of several objectives")
    study_sub = study.add_subparsers(dest="study_cmd", required=True)
    for name, text in (("check", "check that every run of the study is controlled"),
                       ("run", "check, then train every run of the study in turn"),
                       ("report", "check the run dirs' recorded configs and fingerprints, then tabulate them")):
        sp = study_sub.add_parser(name, help=text)
        sp.add_argument("study", help="study YAML (configs/cpu/study.yaml, configs/paper/study.yaml)")
        sp.add_argument("overrides", nargs="*", help="dotted overrides applied to every run")
        if name == "run":
            sp.add_argument("--launcher", default="",
                            help="command prefix, e.g. 'deepspeed --num_gpus 8' (default: this python)")
            sp.add_argument("--max-steps", type=int, default=None)

    ev = sub.add_parser("eval", help="evaluate encoders: `fastenc eval RUN_DIR... --suite S --out D`, or `eval knn`",
                        description="fastenc eval RUN_DIR... --suite SUITE --out DIR runs an eval suite (see "
                        "launch/evaluate.py); `fastenc eval knn` the single k-NN evaluation."
                        ).add_subparsers(dest="eval_cmd", required=True)
    knn = ev.add_parser("knn", help="weighted k-NN accuracy of frozen features (DINO's protocol)")
    knn.add_argument("--encoder", required=True, help="export/encoder.safetensors, or a run dir")
    knn.add_argument("--model", default=None, help="ViT preset (default: from the export's metadata)")
    knn.add_argument("--train-shards", required=True)
    knn.add_argument("--val-shards", required=True)
    knn.add_argument("--label", default="category_id", help="integer field of the samples' .json")
    knn.add_argument("--k", type=int, default=20)
    knn.add_argument("--temperature", type=float, default=0.07)
    knn.add_argument("--max-train", type=int, default=None)
    knn.add_argument("--max-val", type=int, default=None)

    plot = sub.add_parser("plot", help="loss curves of several runs on one figure")
    plot.add_argument("runs", nargs="+", help="run dirs or metrics.jsonl files")
    plot.add_argument("--out", required=True)
    plot.add_argument("--y", default="loss")

    sub.add_parser("objectives", help="list registered objectives")
    sub.add_parser("models", help="list ViT and text-tower presets")

    args = parser.parse_args(argv)
    if args.cmd == "train":
        return run_train(args)
    if args.cmd == "data" and args.data_cmd == "synth":
        from fastenc.data.synth import write_synthetic_shards

        manifest = write_synthetic_shards(args.out, args.num_samples, image_size=args.image_size, seed=args.seed,
                                          samples_per_shard=args.samples_per_shard)
        print(f"wrote {manifest['num_samples']} samples in {manifest['num_shards']} shards to {args.out}")
        return 0
    if args.cmd == "data":
        return run_data_tool(args)
    if args.cmd == "tokenizer":
        from fastenc.data.tokenizer import train_tokenizer

        path = train_tokenizer(args.shards, args.out, vocab_size=args.vocab_size, max_sentences=args.max_sentences,
                               model_type=args.model_type)
        print(f"wrote {path}")
        return 0
    if args.cmd == "config":
        from fastenc.config import ConfigError, config_to_yaml, load_config

        try:
            if args.conf_cmd == "diff":
                from fastenc.run.fingerprint import diff_configs, format_diff
                from fastenc.run.layout import load_config_or_run as load_run_or_recipe

                d = diff_configs(load_run_or_recipe(args.a), load_run_or_recipe(args.b))
                print(format_diff(d, args.a, args.b))
                return 0 if d.controlled else 1
            print(config_to_yaml(load_config(args.config, args.overrides)), end="")
        except ConfigError as e:
            print(f"fastenc: config error: {e}", file=sys.stderr)
            return 2
        return 0
    if args.cmd == "study":
        from fastenc.config import ConfigError
        from fastenc.cli.study import study_command

        try:
            return study_command(args)
        except ConfigError as e:
            print(f"fastenc: config error: {e}", file=sys.stderr)
            return 2
    if args.cmd == "eval":
        from fastenc.eval.knn import run_knn_command

        return run_knn_command(args)
    if args.cmd == "plot":
        from fastenc.analysis.curves import plot_loss_curves

        paths = [os.path.join(r, "metrics.jsonl") if os.path.isdir(r) else r for r in args.runs]
        print(plot_loss_curves(paths, args.out, y=args.y))
        return 0
    if args.cmd == "objectives":
        from fastenc.objectives import list_objectives

        print("\n".join(list_objectives()))
        return 0
    if args.cmd == "models":
        from fastenc.models import list_text_towers, list_vits

        print("vision:", ", ".join(list_vits()))
        print("text:  ", ", ".join(list_text_towers()))
        return 0
    parser.error("unknown command")
    return 2


if __name__ == "__main__":
    sys.exit(main())
