"""Process-group setup that works the same under `python`, `torchrun` and `deepspeed` launchers, CPU or GPU.

torchrun and the deepspeed launcher both export RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT
(multinode: torchrun's rendezvous or deepspeed's hostfile + pdsh set them per node); a plain `python` run gets a
world of one on a free local port. The backend is the accelerator's (nccl on CUDA, gloo on CPU).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(local_rank_arg: int | None = None) -> DistInfo:
    """Initialize torch.distributed through DeepSpeed (idempotent) and pick this rank's device."""
    if "RANK" not in os.environ:  # plain `python launch/pretrain.py`: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", local_rank_arg if local_rank_arg is not None else 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    import deepspeed

    if not torch.distributed.is_initialized():
        # Backend comes from DeepSpeed's accelerator: nccl on CUDA, gloo on its CPU accelerator.
        deepspeed.init_distributed(verbose=False)
    return DistInfo(torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank, device)


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def broadcast_object(obj, src: int = 0):
    if not torch.distributed.is_initialized():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def warm_deepspeed_ops() -> None:
    """JIT-build, once and in one process, the DeepSpeed ops that process-group setup compiles on first use
    (on CPU: the shared-memory allreduce, ~2 minutes). Several ranks building it at the same time can hang, so
    `make setup` calls this before any multi-rank run; the result is cached in ~/.cache/torch_extensions."""
    import deepspeed  # noqa: F401
    from deepspeed.accelerator import get_accelerator
    from deepspeed.ops import __compatible_ops__ as compatible

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None and compatible.get(builder.NAME, False):
        builder.load(verbose=False)


if __name__ == "__main__":
    warm_deepspeed_ops()
