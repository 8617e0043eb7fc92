"""The training loop: a run and its outputs, every loss, models, schedules, the output directory."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from sse_sam_fast.train.config import OptionError, TrainConfig, resolve
from sse_sam_fast.train.data import long_tail_counts
from sse_sam_fast.train.loop import build_model, load_data, train
from sse_sam_fast.train.losses import NormedLinear
from sse_sam_fast.train.metrics import group_accuracy
from tests.train.short_runs import DIGITS, digits, fake_cifar, quiet, write_fake_cifar


def test_run_writes_results_checkpoint_and_plot(tmp_path):
    lines = []
    results = train(digits(), tmp_path / "run", log=lines.append)
    out = tmp_path / "run"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "results.json", "results.png"]
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert saved["finished"] and saved["sessions"] == 1 and saved["wall_time_s"] > 0
    assert saved["versions"]["sse_sam_fast"] and saved["versions"]["torch"] == torch.__version__
    assert saved["config"]["eta"] == 40 and saved["config"]["opt"] == "ssesam"
    assert [e["epoch"] for e in saved["epochs"]] == [1, 2]
    assert saved["epochs"][1]["lr"] < saved["epochs"][0]["lr"] == 0.05  # cosine decay
    assert saved["data"]["train_counts"] == DIGITS
    groups = saved["data"]["groups"]
    assert groups["tail"] == [5, 6, 7, 8, 9] and groups["few"] == [7, 8, 9]
    final = saved["final"]
    assert len(final["per_class"]) == 10
    # the group columns are means of the per-class accuracies, head/tail under the run's eta
    expected = group_accuracy(final["per_class"], {k: groups[k] for k in groups})
    assert final["acc"] == pytest.approx(expected, abs=1e-6)
    assert final["acc"] == pytest.approx(saved["epochs"][-1]["acc"])
    text = "\n".join(lines)
    assert "tail classes (count < eta=40): 5-9" in text and "few" in text


@pytest.mark.parametrize("loss", ["ce", "ldam", "la", "vs"])
def test_every_loss_trains(tmp_path, loss):
    results = quiet(digits(loss=loss, opt="imbsam", epochs=3, lr=0.1), tmp_path)
    assert results["final"]["acc"]["all"] > 0.2  # chance is 0.1
    assert all(math.isfinite(e["loss"]) for e in results["epochs"])


def test_ldam_uses_a_cosine_classifier(tmp_path):
    cfg = resolve(digits(loss="ldam"))
    data = load_data(cfg)
    assert isinstance(build_model(cfg, data)[-1], NormedLinear)
    cifar = resolve(TrainConfig(dataset="cifar10-lt", loss="ldam"))
    fake = write_fake_cifar(tmp_path, per_class=8)
    data = load_data(dataclasses.replace(cifar, data_dir=str(fake), imb_factor=2.0))
    assert isinstance(build_model(cifar, data).fc, NormedLinear)


def test_resnet32_on_fake_cifar(tmp_path):
    cfg = fake_cifar(tmp_path, model="resnet32", opt="ssesam", epochs=1, batch_size=32, threads=1)
    results = quiet(cfg, tmp_path / "run")
    assert results["finished"] and len(results["final"]["per_class"]) == 10
    assert results["data"]["train_counts"] == long_tail_counts(16, 10, 4)
    assert results["config"]["model"] == "resnet32" and results["config"]["threads"] == 1


def test_split_schedule_matches_exact_on_an_mlp(tmp_path):
    # no BatchNorm: the split schedule computes the same update, up to rounding
    exact = quiet(digits(epochs=1), tmp_path / "exact")
    split = quiet(digits(epochs=1, schedule="split"), tmp_path / "split")
    auto = quiet(digits(epochs=1, schedule="auto"), tmp_path / "auto")
    a = torch.load(tmp_path / "exact" / "checkpoint.pt", weights_only=True)["model"]
    for other in ("split", "auto"):
        b = torch.load(tmp_path / other / "checkpoint.pt", weights_only=True)["model"]
        for k in a:
            assert torch.allclose(a[k], b[k], atol=1e-5), (other, k)
    assert split["config"]["schedule"] == "split" and auto["epochs"][0]["loss"] == pytest.approx(
        exact["epochs"][0]["loss"], abs=1e-5
    )


def test_out_directory_rules(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(OptionError, match="is a file") as exc:
        quiet(digits(epochs=1), target)
    assert exc.value.option == "--out"

    quiet(digits(epochs=2), tmp_path / "run", stop_after=1)
    with pytest.raises(OptionError, match="unfinished run"):
        quiet(digits(epochs=2), tmp_path / "run")
    quiet(digits(epochs=2), tmp_path / "run", overwrite=True)
    lines = []
    # finished, same configuration (device and threads are no part of it): trained again in place
    train(digits(epochs=2, threads=2), tmp_path / "run", quiet=True, plot=False, log=lines.append)
    assert any("replacing the finished run" in line for line in lines)
    # finished, another configuration: a result that only --overwrite replaces
    with pytest.raises(OptionError, match=r"finished run with --epochs 2 \(this run: --epochs 1\)") as exc:
        quiet(digits(epochs=1), tmp_path / "run")
    assert exc.value.option == "--out"
    assert json.loads((tmp_path / "run" / "results.json").read_text())["config"]["epochs"] == 2  # untouched
    quiet(digits(epochs=1), tmp_path / "run", overwrite=True)
    assert json.loads((tmp_path / "run" / "results.json").read_text())["config"]["epochs"] == 1


def test_a_finished_run_is_told_apart_by_the_options_its_method_reads(tmp_path):
    quiet(digits(epochs=1, opt="sgd"), tmp_path / "run")
    # an SGD run saved before unread options were refused holds any value there
    results = tmp_path / "run" / "results.json"
    saved = json.loads(results.read_text())
    saved["config"]["rho"] = 0.3
    results.write_text(json.dumps(saved))
    quiet(digits(epochs=1, opt="sgd"), tmp_path / "run")  # the same SGD run: trained again
    with pytest.raises(OptionError, match="--opt sgd"):
        quiet(digits(epochs=1, opt="sam"), tmp_path / "run")


def test_progress_bar_shows_the_running_loss(tmp_path, monkeypatch):
    from sse_sam_fast.train import loop

    class Bar:
        def __init__(self):
            self.postfix, self.updates = [], 0

        def set_postfix_str(self, text, refresh=True):
            self.postfix.append(text)

        def update(self, n):
            self.updates += n

        def close(self):
            pass

    bars = []
    monkeypatch.setattr(loop, "_progress", lambda total, desc, enabled: bars.append(Bar()) or bars[-1])
    monkeypatch.setattr(loop, "BAR_LOSS_S", 0.0)  # a reading at every batch
    results = train(digits(epochs=2), tmp_path / "run", plot=False, log=lambda _: None)
    assert len(bars) == 2 and all(b.updates == len(b.postfix) == math.ceil(sum(DIGITS) / 64) for b in bars)
    # the last reading is the epoch's mean loss, as its log line reports it
    for bar, epoch in zip(bars, results["epochs"]):
        assert bar.postfix[-1] == f"loss {epoch['loss']:.4f}"
        assert bar.postfix[0] != bar.postfix[-1]  # a running mean, not the final one shown throughout
