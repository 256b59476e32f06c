"""Chunked losses in plain torch: no B x N tensor is kept for backward; tiles are recomputed there.

The always-available memory-lean path (`impl="chunked"`): a custom autograd Function processes R rows at a time,
keeps only O(B) row statistics between forward and backward, and recomputes each [R, N] tile of logits in backward.
Peak memory is O(R * N) for the tile plus O((B + N) * D) for the features and their gradients, instead of the
reference's O(B * N) logits, softmax and gradient tensors.

Shapes: B = local rows, N = all columns (N = B in one process; all ranks' rows when distributed), D = feature dim,
R = rows per chunk. Numerics follow the references: the similarity matmul runs in the features' dtype, its result
is upcast to fp32 before scaling, log-sum-exp and softmax; gradient matmuls run in the features' dtype on fp32
tile gradients cast down (what autograd does through the reference's `.float()`), with the column gradients
accumulated over chunks in fp32.

Tile work per step (CLIP, both directions): forward computes each direction's tiles once (2 B x N x D products);
backward recomputes them once (2 more) and spends 4 on the gradients. Both directions are separate passes here,
as in Inf-CL; sharing one tile between the row and the column softmax is the job of the fused kernels.
SigLIP has no row statistics: forward computes each tile once and keeps nothing but the inputs; backward recomputes
it once and spends 2 products on the gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastenc.losses.dispatch import as_scalar

# Default chunk: as many rows as fit one fp32 tile of TILE_BYTES[device type]. On CPU, 16 MiB keeps the few
# tile-sized temporaries of a step (logits, probabilities, gradient) far below the B x B logits at large B, while a
# [256, 16384] tile still gives BLAS a 4 GFLOP product per call. On a GPU every chunk costs several kernel launches
# from Python, so tiles are larger (512 MiB: 1024 rows at N = 131072), still a small fraction of its memory.
TILE_BYTES = {"cpu": 16 * 2**20, "cuda": 512 * 2**20}


def rows_per_chunk(chunk: int | None, row_bytes: int, loss: str, device: torch.device | None = None) -> int:
    """`chunk` if given (validated), else the number of rows of `row_bytes` each that fit one tile (at least 1)."""
    if chunk is None:
        budget = TILE_BYTES.get(device.type if device is not None else "cpu", TILE_BYTES["cpu"])
        return max(1, budget // max(1, row_bytes))
    if chunk < 1:
        raise ValueError(f"{loss}(impl='chunked'): chunk must be >= 1, got {chunk}")
    return chunk


def _row_lse(X_BD, Y_ND, t, offset, chunk):
    """Per row i: logsumexp_j(t * x_i.y_j) and the positive logit t * x_i.y_{offset+i}, fp32 [B] each."""
    B = X_BD.shape[0]
    lse, pos = torch.empty(B, device=X_BD.device), torch.empty(B, device=X_BD.device)
    for r0 in range(0, B, chunk):
        r1 = min(r0 + chunk, B)
        Z_RN = t * (X_BD[r0:r1] @ Y_ND.T).float()
        lse[r0:r1] = torch.logsumexp(Z_RN, dim=1)
        rows = torch.arange(r1 - r0, device=X_BD.device)
        pos[r0:r1] = Z_RN[rows, offset + r0 + rows]
    return lse, pos


def _row_backward(X_BD, Y_ND, t, lse_B, offset, chunk, w, need_x, need_y, need_t):
    """Gradients of w * sum_i (lse_i - z_i,pos) w.r.t. X [B, D], Y [N, D] and t, recomputing the tiles.

    dL/dz_ij = w * (softmax_ij - [j == offset + i]); z = t * s, so dX = t dZ Y, dY = t dZ^T X, dt = sum(dZ * s).
    """
    B = X_BD.shape[0]
    dX = torch.empty_like(X_BD) if need_x else None
    dY = torch.zeros(Y_ND.shape, dtype=torch.float32, device=Y_ND.device) if need_y else None
    dt = torch.zeros((), device=X_BD.device)
    for r0 in range(0, B, chunk):
        r1 = min(r0 + chunk, B)
        X_RD = X_BD[r0:r1]
        S_RN = (X_RD @ Y_ND.T).float()
        G_RN = torch.exp(t * S_RN - lse_B[r0:r1, None])
        rows = torch.arange(r1 - r0, device=X_BD.device)
        G_RN[rows, offset + r0 + rows] -= 1.0
        G_RN *= w  # dL/dz for this tile
        if need_t:
            dt += (G_RN * S_RN).sum()
        dS_RN = (G_RN * t).to(X_BD.dtype)  # dL/ds, cast as autograd casts it through the reference's .float()
        if need_x:
            dX[r0:r1] = dS_RN @ Y_ND
        if need_y:
            dY += (dS_RN.T @ X_RD).float()
    return dX, (dY.to(Y_ND.dtype) if need_y else None), dt


class _ChunkedClipRows(torch.autograd.Function):
    """(CE(t I T_all^T, labels) + CE(t T I_all^T, labels)) / 2 over B local rows, labels = offset + arange(B)."""

    @staticmethod
    def forward(ctx, img_BD, txt_BD, img_ND, txt_ND, t, offset: int, chunk: int):
        t_val = t.detach()
        lse_i, pos_i = _row_lse(img_BD, txt_ND, t_val, offset, chunk)
        lse_t, pos_t = _row_lse(txt_BD, img_ND, t_val, offset, chunk)
        ctx.save_for_backward(img_BD, txt_BD, img_ND, txt_ND, t_val, lse_i, lse_t)
        ctx.offset, ctx.chunk = offset, chunk
        return ((lse_i - pos_i).mean() + (lse_t - pos_t).mean()) / 2

    @staticmethod
    def backward(ctx, grad):
        img_BD, txt_BD, img_ND, txt_ND, t, lse_i, lse_t = ctx.saved_tensors
        need = ctx.needs_input_grad
        w = grad.float() / (2 * img_BD.shape[0])
        d_img, d_txtN, dt_i = _row_backward(img_BD, txt_ND, t, lse_i, ctx.offset, ctx.chunk, w, need[0], need[3],
                                            need[4])
        d_txt, d_imgN, dt_t = _row_backward(txt_BD, img_ND, t, lse_t, ctx.offset, ctx.chunk, w, need[1], need[2],
                                            need[4])
        return d_img, d_txt, d_imgN, d_txtN, (dt_i + dt_t) if need[4] else None, None, None


def clip_rows_chunked(img_BD, txt_BD, img_ND, txt_ND, logit_scale, offset: int, *, chunk: int | None = None):
    """The `_clip_rows_ref` value and gradients (fastenc.losses.contrastive), with O(chunk * N) loss memory.

    chunk: rows per tile (default: one TILE_BYTES fp32 tile)."""
    chunk = rows_per_chunk(chunk, 4 * txt_ND.shape[0], "clip_loss", img_BD.device)
    return _ChunkedClipRows.apply(img_BD, txt_BD, img_ND, txt_ND, as_scalar(logit_scale, img_BD.device), offset,
                                  chunk)


class _ChunkedSiglipBlock(torch.autograd.Function):
    """-sum_ij log sigmoid(label_ij * (t * x_i.y_j + b)) over one [B, B'] block, R rows at a time.

    No row statistics: every tile is independent. Forward keeps only the inputs; backward recomputes each tile's
    z and uses dL/dz_ij = sigmoid(z_ij) - [label_ij = +1].
    """

    @staticmethod
    def forward(ctx, X_BD, Y_MD, t, b, positives: bool, chunk: int):
        t_val, b_val = t.detach(), b.detach()
        total = torch.zeros((), device=X_BD.device)
        for r0 in range(0, X_BD.shape[0], chunk):
            r1 = min(r0 + chunk, X_BD.shape[0])
            Z_RM = t_val * (X_BD[r0:r1] @ Y_MD.T).float() + b_val
            total -= F.logsigmoid(-Z_RM).sum()
            if positives:  # label +1 on the diagonal: swap -log sigmoid(-z) for -log sigmoid(z) there
                rows = torch.arange(r1 - r0, device=X_BD.device)
                z = Z_RM[rows, r0 + rows]
                total += (F.logsigmoid(-z) - F.logsigmoid(z)).sum()
        ctx.save_for_backward(X_BD, Y_MD, t_val, b_val)
        ctx.positives, ctx.chunk = positives, chunk
        return total

    @staticmethod
    def backward(ctx, grad):
        X_BD, Y_MD, t, b = ctx.saved_tensors
        need_x, need_y, need_t, need_b = ctx.needs_input_grad[:4]
        dX = torch.empty_like(X_BD) if need_x else None
        dY = torch.zeros(Y_MD.shape, dtype=torch.float32, device=Y_MD.device) if need_y else None
        dt, db = torch.zeros((), device=X_BD.device), torch.zeros((), device=X_BD.device)
        g = grad.float()
        for r0 in range(0, X_BD.shape[0], ctx.chunk):
            r1 = min(r0 + ctx.chunk, X_BD.shape[0])
            X_RD = X_BD[r0:r1]
            S_RM = (X_RD @ Y_MD.T).float()
            G_RM = torch.sigmoid(t * S_RM + b)
            if ctx.positives:
                rows = torch.arange(r1 - r0, device=X_BD.device)
                G_RM[rows, r0 + rows] -= 1.0
            G_RM *= g  # dL/dz for this tile
            if need_t:
                dt += (G_RM * S_RM).sum()
            if need_b:
                db += G_RM.sum()
            dS_RM = (G_RM * t).to(X_BD.dtype)
            if need_x:
                dX[r0:r1] = dS_RM @ Y_MD
            if need_y:
                dY += (dS_RM.T @ X_RD).float()
        return (dX, dY.to(Y_MD.dtype) if need_y else None, dt if need_t else None, db if need_b else None,
                None, None)


def siglip_block_chunked(img_BD, txt_MD, logit_scale, logit_bias, positives: bool, *, chunk: int | None = None):
    """The `_siglip_block_ref` value and gradients (fastenc.losses.sigmoid), with O(chunk * M) loss memory.

    chunk: rows per tile (default: one TILE_BYTES fp32 tile)."""
    chunk = rows_per_chunk(chunk, 4 * txt_MD.shape[0], "siglip_loss", img_BD.device)
    if positives and txt_MD.shape[0] != img_BD.shape[0]:
        raise ValueError(f"siglip block with positives must be square, got {img_BD.shape[0]} x {txt_MD.shape[0]}")
    return _ChunkedSiglipBlock.apply(img_BD, txt_MD, as_scalar(logit_scale, img_BD.device),
                                     as_scalar(logit_bias, img_BD.device), positives, chunk)


class _ChunkedDino(torch.autograd.Function):
    """The DINO loss over R batch rows at a time: for each chunk, the teacher softmax [G, R, K] and the student
    log-softmax [C, R, K]; the full [G * B, K] / [C * B, K] probability tensors are never formed, and backward
    recomputes them per chunk. The gradient w.r.t. the student logits of crop v, row b:
        -(sum_{i != v} q_ib - n_v p_vb) / (student_temp * B * n_terms),  n_v = #teacher views i != v.
    """

    @staticmethod
    def forward(ctx, student_CBK, teacher_GBK, center_K, student_temp, teacher_temp, chunk):
        C, B, K = student_CBK.shape
        G = teacher_GBK.shape[0]
        total = torch.zeros((), device=student_CBK.device)
        for r0 in range(0, B, chunk):
            r1 = min(r0 + chunk, B)
            q = torch.softmax((teacher_GBK[:, r0:r1].float() - center_K) / teacher_temp, dim=-1)
            logp = torch.log_softmax(student_CBK[:, r0:r1].float() / student_temp, dim=-1)
            total += (q.sum(0) * logp.sum(0)).sum() - (q * logp[:G]).sum()
        ctx.save_for_backward(student_CBK, teacher_GBK, center_K)
        ctx.temps, ctx.chunk = (student_temp, teacher_temp), chunk
        return -total / (B * (G * C - G))

    @staticmethod
    def backward(ctx, grad):
        student_CBK, teacher_GBK, center_K = ctx.saved_tensors
        student_temp, teacher_temp = ctx.temps
        C, B, K = student_CBK.shape
        G = teacher_GBK.shape[0]
        scale = -grad.float() / (student_temp * B * (G * C - G))
        d_student = torch.empty_like(student_CBK)
        for r0 in range(0, B, ctx.chunk):
            r1 = min(r0 + ctx.chunk, B)
            q = torch.softmax((teacher_GBK[:, r0:r1].float() - center_K) / teacher_temp, dim=-1)
            p = torch.softmax(student_CBK[:, r0:r1].float() / student_temp, dim=-1)
            target = q.sum(0, keepdim=True).expand(C, -1, -1).clone()  # sum over teacher views i != v
            target[:G] -= q
            counts = torch.full((C, 1, 1), float(G), device=p.device)
            counts[:G] -= 1
            d_student[:, r0:r1] = ((target - counts * p) * scale).to(student_CBK.dtype)
        return d_student, None, None, None, None, None


def dino_loss_chunked(student_output, teacher_output, center, student_temp, teacher_temp, num_global_crops, *,
                      chunk: int | None = None):
    """The dino_loss value and student gradient (fastenc.losses.dino) with O(crops * chunk * K) loss memory.

    Inputs are already checked by dino_loss. chunk: batch rows per chunk, each holding (G + C) * K fp32 values of
    probabilities (default: as many as fit TILE_BYTES)."""
    K = teacher_output.shape[1]
    G = num_global_crops
    B = teacher_output.shape[0] // G
    C = student_output.shape[0] // B
    chunk = rows_per_chunk(chunk, 4 * (G + C) * K, "dino_loss", student_output.device)
    return _ChunkedDino.apply(student_output.view(C, B, K), teacher_output.detach().view(G, B, K),
                              center.detach().float().reshape(1, 1, K)[0], student_temp, teacher_temp, chunk)
