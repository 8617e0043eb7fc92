"""Whole-step timing: plain SGD vs the published schedule vs this library.

Each schedule trains its own copy of the same model on the same batch; the
schedules take turns step by step, in rotating order, so that drift in the
machine's speed (other processes, thermal state) is spread over all of them. Reported: median seconds
per step with p20/p80, and ratios to SGD and to the published schedule.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import SSESAM
from .models import resnet32
from .verify import published_step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def whole_step(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    tail: torch.Tensor,
    stage: int = 1,
    steps: int = 5,
    warmup: int = 1,
    backends: tuple[str, ...] = ("torch",),
) -> dict[str, list[float]]:
    """Seconds per step for ``sgd``, ``published`` (reference backend driven
    through the official methods as the published training loop does: 4F+4B)
    and ``exact/<backend>`` (the one-call step), SSE-SAM in ``stage`` 1 or 2."""
    device = x.device

    def losses(m):
        return F.cross_entropy(m(x), y, reduction="none")

    def make(backend):
        m = copy.deepcopy(model).to(device).train()
        base = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-3)
        if backend is None:
            return m, base
        opt = SSESAM(base, m, 0.05, 0.10, gamma=0.5, total_epochs=2, backend=backend)
        if stage == 2:
            opt.update_rho()
        return m, opt

    runners: dict[str, Callable[[], None]] = {}
    m_sgd, o_sgd = make(None)

    def sgd_step():
        o_sgd.zero_grad()
        losses(m_sgd).mean().backward()
        o_sgd.step()

    runners["sgd"] = sgd_step
    m_pub, o_pub = make("reference")
    runners["published"] = lambda: published_step(o_pub, m_pub, x, y, tail, "ssesam")
    for backend in backends:
        m_b, o_b = make(backend)
        runners[f"exact/{backend}"] = lambda m=m_b, o=o_b: o.step(lambda: losses(m), tail)

    times: dict[str, list[float]] = {k: [] for k in runners}
    order = list(runners.items())
    for i in range(warmup + steps):
        # rotate who goes first: a schedule that always follows the biggest one
        # would pay for its allocator and cache churn
        for name, fn in order[i % len(order):] + order[: i % len(order)]:
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def report(times: dict[str, list[float]], absolute: bool) -> str:
    sgd = statistics.median(times["sgd"])
    pub = statistics.median(times["published"])
    head = f"{'schedule':<16}{'× SGD':>8}{'× published':>13}"
    rows = [head + ("   median s (p20–p80)" if absolute else "")]
    for name, ts in times.items():
        med = statistics.median(ts)
        row = f"{name:<16}{med / sgd:>8.2f}{med / pub:>13.2f}"
        if absolute:
            row += f"   {med:.4f} ({_quantile(ts, 0.2):.4f}–{_quantile(ts, 0.8):.4f})"
        rows.append(row)
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--tail-frac", type=float, default=0.19)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = resnet32(100)
    x = torch.randn(args.batch, 3, 32, 32, device=device)
    y = torch.randint(0, 100, (args.batch,), device=device)
    tail = torch.zeros(args.batch, dtype=torch.bool, device=device)
    tail[torch.randperm(args.batch)[: round(args.tail_frac * args.batch)]] = True
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU, {torch.get_num_threads()} threads"
    print(f"ResNet-32 (CIFAR-100 shapes), batch {args.batch}, {int(tail.sum())} tail samples; {name}; "
          f"torch {torch.__version__}; median of {args.steps} steps after {args.warmup} warm-up")
    for stage in (1, 2):
        times = whole_step(model, x, y, tail, stage, args.steps, args.warmup)
        print(f"\nSSE-SAM stage {stage}\n" + report(times, absolute=device.type == "cuda"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
