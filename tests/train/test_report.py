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
