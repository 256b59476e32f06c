"""SigLIP sigmoid loss: fastenc's implementations against open_clip's SigLipLoss, time and peak memory vs batch.

    python benchmarks/bench_sigmoid.py                                      # CPU: 1024 .. 16384, D = 512, fp32
    python benchmarks/bench_sigmoid.py --batch 4096,16384,65536 --dtype bf16 --device cuda     # (gpu_kernels.sh)

Cases: fastenc siglip_loss with impl = reference | chunked | native | triton, and open_clip.loss.SigLipLoss (the
peer; it materializes the B x B logits and the labels matrix). Inputs: L2-normalized [B, D] features, logit scale
10 and bias -10 (SigLIP's initialization), all requiring gradients. One process per case (loss_bench.py explains
the measurements). Rows go to results/bench_sigmoid.csv, the plot to results/bench_sigmoid.png.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import loss_bench  # noqa: E402

BENCH = "siglip_loss"


def build(spec):
    import torch

    from fastenc.losses import siglip_loss

    device = spec["device"]

    def inputs(B, D):
        img, txt = loss_bench.unit_features(B, D, spec["dtype"], device)
        t = torch.tensor(10.0, device=device, requires_grad=True)
        return img, txt, t, torch.tensor(-10.0, device=device, requires_grad=True)

    if spec["impl"] == "open_clip":
        from open_clip.loss import SigLipLoss

        peer = SigLipLoss()

        def fn(img, txt, t, b):
            return peer(img.float(), txt.float(), t, b) if spec["dtype"] != "fp32" else peer(img, txt, t, b)
    else:
        def fn(img, txt, t, b):
            return siglip_loss(img, txt, t, b, impl=spec["impl"])

    return (lambda: inputs(spec["batch"], spec["dim"])), fn, (lambda: inputs(8, spec["dim"]))


if __name__ == "__main__":
    loss_bench.feature_loss_main(__doc__, __file__, BENCH, build)
