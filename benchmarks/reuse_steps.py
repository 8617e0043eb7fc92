"""Time per step of SGD and SSE-SAM with and without ``reuse=K`` on the
mnist1d-lt default model and batch (an MLP, hidden 128, batch 64), one torch
thread, CPU process time, best of 5 interleaved rounds of 200 steps.

    python benchmarks/reuse_steps.py                 # the rows of RESULTS.md
    python benchmarks/reuse_steps.py sgd exact-8-correction

A row is ``sgd`` or ``<schedule>-<K>[-correction]``; a K larger than the steps
timed gives the reusing step alone (``exact-1000-correction``).
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F

from sse_sam_fast import SSESAM
from sse_sam_fast.train.models import mlp

ROWS = ["sgd", "exact-1", "exact-8", "exact-8-correction", "exact-1000-correction"]


def make(row: str, x, y, tail):
    torch.manual_seed(0)
    model = mlp(40, 10, 128)
    base = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    if row == "sgd":

        def sgd():
            base.zero_grad()
            F.cross_entropy(model(x), y).backward()
            base.step()

        return sgd
    schedule, k, *policy = row.split("-")
    opt = SSESAM(
        base,
        model,
        0.05,
        0.1,
        backend="torch",
        reuse=int(k),
        reuse_policy=policy[0] if policy else "perturbation",
    )

    def closure(idx=None):
        xs, ys = (x, y) if idx is None else (x[idx], y[idx])
        return F.cross_entropy(model(xs), ys, reduction="none")

    return lambda: opt.step(closure, tail, schedule)


def main(rows: list[str]) -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 40, generator=g), torch.randint(0, 10, (64,), generator=g)
    tail = y >= 7
    steps = {row: make(row, x, y, tail) for row in rows}
    for step in steps.values():
        for _ in range(20):
            step()
    best = dict.fromkeys(rows, float("inf"))
    for _ in range(5):
        for row, step in steps.items():
            t0 = time.process_time()
            for _ in range(200):
                step()
            best[row] = min(best[row], (time.process_time() - t0) / 200)
    for row in rows:
        ratio = f"  {best[row] / best['sgd']:.2f}x SGD" if "sgd" in best else ""
        print(f"{row:24s} {best[row] * 1e6:8.1f} us{ratio}")


if __name__ == "__main__":
    main(sys.argv[1:] or ROWS)
