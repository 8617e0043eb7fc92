"""Whole buffers or the parameters' own storage: what a perturbation costs the host.

The flat backends keep each ``p.data`` a view into one buffer per (device,
dtype), so saving ``w0``, perturbing ``w = w0 + s·g`` and restoring are one
operation each on the whole buffer. Parameters whose storage another system
owns (FSDP2's shards) cannot be re-bound: there the same phases are grouped
multi-tensor operations over the parameters themselves. This script times
both on a model with ResNet-32's tensors (95 parameters) and counts the
operators each dispatches, on the CPU the host work only means anything
relative to the other column (on CUDA a ``_foreach`` operator is a few
launches, on a CPU it loops over the tensors).

    python benchmarks/rebinding.py [--steps 2000]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def _shapes():
    """ResNet-32's parameter shapes (CIFAR, 16/32/64 channels)."""
    shapes = [(16, 3, 3, 3), (16,), (16,)]
    for c_in, c in ((16, 16), (16, 32), (32, 64)):
        for block in range(5):
            first = c_in if block == 0 else c
            shapes += [(c, first, 3, 3), (c,), (c,), (c, c, 3, 3), (c,), (c,)]
    return shapes + [(10, 64), (10,)]


def whole_buffer(params, w, w0, g, s):
    w0.copy_(w)  # save
    torch.addcmul(w0, g, s, out=w)  # perturb
    w.copy_(w0)  # restore


def grouped(params, w0s, gs, s):
    torch._foreach_copy_(w0s, params)  # save
    torch._foreach_add_(params, torch._foreach_mul(gs, s))  # perturb
    torch._foreach_copy_(params, w0s)  # restore


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    shapes = _shapes()
    sizes = [torch.Size(s).numel() for s in shapes]
    w, w0, g = (torch.randn(sum(sizes)) for _ in range(3))
    params = [v.view(s) for v, s in zip(w.split(sizes), shapes)]
    gs = [v.view(s) for v, s in zip(g.split(sizes), shapes)]
    w0s = [torch.empty(s) for s in shapes]
    s = torch.tensor(0.01)
    runs = {
        "whole buffer (re-bound p.data)": lambda: whole_buffer(params, w, w0, g, s),
        "grouped over the parameters": lambda: grouped(params, w0s, gs, s),
    }
    print(f"{len(shapes)} parameters, {sum(sizes)} elements; save, perturb and restore once per call")
    for name, fn in runs.items():
        for _ in range(50):
            fn()
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        with _Count() as count:
            fn()
        print(f"{name}: median {1e6 * statistics.median(times):.1f} us, {count.n} operators dispatched")


if __name__ == "__main__":
    main()
