"""``train --capture``: the loop through ``opt.capture``, the same run as through ``opt.step``.

On a CPU the captured step runs eagerly, so a captured run must equal an eager
one bitwise, and a run may switch between the two at a resume. The CUDA test
checks that graphs are replayed and give the eager run's weights.
"""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch

from sse_sam_fast.optim.engine import GroupedSAM
from sse_sam_fast.train.checkpoint import config_for_resume, load_checkpoint
from sse_sam_fast.train.config import OptionError, TrainConfig, resolve
from sse_sam_fast.train.loop import capture_choice
from sse_sam_fast.train.losses import build_loss
from sse_sam_fast.verify import assert_close
from tests.train.short_runs import assert_same_run, digits, quiet, weights


@pytest.fixture
def captures(monkeypatch):
    """The loss functions ``opt.capture`` was called with during a run."""
    calls = []
    original = GroupedSAM.capture

    def spy(self, loss_fn, *args, **kw):
        calls.append(loss_fn)
        return original(self, loss_fn, *args, **kw)

    monkeypatch.setattr(GroupedSAM, "capture", spy)
    return calls


def test_on_a_cpu_a_run_through_opt_capture_is_the_eager_run_bitwise(tmp_path, captures):
    cfg = digits(epochs=3, gamma=0.5)  # stage 2 from epoch 2: a new graph key
    eager = quiet(dataclasses.replace(cfg, capture=False), tmp_path / "eager")
    assert captures == []
    captured = quiet(dataclasses.replace(cfg, capture=True), tmp_path / "captured")
    assert len(captures) == 1, "the loop did not step through opt.capture"
    assert_same_run(tmp_path / "eager", tmp_path / "captured")
    assert captured["final"] == eager["final"]
    assert captured["capture"] == {"option": "on", "on": True, "why": "--capture", "graphed": False}
    assert eager["capture"] == {"option": "off", "on": False, "why": "--no-capture", "graphed": None}
    assert [e["graphed_steps"] for e in captured["epochs"]] == [0, 0, 0]  # a CPU runs eagerly
    assert [e["graphed_steps"] for e in eager["epochs"]] == [None, None, None]


@pytest.mark.parametrize(
    "first, then", [(True, False), (False, True)], ids=["captured-eager", "eager-captured"]
)
def test_on_a_cpu_resume_across_capture_on_and_off_gives_the_unbroken_run(tmp_path, first, then):
    cfg = digits(epochs=3, gamma=0.5)
    quiet(cfg, tmp_path / "full")
    quiet(dataclasses.replace(cfg, capture=first), tmp_path / "cut", stop_after=1)
    ckpt = load_checkpoint(tmp_path / "cut")
    assert ckpt["config"]["capture"] is first
    resumed = quiet(config_for_resume(ckpt, {"capture": then}), tmp_path / "cut", resume=ckpt)
    assert resumed["capture"]["on"] is then and resumed["sessions"] == 2
    assert weights(tmp_path / "cut")["config"]["capture"] is then  # the runtime choice is saved
    assert_same_run(tmp_path / "full", tmp_path / "cut")


def test_a_checkpoint_written_before_capture_existed_still_resumes(tmp_path):
    cfg = digits(epochs=2)
    quiet(cfg, tmp_path / "full")
    quiet(cfg, tmp_path / "old", stop_after=1)
    path = tmp_path / "old" / "checkpoint.pt"
    old = torch.load(path, weights_only=True)
    del old["config"]["capture"]
    torch.save(old, path)
    ckpt = load_checkpoint(tmp_path / "old")
    assert ckpt["config"]["capture"] is None  # auto
    quiet(config_for_resume(ckpt, {}), tmp_path / "old", resume=ckpt)
    assert_same_run(tmp_path / "full", tmp_path / "old")
    old["config"]["speed"] = "fast"
    torch.save(old, path)
    with pytest.raises(OptionError, match="cannot read"):  # an unknown field is still refused
        load_checkpoint(tmp_path / "old")


def test_ldam_drw_gets_a_captured_step_per_branch(tmp_path, captures):
    """A CUDA graph records the loss's host-side branch: before and after DRW
    switches on the loop must not replay the same graph."""
    loss = build_loss("ldam", [10, 5, 2], drw_epoch=1)
    loss.set_epoch(0)
    before = loss.host_state()
    loss.set_epoch(1)
    assert loss.host_state() != before
    assert build_loss("ce", [10, 5, 2]).host_state() == ()
    quiet(digits(epochs=2, loss="ldam", drw_epoch=1, opt="imbsam", capture=True), tmp_path)
    assert len(captures) == 2


def _cuda_opt(backend="triton", base=torch.optim.SGD):
    return SimpleNamespace(backend=backend, optimizer=base.__new__(base))


CUDA_DEVICE = torch.device("cuda")


@pytest.mark.parametrize(
    "change, opt, device, words",
    [
        ({}, _cuda_opt(), CUDA_DEVICE, None),
        ({}, _cuda_opt(), torch.device("cpu"), "not cpu"),
        ({"opt": "sgd"}, None, CUDA_DEVICE, "sgd"),
        ({}, _cuda_opt("torch"), CUDA_DEVICE, "backend is torch"),
        ({"schedule": "split"}, _cuda_opt(), CUDA_DEVICE, "exact"),
        ({}, _cuda_opt(base=torch.optim.Adam), CUDA_DEVICE, "not SGD"),
    ],
    ids=["all-hold", "cpu", "sgd", "torch-backend", "split", "adam"],
)
def test_auto_captures_only_where_every_condition_holds(change, opt, device, words):
    on, why = capture_choice(dataclasses.replace(TrainConfig(), **change), opt, device)
    assert on is (words is None)
    assert why.startswith("auto: ") and (words is None or words in why), why
    assert capture_choice(TrainConfig(capture=True), opt, device) == (True, "--capture")
    assert capture_choice(TrainConfig(capture=False), opt, device) == (False, "--no-capture")


@pytest.mark.parametrize(
    "change, words",
    [({"opt": "sgd"}, "--opt sgd has none"), ({"schedule": "split"}, "exact schedule only")],
)
def test_capture_asked_for_where_it_cannot_apply_names_the_option(change, words):
    with pytest.raises(OptionError, match=words) as exc:
        resolve(TrainConfig(capture=True, device="cpu", **change))
    assert exc.value.option == "--capture"
    resolve(TrainConfig(capture=False, device="cpu", **change))  # off is always fine


def test_cli_capture_flags_and_log(tmp_path, capsys):
    pytest.importorskip("sklearn")
    from sse_sam_fast.cli import main

    argv = ["train", "--epochs", "1", "--no-plot", "--device", "cpu"]
    assert main([*argv, "--out", str(tmp_path / "a"), "--capture"]) == 0
    out = capsys.readouterr().out
    assert "captured step: on (--capture)" in out and "graphed 0/8" in out
    assert "captured step: the last step ran eagerly; 0 of the last epoch's 8 steps replayed one" in out
    assert main([*argv, "--out", str(tmp_path / "b")]) == 0
    assert "captured step: off (auto: CUDA graphs need a CUDA device, not cpu)" in capsys.readouterr().out
    saved = json.loads((tmp_path / "b" / "results.json").read_text())
    assert saved["config"]["capture"] is None and saved["capture"]["option"] == "auto"
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--out", str(tmp_path / "c"), "--capture", "--opt", "sgd"])
    assert exc.value.code == 2 and "argument --capture" in capsys.readouterr().err


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_auto_capture_replays_graphs_and_gives_the_eager_weights(tmp_path):
    from sse_sam_fast.backends import triton_available

    if not triton_available():
        pytest.skip("the captured step is graphed with the triton backend only")
    # one epoch of 20 steps: three eager, the capture and its check, replays, the short last batch
    cfg = TrainConfig(dataset="synthetic-lt", epochs=1, device="cuda")
    auto = quiet(cfg, tmp_path / "auto")
    assert auto["capture"]["on"] and auto["capture"]["why"].startswith("auto: CUDA")
    assert sum(e["graphed_steps"] for e in auto["epochs"]) > 0, "no step replayed a graph"
    quiet(dataclasses.replace(cfg, capture=False), tmp_path / "eager")
    a, b = weights(tmp_path / "auto")["model"], weights(tmp_path / "eager")["model"]
    assert_close([a[k] for k in a], [b[k] for k in a], torch.float32, "captured run vs eager run")
