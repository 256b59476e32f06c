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

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import loss_bench  # noqa: E402

BENCH = "clip_loss"
IMPLS = ("open_clip", "reference", "chunked", "native", "triton")


def build(spec):
    import torch
    import torch.nn.functional as F

    from fastenc.losses import clip_loss

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec["dtype"]]
    device = spec["device"]

    def inputs(B, D):
        img = F.normalize(torch.randn(B, D, device=device), dim=1).to(dtype).requires_grad_()
        txt = F.normalize(torch.randn(B, D, device=device), dim=1).to(dtype).requires_grad_()
        return img, txt, torch.tensor(14.3, device=device, requires_grad=True)

    if spec["impl"] == "open_clip":
        from open_clip.loss import ClipLoss

        peer = ClipLoss()

        def fn(img, txt, t):  # open_clip computes the loss in the features' dtype; upcast as its autocast would
            return peer(img.float(), txt.float(), t) if dtype != torch.float32 else peer(img, txt, t)
    else:
        def fn(img, txt, t):
            return clip_loss(img, txt, t, impl=spec["impl"])

    return (lambda: inputs(spec["batch"], spec["dim"])), fn, (lambda: inputs(8, spec["dim"]))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    loss_bench.common_args(p, "bench_contrastive.csv")
    p.add_argument("--batch", default="1024,4096,16384", help="comma-separated batch sizes B")
    p.add_argument("--dim", type=int, default=512)
    args = p.parse_args()
    if args.worker:
        return loss_bench.worker_main(args.worker, build)
    impls = args.impls.split(",") if args.impls else default_impls(args.device)
    sizes = [{"batch": int(b), "dim": args.dim} for b in args.batch.split(",")]
    rows = loss_bench.sweep(os.path.abspath(__file__), BENCH, args, impls, sizes, "batch")
    png = args.plot or os.path.splitext(args.out)[0] + ".png"
    loss_bench.plot(args.out, png, BENCH, "batch", f"clip_loss fwd+bwd, D={args.dim}, {args.dtype}, "
                    f"{args.device}, {args.threads} threads", where=lambda r: r["dtype"] == args.dtype
                    and r["device"] == args.device and r["dim"] == str(args.dim))
    for line in loss_bench.summarize(rows, "batch", "open_clip", [i for i in impls if i != "open_clip"]):
        print(line)


def default_impls(device):
    from fastenc.utils.optional import is_available

    out = ["open_clip", "reference", "chunked"]
    if device == "cpu" and is_available("fastenc._C"):
        out.append("native")
    if device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        out.append("triton")
    return out


if __name__ == "__main__":
    main()
