"""A host-bound proxy on a CPU: many tiny layers, so that a step's time is the
Python and dispatch work per parameter and per layer rather than arithmetic,
as a GPU step is at CIFAR sizes. Prints the median time of a sync-free SSE-SAM
step (the path a CUDA step takes) and the kernel-launching ops a ResNet-32 step
dispatches, from torch.profiler.

    python benchmarks/host_proxy.py [--base adam|sgd] [--backend torch]

Only comparisons between two versions of the code on one machine mean anything.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

from sse_sam_fast import SSESAM
from sse_sam_fast.train.registry import MODELS


def build(model: nn.Module, base: str, backend: str) -> SSESAM:
    if base == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    sse = SSESAM(opt, model, 0.05, 0.1, backend=backend)
    sse._force_sync_free = True  # the device verdict a CUDA step takes
    return sse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", choices=("adam", "sgd"), default="adam")
    parser.add_argument("--backend", default="torch")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)

    layers = [m for _ in range(60) for m in (nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU())]
    model = nn.Sequential(*layers, nn.Linear(8, 4))
    opt = build(model, args.base, args.backend)
    x, y = torch.randn(16, 8), torch.randint(0, 4, (16,))
    closure = lambda: F.cross_entropy(model(x), y, reduction="none")
    times = []
    for i in range(45):
        start = time.perf_counter()
        opt.step(closure, y >= 2)
        if i >= 5:
            times.append(time.perf_counter() - start)
    print(f"proxy (60 x Linear(8, 8) + BatchNorm): median step {1e3 * statistics.median(times):.2f} ms")

    model = MODELS["resnet32"](100)
    opt = build(model, args.base, args.backend)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 100, (8,))
    closure = lambda: F.cross_entropy(model(x), y, reduction="none")
    for _ in range(3):
        opt.step(closure, y >= 50)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        opt.step(closure, y >= 50)
    counts = {e.key: e.count for e in prof.key_averages()}
    shown = ("aten::where", "aten::clone", "aten::cat", "aten::_foreach_copy_")
    print("resnet32 step: " + ", ".join(f"{k} {counts.get(k, 0)}" for k in shown))


if __name__ == "__main__":
    main()
