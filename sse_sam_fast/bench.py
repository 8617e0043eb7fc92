"""Whole-step timing: plain SGD (eager, and captured as one CUDA graph) vs the
published schedule vs this library's ``opt.step`` and ``opt.capture``.

Each row trains its own copy of the same model on the same batch; the rows take
turns step by step, in rotating order, so that drift in the machine's speed
(other processes, thermal state) is spread over all of them, and ratios are
medians of the ratios within each round. Reported: median seconds per step with
p20/p80, ratios to eager SGD, to captured SGD (CUDA) and to the published
schedule, and for ``opt.capture`` whether the timed steps replayed graphs (a
fallback to the eager step shows as ``graphed: no``; on a CPU it always does).
Tables: SSE-SAM in stage 1 and stage 2, SAM and ImbSAM, per model.
"""

from __future__ import annotations

import copy
import os
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

from . import SAM, SSESAM, ImbSAM, _torch_private
from .backends import triton_available
from .train.models import MODELS
from .train.report import agg_figure, try_plot
from .verify import per_sample_losses, published_step


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


# the cases of a whole-step table: (key suffix, method, SSE-SAM stage)
CASES = {"ssesam": [("stage 1", "ssesam", 1), ("stage 2", "ssesam", 2)], "sam": [("sam", "sam", 1)]}
CASES["imbsam"] = [("imbsam", "imbsam", 1)]
PRIME = 8  # calls that may go to a captured step's eager warm-up, capture and check


def _wrap(method: str, base: torch.optim.Optimizer, model: nn.Module, backend: str, stage: int):
    if method == "sam":
        return SAM(base, model, 0.05, backend=backend)
    if method == "imbsam":
        return ImbSAM(base, model, 0.05, backend=backend)
    opt = SSESAM(base, model, 0.05, 0.10, gamma=0.5, total_epochs=2, backend=backend)
    if stage == 2:
        opt.update_rho()
    return opt


def _graphed_sgd(model: nn.Module, base: torch.optim.Optimizer, x, y) -> Callable[[], None]:
    """Forward, backward and SGD step of ``model`` as one CUDA graph, torch's
    whole-network recipe: static inputs, warm-up on a side stream, gradients set
    to None before capture so that backward allocates them in the graph's pool.
    Where the capture fails, the eager step, with a warning (the row then times
    eager SGD), and the process can still capture (``capture.recording``)."""
    from .optim.capture import recording

    static_x, static_y = x.clone(), y.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            base.zero_grad(set_to_none=True)
            per_sample_losses(model, static_x, static_y).mean().backward()
            base.step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    base.zero_grad(set_to_none=True)
    try:
        with recording(graph):
            per_sample_losses(model, static_x, static_y).mean().backward()
            base.step()
    except Exception as err:  # nothing ran: the weights are those of the warm-ups
        warnings.warn(
            f"sgd-graph: capture failed ({type(err).__name__}: {err}); the row times the eager SGD step",
            RuntimeWarning,
            stacklevel=2,
        )

        def eager() -> None:
            base.zero_grad()
            per_sample_losses(model, x, y).mean().backward()
            base.step()

        return eager

    def step() -> None:
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()

    return step


def _runners(model, x, y, tail, method, stage, schedules, sgd_graph) -> tuple[dict, dict]:
    """``(name -> one step, name -> captured step)`` for every row, each on its own
    copy of ``model``; captured steps already primed (their graphs replayed)."""
    device = x.device

    def make(backend=None):
        m = copy.deepcopy(model).to(device).train()
        base = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-3)
        return m, base if backend is None else _wrap(method, base, m, backend, stage)

    m_sgd, o_sgd = make()

    def sgd_step():
        o_sgd.zero_grad()
        per_sample_losses(m_sgd, x, y).mean().backward()
        o_sgd.step()

    runners: dict[str, Callable[[], None]] = {"sgd": sgd_step}
    if sgd_graph:
        runners["sgd-graph"] = _graphed_sgd(*make(), x, y)
    m_pub, o_pub = make("reference")
    runners["published"] = lambda: published_step(o_pub, m_pub, x, y, tail, method)
    captured = {}
    for name in schedules:
        schedule, backend = name.split("/")
        m, o = make(backend)
        if schedule == "captured":
            captured[name] = o.capture(lambda xs, ys, m=m: per_sample_losses(m, xs, ys))
            runners[name] = lambda c=captured[name]: c(x, y, tail_mask=tail)
            for _ in range(PRIME if device.type == "cuda" else 0):
                runners[name]()
                if captured[name].graphed:
                    break
        else:
            runners[name] = lambda m=m, o=o, s=schedule: o.step(_closure(m, x, y), tail, schedule=s)
    return runners, captured


def _closure(model: nn.Module, x, y):
    """``opt.step``'s closure; ``closure(idx)`` for the split schedule."""

    def closure(idx=None):
        return per_sample_losses(model, x, y) if idx is None else per_sample_losses(model, x[idx], y[idx])

    return closure


def whole_step(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    tail: torch.Tensor,
    stage: int = 1,
    steps: int = 5,
    warmup: int = 1,
    schedules: tuple[str, ...] = ("exact/torch",),
    method: str = "ssesam",
    sgd_graph: bool | None = None,
) -> dict[str, dict]:
    """Seconds per step (and peak memory on CUDA) of ``method`` (``"ssesam"`` in
    ``stage`` 1 or 2, ``"sam"``, ``"imbsam"``) against plain SGD. Rows: ``sgd``
    (eager), ``sgd-graph`` (forward, backward and SGD step as one CUDA graph;
    ``None`` values where not CUDA, or ``sgd_graph=False``), ``published`` (the
    reference backend driven through the official methods as the published
    training loop does) and each of ``schedules``: ``"exact/<backend>"`` or
    ``"split/<backend>"`` (``opt.step``), ``"captured/<backend>"``
    (``opt.capture``; ``graphed`` tells whether every timed step replayed a CUDA
    graph: on a CPU they run eagerly). Ratios are medians of per-round ratios."""
    device = x.device
    graphable = device.type == "cuda" and sgd_graph is not False
    runners, captured = _runners(model, x, y, tail, method, stage, schedules, graphable)
    times: dict[str, list[float]] = {k: [] for k in runners}
    peak: dict[str, int] = dict.fromkeys(runners, 0)
    replays = dict.fromkeys(captured, 0)
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
                if name in captured:
                    replays[name] += captured[name].graphed
                if device.type == "cuda":
                    peak[name] = max(peak[name], torch.cuda.max_memory_allocated(device))

    def ratio(v: list[float], to: str) -> float | None:
        # pairing steps timed seconds apart cancels the slow drift of a shared machine's speed
        return statistics.median(a / b for a, b in zip(v, times[to])) if to in times else None

    res = {
        k: {
            "median_s": statistics.median(v),
            "p20_s": _quantile(v, 0.2),
            "p80_s": _quantile(v, 0.8),
            "x_sgd": ratio(v, "sgd"),
            "x_sgd_graph": ratio(v, "sgd-graph"),
            "x_published": ratio(v, "published"),
            "peak_bytes": peak[k] or None,
            "graphed": replays[k] == len(v) if k in captured else None,
        }
        for k, v in times.items()
    }
    if "sgd-graph" not in res:  # n/a: a row of None, so that every table has the same rows
        sgd = res.pop("sgd")
        res = {"sgd": sgd, "sgd-graph": dict.fromkeys(sgd), **res}
    return res


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


def _x(value: float | None, width: int) -> str:
    return f"{value:>{width}.2f}" if value is not None else f"{'n/a':>{width}}"


def _ms(r: dict) -> str:
    """Median milliseconds with the p20–p80 spread."""
    return f"{r['median_s'] * 1e3:.2f} ({r['p20_s'] * 1e3:.2f}–{r['p80_s'] * 1e3:.2f})"


def report(res: dict[str, dict], gpu: bool) -> str:
    """The table of :func:`whole_step`: ratios, then the medians they come from (on a
    CPU those depend on what else the machine runs; the ratios much less)."""
    head = f"{'schedule':<17}{'× SGD':>7}{'× SGD graph':>13}{'× published':>13}{'graphed':>9}"
    head += f"{'median ms (p20–p80)':>26}" + (f"{'peak MB':>10}" if gpu else "")
    rows = [head]
    for name, r in res.items():
        if r["median_s"] is None:
            rows.append(f"{name:<17}{'n/a':>7}   (CUDA only)")
            continue
        graphed = {None: "", True: "yes", False: "no"}[r["graphed"]]
        row = f"{name:<17}{_x(r['x_sgd'], 7)}{_x(r['x_sgd_graph'], 13)}{_x(r['x_published'], 13)}{graphed:>9}"
        row += f"{_ms(r):>26}" + (f"{(r['peak_bytes'] or 0) / 2**20:>10.0f}" if gpu else "")
        rows.append(row)
    if not gpu and any(r["graphed"] is False for r in res.values()):
        rows.append("captured/* ran eagerly: opt.capture replays CUDA graphs on a CUDA device only")
    return "\n".join(rows)


def _chart(results: dict, path: str):
    """One panel per whole-step table: a bar per row, time per step as a multiple of
    SGD's, each bar labelled with that ratio and its median. Returns the figure."""
    cases = list(results["whole_step"].items())
    cols = min(4, max(1, len(cases)))
    nrows = max(1, -(-len(cases) // cols))
    fig = agg_figure((4.2 * cols, 3.0 * nrows), layout=None)
    axes = fig.subplots(nrows, cols, squeeze=False).ravel()
    for ax, (key, res) in zip(axes, cases):
        names = [n for n in res if res[n].get("x_sgd") is not None]  # n/a rows are left out
        labels = [n + (" (eager)" if res[n].get("graphed") is False else "") for n in names]
        ratios = [res[n]["x_sgd"] for n in names]
        bars = ax.barh(labels, ratios, color="tab:blue")
        ax.bar_label(bars, [_bar_label(res[n]) for n in names], padding=2, fontsize=7)
        ax.set_xlim(0, 1.7 * max(ratios, default=1.0))  # room for the labels right of the longest bar
        ax.axvline(1.0, color="grey", lw=0.8)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("time per step, × SGD")
        ax.invert_yaxis()
    for ax in axes[len(cases) :]:
        ax.set_axis_off()
    fig.suptitle(results["device"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return fig


def _bar_label(r: dict) -> str:
    ms = r.get("median_s")
    return f"{r['x_sgd']:.2f}×" + (f", {ms * 1e3:.3g} ms" if ms is not None else "")


def _whole_steps(args, models: list[str], backends: list[str], device: torch.device, done) -> None:
    """The whole-step tables of ``run_bench``: per model, SSE-SAM in both stages,
    SAM and ImbSAM (``args.methods``), each printed and passed to ``done(key, rows)``
    as it finishes."""
    gpu = device.type == "cuda"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 100, (args.batch,), generator=g).to(device)
    tail = torch.zeros(args.batch, dtype=torch.bool)
    tail[torch.randperm(args.batch, generator=g)[: round(args.tail_frac * args.batch)]] = True
    tail = tail.to(device)
    # captured where a graph can be replayed: triton on a GPU; elsewhere it runs eagerly
    captured = ["captured/triton" if "triton" in backends and gpu else "captured/torch"]
    methods = getattr(args, "methods", None) or (["ssesam"] if args.quick else list(CASES))
    for model_name in models:
        torch.manual_seed(0)
        model = MODELS[model_name](100)
        batchnorm = any(isinstance(m, _torch_private.BATCH_NORMS) for m in model.modules())
        for suffix, method, stage in (case for m in methods for case in CASES[m]):
            schedules = [f"exact/{b}" for b in backends] + captured
            if not batchnorm and method != "sam":  # split changes BatchNorm's batch statistics
                schedules += [f"split/{b}" for b in backends]
            res = whole_step(
                model, x, y, tail, stage, args.steps, args.warmup, tuple(schedules), method=method
            )
            key = f"{model_name} {suffix}"
            print(
                f"\nWhole step, {key}: batch {args.batch}, {int(tail.sum())} tail samples, "
                f"median of {args.steps} after {args.warmup} warm-up\n" + report(res, gpu)
            )
            done(key, res)


def _save(results: dict, out: str) -> None:
    """``out/bench.json``, replaced whole: rewritten after every table, so that a
    run cut short (a time limit) keeps the tables it finished."""
    import json
    import os

    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "bench.json")
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(path + ".tmp", path)


def run_bench(args) -> int:
    """The ``sse-sam-fast bench`` command: print tables, write bench.json and bench.png."""
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

        def done(key: str, rows: dict) -> None:
            results["whole_step"][key] = rows
            if args.out:
                _save(results, args.out)

        _whole_steps(args, models, backends, device, done)
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
            # bandwidth only on a GPU: on a CPU the buffers of the small model sit in
            # cache, so bytes over time measures no memory system
            print(
                f"{'backend':<10}{'× reference':>12}{'MB moved':>10}"
                + (f"{'GB/s':>8}{'% copy':>8}" if gpu else "")
                + "   median ms (p20–p80)"
            )
            for b, r in res.items():
                row = f"{b:<10}{r['median_s'] / ref:>12.3f}{r['bytes'] / 1e6:>10.1f}"
                if gpu:
                    row += f"{r['gbps']:>8.1f}{100 * r['gbps'] / copy_gbps:>7.0f}%"
                print(row + f"   {r['median_s'] * 1e3:.3f} ({r['p20_s'] * 1e3:.3f}–{r['p80_s'] * 1e3:.3f})")
    if args.out:
        _save(results, args.out)
        chart = f"{args.out}/bench.png"
        if results["whole_step"]:
            try_plot(lambda: _chart(results, chart), print)
        print(f"\nwrote {args.out}/bench.json" + (f" and {chart}" if os.path.exists(chart) else ""))
    return 0
