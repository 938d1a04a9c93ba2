"""CPU masked_regression_loss, forward + backward, against eager smooth-L1 on the masked rows (issue 25, item 4).

    OMP_NUM_THREADS=1 python bench/loss_cpu.py [--rounds 15] [--size 32,197,384] [--beta 2.0]

Each round times every variant once, in turn (alternating, so a neighbour's load hits all of them alike); the
figures are medians over rounds of the per-call mean of a few calls. fp32 pred and target, 60% of rows masked.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from d2v import ops


def eager(pred, target, mask, beta):
    """What a user writes without d2v: smooth-L1 (beta) or squared error on the masked rows, summed over D,
    mean over rows."""
    p, t = pred[mask], target[mask]
    per = F.smooth_l1_loss(p, t, reduction="none", beta=beta) if beta > 0 else F.mse_loss(p, t, reduction="none")
    return per.sum(-1).mean()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--size", default="32,197,384")
    ap.add_argument("--beta", type=float, default=2.0)
    args = ap.parse_args()
    B, T, D = map(int, args.size.split(","))
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(B, T, D, generator=g, requires_grad=True)
    target = torch.randn(B, T, D, generator=g)
    mask = torch.rand(B, T, generator=g) < 0.6
    variants = {"eager": lambda: eager(pred, target, mask, args.beta)}
    for backend in ("cpu", "torch"):
        try:
            ops.masked_regression_loss(pred, target, mask, beta=args.beta, backend=backend)
        except Exception as exc:  # the extension is not built: say so, time the rest
            print(f"backend {backend}: unavailable ({exc})")
            continue
        variants[backend] = (lambda b=backend: ops.masked_regression_loss(pred, target, mask, beta=args.beta,
                                                                         backend=b))
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(2):  # warm-up
        for fn in variants.values():
            pred.grad = None
            fn().backward()
    for _ in range(args.rounds):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            for _ in range(args.calls):
                pred.grad = None
                fn().backward()
            times[name].append((time.perf_counter() - t0) / args.calls * 1e3)
    base = statistics.median(times["eager"])
    print(f"{B}x{T}x{D} fp32, 60% masked, beta {args.beta}, threads {torch.get_num_threads()}, "
          f"{args.rounds} alternating rounds x {args.calls} calls; median ms (fwd+bwd)")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:6s} {med:7.2f} ms  (min {min(ts):.2f}, max {max(ts):.2f})  {base / med:5.2f}x eager")


if __name__ == "__main__":
    main()
