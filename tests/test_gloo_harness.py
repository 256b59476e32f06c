"""tests/gloo.py, the harness of every distributed test: results come back in rank order, and a rank that raises or
hangs fails the calling test with its traceback instead of hanging or passing."""

import time

import pytest
import torch
import torch.distributed as dist

from tests.gloo import run_ranks

pytestmark = pytest.mark.distributed


def _sum_of_ranks(rank, world, offset):
    t = torch.tensor([float(rank + offset)])
    dist.all_reduce(t)
    return {"rank": rank, "world": world, "sum": t}


def _raises_on_rank_1(rank, world):
    if rank == 1:
        raise RuntimeError("boom on purpose")
    return {}


def _rank_0_hangs(rank, world):
    if rank == 0:
        time.sleep(60)
    return {}


def test_results_in_rank_order(tmp_path):
    res = run_ranks(_sum_of_ranks, 3, tmp_path, 10)
    assert [r["rank"] for r in res] == [0, 1, 2] and all(r["world"] == 3 for r in res)
    assert all(r["sum"].item() == 10 + 11 + 12 for r in res)


def test_a_failing_rank_fails_the_test_with_its_traceback(tmp_path):
    with pytest.raises(pytest.fail.Exception, match=r"(?s)exit codes \[0, 1\].*rank 1.*boom on purpose"):
        run_ranks(_raises_on_rank_1, 2, tmp_path)


def test_a_hung_rank_is_killed_and_named(tmp_path):
    t0 = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match=r"hung \[0\]"):
        run_ranks(_rank_0_hangs, 2, tmp_path, timeout_s=3, init_process_group=False)
    assert time.monotonic() - t0 < 30
