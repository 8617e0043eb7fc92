"""The host work the library adds to a step, measured on a CPU (or a GPU).

On a GPU at CIFAR sizes a step is bound by the host: Python, dispatch and
launches, not arithmetic. This script builds a model with ResNet-32's tensor
structure (95 parameters, 31 BatchNorm layers) but almost no arithmetic, and
splits a sync-free SSE-SAM step (the path a CUDA step takes) into phases by
wrapping the closure, ``torch.autograd.backward`` and the base optimizer's
``step``:

- model: the forwards and backwards (autograd's accumulation of ``p.grad`` included);
- base: the base optimizer's own ``step()`` (0 where a kernel fuses it);
- engine: everything else, the library's own host work and launches.

Per step it prints the engine's microseconds, the operators it dispatches that
launch work (views and other metadata-only operators left out) and, for the
triton backend, its kernel launches. On a CPU the triton backend runs with its
kernels stubbed out (the launchers and their checks run, the kernels do not,
so the numbers it computes are wrong and only its host time means anything);
with ``--device cuda`` they run, and the times are the host's time to issue a
step (a sync-free step never waits for the device). An eager step of the base
optimizer alone (``foreach=True``, as on CUDA) on the same model is the scale.

    python benchmarks/host_proxy.py [--base sgd|adam] [--backend torch|triton] [--steps 200] [--device cuda]

Only comparisons between two versions of the code on one machine mean anything.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from sse_sam_fast import SSESAM

METADATA = {"aten.view.default", "aten.detach.default", "aten.slice.Tensor", "aten.select.int",
            "aten.split_with_sizes.default", "aten.split.Tensor", "aten.as_strided.default",
            "aten.promote_types.default", "aten._reshape_alias.default", "aten.unsqueeze.default",
            "aten.expand.default", "aten.t.default", "aten.alias.default"}  # fmt: skip


def proxy_model() -> nn.Module:
    """ResNet-32's tensors without its arithmetic: 31 BatchNorm layers, 95 parameters."""
    layers = [m for _ in range(31) for m in (nn.Linear(4, 4, bias=False), nn.BatchNorm1d(4), nn.ReLU())]
    return nn.Sequential(*layers, nn.Linear(4, 4))


class Phases:
    """Host time and dispatched operators per phase of a step."""

    def __init__(self):
        self.phase = "engine"
        self.time = collections.Counter()
        self.ops = collections.Counter()
        self.launches = 0

    def wrap(self, name: str, fn):
        def wrapped(*args, **kwargs):
            outer, start = self.phase, time.perf_counter()
            self.phase = name
            try:
                return fn(*args, **kwargs)
            finally:
                self.time[name] += time.perf_counter() - start
                self.phase = outer

        return wrapped


class CountOps(TorchDispatchMode):
    def __init__(self, phases: Phases):
        super().__init__()
        self.phases = phases

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) not in METADATA:
            self.phases.ops[self.phases.phase] += 1
        return func(*args, **(kwargs or {}))


def count_launches(phases: Phases, run: bool) -> None:
    """Count the launches of every Triton kernel; ``run=False`` stubs them out
    (the launchers and their checks still run)."""
    from sse_sam_fast.kernels import norms, perturb, update

    class Counted:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                phases.launches += 1
                if run:
                    self.kernel[grid](*args, **kwargs)

            return launch

    for module in (norms, perturb, update):
        for name in dir(module):
            if name.endswith("_kernel"):
                setattr(module, name, Counted(getattr(module, name)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", choices=("sgd", "adam"), default="sgd")
    parser.add_argument("--backend", choices=("torch", "triton"), default="torch")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--device", default="cpu", help="cpu (kernels stubbed) or cuda (kernels run)")
    args = parser.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    torch.manual_seed(0)
    torch.set_num_threads(1)
    phases = Phases()
    if args.backend == "triton":
        if not gpu:
            os.environ["TRITON_INTERPRET"] = "1"  # the triton backend accepts CPU tensors
        count_launches(phases, run=gpu)
    torch.autograd.backward = phases.wrap("model", torch.autograd.backward)

    def build(model):
        if args.base == "adam":
            return torch.optim.Adam(model.parameters(), lr=1e-3, foreach=True)
        return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4, foreach=True)

    x, y = torch.randn(8, 4, device=device), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3], device=device)
    mask = y >= 3  # two tail samples of eight
    sync = torch.cuda.synchronize if gpu else lambda: None

    plain_model = proxy_model().to(device)
    plain = build(plain_model)
    plain_times = []
    for i in range(args.steps + 10):
        start = time.perf_counter()
        plain.zero_grad()
        F.cross_entropy(plain_model(x), y).backward()
        plain.step()
        if i >= 10:
            plain_times.append(time.perf_counter() - start)
    plain_step = statistics.median(plain_times)

    sync()
    model = proxy_model().to(device)
    base = build(model)
    opt = SSESAM(base, model, 0.05, 0.1, backend=args.backend)
    opt._force_sync_free = True  # the device verdict a CUDA step takes
    base.step = phases.wrap("base", base.step)
    closure = phases.wrap("model", lambda: F.cross_entropy(model(x), y, reduction="none"))
    step = phases.wrap("total", opt.step)
    print(f"eager {args.base} step (forward, backward, foreach step): median {1e6 * plain_step:.0f} us")
    for stage in (1, 2):
        if stage == 2:
            opt.rho_is[0] = 0.0  # what update_rho() sets at the stage switch
        for _ in range(10):
            step(closure, mask)
        phases.time.clear()
        phases.launches = 0
        with CountOps(phases):
            step(closure, mask)
        ops, launches = dict(phases.ops), phases.launches
        phases.ops.clear()
        sync()
        phases.time.clear()
        for _ in range(args.steps):
            step(closure, mask)
        sync()  # host times: a sync-free step never waits for the device inside
        t = {k: 1e6 * v / args.steps for k, v in phases.time.items()}
        engine = t["total"] - t.get("model", 0) - t.get("base", 0)
        print(
            f"SSE-SAM stage {stage}, {args.backend} backend, base {args.base}: engine {engine:.0f} us/step "
            f"({1e-6 * engine / plain_step:.2f} eager {args.base} steps), model {t.get('model', 0):.0f}, "
            f"base {t.get('base', 0):.0f}; engine operators {ops.get('total', 0)}, "
            f"base operators {ops.get('base', 0)}, model operators {ops.get('model', 0)}, "
            f"kernel launches {launches}"
        )


if __name__ == "__main__":
    main()
