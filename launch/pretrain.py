#!/usr/bin/env python
"""Pretraining entry point, the same file for every launcher:

    python launch/pretrain.py --config configs/cpu/clip_tiny.yaml [overrides]
    deepspeed --num_gpus 2 launch/pretrain.py --config configs/cpu/clip_tiny.yaml
    torchrun --nproc_per_node 2 launch/pretrain.py --config configs/cpu/clip_tiny.yaml
    deepspeed --hostfile hostfile launch/pretrain.py ...           (multinode, see launch/README.md)
    torchrun --nnodes 2 --rdzv-backend c10d --rdzv-endpoint HOST:29400 launch/pretrain.py ...
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fastenc.cli.train import add_train_args, run_train  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_args(parser)
    sys.exit(run_train(parser.parse_args()))
