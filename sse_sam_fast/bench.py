"""Whole-step timing: plain SGD vs the published schedule vs this library.

Each schedule trains its own copy of the same model on the same batch; the
schedules take turns step by step, in rotating order, so that drift in the
machine's speed (other processes, thermal state) is spread over all of them,
and ratios are medians of the ratios within each round. Reported: median seconds
per step with p20/p80, and ratios to SGD and to the published schedule.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import SSESAM
from .backends import triton_available
from .train.models import MODELS
from .train.report import agg_figure
from .verify import published_step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> float:
    """Seconds ``fn()`` takes, the device synchronised on both sides."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


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
    schedules: tuple[str, ...] = ("exact/torch",),
) -> dict[str, dict]:
    """Seconds per step (and peak memory on CUDA) for ``sgd``, ``published``
    (the reference backend driven through the official methods as the
    published training loop does: 4F+4B) and each of ``schedules``
    (``"exact/<backend>"`` or ``"split/<backend>"``: the one-call step), SSE-SAM
    in ``stage`` 1 or 2."""
    device = x.device

    def losses(m, idx=None):
        if idx is None:
            return F.cross_entropy(m(x), y, reduction="none")
        return F.cross_entropy(m(x[idx]), y[idx], reduction="none")

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
    for name in schedules:
        schedule, backend = name.split("/")
        m_b, o_b = make(backend)
        runners[name] = lambda m=m_b, o=o_b, s=schedule: o.step(
            lambda idx=None: losses(m, idx), tail, schedule=s
        )

    times: dict[str, list[float]] = {k: [] for k in runners}
    peak: dict[str, int] = dict.fromkeys(runners, 0)
    order = list(runners.items())
    for i in range(warmup + steps):
        # rotate who goes first: a schedule that always follows the biggest one
        # would pay for its allocator and cache churn
        for name, fn in order[i % len(order) :] + order[: i % len(order)]:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            seconds = _timed(fn, device)
            if i >= warmup:
                times[name].append(seconds)
                if device.type == "cuda":
                    peak[name] = max(peak[name], torch.cuda.max_memory_allocated(device))
    # ratios are medians of per-round ratios: pairing steps timed seconds apart
    # cancels the slow drift of a shared machine's speed
    return {
        k: {
            "median_s": statistics.median(v),
            "p20_s": _quantile(v, 0.2),
            "p80_s": _quantile(v, 0.8),
            "x_sgd": statistics.median(a / b for a, b in zip(v, times["sgd"])),
            "x_published": statistics.median(a / b for a, b in zip(v, times["published"])),
            "peak_bytes": peak[k] or None,
        }
        for k, v in times.items()
    }


# Buffer passes of one SSE-SAM stage-1 step driven through the official methods
# (compute_and_add_epsilon(0), compute_grad_sum_and_restore_p(), the same for the
# tail, update()), as element accesses per parameter (reads + writes) of the
# operations each backend runs; times N times the element size, the traffic.
#   torch (35): head: norm (1 r), save w0 = w (1 r, 1 w), w += s_H G_H (2 r, 1 w) |
#     restore w = w0 (1 r, 1 w) | tail: zero the head's row (1 w), norm (1 r), save
#     (2), perturb (3) | G_sum += G (2 r, 1 w), zero G (1 w), restore (2) | foreach
#     SGD with weight decay and momentum from G_sum: d = g + wd w (2 r, 1 w),
#     buf *= m (1 r, 1 w), buf += d (2 r, 1 w), w -= lr buf (2 r, 1 w) | zero three rows (3 w)
#   triton (33): the same, with each norm (1 r) and each save-and-perturb (2 r,
#     2 w) one kernel; update() steps from a slot, which the fused restore-and-SGD
#     kernel does not cover, so its SGD is the same foreach SGD
#   reference, as the published code (44): each method first clones p.grad into a
#     slot (1 r, 1 w; the tail's sum adds: 2 r, 1 w) | each perturbation takes a
#     norm (1 r) | each perturbation and restore: eps = g s (1 r, 1 w), then
#     p += eps or p -= eps (2 r, 1 w) | update: p.grad = G_sum.clone() (1 r, 1 w),
#     the same SGD (11) | zero_grad(set_to_none) moves nothing
PASSES_STAGE1 = {"triton": 33, "torch": 35, "reference": 44}


def _plant(params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    """Add ``grads`` to ``p.grad`` with a backward pass (``d/dp Σ p·g = g``), so
    that every backend sees what a real backward leaves: the flat backends' views
    written in place and their post-accumulate-grad hooks called. Each official
    method leaves the gradients zero, so this plants exactly ``grads``."""
    with torch.enable_grad():
        sum((p * g).sum() for p, g in zip(params, grads)).backward()


def _official_step(opt: SSESAM, params: list[torch.Tensor], grads, device: torch.device) -> float:
    """One SSE-SAM step as the published training loop drives it, on preset
    gradients ``grads`` (head, head at ``w + e_H``, tail, tail at ``w + e_T``).
    Returns the seconds the optimizer's methods took; planting is not timed."""
    calls = (
        lambda: opt.compute_and_add_epsilon(0),
        opt.compute_grad_sum_and_restore_p,
        lambda: opt.compute_and_add_epsilon(1),
        opt.compute_grad_sum_and_restore_p,
    )
    seconds = 0.0
    for g, call in zip(grads, calls):
        _plant(params, g)
        seconds += _timed(call, device)
    return seconds + _timed(opt.update, device)


def optimizer_side(
    model: nn.Module,
    device: torch.device,
    backends=("reference", "torch", "triton"),
    steps: int = 20,
    warmup: int = 3,
) -> dict[str, dict]:
    """Time the optimizer side of an SSE-SAM stage-1 step through the public
    official methods (see :func:`_official_step`), the forward and backward
    passes replaced by untimed backwards that plant precomputed gradients.
    Returns per backend: median seconds per step, p20, p80, bytes moved (from
    PASSES_STAGE1) and GB/s."""
    out = {}
    model = copy.deepcopy(model).to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    grads = [[torch.randn_like(p) * 1e-3 for p in trainable] for _ in range(4)]
    n = sum(p.numel() for p in trainable)
    elem = trainable[0].element_size()
    for backend in backends:
        m = copy.deepcopy(model)
        base = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-3)
        opt = SSESAM(base, m, 0.05, 0.10, backend=backend)
        params = [p for p in m.parameters() if p.requires_grad]
        times = [_official_step(opt, params, grads, device) for _ in range(warmup + steps)][warmup:]
        med = statistics.median(times)
        moved = PASSES_STAGE1[backend] * n * elem
        out[backend] = {
            "median_s": med,
            "p20_s": _quantile(times, 0.2),
            "p80_s": _quantile(times, 0.8),
            "bytes": moved,
            "gbps": moved / med / 1e9,
        }
    return out


def copy_bandwidth(n: int, device: torch.device, dtype=torch.float32, reps: int = 20) -> float:
    """GB/s of a device-to-device copy of ``n`` elements (read + write counted)."""
    src, dst = torch.randn(n, device=device, dtype=dtype), torch.empty(n, device=device, dtype=dtype)
    for _ in range(3):
        dst.copy_(src)
    ts = [_timed(lambda: dst.copy_(src), device) for _ in range(reps)]
    return 2 * n * src.element_size() / statistics.median(ts) / 1e9


def report(res: dict[str, dict], gpu: bool) -> str:
    head = f"{'schedule':<16}{'× SGD':>8}{'× published':>13}"
    if gpu:
        head += f"{'median ms (p20–p80)':>26}{'peak MB':>10}"
    rows = [head]
    for name, r in res.items():
        row = f"{name:<16}{r['x_sgd']:>8.2f}{r['x_published']:>13.2f}"
        if gpu:
            spread = f"{r['median_s'] * 1e3:.2f} ({r['p20_s'] * 1e3:.2f}–{r['p80_s'] * 1e3:.2f})"
            row += f"{spread:>26}{(r['peak_bytes'] or 0) / 2**20:>10.0f}"
        rows.append(row)
    return "\n".join(rows)


def _chart(results: dict, path: str) -> None:
    cases = [(key, res) for key, res in results["whole_step"].items()]
    fig = agg_figure((4.2 * max(1, len(cases)), 3.6), layout=None)
    axes = fig.subplots(1, max(1, len(cases)), squeeze=False)
    for ax, (key, res) in zip(axes[0], cases):
        names = list(res)
        ax.barh(names, [res[n]["x_sgd"] for n in names], color="tab:blue")
        ax.axvline(1.0, color="grey", lw=0.8)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("time per step, × SGD")
        ax.invert_yaxis()
    fig.suptitle(results["device"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run_bench(args) -> int:
    """The ``sse-sam-fast bench`` command: print tables, write bench.json and bench.png."""
    import json
    import os

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if gpu else f"CPU, {torch.get_num_threads()} threads"
    backends = ["torch"] + (["triton"] if gpu and triton_available() else [])
    results = {"device": f"{name}; torch {torch.__version__}", "whole_step": {}, "optimizer_side": {}}
    if gpu and "triton" in backends:
        import triton

        results["device"] += f"; triton {triton.__version__}"
    print(results["device"])
    models = args.models or (["resnet32", "resnet32-gn", "vit"] + (["resnet34"] if gpu else []))
    if args.quick:
        models = models[:1]
    if args.part in ("whole", "all"):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(args.batch, 3, 32, 32, generator=g).to(device)
        y = torch.randint(0, 100, (args.batch,), generator=g).to(device)
        tail = torch.zeros(args.batch, dtype=torch.bool)
        tail[torch.randperm(args.batch, generator=g)[: round(args.tail_frac * args.batch)]] = True
        tail = tail.to(device)
        for model_name in models:
            torch.manual_seed(0)
            model = MODELS[model_name](100)
            # split changes BatchNorm's batch statistics: only timed where it is exact
            schedules = [f"exact/{b}" for b in backends]
            if "resnet32" != model_name and model_name != "resnet34":
                schedules += [f"split/{b}" for b in backends]
            for stage in (1, 2):
                res = whole_step(model, x, y, tail, stage, args.steps, args.warmup, tuple(schedules))
                key = f"{model_name} stage {stage}"
                results["whole_step"][key] = res
                print(
                    f"\nWhole SSE-SAM step, {key}: batch {args.batch}, {int(tail.sum())} tail samples, "
                    f"median of {args.steps} after {args.warmup} warm-up\n" + report(res, gpu)
                )
    if args.part in ("optimizer", "all"):
        for model_name in [m for m in models if m in ("resnet32", "resnet34")] or ["resnet32"]:
            model = MODELS[model_name](100)
            n = sum(p.numel() for p in model.parameters())
            res = optimizer_side(model, device, ["reference", *backends], max(args.steps, 5), args.warmup)
            copy_gbps = copy_bandwidth(n, device)
            results["optimizer_side"][model_name] = {"params": n, "copy_gbps": copy_gbps, **res}
            ref = res["reference"]["median_s"]
            print(
                f"\nOptimizer side of an SSE-SAM stage-1 step (official methods, preset gradients): "
                f"{model_name} ({n / 1e6:.2f}M params)"
                + (f"; device-to-device copy {copy_gbps:.1f} GB/s" if gpu else "")
            )
            # bandwidth and absolute times only on a GPU: on a CPU the buffers of the
            # small model sit in cache and the clock is shared with everything else
            print(
                f"{'backend':<10}{'× reference':>12}{'MB moved':>10}"
                + (f"{'GB/s':>8}{'% copy':>8}   median ms (p20–p80)" if gpu else "")
            )
            for b, r in res.items():
                row = f"{b:<10}{r['median_s'] / ref:>12.3f}{r['bytes'] / 1e6:>10.1f}"
                if gpu:
                    row += (
                        f"{r['gbps']:>8.1f}{100 * r['gbps'] / copy_gbps:>7.0f}%   {r['median_s'] * 1e3:.3f} "
                        f"({r['p20_s'] * 1e3:.3f}–{r['p80_s'] * 1e3:.3f})"
                    )
                print(row)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench.json"), "w") as f:
            json.dump(results, f, indent=1)
        if results["whole_step"]:
            _chart(results, os.path.join(args.out, "bench.png"))
        print(f"\nwrote {args.out}/bench.json" + (" and bench.png" if results["whole_step"] else ""))
    return 0
