#!/usr/bin/env python
"""Evaluation entry point (the launcher form of `fastenc eval`):

    python launch/evaluate.py runs/clip_tiny runs/siglip_tiny runs/dino_tiny --suite eval_synth --out eval/synth
    python launch/evaluate.py RUN_DIR... --suite configs/paper/eval_imagenet.yaml --out eval/imagenet
"""

import argparse
import os
import shlex
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fastenc.cli.evaluate import add_eval_suite_args, run_eval_suite  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_eval_suite_args(parser)
    args = parser.parse_args()
    args.command = shlex.join(["python", "launch/evaluate.py", *sys.argv[1:]])
    sys.exit(run_eval_suite(args))
