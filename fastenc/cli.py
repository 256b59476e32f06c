"""The `fastenc` console command.

    fastenc train --config configs/cpu/clip_tiny.yaml [--resume [RUN_DIR]] [section.key=value ...]
    fastenc data synth --out DIR --num-samples N [--image-size S] [--seed K]
    fastenc tokenizer train --shards SPEC --out PREFIX [--vocab-size V] [--model-type bpe|unigram]
    fastenc config show --config FILE [section.key=value ...]
    fastenc config diff RUN_OR_YAML RUN_OR_YAML      exit 0 if controlled (differ only in `objective:`), else 1
    fastenc study check|run|report STUDY.yaml        refuses (exit 1) when the study's runs are not controlled
    fastenc eval knn --encoder ENCODER.safetensors|RUN_DIR --train-shards S --val-shards S [--label category_id]
    fastenc plot METRICS_OR_RUN_DIR ... --out loss.png
    fastenc objectives | fastenc models

`train` runs in this process; for several ranks use a launcher on launch/pretrain.py (see README).
"""

from __future__ import annotations

import argparse
import logging
import os
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


def main(argv: list[str] | None = None) -> int:
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

    ev = sub.add_parser("eval", help="evaluate encoders").add_subparsers(dest="eval_cmd", required=True)
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
                from fastenc.study import diff_configs, format_diff, load_run_or_recipe

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
        from fastenc.study import run_study_command

        try:
            return run_study_command(args)
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
