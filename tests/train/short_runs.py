"""Short training runs shared by the tests of the loop, the checkpoints and compare."""

from __future__ import annotations

import pytest
import torch
from test_data import write_fake_cifar

from sse_sam_fast.train.config import TrainConfig
from sse_sam_fast.train.loop import train

DIGITS = [124, 96, 74, 57, 44, 34, 26, 20, 16, 12]


def quiet(cfg: TrainConfig, out, **kw) -> dict:
    return train(cfg, out, quiet=True, plot=kw.pop("plot", False), log=lambda _: None, **kw)


def digits(**kw) -> TrainConfig:
    pytest.importorskip("sklearn")
    return TrainConfig(**{"epochs": 2, "device": "cpu", **kw})


def fake_cifar(tmp_path, **kw) -> TrainConfig:
    root = write_fake_cifar(tmp_path / "cifar", per_class=16, test_per_class=2)
    defaults = {
        "dataset": "cifar10-lt",
        "data_dir": str(root),
        "imb_factor": 4.0,
        "model": "mlp",
        "hidden": 16,
        "epochs": 2,
        "batch_size": 16,
        "device": "cpu",
    }
    return TrainConfig(**{**defaults, **kw})


def weights(run_dir) -> dict:
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)


def assert_same_run(a_dir, b_dir):
    a, b = weights(a_dir), weights(b_dir)
    assert a["epoch"] == b["epoch"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k  # bitwise
    opt_a, opt_b = a["optimizer"], b["optimizer"]
    base_a = opt_a.get("base", opt_a)
    base_b = opt_b.get("base", opt_b)
    for i, state in base_a["state"].items():
        assert torch.equal(state["momentum_buffer"], base_b["state"][i]["momentum_buffer"])
    assert opt_a.get("stage") == opt_b.get("stage")
    assert a["scheduler"] == b["scheduler"]
    # facts of a session, not of the run: its speed, and whether its steps replayed CUDA graphs
    session = ("time_s", "graphed_steps")
    strip = [{k: v for k, v in e.items() if k not in session} for e in a["history"]]
    assert strip == [{k: v for k, v in e.items() if k not in session} for e in b["history"]]
