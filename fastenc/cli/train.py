"""`fastenc train`: one process; several ranks run launch/pretrain.py (the same arguments) under a launcher."""

from __future__ import annotations

import argparse
import logging
import sys


def add_train_args(p: argparse.ArgumentParser) -> None:
    """The training arguments (also launch/pretrain.py's)."""
    p.add_argument("--config", required=True, help="YAML recipe (configs/cpu/*.yaml, configs/paper/*.yaml)")
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue from the latest checkpoint of RUN_DIR (default: run.output_dir/run.name)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (schedule unchanged)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=5e-4 engine.zero_stage=2")


def run_train(args: argparse.Namespace) -> int:
    """Train in this process; exit 2 on a config error."""
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
