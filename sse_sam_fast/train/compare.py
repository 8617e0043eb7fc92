"""``sse-sam-fast compare``: several methods over several seeds, tabulated as mean ± std
of Many / Medium / Few / All and head / tail accuracy."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from itertools import product
from pathlib import Path

import torch

from .. import __version__
from .checkpoint import (
    RESULTS,
    config_for_resume,
    first_difference,
    load_checkpoint,
    run_status,
    saved_config,
)
from .config import (
    METHOD_OPTIONS,
    OptionError,
    TrainConfig,
    default_eta,
    for_method,
    option_name,
    resolve,
)
from .loop import train
from .metrics import group_accuracy, head_tail_groups, mean_std
from .registry import METHODS
from .report import compare_table, machine, plot_compare, try_plot, versions

COMPARE_COLUMNS = ("many", "medium", "few", "all", "head", "tail")


def compare(
    base: TrainConfig,
    out: str | Path,
    *,
    seeds: int = 5,
    methods: Sequence[str] = tuple(METHODS),
    reuse: Sequence[int] = (1,),
    reuse_policies: Sequence[str] = ("perturbation",),
    download: bool = False,
    plot: bool = True,
    quiet: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """Train every method in ``methods`` with seeds ``0 .. seeds-1`` (runs in
    ``out/<method>-seed<k>``) and tabulate mean ± std accuracy by group.

    Each method trains with its own ``eta`` unless ``base.eta`` is set; the head and
    tail columns all use one ``eta`` (``base.eta``, else SSE-SAM's default for the
    data set) so that they describe the same classes. A finished run with the same
    configuration is reused, an unfinished one resumed. ``quiet`` drops the line
    per run. ``reuse``: every SAM-family method once per ``K`` (``reuse=K``) and,
    for ``K > 1``, per policy of ``reuse_policies``, its runs in
    ``out/<label>-seed<k>`` and its row ``<label>``: ``<method>-reuse<K>``, with
    ``-correction`` for that policy. With ``sgd`` among the methods the table
    gives each row's training time as a ratio to SGD's.
    """
    out = Path(out)
    device = torch.device(resolve(for_method(base, base.opt)).device)
    if out.exists() and not out.is_dir():
        raise OptionError("--out", f"{out} is a file; --out names a directory for the comparison")
    for method in methods:
        if method not in METHODS:
            raise OptionError("--methods", f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    variants = _variants(methods, reuse, reuse_policies)
    start = time.perf_counter()
    runs, reused = [], 0
    jobs = list(product(variants, range(seeds)))
    for i, ((label, method, k, policy), seed) in enumerate(jobs, 1):
        cfg = dataclasses.replace(for_method(base, method), seed=seed, reuse=k, reuse_policy=policy)
        cfg = resolve(cfg)
        results, note = _run_or_reuse(cfg, out / f"{label}-seed{seed}", download)
        reused += note == " (reused)"
        acc = results["final"]["acc"]
        runs.append({"method": label, "seed": seed, "results": results})
        if quiet:
            continue
        log(
            f"[{i}/{len(jobs)}] {label:<7} seed {seed}: all {100 * acc['all']:.2f}  many "
            f"{100 * acc['many']:.2f}  medium {100 * acc['medium']:.2f}  few {100 * acc['few']:.2f}  "
            f"({results['wall_time_s']:.1f} s){note}"
        )

    first = runs[0]["results"]
    counts = first["data"]["train_counts"]
    eta = base.eta if base.eta is not None else default_eta(base.dataset, "ssesam", counts)
    ht = head_tail_groups(counts, eta)
    methods = [label for label, *_ in variants]
    summary, times = _summarise(runs, methods, ht)
    wall = time.perf_counter() - start
    host = machine(device)
    where = f"{host['gpu']}" if host["gpu"] else f"CPU ({host['cpus']} cores)"
    lines = compare_table(first, methods, summary, times, COMPARE_COLUMNS, seeds, eta, ht["tail"])
    lines += [
        "",
        f"{len(runs)} runs ({reused} reused from {out}) in {wall:.1f} s on {where}, "
        f"torch {torch.__version__}, sse_sam_fast {__version__}.",
    ]
    text = "\n".join(lines)
    log("")
    log(text)

    report = {
        "config": asdict(base),
        "methods": list(methods),
        "seeds": list(range(seeds)),
        "eta": eta,
        "runs": [{"method": r["method"], "seed": r["seed"], "acc": r["acc"]} for r in runs],
        "summary": {m: {c: list(v) for c, v in s.items()} for m, s in summary.items()},
        "train_time_s": {m: list(v) for m, v in times.items()},
        "wall_time_s": round(wall, 3),
        "versions": versions(),
        "machine": host,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text(text + "\n")
    (out / "compare.json").write_text(json.dumps(report, indent=1) + "\n")
    if plot:
        cfg0 = first["config"]
        title = (
            f"{cfg0['dataset']}, {cfg0['model']}, {cfg0['epochs']} epochs, {seeds} seeds; "
            f"head/tail at eta = {eta:g}"
        )
        try_plot(lambda: plot_compare(out / "compare.png", summary, COMPARE_COLUMNS, title), log)
    log(f"wrote {out / 'compare.md'}, compare.json" + (", compare.png" if plot else ""))
    return report


def _variants(
    methods: Sequence[str], reuse: Sequence[int], policies: Sequence[str]
) -> list[tuple[str, str, int, str]]:
    """``(label, method, K, policy)`` per run configuration: each SAM-family method
    once per K, and per policy for K > 1 (K = 1 reuses nothing: no policy)."""
    reuse, policies = list(dict.fromkeys(reuse)), list(dict.fromkeys(policies))  # each once, in order
    readers = METHOD_OPTIONS["reuse"]
    if any(k > 1 for k in reuse) and not any(m in readers for m in methods):
        raise OptionError(
            "--reuse", f"applies to sam, imbsam and ssesam; --methods {' '.join(methods)} has none"
        )
    default = TrainConfig().reuse_policy
    out = []
    for m in methods:
        for k in reuse if m in readers else [1]:
            for policy in policies if k > 1 else [default]:
                suffix = "" if policy == default else f"-{policy}"
                out.append((m if k == 1 else f"{m}-reuse{k}{suffix}", m, k, policy))
    return out


def _run_or_reuse(cfg: TrainConfig, run_dir: Path, download: bool) -> tuple[dict, str]:
    """The results of ``cfg`` in ``run_dir``: a finished run's are reused, an
    unfinished run is resumed, else it trains; with the note for its line."""
    status, note = run_status(run_dir), ""
    ckpt = None
    if status is not None:
        saved = saved_config(run_dir) if status == "finished" else None
        if saved is None:
            ckpt = load_checkpoint(run_dir)
            saved = ckpt["config"]
        differs = first_difference(cfg, saved)
        if differs is not None:
            raise OptionError(
                "--out",
                f"{run_dir} holds a run with {option_name(differs)} {saved.get(differs)} "
                f"(this comparison: {getattr(cfg, differs)}); choose another --out",
            )
    if status == "finished":
        return json.loads((run_dir / RESULTS).read_text()), " (reused)"
    if ckpt is not None:
        cfg, note = config_for_resume(ckpt, asdict(cfg)), " (resumed)"
    results = train(cfg, run_dir, resume=ckpt, download=download, quiet=True, plot=False, log=lambda _: None)
    return results, note


def _summarise(runs: list[dict], methods: Sequence[str], ht: dict[str, list[int]]) -> tuple[dict, dict]:
    """``(summary, times)``: mean ± std of each column and of the training time per
    method; each run gets its columns as ``run["acc"]``, head / tail under ``ht``."""
    table: dict[str, dict[str, list[float]]] = {m: {c: [] for c in COMPARE_COLUMNS} for m in methods}
    for run in runs:
        res = run["results"]
        acc = dict(res["final"]["acc"])
        acc.update(group_accuracy([math.nan if a is None else a for a in res["final"]["per_class"]], ht))
        run["acc"] = {c: acc[c] for c in COMPARE_COLUMNS}
        for c in COMPARE_COLUMNS:
            table[run["method"]][c].append(acc[c])
    summary = {m: {c: mean_std(v) for c, v in cols.items()} for m, cols in table.items()}
    times = {m: mean_std(r["results"]["wall_time_s"] for r in runs if r["method"] == m) for m in methods}
    return summary, times
