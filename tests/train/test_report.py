"""Plots: one Agg figure helper for runs, comparisons and bench, leaving pyplot's backend alone."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[2]
PNG = b"\x89PNG\r\n\x1a\n"


def test_every_plot_draws_without_pyplot(tmp_path):
    # a notebook's backend must survive a plot: no matplotlib.use, no pyplot at all
    code = f"""
import sys
from pathlib import Path
from sse_sam_fast.bench import _chart
from sse_sam_fast.train.report import plot_compare

out = Path({str(tmp_path)!r})
summary = {{
    "sgd": {{"all": (0.5, 0.1), "tail": (0.3, 0.05)}},
    "ssesam": {{"all": (0.6, 0.1), "tail": (0.5, 0.0)}},
}}
plot_compare(out / "compare.png", summary, ["all", "tail"], "title")
res = {{"sgd": {{"x_sgd": 1.0}}, "exact/torch": {{"x_sgd": 1.4}}}}
_chart({{"device": "CPU", "whole_step": {{"m stage 1": res, "m stage 2": res}}}}, str(out / "bench.png"))
assert "matplotlib.pyplot" not in sys.modules
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for name in ("compare.png", "bench.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG


def test_bench_chart_labels_each_bar_with_its_ratio_and_median(tmp_path):
    from sse_sam_fast.bench import _chart

    res = {
        "sgd": {"x_sgd": 1.0, "median_s": 0.0123},
        "sgd-graph": dict.fromkeys(["x_sgd", "median_s"]),  # n/a on a CPU: no bar
        "exact/torch": {"x_sgd": 1.4, "median_s": 0.0172, "graphed": None},
    }
    fig = _chart({"device": "CPU", "whole_step": {"m stage 1": res}}, str(tmp_path / "bench.png"))
    assert [t.get_text() for t in fig.axes[0].texts] == ["1.00×, 12.3 ms", "1.40×, 17.2 ms"]


def _results(stages):
    epochs = [
        {"epoch": e + 1, "stage": s, "acc": dict.fromkeys(["all", "head", "tail", "many", "few"], 0.5)}
        for e, s in enumerate(stages)
    ]
    groups = {"many": [0], "medium": [1], "few": [2], "head": [0, 1], "tail": [2]}
    return {
        "config": {"eta": 30, "opt": "ssesam", "dataset": "d", "seed": 0},
        "data": {"train_counts": [100, 50, 10], "groups": groups},
        "final": {"per_class": [0.9, 0.8, 0.5]},
        "epochs": epochs,
    }


@pytest.mark.parametrize(
    "stages, switch",
    [([1, 1, 2, 2], 3), ([1, 1, 1], None), ([2, 2], None), ([None, None], None)],
    ids=["switch", "stage-1-only", "resumed-in-stage-2", "not-ssesam"],
)
def test_training_plot_marks_the_stage_switch(tmp_path, stages, switch):
    from sse_sam_fast.train.report import plot_run

    fig = plot_run(tmp_path / "results.png", _results(stages))
    legend = [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
    marked = [t for t in legend if t.startswith("stage 2")]
    assert marked == ([f"stage 2 from epoch {switch} (head rho 0)"] if switch else [])
    if switch:  # at the point of the last stage-1 epoch: what follows trained in stage 2
        (line,) = [ln for ln in fig.axes[1].lines if ln.get_label() == marked[0]]
        assert list(line.get_xdata()) == [switch - 1, switch - 1]
