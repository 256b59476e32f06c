"""The `fastenc` console command: train, evaluate and compare vision encoders, and make their data.

    fastenc train --config configs/cpu/clip_tiny.yaml [--resume [RUN_DIR]] [section.key=value ...]
    fastenc data synth --out DIR --num-samples N [--image-size S] [--seed K]
    fastenc data ingest SRC --out DIR [--captions FILE | --captions-from auto|sidecar|filename|none] [--overwrite]
    fastenc data index SHARDS [--index-dir D] [--no-validate] [--force] [--workers N]    exit 1: a shard is unreadable
    fastenc data inspect SHARDS --out DIR [--num-samples 32] [--seed 0]
    fastenc tokenizer train --shards SPEC --out PREFIX [--vocab-size V] [--model-type bpe|unigram]
    fastenc config show --config FILE [section.key=value ...]
    fastenc config diff RUN_OR_YAML RUN_OR_YAML      exit 0 if controlled (differ only in `objective:`), else 1
    fastenc study check|run|report STUDY.yaml        refuses (exit 1) when the study's runs are not controlled
    fastenc eval [suite] RUN_DIR... --suite SUITE --out DIR   every protocol of an eval suite on every run:
                                         report.md, results.json, PNGs (configs/cpu/eval_synth.yaml; launch/evaluate.py)
    fastenc eval knn --encoder ENCODER.safetensors|RUN_DIR --train-shards S --val-shards S [--label category_id]
    fastenc eval vqa RUN_DIR... --benchmark FILE --out DIR [--images DIR] [--mode likelihood|generate|both]
                                         [--limit N] [--by COLUMN] [--bootstrap 1000]   multiple-choice VQA accuracy
    fastenc data synth-vqa --out DIR [--num-samples N] [--num-heldout M] [--mc-fraction 0.5]
    fastenc chat RUN_DIR --image IMG "question"  |  fastenc chat RUN_DIR --score RECORDS.json --images DIR
    fastenc plot METRICS_OR_RUN_DIR ... --out loss.png
    fastenc objectives | fastenc models

`train` runs in this process; for several ranks use a launcher on launch/pretrain.py (see launch/README.md).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import dataclass
from typing import Callable

from fastenc.cli import chat, config, data, evaluate, study, train


@dataclass(frozen=True)
class Command:
    """One command: `name` is its words after `fastenc`; `run(args)` returns the exit code."""

    name: str
    run: Callable[[argparse.Namespace], int]
    add_args: Callable[[argparse.ArgumentParser], None] | None
    help: str
    description: str | None = None


# The one table from command name to function: the parser is built from it (a two-word name is a subcommand of
# the group in GROUPS), and a parsed command runs its function.
COMMANDS = (
    Command("train", train.run_train, train.add_train_args, "train an encoder (single process; see "
            "launch/pretrain.py)"),
    Command("data synth", data.run_synth, data.add_synth_args, "write synthetic webdataset shards for the toy-scale "
            "study"),
    Command("data synth-vqa", data.run_synth_vqa, data.add_synth_vqa_args, "synthetic vision-language data: "
            "LLaVA-format captions/instruct/heldout JSON for the CPU VLM recipes + a VMCBench-format benchmark.jsonl"),
    Command("data ingest", data.run_ingest, data.add_ingest_args, "image folder or img2dataset output -> validated "
            "shards + indexes", data.INGEST_HELP),
    Command("data index", data.run_index, data.add_index_args, "build missing or stale DALI index files (fastenc's "
            "wds2idx, validating)", data.INDEX_HELP),
    Command("data inspect", data.run_inspect, data.add_inspect_args, "counts, size and caption statistics and a "
            "contact sheet of a shard set", data.INSPECT_HELP),
    Command("tokenizer train", data.run_tokenizer_train, data.add_tokenizer_args, "fit a sentencepiece tokenizer on "
            "the captions of a shard set"),
    Command("config show", config.run_show, config.add_show_args, "print the fully resolved config"),
    Command("config diff", config.run_diff, config.add_diff_args, "differences between two configs, and whether the "
            "pair is controlled"),
    Command("study check", study.run_check, study.add_study_args, "check that every run of the study is controlled"),
    Command("study run", study.run_run, study.add_study_run_args, "check, then train every run of the study in turn"),
    Command("study report", study.run_report, study.add_study_args, "check the run dirs' recorded configs and "
            "fingerprints, then tabulate them"),
    Command("eval suite", evaluate.run_eval_suite, evaluate.add_eval_suite_args, "every protocol of an eval suite on "
            "every run (the default: `fastenc eval RUN_DIR... --suite S --out D`)"),
    Command("eval knn", evaluate.run_knn, evaluate.add_knn_args, "weighted k-NN accuracy of frozen features (DINO's "
            "protocol)"),
    Command("eval vqa", evaluate.run_eval_vqa, evaluate.add_eval_vqa_args, "multiple-choice VQA accuracy of "
            "vision-language runs on a benchmark in VMCBench's format (.parquet, .tsv, .jsonl, .json)"),
    Command("chat", chat.run_chat, chat.add_chat_args, "ask a trained vision-language run about an image (greedy), "
            "or --score its answers on records"),
    Command("plot", evaluate.run_plot, evaluate.add_plot_args, "loss curves of several runs on one figure"),
    Command("objectives", config.run_objectives, None, "list registered objectives"),
    Command("models", config.run_models, None, "list ViT and text-tower presets"),
)

GROUPS = {
    "data": ("dataset tools", None),
    "tokenizer": ("tokenizer tools", None),
    "config": ("config tools", None),
    "study": ("controlled comparisons of several objectives", None),
    "eval": ("evaluate encoders: `fastenc eval RUN_DIR... --suite S --out D`, or `eval knn`, `eval vqa`", "suite"),
}
"""Command groups: {first word: (help, the subcommand that runs when the next word names none)}."""


class _DefaultSubcommand(argparse._SubParsersAction):
    """Subcommands where a first word that names none goes to `default`: `fastenc eval RUN_DIR ...` is
    `fastenc eval suite RUN_DIR ...` (a run dir named like a subcommand: write ./knn, or `eval suite knn`)."""

    def __init__(self, *args, default_command: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.default_command = default_command
        self.choices = None  # any first word is valid: __call__ routes the unknown ones to the default

    def __call__(self, parser, namespace, values, option_string=None):
        if values[0] not in self._name_parser_map:
            values = [self.default_command, *values]
        super().__call__(parser, namespace, values, option_string)


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command in COMMANDS; a parsed command's function is `args.run`."""
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="fastenc", description=__doc__, formatter_class=fmt)
    top = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    groups = {}
    for cmd in COMMANDS:
        group, _, leaf = cmd.name.rpartition(" ")
        if group and group not in groups:
            text, default = GROUPS[group]
            words = [c.name.split()[1] for c in COMMANDS if c.name.startswith(group + " ")]
            kwargs = dict(action=_DefaultSubcommand, default_command=default) if default else {}
            groups[group] = top.add_parser(group, help=text, description=text).add_subparsers(
                dest=f"{group}_cmd", required=True, metavar="{" + ",".join(words) + "}", **kwargs)
        p = (groups[group] if group else top).add_parser(leaf, help=cmd.help, description=cmd.description or cmd.help,
                                                        formatter_class=fmt)
        if cmd.add_args:
            cmd.add_args(p)
        p.set_defaults(run=cmd.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.command = shlex.join(["fastenc", *argv])  # provenance, for the reports a command writes
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
