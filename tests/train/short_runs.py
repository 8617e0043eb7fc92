"""Short training runs shared by the tests of the loop, the checkpoints and compare,
and the tiny CIFAR files they and the data tests read."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from sse_sam_fast.train.config import TrainConfig
from sse_sam_fast.train.loop import train

DIGITS = [124, 96, 74, 57, 44, 34, 26, 20, 16, 12]


def write_fake_cifar(
    root: Path, name: str = "cifar10-lt", per_class: int = 20, test_per_class: int = 4, seed: int = 0
) -> Path:
    """``root/cifar-10-batches-py`` (5 training batches + test_batch, b"labels") or
    ``root/cifar-100-python`` (train + test, b"fine_labels") with random images."""
    rng = np.random.default_rng(seed)
    classes = 10 if name == "cifar10-lt" else 100

    def make(n: int) -> tuple[np.ndarray, list[int]]:
        labels = rng.permutation(np.repeat(np.arange(classes), n))
        images = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
        return images, labels.tolist()

    (x, y), (xt, yt) = make(per_class), make(test_per_class)
    if name == "cifar10-lt":
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True, exist_ok=True)
        for i, part in enumerate(np.array_split(np.arange(len(y)), 5), 1):
            batch = {b"data": x[part], b"labels": [y[j] for j in part], b"batch_label": b"fake"}
            (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch))
        (folder / "test_batch").write_bytes(pickle.dumps({b"data": xt, b"labels": yt}))
    else:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True, exist_ok=True)
        coarse = [c // 5 for c in y]
        (folder / "train").write_bytes(
            pickle.dumps({b"data": x, b"fine_labels": y, b"coarse_labels": coarse})
        )
        (folder / "test").write_bytes(pickle.dumps({b"data": xt, b"fine_labels": yt}))
    return root


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
