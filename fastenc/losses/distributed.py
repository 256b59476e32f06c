"""Autograd-aware collectives for losses that span data-parallel ranks (all backends, gloo included).

- `all_gather_with_grad`: every rank's [B, ...] slice concatenated to [W*B, ...]; backward reduce-scatters, so each
  rank receives the sum over ranks of the gradients w.r.t. its own slice (torch.distributed.nn semantics).
- `neighbour_exchange_with_grad`: send a tensor to one rank and receive a same-shaped one from another (one ring
  step); backward sends the received tensor's gradient back to its owner.
Nothing here touches CUDA at import time. Shapes: B = local batch, D = feature dim, W = world size, N = W * B.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# torch >= 2.10 renamed the tensor-in/tensor-out collectives; fall back to the old names on older releases.
_all_gather_single = getattr(dist, "all_gather_single", None) or getattr(dist, "all_gather_into_tensor", None)
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or getattr(dist, "reduce_scatter_tensor", None)


def world_info(group=None) -> tuple[int, int]:
    """(rank, world size) of this process in `group` (None: the default group); a clear error if not initialized."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "distributed=True needs torch.distributed to be initialized (dist.init_process_group, done by "
            "deepspeed.init_distributed / torchrun launchers); pass distributed=False for a single process"
        )
    return dist.get_rank(group), dist.get_world_size(group)


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_BD, group):
        ctx.group = group
        world = dist.get_world_size(group)
        out_ND = x_BD.new_empty((world * x_BD.shape[0], *x_BD.shape[1:]))
        _all_gather_single(out_ND, x_BD.contiguous(), group=group)
        return out_ND

    @staticmethod
    def backward(ctx, grad_ND):
        # Every rank used every slice, so the gradient of our slice is the sum of all ranks' gradients for it.
        world = dist.get_world_size(ctx.group)
        grad_BD = grad_ND.new_empty((grad_ND.shape[0] // world, *grad_ND.shape[1:]))
        _reduce_scatter_single(grad_BD, grad_ND.contiguous(), op=dist.ReduceOp.SUM, group=ctx.group)
        return grad_BD, None


def all_gather_with_grad(x_BD: torch.Tensor, group=None) -> torch.Tensor:
    """[B, ...] per rank -> [W*B, ...], rank r's rows at r*B:(r+1)*B; same B on every rank (see check_equal_batch)."""
    if dist.get_world_size(group) == 1:
        return x_BD
    return _AllGatherWithGrad.apply(x_BD, group)


def _exchange(x, send_to: int, recv_from: int, group) -> torch.Tensor:
    recv = torch.empty_like(x)
    ops = [
        dist.P2POp(dist.isend, x, dist.get_global_rank(group, send_to) if group is not None else send_to, group),
        dist.P2POp(dist.irecv, recv, dist.get_global_rank(group, recv_from) if group is not None else recv_from, group),
    ]
    # Send and receive are posted together, so a ring of ranks all doing this at once cannot deadlock.
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return recv


class _NeighbourExchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, send_to, recv_from, group):
        ctx.send_to, ctx.recv_from, ctx.group = send_to, recv_from, group
        return _exchange(x.contiguous(), send_to, recv_from, group)

    @staticmethod
    def backward(ctx, grad):
        # The gradient of what we received belongs to its sender; what we get back is the gradient of what we sent.
        return _exchange(grad.contiguous(), ctx.recv_from, ctx.send_to, ctx.group), None, None, None


def neighbour_exchange_with_grad(x: torch.Tensor, send_to: int, recv_from: int, group=None) -> torch.Tensor:
    """Send `x` to rank `send_to`, return the same-shaped tensor received from `recv_from` (ranks within `group`).

    Every rank of the group must call it at the same time with a consistent pattern (e.g. a ring shift). Backward
    runs the reverse exchange, so gradients flow back to the rank that owned the features.
    """
    return _NeighbourExchange.apply(x, send_to, recv_from, group)


_checked_groups: set[int] = set()


def check_equal_batch(loss: str, x_BD: torch.Tensor, group=None) -> None:
    """Raise a clear error if the local [B, D] shapes differ across ranks; checked on the first call per group.

    The check costs a tiny all-gather and one host sync, so it runs once per process and group: every rank makes
    its first call at the same step, which keeps the collectives matched. A later change of B on one rank only
    (a ragged last batch) is not detected: data loaders must use drop_last=True.
    """
    key = id(group if group is not None else dist.group.WORLD)
    if key in _checked_groups:
        return
    world = dist.get_world_size(group)
    shape = torch.tensor(list(x_BD.shape), dtype=torch.int64, device=x_BD.device)
    shapes = shape.new_empty(world * 2)
    _all_gather_single(shapes, shape, group=group)
    shapes = [tuple(s) for s in shapes.view(world, 2).tolist()]
    if len(set(shapes)) != 1:
        raise ValueError(
            f"{loss}(distributed=True) needs the same local feature shape [B, D] on every rank, got {shapes} "
            "(rank order). Use equal per-rank batch sizes and drop_last=True in the data loader."
        )
    _checked_groups.add(key)
