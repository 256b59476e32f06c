"""DINO loss: fastenc's implementations against the reference, time and peak memory vs batch, K prototypes.

    python benchmarks/bench_dino.py                                   # CPU: B = 8 .. 64, 2 + 8 crops, K = 65536
    python benchmarks/bench_dino.py --batch 64,128,256 --dtype bf16 --device cuda                # (gpu_kernels.sh)

Cases: fastenc dino_loss with impl = reference (one log_softmax per crop, the pair sum factored) | chunked |
native | triton, and "reference_loop": dino_loss_ref, the loop over (teacher view, student view) pairs written as
facebookresearch/dino's DINOLoss.forward, the peer. Inputs: student head outputs [C * B, K] requiring gradients,
teacher outputs [G * B, K] and a center [1, K] without, student temp 0.1, teacher temp 0.04. One process per case
(loss_bench.py explains the measurements). Rows go to results/bench_dino.csv, the plot to results/bench_dino.png.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import loss_bench  # noqa: E402

BENCH = "dino_loss"


def build(spec):
    import torch

    from fastenc.losses.dino import dino_loss, dino_loss_ref

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec["dtype"]]
    device, G, C, K = spec["device"], spec["global_crops"], spec["crops"], spec["prototypes"]

    def inputs(B, K):
        student = torch.randn(C * B, K, device=device).to(dtype).requires_grad_()
        teacher = torch.randn(G * B, K, device=device).to(dtype)
        return student, teacher, 0.1 * torch.randn(1, K, device=device)

    if spec["impl"] == "reference_loop":
        def fn(s, t, c):
            return dino_loss_ref(s, t, c, 0.1, 0.04, G)
    else:
        def fn(s, t, c):
            return dino_loss(s, t, c, 0.1, 0.04, G, impl=spec["impl"])

    return (lambda: inputs(spec["batch"], K)), fn, (lambda: inputs(2, 64))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    loss_bench.common_args(p, "bench_dino.csv")
    p.add_argument("--batch", default="8,16,32,64", help="comma-separated batch sizes B (images per process)")
    p.add_argument("--prototypes", type=int, default=65536, help="K, the DINO head's output dim")
    p.add_argument("--crops", type=int, default=10, help="student crops C (global + local)")
    p.add_argument("--global-crops", type=int, default=2, help="teacher crops G")
    args = p.parse_args()
    if args.worker:
        return loss_bench.worker_main(args.worker, build)
    impls = args.impls.split(",") if args.impls else ["reference_loop"] + loss_bench.default_impls(args.device)
    sizes = [{"batch": int(b), "prototypes": args.prototypes, "crops": args.crops, "global_crops": args.global_crops}
             for b in args.batch.split(",")]
    rows = loss_bench.sweep(os.path.abspath(__file__), BENCH, args, impls, sizes, "batch")
    png = args.plot or os.path.splitext(args.out)[0] + ".png"
    loss_bench.plot(args.out, png, BENCH, "batch", f"dino_loss fwd+bwd, K={args.prototypes}, {args.global_crops}+"
                    f"{args.crops - args.global_crops} crops, {args.dtype}, {args.device}, {args.threads} threads",
                    where=lambda r: r["dtype"] == args.dtype and r["device"] == args.device
                    and r["prototypes"] == str(args.prototypes) and r["crops"] == str(args.crops))
    for peer in ("reference_loop", "reference"):
        for line in loss_bench.summarize(rows, "batch", peer, [i for i in impls if i not in ("reference_loop", peer)]):
            print(line)


if __name__ == "__main__":
    main()
