"""CLIP contrastive loss: fastenc's implementations against open_clip's ClipLoss, time and peak memory vs batch.

    python benchmarks/bench_contrastive.py                                  # CPU: 1024 .. 16384, D = 512, fp32
    python benchmarks/bench_contrastive.py --batch 4096,16384,65536 --dtype bf16 --device cuda   # (gpu_kernels.sh)

Cases: fastenc clip_loss with impl = reference | chunked | native | triton, and open_clip.loss.ClipLoss (the peer;
its forward materializes logits_per_image and logits_per_text, B x B each, and cross_entropy keeps their softmax).
Inputs: L2-normalized [B, D] image and text features and a logit scale of 14.3, all requiring gradients, as in
training. One process per case (loss_bench.py explains the time and memory measurements). Rows go to
results/bench_contrastive.csv, the plot to results/bench_contrastive.png.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import loss_bench  # noqa: E402

BENCH = "clip_loss"


def build(spec):
    import torch

    from fastenc.losses import clip_loss

    device = spec["device"]

    def inputs(B, D):
        img, txt = loss_bench.unit_features(B, D, spec["dtype"], device)
        return img, txt, torch.tensor(14.3, device=device, requires_grad=True)

    if spec["impl"] == "open_clip":
        from open_clip.loss import ClipLoss

        peer = ClipLoss()

        def fn(img, txt, t):  # open_clip computes the loss in the features' dtype; upcast as its autocast would
            return peer(img.float(), txt.float(), t) if spec["dtype"] != "fp32" else peer(img, txt, t)
    else:
        def fn(img, txt, t):
            return clip_loss(img, txt, t, impl=spec["impl"])

    return (lambda: inputs(spec["batch"], spec["dim"])), fn, (lambda: inputs(8, spec["dim"]))


if __name__ == "__main__":
    loss_bench.feature_loss_main(__doc__, __file__, BENCH, build)
