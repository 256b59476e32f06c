"""Fused Triton CLIP loss rows (Radford et al. 2021): the `_clip_rows_ref` contract without any B x N tensor.

    loss = (CE(t * I T_N^T, labels) + CE(t * T I_N^T, labels)) / 2,  labels_i = offset + i,  CE = mean over B rows,

with I, T the [B, D] local image / text features, I_N, T_N the [N, D] columns (all ranks' features when
distributed) and t the (exponentiated) logit scale.

Legend: B = local rows, N = columns (N = B in one process), D = feature dim; BM / BN / BD = tile sizes along rows,
columns and features; MB = ceil(B / BM) row blocks. A "tile" is one [BM, BN] block of logits z = t * x_i . y_j.

Two paths, chosen by the caller's arguments:

* Shared tile (one process: img_ND is img_BD, txt_ND is txt_BD, offset 0). S = t * I T^T serves both softmaxes:
  the image->text CE is the row softmax of S, the text->image CE its column softmax. Forward computes each tile
  once: `_clip_fwd_kernel` (one program per row block) keeps an online row log-sum-exp and writes the tile's
  column (max, sum exp) over its BM rows into two [MB, N] fp32 buffers; `_lse_combine_kernel` folds the MB
  partials into the column log-sum-exp. Backward recomputes tiles with
      dL/dz_ij = w * (P_row_ij + P_col_ij - 2 [i == j]),  w = dL_out / (2B),
  and dI = t dZ T (a reduction along columns), dT = t dZ^T I (along rows), dt = sum(dZ * I T^T).
  - deterministic=True (default): two passes. Pass 1, one program per row block, sweeps the column blocks and owns
    dI (and writes a per-program dt partial); pass 2 is the same kernel with the roles swapped (rows = text,
    columns = images, row/column LSE swapped), owning dT. Fixed summation order: bitwise reproducible.
  - deterministic=False: one pass; dT is accumulated with fp32 atomic adds of each tile's [BN, D] contribution,
    (B / BM) * N * D atomic adds in all. Saves one tile recompute (2 B N D flops) for that atomic traffic; which
    wins has not been measured on a GPU yet. Summation order of dT varies run to run at the ulp level.
  Tile logits computed per training step: forward 1, backward 2 (deterministic) or 1 (atomics), i.e. 3 or 2 in all;
  B x N x D products in all: 1 + (2 + 2) = 5 or 1 + (1 + 2) = 4.
  Inf-CL (Yu et al. 2024) runs the two softmax directions as separate passes, each tiled with an online LSE and
  recomputed in backward: forward 2, backward 2 tile computations (4 in all), plus 2 gradient products per
  direction: 8 B x N x D products. fastenc.losses.chunked does the same as Inf-CL.

* General (distributed, or different tensors): the two directions run separately, like Inf-CL: per direction one
  forward pass (online row LSE; 1 computation per tile) and a backward of 1 (atomics) or 2 (deterministic) tile
  recomputations, with the column-side gradient from atomics or from a swapped second pass as above.

Numerics: similarities are tl.dot in the features' dtype (bf16 allowed) with fp32 accumulation; scale, LSE and
softmax in fp32. dL/ds is rounded to the features' dtype before the gradient matmuls (what autograd does through the
reference's `.float()`), which accumulate in fp32 buffers; the gradients are cast to the features' dtype once at the
end. Memory: the features and their fp32 gradient buffers O((B + N) * D), O(B + N) row / column statistics (the only
tensors saved for backward besides the inputs), and the [MB, N] column partials of the shared-tile forward.

Triton interpreter (TRITON_INTERPRET=1, CPU tensors; checked with triton 3.8.0): it stores bf16 as raw uint16, so
tl.dot on bf16 operands multiplies the bit patterns as integers (garbage), fp32 -> bf16 casts truncate, and the
fp_downcast_rounding="rtne" cast disagrees with torch's rounding on about half of random values. Under the
interpreter bf16 operands are therefore upcast to fp32 after loading (exact; bf16 x bf16 products are exact in fp32,
so the fp32-accumulated dot forms the same products the GPU's bf16 MMA accumulates in fp32, up to summation order)
and dL/ds is rounded to bf16 precision by integer round-to-nearest-even on its bits, kept in fp32 storage
(EMULATE_BF16). Compiled kernels use real bf16 loads, tl.dot and casts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from fastenc.kernels import as_scalar, check_device, row_major, tile_size
from fastenc.losses.contrastive import _clip_rows_ref as clip_rows_ref

__all__ = ["clip_rows_triton", "clip_rows_ref"]


# ----------------------------------------------------------------------------------------------------------------
# Tile helpers shared with fastenc/kernels/sigmoid.py
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _load_rows(base, rows, num_rows, stride, d0, D, BLOCK_D: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """[len(rows), BLOCK_D] block [rows, d0:d0 + BLOCK_D] of a [num_rows, D] matrix with unit column stride;
    out-of-range rows / features read as 0, so they add nothing to a dot product."""
    dd = d0 + tl.arange(0, BLOCK_D)
    ptrs = base + rows.to(tl.int64)[:, None] * stride + dd[None, :]
    x = tl.load(ptrs, mask=(rows[:, None] < num_rows) & (dd[None, :] < D), other=0.0)
    if EMULATE_BF16:
        x = x.to(tl.float32)  # exact; see the module docstring
    return x


@triton.jit
def _sims_tile(A, Bm, rows, cols, RA, RB, D, stride_a, stride_b,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """fp32 [BLOCK_M, BLOCK_N] similarities a_rows . b_cols: tl.dot in the input dtype, fp32 accumulation over D."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        a = _load_rows(A, rows, RA, stride_a, d0, D, BLOCK_D, EMULATE_BF16)
        b = _load_rows(Bm, cols, RB, stride_b, d0, D, BLOCK_D, EMULATE_BF16)
        acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")  # ieee: no tf32 for fp32 features
    return acc


@triton.jit
def _round_to_operand(x, dtype: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """fp32 x rounded to the matmul operand dtype (autograd's cast of dL/ds before the gradient matmuls)."""
    if EMULATE_BF16:
        # Round to nearest even at bf16 precision on the fp32 bits (finite values), keep fp32 storage.
        u = x.to(tl.uint32, bitcast=True)
        u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
        y = u.to(tl.float32, bitcast=True)
    else:
        y = x.to(dtype)
    return y


@triton.jit
def _accumulate_grads(ds, A, Bm, dA, dB, rows, cols, RA, RB, D, stride_a, stride_b,
                      COMPUTE_DA: tl.constexpr, ATOMIC_DB: tl.constexpr,
                      BLOCK_D: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """dA[rows] += ds @ B[cols] (rows owned by this program) and, if ATOMIC_DB, dB[cols] += ds^T @ A[rows] with
    fp32 atomics; dA, dB are contiguous fp32 [R, D] buffers. D is swept in BLOCK_D slices so registers hold one
    [BM, BD] / [BN, BD] slice, not a whole [BM, D] row block (CLIP heads have D = 512..1152); the price is a
    read-modify-write of the program's own dA rows per tile, which stay in L2 across its column sweep."""
    row_ok = rows < RA
    col_ok = cols < RB
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_ok = dd < D
        if COMPUTE_DA:
            b = _load_rows(Bm, cols, RB, stride_b, d0, D, BLOCK_D, EMULATE_BF16)
            ptrs = dA + rows.to(tl.int64)[:, None] * D + dd[None, :]
            mask = row_ok[:, None] & d_ok[None, :]
            cur = tl.load(ptrs, mask=mask, other=0.0)
            tl.store(ptrs, cur + tl.dot(ds, b, input_precision="ieee"), mask=mask)
        if ATOMIC_DB:
            a = _load_rows(A, rows, RA, stride_a, d0, D, BLOCK_D, EMULATE_BF16)
            ptrs = dB + cols.to(tl.int64)[:, None] * D + dd[None, :]
            contrib = tl.dot(tl.trans(ds), a, input_precision="ieee")
            tl.atomic_add(ptrs, contrib, mask=col_ok[:, None] & d_ok[None, :], sem="relaxed")


# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _clip_fwd_kernel(A, Bm, t_ptr, stats_ptr, pos_ptr, colmax_ptr, colsum_ptr,
                     RA, RB, D, stride_a, stride_b, offset,
                     COL_STATS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     EMULATE_BF16: tl.constexpr):
    """One program per block of BM rows of A, sweeping all RB columns of Bm: z = t * a_i . b_j.

    Writes the row statistics stats[0, i] = max_j z_ij, stats[1, i] = log sum_j exp(z_ij - max) (lse = their sum)
    and the positive logit pos[i] = z[i, offset + i]; with COL_STATS, also each tile's column max and sum exp over
    this program's rows into row `pid` of two [MB, RB] buffers (the shared-tile path)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < RA
    t = tl.load(t_ptr)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    pos_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, RB, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < RB
        z = t * _sims_tile(A, Bm, rows, cols, RA, RB, D, stride_a, stride_b, BLOCK_M, BLOCK_N, BLOCK_D,
                           EMULATE_BF16)
        pos_i += tl.sum(tl.where(cols[None, :] == rows[:, None] + offset, z, 0.0), axis=1)
        # Every column block has a valid column and padded rows see zero features (z = 0), so the running max is
        # finite after the first block and exp(m_i - m_new) never meets -inf - -inf.
        z_r = tl.where(col_ok[None, :], z, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z_r, axis=1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(z_r - m_new[:, None]), axis=1)
        m_i = m_new
        if COL_STATS:
            z_c = tl.where(row_ok[:, None], z, float("-inf"))
            c_max = tl.max(z_c, axis=0)
            c_sum = tl.sum(tl.exp(z_c - c_max[None, :]), axis=0)
            tl.store(colmax_ptr + pid * RB + cols, c_max, mask=col_ok)
            tl.store(colsum_ptr + pid * RB + cols, c_sum, mask=col_ok)
    tl.store(stats_ptr + rows, m_i, mask=row_ok)
    tl.store(stats_ptr + RA + rows, tl.log(l_i), mask=row_ok)
    tl.store(pos_ptr + rows, pos_i, mask=row_ok)


@triton.jit
def _lse_combine_kernel(colmax_ptr, colsum_ptr, stats_ptr, num_blocks, RB, BLOCK: tl.constexpr):
    """Column statistics [2, RB] from the [MB, RB] partials: m_j = max_k m_kj, log sum_k s_kj exp(m_kj - m_j)."""
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < RB
    m = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK,), dtype=tl.float32)
    for k in range(0, num_blocks):
        c_max = tl.load(colmax_ptr + k * RB + cols, mask=ok, other=0.0)
        c_sum = tl.load(colsum_ptr + k * RB + cols, mask=ok, other=0.0)
        m_new = tl.maximum(m, c_max)
        s = s * tl.exp(m - m_new) + c_sum * tl.exp(c_max - m_new)
        m = m_new
    tl.store(stats_ptr + cols, m, mask=ok)
    tl.store(stats_ptr + RB + cols, tl.log(tl.where(ok, s, 1.0)), mask=ok)  # padded columns: s = 0


@triton.jit
def _clip_bwd_kernel(A, Bm, t_ptr, grad_ptr, stats_a_ptr, stats_b_ptr, dA, dB, dt_ptr,
                     RA, RB, D, stride_a, stride_b, offset, weight,
                     HAS_LSE_A: tl.constexpr, HAS_LSE_B: tl.constexpr, NUM_POS: tl.constexpr,
                     COMPUTE_DA: tl.constexpr, ATOMIC_DB: tl.constexpr, COMPUTE_DT: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     EMULATE_BF16: tl.constexpr):
    """One program per block of BM rows of A, recomputing every tile z = t * a_i . b_j against Bm's columns.

    dL/dz_ij = w * (exp(z_ij - lse_a_i) [HAS_LSE_A] + exp(z_ij - lse_b_j) [HAS_LSE_B] - NUM_POS [j == i + offset])
    with w = dL_out * weight; stats_a / stats_b hold each LSE as [2, R] (max, log sum), applied as
    exp((z - max) - log sum): z - max is exact for the terms that matter, whereas z - lse would carry the rounding
    of a number of size |z| (up to t = 100), i.e. ~1e-5 relative error in every softmax entry.
    Accumulates dA += t dZ B (owned rows), optionally dB += t dZ^T A (atomics), and the program's share of
    dL/dt = sum dZ * (a_i . b_j) into dt_ptr[pid].
    The roles are symmetric: the swapped pass (A = columns, Bm = rows, LSEs swapped, offset negated) owns dB."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < RA
    t = tl.load(t_ptr)
    w = tl.load(grad_ptr) * weight
    if HAS_LSE_A:
        max_a = tl.load(stats_a_ptr + rows, mask=row_ok, other=0.0)
        log_sum_a = tl.load(stats_a_ptr + RA + rows, mask=row_ok, other=0.0)
    dt_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, RB, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < RB
        s = _sims_tile(A, Bm, rows, cols, RA, RB, D, stride_a, stride_b, BLOCK_M, BLOCK_N, BLOCK_D, EMULATE_BF16)
        z = t * s
        p = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        # A log-softmax is <= 0; the clamp only matters for padded entries (zero features, z = 0), which would sit
        # e^100 above the LSE when every logit of a row is near -100 (t = 100, anti-aligned features) and overflow:
        # clamped they stay finite and, with s = 0 there, add nothing to dt or to either gradient product.
        if HAS_LSE_A:
            p += tl.exp(tl.minimum((z - max_a[:, None]) - log_sum_a[:, None], 0.0))
        if HAS_LSE_B:
            max_b = tl.load(stats_b_ptr + cols, mask=col_ok, other=0.0)
            log_sum_b = tl.load(stats_b_ptr + RB + cols, mask=col_ok, other=0.0)
            p += tl.exp(tl.minimum((z - max_b[None, :]) - log_sum_b[None, :], 0.0))
        g = w * (p - tl.where(cols[None, :] == rows[:, None] + offset, NUM_POS, 0.0))
        if COMPUTE_DT:
            dt_acc += tl.sum(g * s, axis=1)
        ds = _round_to_operand(g * t, A.dtype.element_ty, EMULATE_BF16)
        _accumulate_grads(ds, A, Bm, dA, dB, rows, cols, RA, RB, D, stride_a, stride_b, COMPUTE_DA, ATOMIC_DB,
                          BLOCK_D, EMULATE_BF16)
    if COMPUTE_DT:
        tl.store(dt_ptr + pid, tl.sum(dt_acc, axis=0))


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------

_INTERPRETED = isinstance(_clip_fwd_kernel, InterpretedFunction)
_COMBINE_BLOCK = 256


@dataclass(frozen=True)
class _Tiles:
    block_m: int
    block_n: int
    block_d: int
    deterministic: bool
    num_warps: int


def _emulate_bf16(x: torch.Tensor) -> bool:
    return _INTERPRETED and x.dtype == torch.bfloat16


def _clip_fwd(A, Bm, t, offset, tiles: _Tiles, col_stats: bool):
    """(row stats [2, RA], pos [RA], column stats [2, RB] or None) of z = t * A Bm^T, one pass over the tiles.

    A stats tensor holds (max, log sum exp(z - max)) per row / column: lse = stats.sum(0)."""
    RA, D = A.shape
    RB = Bm.shape[0]
    f32 = dict(dtype=torch.float32, device=A.device)
    stats, pos = torch.empty(2, RA, **f32), torch.empty(RA, **f32)
    num_blocks = triton.cdiv(RA, tiles.block_m)
    if col_stats:
        colmax, colsum = torch.empty(num_blocks, RB, **f32), torch.empty(num_blocks, RB, **f32)
    else:
        colmax = colsum = stats  # unused (COL_STATS=False): any valid pointer
    _clip_fwd_kernel[(num_blocks,)](
        A, Bm, t, stats, pos, colmax, colsum, RA, RB, D, A.stride(0), Bm.stride(0), offset,
        COL_STATS=col_stats, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_D=tiles.block_d,
        EMULATE_BF16=_emulate_bf16(A), num_warps=tiles.num_warps)
    if not col_stats:
        return stats, pos, None
    col_stats = torch.empty(2, RB, **f32)
    _lse_combine_kernel[(triton.cdiv(RB, _COMBINE_BLOCK),)](colmax, colsum, col_stats, num_blocks, RB,
                                                             BLOCK=_COMBINE_BLOCK)
    return stats, pos, col_stats


def _clip_bwd(A, Bm, t, grad, stats_a, stats_b, offset, weight, num_pos, dA, dB, dt, tiles: _Tiles):
    """Launch one backward sweep over A's row blocks (see _clip_bwd_kernel); stats_a / stats_b (the row / column
    LSE statistics) and dA / dB / dt may be None (not used / not computed)."""
    RA, D = A.shape
    RB = Bm.shape[0]
    num_blocks = triton.cdiv(RA, tiles.block_m)
    dummy = stats_a if stats_a is not None else stats_b
    _clip_bwd_kernel[(num_blocks,)](
        A, Bm, t, grad, dummy if stats_a is None else stats_a, dummy if stats_b is None else stats_b,
        dummy if dA is None else dA, dummy if dB is None else dB, dummy if dt is None else dt,
        RA, RB, D, A.stride(0), Bm.stride(0), offset, weight,
        HAS_LSE_A=stats_a is not None, HAS_LSE_B=stats_b is not None, NUM_POS=float(num_pos),
        COMPUTE_DA=dA is not None, ATOMIC_DB=dB is not None, COMPUTE_DT=dt is not None,
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_D=tiles.block_d, EMULATE_BF16=_emulate_bf16(A),
        num_warps=tiles.num_warps)


def _grad_buffer(x, need):
    return torch.zeros(x.shape, dtype=torch.float32, device=x.device) if need else None


def _dt_buffer(A, tiles, need):
    return torch.zeros(triton.cdiv(A.shape[0], tiles.block_m), dtype=torch.float32, device=A.device) if need else None


def _feature_grad(buf, like):
    return None if buf is None else buf.to(like.dtype)


class _ClipSharedTile(torch.autograd.Function):
    """One process: (CE(S, diag) + CE(S^T, diag)) / 2 with S = t * I T^T, each tile shared by both softmaxes."""

    @staticmethod
    def forward(ctx, img_BD, txt_BD, t, tiles: _Tiles):
        t_val = t.detach()
        stats_row, pos, stats_col = _clip_fwd(img_BD, txt_BD, t_val, 0, tiles, col_stats=True)
        ctx.save_for_backward(img_BD, txt_BD, t_val, stats_row, stats_col)
        ctx.tiles = tiles
        # The text->image positive logit of row j is S_jj too, so both CE terms subtract the same pos.
        return ((stats_row.sum(0) - pos).sum() + (stats_col.sum(0) - pos).sum()) / (2 * img_BD.shape[0])

    @staticmethod
    def backward(ctx, grad):
        img, txt, t, stats_row, stats_col = ctx.saved_tensors
        need_img, need_txt, need_t = ctx.needs_input_grad[:3]
        tiles = ctx.tiles
        grad = grad.reshape(1).float()
        weight = 1.0 / (2 * img.shape[0])
        d_img, d_txt = _grad_buffer(img, need_img), _grad_buffer(txt, need_txt)
        dt = _dt_buffer(img, tiles, need_t)
        atomic = not tiles.deterministic
        if need_img or need_t or (need_txt and atomic):
            _clip_bwd(img, txt, t, grad, stats_row, stats_col, 0, weight, 2, d_img, d_txt if atomic else None, dt,
                      tiles)
        if need_txt and not atomic:  # rows = texts, columns = images: S^T, whose row LSE is S's column LSE
            _clip_bwd(txt, img, t, grad, stats_col, stats_row, 0, weight, 2, d_txt, None, None, tiles)
        return (_feature_grad(d_img, img), _feature_grad(d_txt, txt), dt.sum() if need_t else None, None)


class _ClipRows(torch.autograd.Function):
    """General path: each direction (image rows vs text columns, text rows vs image columns) on its own."""

    @staticmethod
    def forward(ctx, img_BD, txt_BD, img_ND, txt_ND, t, offset: int, tiles: _Tiles):
        t_val = t.detach()
        stats_i, pos_i, _ = _clip_fwd(img_BD, txt_ND, t_val, offset, tiles, col_stats=False)
        stats_t, pos_t, _ = _clip_fwd(txt_BD, img_ND, t_val, offset, tiles, col_stats=False)
        ctx.save_for_backward(img_BD, txt_BD, img_ND, txt_ND, t_val, stats_i, stats_t)
        ctx.offset, ctx.tiles = offset, tiles
        return ((stats_i.sum(0) - pos_i).mean() + (stats_t.sum(0) - pos_t).mean()) / 2

    @staticmethod
    def backward(ctx, grad):
        img_BD, txt_BD, img_ND, txt_ND, t, stats_i, stats_t = ctx.saved_tensors
        need = ctx.needs_input_grad
        tiles, offset = ctx.tiles, ctx.offset
        grad = grad.reshape(1).float()
        weight = 1.0 / (2 * img_BD.shape[0])
        bufs = [_grad_buffer(x, n) for x, n in zip((img_BD, txt_BD, img_ND, txt_ND), need[:4])]
        dts = []
        # Direction 1 (rows img_BD, columns txt_ND), direction 2 (rows txt_BD, columns img_ND).
        for rows, cols, stats, d_rows, d_cols in ((img_BD, txt_ND, stats_i, bufs[0], bufs[3]),
                                                  (txt_BD, img_ND, stats_t, bufs[1], bufs[2])):
            dt = _dt_buffer(rows, tiles, need[4])
            atomic = not tiles.deterministic
            if d_rows is not None or dt is not None or (d_cols is not None and atomic):
                _clip_bwd(rows, cols, t, grad, stats, None, offset, weight, 1, d_rows, d_cols if atomic else None,
                          dt, tiles)
            if d_cols is not None and not atomic:  # swapped: column j's positive row is j - offset
                _clip_bwd(cols, rows, t, grad, None, stats, -offset, weight, 1, d_cols, None, None, tiles)
            if dt is not None:
                dts.append(dt.sum())
        grads = [_feature_grad(b, x) for b, x in zip(bufs, (img_BD, txt_BD, img_ND, txt_ND))]
        return (*grads, (dts[0] + dts[1]) if need[4] else None, None, None)


def clip_rows_triton(img_BD, txt_BD, img_ND, txt_ND, logit_scale, offset: int, *, block_m: int = 64,
                     block_n: int = 64, block_d: int = 64, deterministic: bool = True,
                     num_warps: int = 4) -> torch.Tensor:
    """CLIP loss rows (Radford et al. 2021), the value and gradients of `_clip_rows_ref`, as fused Triton kernels.

        loss = (CE(t * I T_N^T, labels) + CE(t * T I_N^T, labels)) / 2,  labels = offset + arange(B),
    over the B local rows (img_BD, txt_BD: [B, D]) against N columns (img_ND, txt_ND: [N, D]); logit_scale t is a
    python number or a one-element tensor (which receives its gradient). Returns an fp32 scalar.
    Passing the same tensor objects as rows and columns (img_ND is img_BD, txt_ND is txt_BD, offset 0, as
    clip_loss does in one process) selects the shared-tile path: one tile feeds both softmaxes.
    block_m / block_n / block_d: tile sizes (powers of two >= 16, shrunk to the padded extents);
    deterministic: column-side gradients from a second swept pass (True) or from fp32 atomics (False);
    see the module docstring for the tile-recompute counts. No B x N tensor is ever formed.
    """
    op = "clip_rows_triton"
    named = (("img_BD", img_BD), ("txt_BD", txt_BD), ("img_ND", img_ND), ("txt_ND", txt_ND))
    shapes = [tuple(x.shape) for _, x in named]
    B, D = shapes[0] if len(shapes[0]) == 2 else (0, 0)
    N = shapes[2][0] if len(shapes[2]) == 2 else 0
    if B == 0 or N == 0 or shapes != [(B, D), (B, D), (N, D), (N, D)]:
        raise ValueError(f"{op}: expected rows [B, D] and columns [N, D] with B, N >= 1, got {shapes}")
    feats = [row_major(op, n, x) for n, x in named]
    shared = img_ND is img_BD and txt_ND is txt_BD and offset == 0
    if len({x.dtype for x in feats}) != 1:
        raise ValueError(f"{op}: features must share a dtype, got {[str(x.dtype) for x in feats]}")
    if not 0 <= offset <= N - B:
        raise ValueError(f"{op}: offset {offset} puts the B={B} positives outside the N={N} columns")
    check_device(op, _INTERPRETED, *feats)
    t = as_scalar(logit_scale, img_BD.device).to(img_BD.device)
    rows_tile = tile_size(op, "block_m", block_m, max(B, N) if not shared else B)
    tiles = _Tiles(block_m=rows_tile, block_n=tile_size(op, "block_n", block_n, max(B, N)),
                   block_d=tile_size(op, "block_d", block_d, D), deterministic=deterministic, num_warps=num_warps)
    if shared:
        return _ClipSharedTile.apply(feats[0], feats[1], t, tiles)
    return _ClipRows.apply(*feats, t, offset, tiles)
