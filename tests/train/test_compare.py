"""compare: methods x seeds tabulated as mean ± std; runs reused or resumed."""

from __future__ import annotations

import dataclasses
import json

import pytest

from sse_sam_fast.train.compare import compare
from sse_sam_fast.train.config import OptionError, TrainConfig
from sse_sam_fast.train.metrics import mean_std
from tests.train.short_runs import assert_same_run, digits, quiet


def test_compare_tabulates_mean_and_std(tmp_path):
    base = digits(epochs=1)
    lines = []
    report = compare(base, tmp_path, seeds=2, methods=["sgd", "imbsam"], plot=True, log=lines.append)
    assert (tmp_path / "compare.png").exists() and (tmp_path / "compare.md").exists()
    assert json.loads((tmp_path / "compare.json").read_text()) == json.loads(json.dumps(report))
    assert report["eta"] == 40 and len(report["runs"]) == 4
    for method in ("sgd", "imbsam"):
        alls = [json.loads((tmp_path / f"{method}-seed{s}" / "results.json").read_text()) for s in (0, 1)]
        values = [r["final"]["acc"]["few"] for r in alls]
        assert report["summary"][method]["few"] == pytest.approx(list(mean_std(values)))
    table = (tmp_path / "compare.md").read_text()
    assert "| method | Many | Medium | Few | All | Head | Tail |" in table
    assert table.count(" ± ") >= 2 * 7 and "| imbsam |" in table
    assert table in "\n".join(lines) + "\n"

    again = []
    compare(base, tmp_path, seeds=2, methods=["sgd", "imbsam"], plot=False, log=again.append)
    assert sum("(reused)" in line for line in again) == 4
    with pytest.raises(OptionError, match="holds a run with --lr") as exc:
        compare(dataclasses.replace(base, lr=0.2), tmp_path, seeds=1, methods=["sgd"], log=lambda _: None)
    assert exc.value.option == "--out"


def test_compare_reports_head_tail_under_one_eta(tmp_path):
    # each method trains with its own eta (20 vs 100 here), the table uses SSE-SAM's for all
    base = TrainConfig(dataset="synthetic-lt", epochs=1, device="cpu", num_classes=10)
    report = compare(base, tmp_path, seeds=1, methods=["imbsam"], plot=False, log=lambda _: None)
    run = json.loads((tmp_path / "imbsam-seed0" / "results.json").read_text())
    assert run["config"]["eta"] == 20 and report["eta"] == 100
    tail = [c for c, n in enumerate(run["data"]["train_counts"]) if n < 100]
    expected = sum(run["final"]["per_class"][c] for c in tail) / len(tail)
    assert report["runs"][0]["acc"]["tail"] == pytest.approx(expected)


def test_compare_resumes_an_unfinished_run(tmp_path):
    base = digits(epochs=2)
    quiet(dataclasses.replace(base, opt="sgd", seed=0), tmp_path / "sgd-seed0", stop_after=1)
    lines = []
    compare(base, tmp_path, seeds=1, methods=["sgd"], plot=False, log=lines.append)
    assert "(resumed)" in lines[0]
    quiet(dataclasses.replace(base, opt="sgd", seed=0), tmp_path / "fresh")
    assert_same_run(tmp_path / "fresh", tmp_path / "sgd-seed0")


def test_compare_hands_the_sam_options_to_the_methods_that_have_them(tmp_path):
    # sgd has no ASAM or clipping, and only imbsam has a normalisation: those runs
    # keep their defaults instead of refusing the whole comparison
    base = dataclasses.replace(
        digits(epochs=1), adaptive=True, max_grad_norm=5.0, imbsam_normalization="group"
    )
    compare(base, tmp_path, seeds=1, methods=["sgd", "imbsam", "sam"], plot=False, log=lambda _: None)
    saved = {
        m: json.loads((tmp_path / f"{m}-seed0" / "results.json").read_text())["config"]
        for m in ("sgd", "imbsam", "sam")
    }
    assert (saved["sgd"]["adaptive"], saved["sgd"]["max_grad_norm"]) == (False, None)
    assert (saved["imbsam"]["adaptive"], saved["imbsam"]["imbsam_normalization"]) == (True, "group")
    assert (saved["sam"]["max_grad_norm"], saved["sam"]["imbsam_normalization"]) == (5.0, "batch")


def test_a_finished_run_from_before_the_new_options_is_reused(tmp_path):
    base = digits(epochs=1)
    compare(base, tmp_path, seeds=1, methods=["sgd"], plot=False, log=lambda _: None)
    path = tmp_path / "sgd-seed0" / "results.json"
    results = json.loads(path.read_text())
    for key in ("adaptive", "max_grad_norm", "imbsam_normalization"):
        del results["config"][key]
    path.write_text(json.dumps(results))
    lines = []
    compare(base, tmp_path, seeds=1, methods=["sgd"], plot=False, log=lines.append)
    assert "(reused)" in lines[0]


def test_compare_trains_each_reuse_k_and_policy_and_gives_time_ratios_to_sgd(tmp_path):
    """--reuse 1 2 --reuse-policy perturbation correction: a row per SAM-family
    method, K and policy (K = 1 once); SGD once; every row's time over SGD's."""
    base = digits(epochs=1)
    report = compare(
        base,
        tmp_path,
        seeds=1,
        methods=["sgd", "ssesam"],
        reuse=[1, 2],
        reuse_policies=["perturbation", "correction"],
        plot=False,
        log=lambda _: None,
    )
    rows = ["sgd", "ssesam", "ssesam-reuse2", "ssesam-reuse2-correction"]
    assert report["methods"] == rows
    for row in rows:
        saved = json.loads((tmp_path / f"{row}-seed0" / "results.json").read_text())["config"]
        assert (saved["reuse"], saved["reuse_policy"]) == {
            "ssesam-reuse2": (2, "perturbation"),
            "ssesam-reuse2-correction": (2, "correction"),
        }.get(row, (1, "perturbation"))
    table = (tmp_path / "compare.md").read_text()
    assert "time / SGD |" in table
    sgd = report["train_time_s"]["sgd"][0]
    for row in rows:
        ratio = report["train_time_s"][row][0] / sgd
        line = table.split(f"| {row} |")[1].split("\n")[0]
        assert line.endswith(f" {ratio:.2f} |")
    with pytest.raises(OptionError, match="applies to sam, imbsam and ssesam") as exc:
        compare(base, tmp_path / "x", seeds=1, methods=["sgd"], reuse=[4], log=lambda _: None)
    assert exc.value.option == "--reuse"
