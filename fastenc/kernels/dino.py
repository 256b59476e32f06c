"""Fused Triton DINO (v1) loss (Caron et al. 2021): the `dino_loss_ref` value and student gradient, streamed over K.

    q_ib = softmax((teacher_ib - center) / teacher_temp),  log p_vb = log_softmax(student_vb / student_temp),
    loss = -1 / (B * n_terms) * sum_b sum_{i < G, v < C, v != i} q_ib . log p_vb,  n_terms = G * C - G.

Legend: C = student crops (global + local), G = global (teacher) crops, B = batch rows, K = prototypes (65536 in
the paper); outputs are crop-major ([C * B, K]: row v * B + b is crop v of sample b); CP = C padded to a power of
two; BK = the K block.

One program per batch row b holds all crops of that row as [CP, BK] tiles (teacher rows >= G masked to zero) and
streams over K, so no [crops x B x K] probability tensor is ever formed and K = 65536 costs only more loop steps:
  forward pass 1: online (max, sum exp) over K for the G teacher softmaxes and the C student log-softmaxes (and, if
                  asked, the teacher batch sum for the center: fp32 atomic adds of the G rows of b into [K]);
  forward pass 2: with the final LSEs, the pair sum factored as (sum_i q_i) . (sum_v log p_v) - sum_i q_i . log p_i;
                  one fp32 partial per row, summed in a fixed order.
  backward (one pass, from the saved max and log sum exp(x - max) per crop row: 2 * B * (C + G) floats):
      d student_vb = -dL_out (sum_{i != v} q_ib - n_v p_vb) / (student_temp * B * n_terms),  n_v = #{i < G: i != v}.
The student is read 3 times and the teacher 3 times per step; every softmax is in fp32 (inputs upcast on load).
The teacher sum's summation order over batch rows follows the atomics (ulp-level run-to-run differences on GPU).
Parallelism is B programs: at small per-GPU batches a GPU is underfilled (splitting K across programs would need a
cross-program LSE combine; not done). bf16 gradients are rounded once, as autograd rounds the reference's; under the
Triton interpreter that rounding is done on the fp32 bits (see fastenc/kernels/contrastive.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from fastenc.kernels import check_device, row_major, tile_size
from fastenc.kernels.contrastive import _round_to_operand
from fastenc.losses.dino import check_dino_inputs, dino_loss_ref

__all__ = ["dino_loss_triton", "dino_loss_ref"]


@triton.jit
def _load_crops(base, rows, rows_ok, stride, kk, k_ok):
    """fp32 [CP, BK] tile of crop rows `rows` (masked: 0), columns kk; out-of-range k stays 0 here too."""
    ptrs = base + rows.to(tl.int64)[:, None] * stride + kk[None, :]
    return tl.load(ptrs, mask=rows_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)


@triton.jit
def _online_lse(m, l, x):
    """One step of a running (max, sum exp) over the last axis of x [CP, BK] (-inf where masked)."""
    m_new = tl.maximum(m, tl.max(x, axis=1))
    l = l * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), axis=1)
    return m_new, l


@triton.jit
def _dino_fwd_kernel(S, T, center_ptr, stats_s_ptr, stats_t_ptr, partial_ptr, tsum_ptr,
                     B, K, C, G, stride_s, stride_t, student_temp, teacher_temp,
                     C_PAD: tl.constexpr, RETURN_TSUM: tl.constexpr, BLOCK_K: tl.constexpr):
    b = tl.program_id(0)
    v = tl.arange(0, C_PAD)
    s_ok = v < C
    t_ok = v < G
    rows = v * B + b
    # Pass 1: LSEs. Padded crop rows read zeros (finite), so the running max is finite after the first block.
    m_s = tl.full((C_PAD,), float("-inf"), dtype=tl.float32)
    l_s = tl.zeros((C_PAD,), dtype=tl.float32)
    m_t = tl.full((C_PAD,), float("-inf"), dtype=tl.float32)
    l_t = tl.zeros((C_PAD,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < K
        x = _load_crops(S, rows, s_ok, stride_s, kk, k_ok) / student_temp
        m_s, l_s = _online_lse(m_s, l_s, tl.where(k_ok[None, :], x, float("-inf")))
        t_raw = _load_crops(T, rows, t_ok, stride_t, kk, k_ok)
        c = tl.load(center_ptr + kk, mask=k_ok, other=0.0)
        y = (t_raw - c[None, :]) / teacher_temp
        m_t, l_t = _online_lse(m_t, l_t, tl.where(k_ok[None, :], y, float("-inf")))
        if RETURN_TSUM:
            tl.atomic_add(tsum_ptr + kk, tl.sum(t_raw, axis=0), mask=k_ok, sem="relaxed")
    # Kept as (max, log sum) and applied as (x - max) - log sum: x - max is exact for the terms that matter, while
    # x - (max + log sum) would carry the rounding of a sum of size |max| (teacher logits reach ~100 at tau 0.04).
    log_l_s = tl.log(l_s)
    log_l_t = tl.log(l_t)
    # Pass 2: sum over pairs (i, v != i) of q_i . log p_v = (sum_i q_i) . (sum_v log p_v) - sum_{i<G} q_i . log p_i.
    acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < K
        x = _load_crops(S, rows, s_ok, stride_s, kk, k_ok) / student_temp
        logp = tl.where(s_ok[:, None] & k_ok[None, :], (x - m_s[:, None]) - log_l_s[:, None], 0.0)
        c = tl.load(center_ptr + kk, mask=k_ok, other=0.0)
        y = (_load_crops(T, rows, t_ok, stride_t, kk, k_ok) - c[None, :]) / teacher_temp
        q = tl.where(t_ok[:, None] & k_ok[None, :], tl.exp((y - m_t[:, None]) - log_l_t[:, None]), 0.0)
        acc += tl.sum(q, axis=0) * tl.sum(logp, axis=0) - tl.sum(q * logp, axis=0)
    tl.store(partial_ptr + b, tl.sum(acc, axis=0))
    tl.store(stats_s_ptr + b * C + v, m_s, mask=s_ok)
    tl.store(stats_s_ptr + (B + b) * C + v, log_l_s, mask=s_ok)
    tl.store(stats_t_ptr + b * G + v, m_t, mask=t_ok)
    tl.store(stats_t_ptr + (B + b) * G + v, log_l_t, mask=t_ok)


@triton.jit
def _dino_bwd_kernel(S, T, center_ptr, stats_s_ptr, stats_t_ptr, grad_ptr, dS,
                     B, K, C, G, stride_s, stride_t, student_temp, teacher_temp, scale,
                     C_PAD: tl.constexpr, BLOCK_K: tl.constexpr, EMULATE_BF16: tl.constexpr):
    b = tl.program_id(0)
    v = tl.arange(0, C_PAD)
    s_ok = v < C
    t_ok = v < G
    rows = v * B + b
    w = tl.load(grad_ptr) * scale
    m_s = tl.load(stats_s_ptr + b * C + v, mask=s_ok, other=0.0)
    log_l_s = tl.load(stats_s_ptr + (B + b) * C + v, mask=s_ok, other=0.0)
    m_t = tl.load(stats_t_ptr + b * G + v, mask=t_ok, other=0.0)
    log_l_t = tl.load(stats_t_ptr + (B + b) * G + v, mask=t_ok, other=0.0)
    n_v = G - tl.where(t_ok, 1.0, 0.0)  # teacher views i != v
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < K
        ok = s_ok[:, None] & k_ok[None, :]
        x = _load_crops(S, rows, s_ok, stride_s, kk, k_ok) / student_temp
        p = tl.where(ok, tl.exp((x - m_s[:, None]) - log_l_s[:, None]), 0.0)
        c = tl.load(center_ptr + kk, mask=k_ok, other=0.0)
        y = (_load_crops(T, rows, t_ok, stride_t, kk, k_ok) - c[None, :]) / teacher_temp
        q = tl.where(t_ok[:, None] & k_ok[None, :], tl.exp((y - m_t[:, None]) - log_l_t[:, None]), 0.0)
        d = w * ((tl.sum(q, axis=0)[None, :] - q) - n_v[:, None] * p)
        d = _round_to_operand(d, dS.dtype.element_ty, EMULATE_BF16)
        tl.store(dS + rows.to(tl.int64)[:, None] * K + kk[None, :], d.to(dS.dtype.element_ty), mask=ok)


_INTERPRETED = isinstance(_dino_fwd_kernel, InterpretedFunction)


class _DinoLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, center_K, student_temp, teacher_temp, G, return_tsum, cfg):
        K = teacher.shape[1]
        B = teacher.shape[0] // G
        C = student.shape[0] // B
        c_pad, block_k, num_warps = cfg
        f32 = dict(dtype=torch.float32, device=student.device)
        # Per (row, crop): running max and log sum exp, [2, B, C] and [2, B, G]: all that backward needs.
        stats_s, stats_t, partial = torch.empty(2 * B * C, **f32), torch.empty(2 * B * G, **f32), torch.empty(B, **f32)
        tsum = torch.zeros(1 if return_tsum else 0, K, **f32)
        _dino_fwd_kernel[(B,)](student, teacher, center_K, stats_s, stats_t, partial, tsum if return_tsum else partial,
                               B, K, C, G, student.stride(0), teacher.stride(0), float(student_temp),
                               float(teacher_temp), C_PAD=c_pad, RETURN_TSUM=return_tsum, BLOCK_K=block_k,
                               num_warps=num_warps)
        ctx.save_for_backward(student, teacher, center_K, stats_s, stats_t)
        ctx.meta = (B, K, C, G, float(student_temp), float(teacher_temp), cfg)
        ctx.mark_non_differentiable(tsum)
        return -partial.sum() / (B * (G * C - G)), tsum

    @staticmethod
    def backward(ctx, grad, _grad_tsum):
        student, teacher, center_K, stats_s, stats_t = ctx.saved_tensors
        B, K, C, G, student_temp, teacher_temp, (c_pad, block_k, num_warps) = ctx.meta
        d_student = torch.empty((C * B, K), dtype=student.dtype, device=student.device)
        scale = -1.0 / (student_temp * B * (G * C - G))
        _dino_bwd_kernel[(B,)](student, teacher, center_K, stats_s, stats_t, grad.reshape(1).float(), d_student,
                               B, K, C, G, student.stride(0), teacher.stride(0), student_temp, teacher_temp, scale,
                               C_PAD=c_pad, BLOCK_K=block_k,
                               EMULATE_BF16=_INTERPRETED and student.dtype == torch.bfloat16, num_warps=num_warps)
        return d_student, None, None, None, None, None, None, None


def dino_loss_triton(student_output, teacher_output, center, student_temp: float = 0.1, teacher_temp: float = 0.04,
                     num_global_crops: int = 2, *, return_teacher_sum: bool = False, block_k: int | None = None,
                     num_warps: int = 4):
    """DINO loss (Caron et al. 2021), the value and student gradient of `dino_loss_ref`, as fused Triton kernels.

    student_output [C * B, K] and teacher_output [G * B, K] crop-major (G = num_global_crops), center [1, K] or [K];
    the teacher side gets no gradient. Returns the fp32 loss, or (loss, teacher_sum_1K) with return_teacher_sum:
    the fp32 sum of teacher_output over its G * B rows, [1, K] (what the center update all-reduces), computed in
    the same pass. block_k: K block (power of two >= 16; default keeps a [C, block_k] tile near 4096 floats).
    """
    op = "dino_loss_triton"
    C, B, K = check_dino_inputs(student_output, teacher_output, center, num_global_crops)
    G = num_global_crops
    student = row_major(op, "student_output", student_output)
    teacher = row_major(op, "teacher_output", teacher_output.detach())
    check_device(op, _INTERPRETED, student, teacher)
    center_K = center.detach().reshape(-1).float().contiguous().to(student.device)
    c_pad = triton.next_power_of_2(C)
    if block_k is None:
        block_k = max(16, 4096 // c_pad)
    block_k = tile_size(op, "block_k", block_k, K)
    loss, tsum = _DinoLoss.apply(student, teacher, center_K, student_temp, teacher_temp, G, return_teacher_sum,
                                 (c_pad, block_k, num_warps))
    return (loss, tsum) if return_teacher_sum else loss
