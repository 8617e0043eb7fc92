"""Tables and plots of runs and comparisons, and the facts about the machine they record.

matplotlib (the ``cli`` extra) is imported only when a plot is drawn, and every
plot is drawn on an Agg figure of its own (:func:`agg_figure`): the library never
changes pyplot's global backend under a notebook or another program.
"""

from __future__ import annotations

import math
import os
import platform
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .. import __version__
from .metrics import REPORTED, class_ranges

PLOT = "results.png"


def agg_figure(size: tuple[float, float], layout: str | None = "constrained"):
    """A :class:`matplotlib.figure.Figure` of ``size`` inches drawn by Agg, without
    pyplot: nothing global is switched, and the figure is freed with its last reference."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def try_plot(draw: Callable[[], None], log: Callable[[str], None]) -> None:
    """``draw()``, or a note when matplotlib is missing: a plot is never worth a failed run."""
    try:
        draw()
    except ImportError as exc:
        log(f"note: no plot ({exc}); pip install 'sse_sam_fast[cli]'")


def machine(device: torch.device) -> dict:
    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }


def versions() -> dict:
    return {"sse_sam_fast": __version__, "torch": torch.__version__, "python": platform.python_version()}


def json_float(x: float) -> float | None:
    return None if math.isnan(x) else round(x, 6)


# ---- one run ------------------------------------------------------------------------------------


def print_table(results: dict, log: Callable[[str], None]) -> None:
    """The final accuracy of a run by group, with each group's rule and class sizes."""
    cfg, data, final = results["config"], results["data"], results["final"]
    counts, groups = data["train_counts"], data["groups"]
    rules = {
        "all": "",
        "many": f"n > {cfg['many_thr']:g}",
        "medium": f"{cfg['few_thr']:g} <= n <= {cfg['many_thr']:g}",
        "few": f"n < {cfg['few_thr']:g}",
        "head": f"n >= eta {cfg['eta']:g}",
        "tail": f"n < eta {cfg['eta']:g}",
    }
    n_test = sum(data["test_counts"])
    log(f"final test accuracy after {final['epoch']} epochs ({n_test} test samples, balanced):")
    log(f"{'group':<8}{'accuracy':>9}  {'classes':>7}  training samples per class")
    for name in REPORTED:
        classes = list(range(len(counts))) if name == "all" else groups[name]
        sizes = [counts[c] for c in classes]
        acc = final["acc"][name]
        shown = "n/a" if acc is None else f"{100 * acc:.2f}%"
        span = f"{min(sizes)}-{max(sizes)}"
        rule = f"{rules[name]}: " if rules[name] else ""
        log(f"{name:<8}{shown:>9}  {len(classes):>7}  {rule}{span}")


def plot_run(path: Path, results: dict):
    """Per-class accuracy against training count; group accuracy over epochs, with
    SSE-SAM's stage switch marked. Returns the figure."""
    cfg, data, final = results["config"], results["data"], results["final"]
    counts = data["train_counts"]
    from matplotlib.ticker import ScalarFormatter

    fig = agg_figure((11, 4.2))
    left, right = fig.subplots(1, 2)
    colors = {"many": "tab:blue", "medium": "tab:orange", "few": "tab:red"}
    for name, color in colors.items():
        cls = data["groups"][name]
        acc = [100 * (final["per_class"][c] if final["per_class"][c] is not None else math.nan) for c in cls]
        left.scatter([counts[c] for c in cls], acc, color=color, label=f"{name} ({len(cls)})", s=22)
    if len(counts) <= 20:
        for c, n in enumerate(counts):
            if final["per_class"][c] is not None:
                left.annotate(
                    str(c),
                    (n, 100 * final["per_class"][c]),
                    fontsize=7,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
    left.axvline(cfg["eta"], color="gray", linestyle=":", label=f"eta = {cfg['eta']:g}")
    left.set_xscale("log")
    left.xaxis.set_major_formatter(ScalarFormatter())
    left.set_ylim(-3, 103)
    left.set_xlabel("training samples of the class")
    left.set_ylabel("test accuracy (%)")
    left.set_title("per-class accuracy after the last epoch")
    left.legend(fontsize=8)
    epochs = [h["epoch"] for h in results["epochs"]]
    for name, style in (("all", "k-"), ("head", "b-"), ("tail", "r-"), ("many", "b:"), ("few", "r:")):
        values = [100 * h["acc"][name] if h["acc"][name] is not None else math.nan for h in results["epochs"]]
        right.plot(epochs, values, style, label=name, linewidth=1.2)
    switch = stage_switch(results["epochs"])
    if switch is not None:
        # the epoch's point is its end: stage 2 starts right after the last stage-1 epoch
        label = f"stage 2 from epoch {switch} (head rho 0)"
        right.axvline(switch - 1, color="gray", linestyle="--", linewidth=1, label=label)
    right.set_ylim(-3, 103)
    right.set_xlabel("epoch")
    right.set_ylabel("test accuracy (%)")
    right.set_title(f"{cfg['opt']} on {cfg['dataset']} (seed {cfg['seed']})")
    right.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    return fig


def stage_switch(history: Sequence[dict]) -> int | None:
    """The first epoch (1-based) SSE-SAM trained in stage 2 after training in stage 1,
    or None: another method, or a run that stayed in one stage."""
    stages = [h.get("stage") for h in history]
    for prev, h in zip(stages, history[1:]):
        if prev == 1 and h.get("stage") == 2:
            return h["epoch"]
    return None


# ---- comparisons --------------------------------------------------------------------------------


def compare_table(
    first: dict,
    methods: Sequence[str],
    summary: dict,
    times: dict,
    columns: Sequence[str],
    seeds: int,
    eta: float,
    tail: Sequence[int],
) -> list[str]:
    """The lines of the Markdown table of a comparison: what was run, then one row
    per method of mean ± std accuracy (%) by column and training time per run
    (with ``sgd`` among the methods, also as a ratio to SGD's mean time).
    ``first`` is the results of one of its runs (the shared configuration)."""
    cfg0, groups = first["config"], first["data"]["groups"]
    lines = [
        f"{cfg0['dataset']} (imbalance {cfg0['imb_factor']:g}, {cfg0['model']}, loss {cfg0['loss']}, "
        f"{cfg0['epochs']} epochs), seeds 0-{seeds - 1}: test accuracy (%), mean ± std over seeds.",
        f"Many n > {cfg0['many_thr']:g} (classes {class_ranges(groups['many'])}), "
        f"Few n < {cfg0['few_thr']:g} "
        f"(classes {class_ranges(groups['few'])}); head/tail at eta = {eta:g} for every method "
        f"(tail classes {class_ranges(tail)}).",
        "",
        "| method | "
        + " | ".join(c.capitalize() for c in columns)
        + " | train time / run (s) |"
        + (" time / SGD |" if "sgd" in methods else ""),
        "|---|" + "---:|" * (len(columns) + 1 + ("sgd" in methods)),
    ]
    for m in methods:
        cells = [f"{100 * summary[m][c][0]:.2f} ± {100 * summary[m][c][1]:.2f}" for c in columns]
        cells.append(f"{times[m][0]:.2f} ± {times[m][1]:.2f}")
        if "sgd" in methods:
            cells.append(f"{times[m][0] / times['sgd'][0]:.2f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def plot_compare(path: Path, summary: dict, columns: Sequence[str], title: str = "") -> None:
    fig = agg_figure((9, 4))
    ax = fig.subplots()
    methods = list(summary)
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(columns))]
        means = [100 * summary[method][c][0] for c in columns]
        stds = [100 * summary[method][c][1] for c in columns]
        # points, not bars: the axis does not start at 0, and bars would exaggerate the gaps
        ax.errorbar(xs, means, yerr=stds, fmt="o", capsize=3, markersize=5, label=method)
    ax.set_xticks(range(len(columns)), [c.capitalize() for c in columns])
    ax.grid(axis="y", alpha=0.3)
    low = min(100 * (summary[m][c][0] - summary[m][c][1]) for m in methods for c in columns)
    ax.set_ylim(max(0.0, 10 * math.floor(low / 10 - 0.5)), 100)
    ax.set_ylabel("test accuracy (%), mean ± std")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, ncol=len(methods), loc="upper center", bbox_to_anchor=(0.5, -0.08))
    fig.savefig(path, dpi=110)
