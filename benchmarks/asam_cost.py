"""What ASAM and gradient clipping add to the optimizer side of a SAM step.

SAM's official methods on planted gradients (no forward or backward), ResNet-32
with 100 classes, interleaved rounds in one process; prints each variant's
median time as a multiple of plain SAM's. On a CPU only the ratios mean
something (as everywhere in BENCHMARKS.md).

    python benchmarks/asam_cost.py [--backend torch] [--device cpu] [--rounds 40]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sse_sam_fast import SAM
from sse_sam_fast.train.registry import MODELS

VARIANTS = {"plain": {}, "adaptive": {"adaptive": True}, "clipped": {"max_grad_norm": 1.0}}


def build(backend: str, device: str, **options):
    torch.manual_seed(0)
    model = MODELS["resnet32"](100).to(device)
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    grads = [torch.randn_like(p) for p in model.parameters()]
    return model, SAM(base, model, 0.05, backend=backend, **options), grads


def step(model, opt, grads) -> None:
    for p, g in zip(model.parameters(), grads):
        p.grad = g
    opt.first_step()
    for p, g in zip(model.parameters(), grads):
        p.grad = g
    opt.second_step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    built = {name: build(args.backend, args.device, **kw) for name, kw in VARIANTS.items()}
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(args.rounds):
        for name, run in built.items():
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            step(*run)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t[5:]) for name, t in times.items()}  # first rounds: warm-up
    ratios = ", ".join(f"{name} {median[name] / median['plain']:.2f}x" for name in VARIANTS)
    print(f"SAM optimizer side, resnet32, {args.backend} on {args.device}: {ratios}")


if __name__ == "__main__":
    main()
