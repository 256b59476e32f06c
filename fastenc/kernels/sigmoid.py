"""Fused Triton SigLIP block loss (Zhai et al. 2023): the `_siglip_block_ref` contract without any B x M tensor.

    loss = -sum_ij log sigmoid(label_ij * z_ij),  z = t * I T^T + b,  label_ij = +1 if (positives and i == j) else -1,

over one [B, M] block (I: [B, D] image rows, T: [M, D] text columns; positives needs M = B). Not divided by B:
siglip_loss sums the blocks of its ring and divides once.

Legend: B = rows, M = columns, D = feature dim; BM / BN / BD = tile sizes; a tile is one [BM, BN] block of z.

Tiles are independent (no row statistics): forward computes each tile once and writes one partial sum per row
block (summed in a fixed order: deterministic); nothing but the inputs is saved. Backward recomputes each tile with
    dL/dz_ij = sigmoid(z_ij) - [label_ij = +1],
dI = t dZ T, dT = t dZ^T I, dt = sum(dZ * I T^T), db = sum(dZ). As in fastenc/kernels/contrastive.py, dI is owned
by the row-block program and dT comes either from a second, swapped pass (deterministic=True, default: tiles
computed 1 + 2 = 3 times per step) or from fp32 atomic adds (deterministic=False: 1 + 1 = 2 times).

Numerics: tl.dot in the features' dtype with fp32 accumulation; -log sigmoid(y) = softplus(-y) evaluated as
max(x, 0) + log1p(exp(-|x|)) in fp32 with an accurate log1p (triton has no portable log1p: libdevice's does not run
in the interpreter): at SigLIP's init (t = 10, b = -10) a negative pair's term is log(1 + x) with x ~ 1e-7..1e-2,
where fl(1 + x) drops most of x's digits; an all-negative ring block is made only of such terms, and plain
log(1 + x) puts its loss ~3e-5 off (measured), 250x the error of this kernel.
bf16 under the Triton interpreter: see fastenc/kernels/contrastive.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from fastenc.kernels import as_scalar, check_device, row_major, tile_size
from fastenc.kernels.contrastive import _accumulate_grads, _round_to_operand, _sims_tile, _Tiles
from fastenc.losses.sigmoid import _siglip_block_ref as siglip_block_ref

__all__ = ["siglip_block_triton", "siglip_block_ref"]


@triton.jit
def _log1p(x):
    """log(1 + x) for x >= 0 to a few ulp: log(u) * x / (u - 1) with u = fl(1 + x) cancels u's rounding error."""
    u = 1.0 + x
    exact = u == 1.0
    return tl.where(exact, x, tl.log(u) * (x / tl.where(exact, 1.0, u - 1.0)))


@triton.jit
def _siglip_fwd_kernel(A, Bm, t_ptr, b_ptr, partial_ptr, RA, RB, D, stride_a, stride_b,
                       POSITIVES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_D: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """One program per block of BM rows: partial_ptr[pid] = sum over its rows and all columns of softplus(-l z)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < RA
    t = tl.load(t_ptr)
    bias = tl.load(b_ptr)
    acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, RB, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < RB
        z = t * _sims_tile(A, Bm, rows, cols, RA, RB, D, stride_a, stride_b, BLOCK_M, BLOCK_N, BLOCK_D,
                           EMULATE_BF16) + bias
        if POSITIVES:
            x = tl.where(cols[None, :] == rows[:, None], -z, z)  # -log sigmoid(l z) = softplus(-l z)
        else:
            x = z
        softplus = tl.maximum(x, 0.0) + _log1p(tl.exp(-tl.abs(x)))
        acc += tl.sum(tl.where(row_ok[:, None] & col_ok[None, :], softplus, 0.0), axis=1)
    tl.store(partial_ptr + pid, tl.sum(acc, axis=0))


@triton.jit
def _siglip_bwd_kernel(A, Bm, t_ptr, b_ptr, grad_ptr, dA, dB, dt_ptr, db_ptr, RA, RB, D, stride_a, stride_b,
                       POSITIVES: tl.constexpr, COMPUTE_DA: tl.constexpr, ATOMIC_DB: tl.constexpr,
                       COMPUTE_DTB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_D: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """One program per block of BM rows of A, recomputing each tile: dL/dz = dL_out * (sigmoid(z) - [l = +1]).

    dA += t dZ Bm (owned rows), optionally dB += t dZ^T A (atomics), per-program partials of dt and db. The block
    is symmetric in its roles (the diagonal is the diagonal), so the swapped pass (A = texts) owns dB."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < RA
    t = tl.load(t_ptr)
    bias = tl.load(b_ptr)
    w = tl.load(grad_ptr)
    dt_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, RB, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < RB
        s = _sims_tile(A, Bm, rows, cols, RA, RB, D, stride_a, stride_b, BLOCK_M, BLOCK_N, BLOCK_D, EMULATE_BF16)
        z = t * s + bias
        e = tl.exp(-tl.abs(z))  # sigmoid without overflow: exp of a non-positive number only
        g = tl.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
        if POSITIVES:
            g = g - tl.where(cols[None, :] == rows[:, None], 1.0, 0.0)
        g = tl.where(row_ok[:, None] & col_ok[None, :], w * g, 0.0)
        if COMPUTE_DTB:
            dt_acc += tl.sum(g * s, axis=1)
            db_acc += tl.sum(g, axis=1)
        ds = _round_to_operand(g * t, A.dtype.element_ty, EMULATE_BF16)
        _accumulate_grads(ds, A, Bm, dA, dB, rows, cols, RA, RB, D, stride_a, stride_b, COMPUTE_DA, ATOMIC_DB,
                          BLOCK_D, EMULATE_BF16)
    if COMPUTE_DTB:
        tl.store(dt_ptr + pid, tl.sum(dt_acc, axis=0))
        tl.store(db_ptr + pid, tl.sum(db_acc, axis=0))


_INTERPRETED = isinstance(_siglip_fwd_kernel, InterpretedFunction)


def _launch_bwd(A, Bm, t, b, grad, positives, dA, dB, dt, db, tiles: _Tiles):
    """One backward sweep over A's row blocks (see _siglip_bwd_kernel); dA / dB / dt, db may be None (skipped)."""
    RA, D = A.shape
    dummy = grad
    _siglip_bwd_kernel[(triton.cdiv(RA, tiles.block_m),)](
        A, Bm, t, b, grad, dummy if dA is None else dA, dummy if dB is None else dB,
        dummy if dt is None else dt, dummy if db is None else db, RA, Bm.shape[0], D, A.stride(0), Bm.stride(0),
        POSITIVES=positives, COMPUTE_DA=dA is not None, ATOMIC_DB=dB is not None, COMPUTE_DTB=dt is not None,
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_D=tiles.block_d,
        EMULATE_BF16=_INTERPRETED and A.dtype == torch.bfloat16, num_warps=tiles.num_warps)


class _SiglipBlock(torch.autograd.Function):
    """One [B, M] block: forward keeps only the inputs, backward recomputes every tile."""

    @staticmethod
    def forward(ctx, img_BD, txt_MD, t, b, positives: bool, tiles: _Tiles):
        t_val, b_val = t.detach(), b.detach()
        B, D = img_BD.shape
        partial = torch.empty(triton.cdiv(B, tiles.block_m), dtype=torch.float32, device=img_BD.device)
        _siglip_fwd_kernel[(partial.numel(),)](
            img_BD, txt_MD, t_val, b_val, partial, B, txt_MD.shape[0], D, img_BD.stride(0), txt_MD.stride(0),
            POSITIVES=positives, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_D=tiles.block_d,
            EMULATE_BF16=_INTERPRETED and img_BD.dtype == torch.bfloat16, num_warps=tiles.num_warps)
        ctx.save_for_backward(img_BD, txt_MD, t_val, b_val)
        ctx.positives, ctx.tiles = positives, tiles
        return partial.sum()

    @staticmethod
    def backward(ctx, grad):
        img, txt, t, b = ctx.saved_tensors
        need_img, need_txt, need_t, need_b = ctx.needs_input_grad[:4]
        tiles = ctx.tiles
        grad = grad.reshape(1).float()
        f32 = dict(dtype=torch.float32, device=img.device)
        d_img = torch.zeros(img.shape, **f32) if need_img else None
        d_txt = torch.zeros(txt.shape, **f32) if need_txt else None
        num_blocks = triton.cdiv(img.shape[0], tiles.block_m)
        need_tb = need_t or need_b
        dt = torch.empty(num_blocks, **f32) if need_tb else None
        db = torch.empty(num_blocks, **f32) if need_tb else None
        atomic = not tiles.deterministic
        if need_img or need_tb or (need_txt and atomic):
            _launch_bwd(img, txt, t, b, grad, ctx.positives, d_img, d_txt if atomic else None, dt, db, tiles)
        if need_txt and not atomic:  # rows = texts: the block's transpose, same diagonal
            _launch_bwd(txt, img, t, b, grad, ctx.positives, d_txt, None, None, None, tiles)
        return (None if d_img is None else d_img.to(img.dtype), None if d_txt is None else d_txt.to(txt.dtype),
                dt.sum() if need_t else None, db.sum() if need_b else None, None, None)


def siglip_block_triton(img_BD, txt_MD, logit_scale, logit_bias, positives: bool, *, block_m: int = 64,
                        block_n: int = 64, block_d: int = 64, deterministic: bool = True,
                        num_warps: int = 4) -> torch.Tensor:
    """SigLIP loss of one [B, M] block (Zhai et al. 2023), the value and gradients of `_siglip_block_ref`.

        loss = -sum_ij log sigmoid(label_ij * (t * x_i . y_j + b)),  label_ij = +1 iff positives and i == j, else -1,
    an fp32 scalar (not divided by B). img_BD: [B, D], txt_MD: [M, D] (M = B when positives); logit_scale t and
    logit_bias b: python numbers or one-element tensors (which receive their gradients). block_* / deterministic:
    as in fastenc.kernels.contrastive.clip_rows_triton (tiles computed 3 times per step, or 2 with atomics).
    """
    op = "siglip_block_triton"
    if (img_BD.dim() != 2 or txt_MD.dim() != 2 or img_BD.shape[1] != txt_MD.shape[1] or img_BD.shape[0] == 0
            or txt_MD.shape[0] == 0):
        raise ValueError(f"{op}: expected [B, D] and [M, D] features, got {tuple(img_BD.shape)}, "
                         f"{tuple(txt_MD.shape)}")
    img, txt = row_major(op, "img_BD", img_BD), row_major(op, "txt_MD", txt_MD)
    if img.dtype != txt.dtype:
        raise ValueError(f"{op}: features must share a dtype, got {img.dtype}, {txt.dtype}")
    if positives and txt.shape[0] != img.shape[0]:
        raise ValueError(f"{op}: a block with positives must be square, got {img.shape[0]} x {txt.shape[0]}")
    check_device(op, _INTERPRETED, img, txt)
    B, M, D = img.shape[0], txt.shape[0], img.shape[1]
    rows = max(B, M)  # the swapped backward pass has M rows
    tiles = _Tiles(block_m=tile_size(op, "block_m", block_m, rows), block_n=tile_size(op, "block_n", block_n, rows),
                   block_d=tile_size(op, "block_d", block_d, D), deterministic=deterministic, num_warps=num_warps)
    t = as_scalar(logit_scale, img.device).to(img.device)
    b = as_scalar(logit_bias, img.device).to(img.device)
    return _SiglipBlock.apply(img, txt, t, b, bool(positives), tiles)
