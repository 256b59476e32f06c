"""CPU fast paths of the CLIP, SigLIP and DINO losses: the C++/OpenMP extension fastenc._C (csrc/losses.cpp).

`impl="native"` of clip_loss, siglip_loss and dino_loss. Same values and gradients as the references
(`_clip_rows_ref`, `_siglip_block_ref`, `dino_loss_ref`), with tiled forward and backward passes that never hold a
B x N (or [crops, B, K]) tensor: tiles are recomputed in backward from the inputs and O(B) softmax statistics
(per row or column: the max and 1 / sum-exp, kept apart so that probabilities exp(z - max) / sum do not inherit the
rounding of a log-sum-exp near |z| = 100).

Shapes: B = local rows, N = all columns (N = B in one process), M = columns of a SigLIP block, D = feature dim,
R = rows per tile (`chunk`), C = student crops, G = global crops, K = prototypes.

CLIP (Radford et al. 2021), z = t * I T^T: loss = (CE(z, labels) + CE(z^T, labels)) / 2 over the B local rows.
  One process (the caller passes img_ND is img_BD, txt_ND is txt_BD, offset 0): shared tiles. Each [R, B] tile
  S = I_r T^T serves both softmaxes: its rows give the image->text log-sum-exps, and per-column running max /
  sum-exp over the tiles give the text->image ones. Backward recomputes each tile once and forms
  dS = t * w * (P_row + P_col - 2 [i == j]) in one fused pass, then dI_r = dS T and dT += dS^T I_r:
  4 B*B*D products per step, against 6 in open_clip's ClipLoss.
  Otherwise (distributed: B rows against N gathered columns, positives at offset + i): each direction on its own,
  as fastenc.losses.chunked does, with fused elementwise passes (2 + 6 B*N*D products).
SigLIP (Zhai et al. 2023): -sum_ij log sigmoid(l_ij (t x_i.y_j + b)) over one block; forward keeps only the
  inputs, backward recomputes each tile (1 + 3 products).
DINO (Caron et al. 2021): streamed per batch row over K; forward keeps only per-row softmax statistics, the cross
  terms use sum over pairs (i, v != i) of q_i.log p_v = (sum_i q_i).(sum_v log p_v) - sum_i q_i.log p_i.

Memory: one [R, N] tile in the features' dtype, R = max(1, TILE_BYTES // (4 N)) unless `chunk` is given, plus the
gradients and O(B + N) fp32 statistics. Numerics: matmuls in the features' dtype (fp32 or bf16); exp, log and all
sums in fp32 (loss totals in double); gradients returned in the input dtype. Results are deterministic: two calls
with the same inputs and thread count are bitwise equal.
"""

from __future__ import annotations

import torch

from fastenc.losses.dino import check_dino_inputs
from fastenc.utils.optional import MissingDependency

try:
    from fastenc import _C
except ImportError as _e:  # not built (no compiler, FASTENC_NO_NATIVE=1) or built against another torch
    _C = None
    _IMPORT_ERROR: ImportError | None = _e
else:
    _IMPORT_ERROR = None

# Rows per tile by default: the [R, N] tile (counted as fp32) stays within TILE_BYTES. 16 MiB: R = 256 at N = 16384,
# where one process's CLIP step (D = 512, fp32, 2 cores) measured 12-15 s with a 63 MiB peak against open_clip
# ClipLoss's 21-23 s and 4.2 GiB; R = 1024 (64 MiB) was 5-25% faster, as BLAS runs short products less efficiently.
TILE_BYTES = 16 * 2**20

_DTYPES = (torch.float32, torch.bfloat16)


def native_available() -> bool:
    """True if the extension fastenc._C is built and loads with this torch."""
    return _C is not None


def _require(feature: str):
    if _C is None:
        raise MissingDependency(
            f"{feature} needs fastenc's native extension fastenc._C, which is not built ({_IMPORT_ERROR}). Build it "
            "(needs a C++ compiler) with `python setup.py build_ext --inplace` (or `make setup`) in the repository "
            "root, without FASTENC_NO_NATIVE=1 set (that skips it); or "
            "pick impl='chunked'")
    return _C


def _rows_per_tile(chunk: int | None, num_cols: int, feature: str) -> int:
    if chunk is None:
        return max(1, TILE_BYTES // (4 * max(1, num_cols)))
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"{feature}: chunk must be an int >= 1, got {chunk!r}")
    return chunk


def _check_features(feature: str, **tensors: torch.Tensor) -> None:
    dtypes = set()
    for name, x in tensors.items():
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[0] == 0:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{feature}: {name} must be a non-empty 2-D tensor, got {shape}")
        if x.device.type != "cpu":
            raise ValueError(f"{feature}: runs on CPU tensors, {name} is on {x.device}; use impl='auto'")
        if x.dtype not in _DTYPES:
            raise ValueError(f"{feature}: {name} must be float32 or bfloat16, got {x.dtype}")
        dtypes.add(x.dtype)
    if len(dtypes) > 1:
        raise ValueError(f"{feature}: inputs must share a dtype, got {sorted(map(str, dtypes))}")
    widths = {x.shape[1] for x in tensors.values()}
    if len(widths) > 1:
        shapes = ", ".join(f"{n} {tuple(x.shape)}" for n, x in tensors.items())
        raise ValueError(f"{feature}: inputs must share the feature dim, got {shapes}")


def _scalar(value) -> torch.Tensor:
    """A 0-dim fp32 tensor; a tensor argument keeps its graph (so it receives its gradient)."""
    if isinstance(value, torch.Tensor):
        return value.reshape(()).float()
    return torch.tensor(float(value))


# ----- CLIP ---------------------------------------------------------------------------------------------------------


class _NativeClipShared(torch.autograd.Function):
    """One process: (CE(t I T^T, diag) + CE(t T I^T, diag)) / 2 with each tile shared by both directions."""

    @staticmethod
    def forward(ctx, img_BD, txt_BD, t, chunk: int):
        t_val = float(t)
        loss, row_stats_2B, col_stats_2B = _C.clip_shared_fwd(img_BD, txt_BD, t_val, chunk)
        ctx.save_for_backward(img_BD, txt_BD, row_stats_2B, col_stats_2B)
        ctx.t, ctx.chunk = t_val, chunk
        return loss

    @staticmethod
    def backward(ctx, grad):
        img_BD, txt_BD, row_stats_2B, col_stats_2B = ctx.saved_tensors
        need_img, need_txt, need_t = ctx.needs_input_grad[:3]
        d_img, d_txt, d_t = _C.clip_shared_bwd(img_BD, txt_BD, ctx.t, row_stats_2B, col_stats_2B, float(grad),
                                               ctx.chunk, need_img, need_txt)
        return d_img, d_txt, d_t if need_t else None, None


class _NativeClipRows(torch.autograd.Function):
    """B local rows against N columns, both directions separately; row i's positive is column offset + i."""

    @staticmethod
    def forward(ctx, img_BD, txt_BD, img_ND, txt_ND, t, offset: int, chunk: int):
        t_val = float(t)
        sum_i, stats_i_2B = _C.clip_rows_fwd(img_BD, txt_ND, t_val, offset, chunk)
        sum_t, stats_t_2B = _C.clip_rows_fwd(txt_BD, img_ND, t_val, offset, chunk)
        ctx.save_for_backward(img_BD, txt_BD, img_ND, txt_ND, stats_i_2B, stats_t_2B)
        ctx.t, ctx.offset, ctx.chunk = t_val, offset, chunk
        return (sum_i + sum_t) / (2 * img_BD.shape[0])

    @staticmethod
    def backward(ctx, grad):
        img_BD, txt_BD, img_ND, txt_ND, stats_i_2B, stats_t_2B = ctx.saved_tensors
        need = ctx.needs_input_grad
        w = float(grad) / (2 * img_BD.shape[0])
        d_img, d_txtN, dt_i = _C.clip_rows_bwd(img_BD, txt_ND, ctx.t, stats_i_2B, ctx.offset, w, ctx.chunk, need[0],
                                               need[3])
        d_txt, d_imgN, dt_t = _C.clip_rows_bwd(txt_BD, img_ND, ctx.t, stats_t_2B, ctx.offset, w, ctx.chunk, need[1],
                                               need[2])
        return d_img, d_txt, d_imgN, d_txtN, (dt_i + dt_t) if need[4] else None, None, None


def clip_rows_native(img_BD, txt_BD, img_ND, txt_ND, logit_scale, offset: int, *, chunk: int | None = None):
    """The `_clip_rows_ref` value and gradients (fastenc.losses.contrastive) on CPU, O(chunk * N) loss memory.

    Mean CE of the B local rows against all N columns in both directions, row i's positive at column offset + i;
    an fp32 scalar. Passing the same tensors as rows and columns (img_ND is img_BD, txt_ND is txt_BD, offset 0)
    selects the shared-tile path. chunk: rows per tile (default: a TILE_BYTES fp32 tile)."""
    _require("clip_loss(impl='native')")
    _check_features("clip_loss(impl='native')", img_BD=img_BD, txt_BD=txt_BD, img_ND=img_ND, txt_ND=txt_ND)
    B, N = img_BD.shape[0], img_ND.shape[0]
    if txt_BD.shape[0] != B or txt_ND.shape[0] != N or not 0 <= offset <= N - B:
        raise ValueError(f"clip_loss(impl='native'): need rows [B, D] x 2 and columns [N, D] x 2 with 0 <= offset <= "
                         f"N - B, got B = {B}/{txt_BD.shape[0]}, N = {N}/{txt_ND.shape[0]}, offset = {offset}")
    chunk = _rows_per_tile(chunk, N, "clip_loss(impl='native')")
    t = _scalar(logit_scale)
    if img_ND is img_BD and txt_ND is txt_BD and offset == 0:
        return _NativeClipShared.apply(img_BD, txt_BD, t, chunk)
    return _NativeClipRows.apply(img_BD, txt_BD, img_ND, txt_ND, t, offset, chunk)


# ----- SigLIP -------------------------------------------------------------------------------------------------------


class _NativeSiglipBlock(torch.autograd.Function):
    """-sum_ij log sigmoid(label_ij (t x_i.y_j + b)) over one [B, M] block; nothing but the inputs is saved."""

    @staticmethod
    def forward(ctx, img_BD, txt_MD, t, b, positives: bool, chunk: int):
        ctx.save_for_backward(img_BD, txt_MD)
        ctx.t, ctx.b, ctx.positives, ctx.chunk = float(t), float(b), positives, chunk
        return _C.siglip_fwd(img_BD, txt_MD, ctx.t, ctx.b, positives, chunk)

    @staticmethod
    def backward(ctx, grad):
        img_BD, txt_MD = ctx.saved_tensors
        need_img, need_txt, need_t, need_b = ctx.needs_input_grad[:4]
        d_img, d_txt, d_t, d_b = _C.siglip_bwd(img_BD, txt_MD, ctx.t, ctx.b, ctx.positives, float(grad), ctx.chunk,
                                               need_img, need_txt)
        return d_img, d_txt, d_t if need_t else None, d_b if need_b else None, None, None


def siglip_block_native(img_BD, txt_MD, logit_scale, logit_bias, positives: bool, *, chunk: int | None = None):
    """The `_siglip_block_ref` value and gradients (fastenc.losses.sigmoid) on CPU, O(chunk * M) loss memory.

    -sum_ij log sigmoid(label_ij * (t * x_i.y_j + b)), labels +1 on the diagonal iff `positives` (then the block
    must be square) else -1; an fp32 scalar, not divided by B. chunk: rows per tile (default: a TILE_BYTES tile)."""
    _require("siglip_loss(impl='native')")
    _check_features("siglip_loss(impl='native')", img_BD=img_BD, txt_MD=txt_MD)
    if positives and txt_MD.shape[0] != img_BD.shape[0]:
        raise ValueError(f"siglip block with positives must be square, got {img_BD.shape[0]} x {txt_MD.shape[0]}")
    chunk = _rows_per_tile(chunk, txt_MD.shape[0], "siglip_loss(impl='native')")
    return _NativeSiglipBlock.apply(img_BD, txt_MD, _scalar(logit_scale), _scalar(logit_bias), bool(positives),
                                    chunk)


# ----- DINO ---------------------------------------------------------------------------------------------------------


class _NativeDino(torch.autograd.Function):
    """DINO loss streamed per batch row; saves the inputs and per-row softmax statistics [2, C * B], [2, G * B]."""

    @staticmethod
    def forward(ctx, student_CBK, teacher_GBK, center_K, student_temp, teacher_temp, G, return_teacher_sum):
        loss, stats_s, stats_t, teacher_sum_1K = _C.dino_fwd(student_CBK, teacher_GBK, center_K, student_temp,
                                                             teacher_temp, G, return_teacher_sum)
        ctx.save_for_backward(student_CBK, teacher_GBK, center_K, stats_s, stats_t)
        ctx.args = (student_temp, teacher_temp, G)
        if teacher_sum_1K is None:
            return loss
        ctx.mark_non_differentiable(teacher_sum_1K)
        return loss, teacher_sum_1K

    @staticmethod
    def backward(ctx, grad, *_):
        student_CBK, teacher_GBK, center_K, stats_s, stats_t = ctx.saved_tensors
        student_temp, teacher_temp, G = ctx.args
        d_student = _C.dino_bwd(student_CBK, teacher_GBK, center_K, student_temp, teacher_temp, G, stats_s, stats_t,
                                float(grad))
        return d_student, None, None, None, None, None, None


def dino_loss_native(student_output, teacher_output, center, student_temp, teacher_temp, num_global_crops, *,
                     return_teacher_sum: bool = False):
    """The `dino_loss_ref` value and student gradient (fastenc.losses.dino) on CPU, with no [crops, B, K] tensor.

    student_output [C * B, K] and teacher_output [G * B, K] crop-major (the teacher gets no gradient), center
    [1, K] or [K]. Returns the fp32 loss, or (loss, teacher_sum [1, K]) with return_teacher_sum=True: the fp32 sum
    of teacher_output over its rows (what dino_center_update all-reduces), from the same pass over the teacher."""
    _require("dino_loss(impl='native')")
    check_dino_inputs(student_output, teacher_output, center, num_global_crops)
    if student_output.dtype != teacher_output.dtype:
        # A bf16 student beside the fp32 teacher (DINO under engine.precision=bf16): the kernel computes in fp32
        # either way, and autograd casts the student's gradient back to bf16.
        student_output, teacher_output = student_output.float(), teacher_output.float()
    _check_features("dino_loss(impl='native')", student_output=student_output, teacher_output=teacher_output)
    if center.device.type != "cpu":
        raise ValueError(f"dino_loss(impl='native'): runs on CPU tensors, center is on {center.device}")
    return _NativeDino.apply(student_output.contiguous(), teacher_output.detach().contiguous(),
                             center.detach().float().reshape(-1).contiguous(), float(student_temp),
                             float(teacher_temp), int(num_global_crops), bool(return_teacher_sum))
