"""DINO (v1) self-distillation loss and center update, matching facebookresearch/dino's DINOLoss.

Shapes: C = number of student crops (global + local), G = number of global (teacher) crops, B = local batch,
K = prototypes (head output dim). Outputs are crop-major, as the reference concatenates its crops:
student_output [C * B, K] = [crop 0 rows; crop 1 rows; ...], teacher_output [G * B, K]; the first G student crops
are the same global views the teacher saw, in the same order.

Numerics: logits are upcast to fp32 before the softmaxes; the loss is an fp32 scalar.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastenc.losses.chunked import dino_loss_chunked
from fastenc.losses.dispatch import Impl, lazy, resolve_impl


def check_dino_inputs(student_output, teacher_output, center, num_global_crops: int) -> tuple[int, int, int]:
    """Validate shapes; return (C, B, K)."""
    for name, t in (("student_output", student_output), ("teacher_output", teacher_output)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[0] == 0:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"dino_loss: {name} must be a non-empty [crops * B, K] tensor, got {shape}")
    if num_global_crops < 1:
        raise ValueError(f"dino_loss: num_global_crops must be >= 1, got {num_global_crops}")
    GB, K = teacher_output.shape
    if GB % num_global_crops:
        raise ValueError(f"dino_loss: teacher_output has {GB} rows, not a multiple of num_global_crops="
                         f"{num_global_crops} (expected [num_global_crops * B, K])")
    B = GB // num_global_crops
    CB = student_output.shape[0]
    if student_output.shape[1] != K:
        raise ValueError(f"dino_loss: student_output has K={student_output.shape[1]} prototypes, teacher_output "
                         f"has K={K}: both heads must have the same out_dim")
    if CB % B or CB // B < num_global_crops:
        raise ValueError(f"dino_loss: student_output has {CB} rows; expected num_crops * B with B={B} (from "
                         f"teacher_output) and num_crops >= num_global_crops={num_global_crops}")
    C = CB // B
    if C < 2:
        raise ValueError("dino_loss: needs at least 2 student crops (a teacher view and another view to predict it)")
    if not isinstance(center, torch.Tensor) or tuple(center.shape) not in ((1, K), (K,)):
        shape = tuple(center.shape) if isinstance(center, torch.Tensor) else type(center).__name__
        raise ValueError(f"dino_loss: center must be [1, K] = [1, {K}], got {shape}")
    return C, B, K


def teacher_probs(teacher_output: torch.Tensor, center: torch.Tensor, teacher_temp: float) -> torch.Tensor:
    """softmax((t - c) / tau_t) in fp32, without gradient: the teacher's targets [G * B, K]."""
    with torch.no_grad():
        return F.softmax((teacher_output.float() - center.float().reshape(1, -1)) / teacher_temp, dim=-1)


def dino_loss_ref(student_output, teacher_output, center, student_temp: float = 0.1, teacher_temp: float = 0.04,
                  num_global_crops: int = 2) -> torch.Tensor:
    """The reference definition, written as facebookresearch/dino's DINOLoss.forward loops over the crop pairs."""
    C, B, K = check_dino_inputs(student_output, teacher_output, center, num_global_crops)
    student = (student_output.float() / student_temp).chunk(C)
    teacher = teacher_probs(teacher_output, center, teacher_temp).chunk(num_global_crops)
    total, n_terms = 0.0, 0
    for iq, q in enumerate(teacher):
        for v in range(C):
            if v == iq:
                continue  # skip the student view that is the teacher's own view
            total = total + torch.sum(-q * F.log_softmax(student[v], dim=-1), dim=-1).mean()
            n_terms += 1
    return total / n_terms


def _dino_loss_factored(student_output, teacher_output, center, student_temp, teacher_temp, num_global_crops):
    """Same value with one log_softmax per crop and no pair loop.

    sum over pairs (i, v != i) of q_i . log p_v = (sum_i q_i) . (sum_v log p_v) - sum_i q_i . log p_i,
    so the G x (C - 1) pair terms cost 2 [G*B, K] x [C*B, K] products instead of G * (C - 1).
    """
    G, (GB, K) = num_global_crops, teacher_output.shape  # inputs checked by dino_loss
    B = GB // G
    C = student_output.shape[0] // B
    logp_CBK = F.log_softmax(student_output.float().view(C, B, K) / student_temp, dim=-1)
    q_GBK = teacher_probs(teacher_output, center, teacher_temp).view(G, B, K)
    all_pairs = (q_GBK.sum(0) * logp_CBK.sum(0)).sum()
    same_view = (q_GBK * logp_CBK[:G]).sum()
    n_terms = G * C - G
    return -(all_pairs - same_view) / (B * n_terms)


# Preference order for "auto" (first available on the device; fastenc.losses.dispatch). Signature:
# (student_output, teacher_output, center, student_temp, teacher_temp, num_global_crops).
_DINO_IMPLS = {
    "triton": Impl(lazy("fastenc.kernels.dino", "dino_loss_triton"), "triton", ("cuda",), interpretable=True),
    "native": Impl(lazy("fastenc.losses.native", "dino_loss_native"), "fastenc._C", ("cpu",)),
    "reference": Impl(_dino_loss_factored),
    "chunked": Impl(dino_loss_chunked),
}


def dino_loss(student_output: torch.Tensor, teacher_output: torch.Tensor, center: torch.Tensor,
              student_temp: float = 0.1, teacher_temp: float = 0.04, num_global_crops: int = 2, *,
              impl: str = "auto") -> torch.Tensor:
    """DINO loss (Caron et al. 2021): cross-entropy between teacher and student views, averaged over view pairs.

    q_i = softmax((teacher_i - center) / teacher_temp) (no gradient), log p_v = log_softmax(student_v /
    student_temp); loss = mean over the pairs (teacher view i, student view v != i) of the batch mean of
    -sum_k q_ik log p_vk, i.e. G * (C - 1) terms (18 with 2 global + 8 local crops). Local crops may have been
    encoded at another resolution: only the head outputs [C * B, K] matter here. Returns an fp32 scalar.
    `impl`: "auto" (the default: the fastest one that is installed and runs on the outputs' device, i.e. "native"
    on CPU, "reference" where fastenc._C is not built, "triton" on CUDA; fastenc.losses.dispatch), "reference" (one
    log_softmax per crop: [C * B, K] fp32 kept for backward), "chunked" (batch rows in chunks), "native" (CPU
    extension, streamed over K) or "triton" (CUDA); all compute the value and gradients of `dino_loss_ref`.
    The fused kernels can also return the teacher's batch sum (`return_teacher_sum=True` of dino_loss_native /
    dino_loss_triton); the DINO objective computes that sum before the student's forward instead, so that the
    center's all-reduce overlaps the student's compute.
    Data-parallel: the loss is a local-batch mean, so the engine's gradient average over ranks equals the
    full-batch gradient; only the center needs the global batch (dino_center_update).
    """
    check_dino_inputs(student_output, teacher_output, center, num_global_crops)
    fn = resolve_impl("dino_loss", impl, _DINO_IMPLS, student_output.device)
    return fn(student_output, teacher_output, center, student_temp, teacher_temp, num_global_crops)


def teacher_batch_sum(teacher_output: torch.Tensor) -> torch.Tensor:
    """Sum of the teacher outputs over the local rows [1, K] (fp32): what ranks all-reduce for the center."""
    return teacher_output.detach().float().sum(dim=0, keepdim=True)


@torch.no_grad()
def dino_center_update(center: torch.Tensor, teacher_output: torch.Tensor, momentum: float = 0.9, *,
                       distributed: bool = False, group=None) -> torch.Tensor:
    """New center c' = m c + (1 - m) mean(teacher_output) over the global batch (all ranks' rows), [1, K] fp32.

    Functional (returns the new tensor). distributed=True all-reduces the batch sum and the row count over
    `group`, so ranks with different local batch sizes still average over every row. The DINO objective instead
    overlaps this all-reduce with the backward pass (async_op) and finishes it after the step; same result.
    """
    batch_sum = teacher_batch_sum(teacher_output)
    count = torch.tensor([float(teacher_output.shape[0])], device=batch_sum.device)
    if distributed and torch.distributed.is_initialized() and torch.distributed.get_world_size(group) > 1:
        packed = torch.cat([batch_sum.flatten(), count])
        torch.distributed.all_reduce(packed, group=group)
        batch_sum, count = packed[:-1].view(1, -1), packed[-1:]
    return center_ema(center, batch_sum, count, momentum)


def center_ema(center: torch.Tensor, batch_sum: torch.Tensor, count, momentum: float) -> torch.Tensor:
    """c' = m c + (1 - m) * batch_sum / count: the center step, given the (already all-reduced) teacher sum."""
    return center.float() * momentum + (batch_sum.reshape(1, -1) / count) * (1 - momentum)
