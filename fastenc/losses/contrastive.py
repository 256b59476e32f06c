"""CLIP contrastive loss (Radford et al. 2021), matching open_clip's ClipLoss (local-loss mode when distributed).

Shapes: B = local batch, D = feature dim, W = world size, N = W * B (columns: all ranks' samples).
Numerics: the similarity matmul runs in the features' dtype (bf16 under DeepSpeed), its [B, N] result is upcast to
fp32 before scaling and the softmax, so the log-sum-exp never runs in bf16; the loss is always an fp32 scalar.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastenc.losses.chunked import clip_rows_chunked
from fastenc.losses.dispatch import Impl, check_features, check_scalar, lazy, resolve_impl
from fastenc.losses.distributed import all_gather_with_grad, check_equal_batch, world_info


def clip_loss_ref(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale) -> torch.Tensor:
    """Single-process CLIP loss, the plain formula (reference twin of `clip_loss`).

    logits = t * I T^T (I, T: [B, D] L2-normalized, t = exp(learned log scale));
    loss = (CE(logits, diag) + CE(logits^T, diag)) / 2.
    """
    logits_BB = logit_scale * (image_features @ text_features.T).float()
    labels_B = torch.arange(logits_BB.shape[0], device=logits_BB.device)
    return (F.cross_entropy(logits_BB, labels_B) + F.cross_entropy(logits_BB.T, labels_B)) / 2


def _clip_rows_ref(img_BD, txt_BD, img_ND, txt_ND, logit_scale, offset: int) -> torch.Tensor:
    """Mean CE of the B local rows against all N columns in both directions; row i's positive is column offset+i."""
    labels_B = torch.arange(offset, offset + img_BD.shape[0], device=img_BD.device)
    logits_img_BN = logit_scale * (img_BD @ txt_ND.T).float()
    logits_txt_BN = logit_scale * (txt_BD @ img_ND.T).float()
    return (F.cross_entropy(logits_img_BN, labels_B) + F.cross_entropy(logits_txt_BN, labels_B)) / 2


# Preference order for "auto" (first available on the device; fastenc.losses.dispatch). Signature:
# (img_BD, txt_BD, img_ND, txt_ND, logit_scale, offset).
_CLIP_IMPLS = {
    "triton": Impl(lazy("fastenc.kernels.contrastive", "clip_rows_triton"), "triton", ("cuda",), interpretable=True),
    "native": Impl(lazy("fastenc.losses.native", "clip_rows_native"), "fastenc._C", ("cpu",)),
    "reference": Impl(_clip_rows_ref),
    "chunked": Impl(clip_rows_chunked),
}


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale,
    *,
    impl: str = "auto",
    distributed: bool = False,
    group=None,
) -> torch.Tensor:
    """CLIP loss (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision").

    With I, T the [B, D] L2-normalized image and text features and t = logit_scale (already exponentiated; a
    python number or a 0-dim tensor, which then receives a gradient):
        loss = (CE(t * I T^T, diag) + CE(t * T I^T, diag)) / 2,  CE = mean cross-entropy over rows,
    the value of open_clip's ClipLoss. Returns an fp32 scalar. `impl`: "auto" (the default: the fastest one that is
    installed and runs on the features' device, i.e. "native" on CPU, "reference" where fastenc._C is not built,
    "triton" on CUDA; fastenc.losses.dispatch), "reference" (B x N logits, the plain formula), "chunked" (pure
    torch, rows in chunks, tiles recomputed in backward), "native" (CPU extension) or "triton" (CUDA). Only
    "reference" keeps a B x N tensor; every implementation computes the reference's value and gradients.

    distributed=True (open_clip's local_loss=True, gather_with_grad=True): each of the W ranks passes its local
    [B, D] features; I_all, T_all [N, D] are all ranks' features gathered with gradient, and rank r returns
        L_r = (CE(t * I T_all^T, labels) + CE(t * T I_all^T, labels)) / 2,  labels = r*B + arange(B).
    Why the gradients are exact: the full-batch loss L is a mean over the N rows of row terms that each see all N
    columns; L_r is the mean of rank r's B row terms, so L = mean_r L_r (each L_r alone is only its rows' share).
    L_r depends on every rank's features through the gathered columns; the gather's backward sums, over ranks, the
    gradients w.r.t. each rank's slice, so rank r backpropagates d(sum_r' L_r')/d(its features) through its own
    encoder, and its logit_scale gradient is dL_r/dt. The data-parallel engine sums parameter gradients over ranks
    and divides by W (DeepSpeed, DDP), giving d(sum_r' L_r')/dtheta / W = dL/dtheta for every parameter: the same
    as one process on the full batch of N, with O(B*N) logits per rank instead of O(N^2).
    Requires the same B on every rank (checked once per group; use drop_last=True) and an initialized process group.
    """
    check_features("clip_loss", image_features, text_features)
    check_scalar("clip_loss", "logit_scale", logit_scale)
    fn = resolve_impl("clip_loss", impl, _CLIP_IMPLS, image_features.device)
    if not distributed:
        return fn(image_features, text_features, image_features, text_features, logit_scale, 0)

    rank, world = world_info(group)
    if world == 1:
        return fn(image_features, text_features, image_features, text_features, logit_scale, 0)
    check_equal_batch("clip_loss", image_features, group)
    B, D = image_features.shape
    # One collective for both modalities: gather [B, 2D] rows, then split the columns.
    both_ND2 = all_gather_with_grad(torch.cat([image_features, text_features], dim=1), group)
    img_ND, txt_ND = both_ND2[:, :D], both_ND2[:, D:]
    return fn(image_features, text_features, img_ND, txt_ND, logit_scale, rank * B)
