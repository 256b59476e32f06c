"""Run a function in N gloo ranks (fresh processes) and collect what each rank returns.

The one harness of the distributed tests:

    results = run_ranks(fn, world, tmp_path, *args)   # fn(rank, world, *args) -> anything torch.save can store

Each rank uses one thread and has MASTER_ADDR / MASTER_PORT / RANK / WORLD_SIZE / LOCAL_RANK set (what
fastenc.engine.distributed.init_distributed and DeepSpeed read). With init_process_group=True (the default) the
rank joins a gloo group before calling fn and leaves it after; with False, fn initializes it itself (e.g. through
init_distributed). A rank that raises writes its traceback to rank{r}.err; the caller's test then fails with every
rank's traceback, the exit codes and the ranks that hung (killed after timeout_s).

start_method: "fork" starts in milliseconds and suits plain torch.distributed code (the ranks never touch CUDA);
use "spawn" for DeepSpeed, which keeps process-global state and can hang after a fork that follows OpenMP work.
With "spawn", fn must be a module-level function (it is pickled by reference).
"""

from __future__ import annotations

import os
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from fastenc.engine.distributed import free_port


def _rank_main(fn, rank, world, port, out_dir, args, init_process_group):
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                          LOCAL_RANK=str(rank))
        torch.set_num_threads(1)
        if init_process_group:
            torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                                 world_size=world, timeout=timedelta(seconds=60))
        result = fn(rank, world, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise


def run_ranks(fn, world: int, out_dir, *args, start_method: str = "fork", timeout_s: float = 120,
              init_process_group: bool = True) -> list:
    """fn(rank, world, *args) in `world` processes; the list of their return values, in rank order."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if start_method not in mp.get_all_start_methods():
        start_method = "spawn"
    ctx = mp.get_context(start_method)
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(fn, r, world, port, str(out_dir), args, init_process_group))
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout_s)
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    errors = "".join(f"\n--- rank {r} ---\n{(out_dir / f'rank{r}.err').read_text()}"
                     for r in range(world) if (out_dir / f"rank{r}.err").exists())
    if errors or hung or any(p.exitcode != 0 for p in procs):
        pytest.fail(f"{world} gloo ranks ({fn.__name__}): hung {hung}, exit codes {[p.exitcode for p in procs]}"
                    f"{errors}", pytrace=False)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(world)]
