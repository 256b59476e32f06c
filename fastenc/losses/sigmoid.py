"""SigLIP sigmoid loss (Zhai et al. 2023), matching open_clip's SigLipLoss (distributed: its "shift" ring, mirrored).

Shapes: B = local batch, D = feature dim, W = world size.
Numerics: the similarity matmul runs in the features' dtype, its [B, B] result is upcast to fp32 before scale, bias
and logsigmoid; the loss is always an fp32 scalar.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastenc.losses.chunked import siglip_block_chunked
from fastenc.losses.dispatch import Impl, check_features, check_scalar, lazy, resolve_impl
from fastenc.losses.distributed import check_equal_batch, neighbour_exchange_with_grad, world_info


def siglip_loss_ref(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale, logit_bias) -> torch.Tensor:
    """Single-process SigLIP loss, the plain formula (reference twin of `siglip_loss`).

    z = t * I T^T + b, label_ij = +1 if i == j else -1, loss = -sum_ij log sigmoid(label_ij * z_ij) / B.
    """
    z_BB = logit_scale * (image_features @ text_features.T).float() + logit_bias
    labels_BB = 2 * torch.eye(z_BB.shape[0], device=z_BB.device) - 1
    return -F.logsigmoid(labels_BB * z_BB).sum() / z_BB.shape[0]


def _siglip_block_ref(img_BD, txt_BD, logit_scale, logit_bias, positives: bool) -> torch.Tensor:
    """-sum of log sigmoid(label * z) over one [B, B'] block; labels +1 on the diagonal iff `positives`, else -1."""
    z_BB = logit_scale * (img_BD @ txt_BD.T).float() + logit_bias
    if not positives:
        return -F.logsigmoid(-z_BB).sum()
    labels_BB = torch.full_like(z_BB, -1.0)
    labels_BB.diagonal().fill_(1.0)
    return -F.logsigmoid(labels_BB * z_BB).sum()


# Preference order for "auto" (first available on the device; fastenc.losses.dispatch). Signature:
# (img_BD, txt_BD, logit_scale, logit_bias, positives).
_SIGLIP_IMPLS = {
    "triton": Impl(lazy("fastenc.kernels.sigmoid", "siglip_block_triton"), "triton", ("cuda",), interpretable=True),
    "native": Impl(lazy("fastenc.losses.native", "siglip_block_native"), "fastenc._C", ("cpu",)),
    "reference": Impl(_siglip_block_ref),
    "chunked": Impl(siglip_block_chunked),
}


def siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale,
    logit_bias,
    *,
    impl: str = "auto",
    distributed: bool = False,
    group=None,
) -> torch.Tensor:
    """SigLIP loss (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training").

    With I, T the [B, D] L2-normalized features, t = logit_scale (exponentiated) and b = logit_bias (python
    numbers or 0-dim tensors, which then receive gradients):
        z = t * I T^T + b,  label_ij = +1 if i == j else -1,  loss = -sum_ij log sigmoid(label_ij * z_ij) / B,
    the value of open_clip's SigLipLoss. Returns an fp32 scalar. `impl`: "auto" (the default: the fastest one that
    is installed and runs on the features' device, i.e. "native" on CPU, "reference" where fastenc._C is not built,
    "triton" on CUDA; fastenc.losses.dispatch), "reference" (B x B logits per block, the plain formula), "chunked"
    (pure torch, rows in chunks, tiles recomputed in backward), "native" (CPU extension) or "triton" (CUDA). Only
    "reference" keeps a B x B tensor; every implementation computes the reference's value and gradients.

    distributed=True: text features travel around a ring (open_clip's dist_impl="shift", mirrored; W-1 steps;
    its "bidir" variant halves the number of latency-bound steps, worth it only for large W). Rank r first scores
    its own [B, B] block with positives on the diagonal, then W-1 times sends the text features it holds to rank
    r-1 and receives those of rank r+1 (after k steps: rank r+k's), adding their all-negative block. Rank r returns
        L_r = -sum_{i in rank r, j in all W*B} log sigmoid(label_ij z_ij) / B.
    Why the gradients are exact: the full-batch loss over N = W*B pairs is L = -sum_{all i, j} ... / N, and the rows
    split over the ranks, so L = mean_r L_r (each L_r alone is only its rows' share, not L). The exchange's
    backward sends the gradient w.r.t. received text features back along the ring to their owner, so rank r
    backpropagates d(sum_r' L_r')/d(its features) through its own encoder and gets dL_r/dt, dL_r/db for t and b.
    The data-parallel engine sums gradients over ranks and divides by W (DeepSpeed, DDP): d(sum_r' L_r')/dtheta / W
    = dL/dtheta, the single-process full-batch gradient, while no rank ever holds more than [B, B] logits.
    Requires the same B on every rank (checked once per group; use drop_last=True) and an initialized process group.
    """
    check_features("siglip_loss", image_features, text_features)
    check_scalar("siglip_loss", "logit_scale", logit_scale)
    check_scalar("siglip_loss", "logit_bias", logit_bias)
    fn = resolve_impl("siglip_loss", impl, _SIGLIP_IMPLS, image_features.device)
    B = image_features.shape[0]
    loss = fn(image_features, text_features, logit_scale, logit_bias, True)
    if distributed:
        rank, world = world_info(group)
        if world > 1:
            check_equal_batch("siglip_loss", image_features, group)
        txt_BD = text_features
        for _ in range(world - 1):
            txt_BD = neighbour_exchange_with_grad(txt_BD, (rank - 1) % world, (rank + 1) % world, group)
            loss = loss + fn(image_features, txt_BD, logit_scale, logit_bias, False)
    return loss / B
