"""Checkpoints: resume gives the weights of an unbroken run; damaged files are reported."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from sse_sam_fast.train.checkpoint import config_for_resume, load_checkpoint
from sse_sam_fast.train.config import OptionError, TrainConfig
from tests.train.short_runs import assert_same_run, digits, fake_cifar, quiet, write_fake_cifar


def test_resume_after_a_kill_gives_the_same_weights_across_the_stage_switch(tmp_path):
    cfg = digits(epochs=4, gamma=0.5)  # stage 2 from epoch 3
    quiet(cfg, tmp_path / "full")
    stopped = quiet(cfg, tmp_path / "cut", stop_after=1)
    assert not stopped["finished"] and len(stopped["epochs"]) == 1
    assert json.loads((tmp_path / "cut" / "results.json").read_text())["finished"] is False
    ckpt = load_checkpoint(tmp_path / "cut")
    assert ckpt["optimizer"]["stage"]["epoch_count"] == 1
    resumed = quiet(config_for_resume(ckpt, {}), tmp_path / "cut", resume=ckpt)
    assert resumed["finished"] and resumed["sessions"] == 2
    assert [e["stage"] for e in resumed["epochs"]] == [1, 1, 2, 2]
    assert_same_run(tmp_path / "full", tmp_path / "cut")
    full = json.loads((tmp_path / "full" / "results.json").read_text())
    assert resumed["final"] == full["final"]


def test_resume_restores_augmentation_drw_and_imbsam(tmp_path):
    # images: shuffling and crops/flips from the saved generator; LDAM-DRW switches on after the cut
    cfg = fake_cifar(tmp_path, opt="imbsam", loss="ldam", drw_epoch=2, epochs=3)
    quiet(cfg, tmp_path / "full")
    quiet(cfg, tmp_path / "cut", stop_after=2)
    ckpt = load_checkpoint(tmp_path / "cut")
    quiet(config_for_resume(ckpt, {}), tmp_path / "cut", resume=ckpt)
    assert_same_run(tmp_path / "full", tmp_path / "cut")


def test_resume_of_plain_sgd(tmp_path):
    cfg = digits(opt="sgd", epochs=3)
    quiet(cfg, tmp_path / "full")
    quiet(cfg, tmp_path / "cut", stop_after=2)
    ckpt = load_checkpoint(tmp_path / "cut")
    quiet(config_for_resume(ckpt, {}), tmp_path / "cut", resume=ckpt)
    assert_same_run(tmp_path / "full", tmp_path / "cut")


def test_checkpoint_holds_only_plain_data(tmp_path):
    quiet(digits(epochs=1), tmp_path)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)  # raises on anything else
    assert set(ckpt["rng"]) == {"torch", "cuda", "python", "numpy", "data"}
    assert ckpt["epoch"] == 1 and ckpt["config"]["epochs"] == 1


def test_config_for_resume_keeps_the_saved_run(tmp_path):
    quiet(digits(epochs=2), tmp_path, stop_after=1)
    ckpt = load_checkpoint(tmp_path)
    cfg = config_for_resume(ckpt, {"device": "cpu", "threads": 2, "lr": 0.05, "backend": "reference"})
    assert (cfg.threads, cfg.backend, cfg.epochs) == (2, "reference", 2)
    with pytest.raises(OptionError, match="--resume continues the saved run") as exc:
        config_for_resume(ckpt, {"lr": 0.1})
    assert exc.value.option == "--lr"


@pytest.mark.parametrize(
    "damage, words",
    [
        (lambda p: p.write_bytes(b"garbage"), "not a readable checkpoint"),
        (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "not a readable checkpoint"),
        (lambda p: torch.save({"format": "other"}, p), "not a sse_sam_fast.train/1 checkpoint"),
        (lambda p: torch.save(TrainConfig(), p), "not a readable checkpoint"),  # not weights-only
        (lambda p: p.unlink(), "no checkpoint.pt"),
    ],
)
def test_corrupt_checkpoints_are_reported(tmp_path, damage, words):
    quiet(digits(epochs=1), tmp_path)
    damage(tmp_path / "checkpoint.pt")
    with pytest.raises(OptionError, match=words) as exc:
        load_checkpoint(tmp_path)
    assert exc.value.option == "--resume"


def test_resume_rejects_other_data(tmp_path):
    cfg = fake_cifar(tmp_path, epochs=2)
    quiet(cfg, tmp_path / "run", stop_after=1)
    other = write_fake_cifar(tmp_path / "other", per_class=24)
    ckpt = load_checkpoint(tmp_path / "run")
    moved = config_for_resume(ckpt, {"data_dir": str(other)})
    with pytest.raises(OptionError, match="the data differ") as exc:
        quiet(moved, tmp_path / "run", resume=ckpt)
    assert exc.value.option == "--data-dir"


def _set(path, value):
    """A function that sets ``ckpt['rng'][path...]`` to ``value`` (an empty path: the whole entry)."""

    def damage(rng):
        if not path:
            return value
        node = rng
        for key in path[:-1]:
            node = node[key]
        if value is _DELETE:
            del node[path[-1]]
        else:
            node[path[-1]] = value
        return rng

    return damage


_DELETE = object()
RNG_DAMAGE = {
    "numpy-key-int": (_set(["numpy", "key"], 3), "rng\\['numpy'\\]"),  # the AttributeError
    "numpy-key-short": (_set(["numpy", "key"], torch.arange(5)), "rng\\['numpy'\\]"),
    "numpy-not-a-dict": (_set(["numpy"], 7), "rng\\['numpy'\\]"),
    "torch-int": (_set(["torch"], 3), "rng\\['torch'\\]"),
    "torch-short": (_set(["torch"], torch.zeros(10, dtype=torch.uint8)), "rng\\['torch'\\]"),
    "data-float": (_set(["data"], torch.zeros(5056)), "rng\\['data'\\]"),
    "python-int": (_set(["python"], 3), "rng\\['python'\\]"),
    "python-short": (_set(["python"], (3, (1, 2), None)), "rng\\['python'\\]"),
    "cuda-int": (_set(["cuda"], 3), "rng\\['cuda'\\]"),
    "missing-data": (_set(["data"], _DELETE), "no data entry"),
    "not-a-dict": (_set([], 3), "RNG states are damaged"),
}


@pytest.mark.parametrize("damage, words", RNG_DAMAGE.values(), ids=RNG_DAMAGE.keys())
def test_a_damaged_rng_state_is_a_named_error_and_changes_no_random_state(tmp_path, damage, words):
    cfg = digits(epochs=2)
    quiet(cfg, tmp_path, stop_after=1)
    ckpt = load_checkpoint(tmp_path)
    ckpt["rng"] = damage(ckpt["rng"])
    before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    with pytest.raises(OptionError, match=words) as exc:
        quiet(config_for_resume(ckpt, {}), tmp_path, resume=ckpt)
    assert exc.value.option == "--resume" and "damaged" in str(exc.value)
    assert torch.equal(torch.get_rng_state(), before[0])  # set_rng_state never half-ran
    assert random.getstate() == before[1] and (np.random.get_state()[1] == before[2]).all()


def test_cli_resume_with_a_damaged_rng_entry_prints_a_named_error(tmp_path, capsys):
    from sse_sam_fast.cli import main

    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--no-plot", "--epochs", "2", "--stop-after", "1"]) == 0
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    ckpt["rng"]["numpy"]["key"] = 3
    torch.save(ckpt, run / "checkpoint.pt")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["train", "--resume", str(run), "--no-plot"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "argument --resume" in err and "rng['numpy'] is damaged" in err
    assert "Traceback" not in err
