"""Distributed CLIP / SigLIP with real gloo ranks: data-parallel gradients equal the single-process full batch.

Each rank takes its slice of a fixed global batch, runs a tiny shared encoder (a Linear W applied to both
modalities, then L2-normalize) and the distributed loss, backpropagates, and all-reduce-averages the parameter
gradients as DeepSpeed does. The parent compares every rank's averaged gradients (W, logit scale, logit bias) and
the mean of the per-rank losses with the single-process full-batch loss. 3 ranks exercise multi-hop rings (the
gradient then travels back through chained exchanges) and a non-zero label offset beyond rank 1.
"""

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from fastenc.losses import clip_loss, clip_loss_ref, siglip_loss, siglip_loss_ref
from tests.gloo import run_ranks
from tests.losses.helpers import fast_impls

B, D_IN, D = 5, 12, 20  # local batch (odd), input width, feature width (not a power of two)
TIMEOUT_S = 120  # whole run of the ranks (seconds when forked); gloo itself times out after 60 s
# Every implementation that runs here keeps the memory bound across ranks the same way (fastenc.losses: gathered
# features for CLIP, a ring for SigLIP, each local block through the implementation). Triton runs under the
# interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1 without a GPU; the forked ranks inherit it).
IMPLS = ["reference", *fast_impls()]
KINDS = [f"{loss}_{impl}" for loss in ("clip", "siglip") for impl in IMPLS]


def _encode(x, W):
    return F.normalize(x @ W.T, dim=1)


def _problem(world):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(world * B, D_IN, generator=g), torch.randn(world * B, D_IN, generator=g)
    params = {
        "W": torch.randn(D, D_IN, generator=g) / math.sqrt(D_IN),
        "log_scale": torch.tensor(math.log(10.0)),
        "bias": torch.tensor(-10.0),
    }
    return x, y, {k: v.requires_grad_() for k, v in params.items()}


def _full_batch_loss(kind, img, txt, p):
    if kind.startswith("clip"):
        return clip_loss_ref(img, txt, p["log_scale"].exp())
    return siglip_loss_ref(img, txt, p["log_scale"].exp(), p["bias"])


def _local_loss(kind, img, txt, p, group):
    impl = kind.split("_", 1)[1]
    if kind.startswith("clip"):
        return clip_loss(img, txt, p["log_scale"].exp(), distributed=True, group=group, impl=impl)
    return siglip_loss(img, txt, p["log_scale"].exp(), p["bias"], distributed=True, group=group, impl=impl)


def _data_parallel_step(kind, rank, world, group):
    x, y, p = _problem(world)
    full = _full_batch_loss(kind, _encode(x, p["W"]), _encode(y, p["W"]), p)
    full_grads = torch.autograd.grad(full, list(p.values()), allow_unused=True)

    x, y, p = _problem(world)
    rows = slice(rank * B, (rank + 1) * B)
    local = _local_loss(kind, _encode(x[rows], p["W"]), _encode(y[rows], p["W"]), p, group)
    local.backward()
    dp_grads = []
    for v in p.values():  # what DeepSpeed / DDP do: sum over ranks, divide by W
        grad = v.grad if v.grad is not None else torch.zeros_like(v)
        dist.all_reduce(grad, group=group)
        dp_grads.append(grad / world)
    losses = [torch.zeros(()) for _ in range(world)]
    dist.all_gather(losses, local.detach(), group=group)
    return {"full": full.detach(), "full_grads": full_grads, "losses": torch.stack(losses), "dp_grads": dp_grads}


def _worker(rank, world):
    res = {}
    # First call on a fresh group: unequal local batches must be refused on every rank (not hang).
    img, txt = torch.randn(3 + rank, D), torch.randn(3 + rank, D)
    unequal = dist.new_group(list(range(world)))
    for kind, call in (("clip", lambda: clip_loss(img, txt, 10.0, distributed=True, group=unequal)),
                       ("siglip", lambda: siglip_loss(img, txt, 10.0, -10.0, distributed=True, group=unequal))):
        try:
            call()
            res[f"unequal_{kind}"] = "no error"
        except ValueError as e:
            res[f"unequal_{kind}"] = str(e)
        dist.barrier()
    sub = dist.new_group(list(range(world)))  # group=None and an explicit group object take different paths
    for kind in KINDS:
        res[kind] = _data_parallel_step(kind, rank, world, None)
        res[f"{kind}_group"] = _data_parallel_step(kind, rank, world, sub)
    return res


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"world{w}")
def ranks(request, tmp_path_factory):
    return run_ranks(_worker, request.param, tmp_path_factory.mktemp(f"world{request.param}"), timeout_s=TIMEOUT_S)


CASES = [case for kind in KINDS for case in (kind, f"{kind}_group")]


@pytest.mark.distributed
@pytest.mark.parametrize("case", CASES)
def test_data_parallel_gradients_equal_full_batch(ranks, case):
    for rank, res in enumerate(ranks):
        r = res[case]
        # fp32: both sides sum the same terms in a different order (and over ranks); O(1) values -> 1e-5.
        torch.testing.assert_close(r["losses"].mean(), r["full"], rtol=1e-5, atol=1e-6)
        for name, got, want in zip(("W", "log_scale", "bias"), r["dp_grads"], r["full_grads"]):
            want = torch.zeros_like(got) if want is None else want  # clip has no bias
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m: f"rank {rank} d{name}: {m}")


@pytest.mark.distributed
def test_per_rank_losses_are_row_shares_not_copies(ranks):
    # Each rank's loss covers only its rows: they differ (random data), yet average to the full-batch loss.
    for case in CASES:
        assert ranks[0][case]["losses"].unique().numel() == len(ranks), case


@pytest.mark.distributed
@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_unequal_local_batches_are_refused(ranks, kind):
    for rank, res in enumerate(ranks):
        assert "same local feature shape [B, D] on every rank" in res[f"unequal_{kind}"], (rank, res[f"unequal_{kind}"])
