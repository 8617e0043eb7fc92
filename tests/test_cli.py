"""The ``train`` command and the long-tailed digits data behind it."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn", reason="the CLI's data set needs the cli extra (scikit-learn)")

from sse_sam_fast.cli import main  # noqa: E402
from sse_sam_fast.data import digits_lt, long_tail_counts, long_tail_split  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _digits_labels() -> np.ndarray:
    from sklearn.datasets import load_digits

    return load_digits().target


def _accuracies(out: str) -> dict[str, float]:
    return {
        k: float(re.search(rf"^{k} accuracy\s+([0-9.]+)", out, re.M).group(1))
        for k in ("overall", "head", "tail")
    }


# ---- long_tail_counts ------------------------------------------------------------------------


def test_long_tail_counts_hand_computed():
    # 100 · 10^(-c/4) = 100, 56.23, 31.62, 17.78, 10
    assert long_tail_counts(100, 5, 10.0) == [100, 56, 31, 17, 10]
    # 5000 · 100^(-c/9): the CIFAR-10-LT profile at imbalance 100
    assert long_tail_counts(5000, 10, 100) == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


@pytest.mark.parametrize(
    "n_max, num_classes, imb", [(124, 10, 10.0), (500, 100, 50), (37, 7, 3.5), (9, 3, 1)]
)
def test_long_tail_counts_shape(n_max, num_classes, imb):
    counts = long_tail_counts(n_max, num_classes, imb)
    assert len(counts) == num_classes
    assert all(isinstance(n, int) for n in counts)
    assert counts[0] == n_max
    assert counts[-1] == int(n_max / imb)
    assert all(a >= b for a, b in zip(counts, counts[1:]))


def test_long_tail_counts_balanced_and_single_class():
    assert long_tail_counts(7, 4, 1) == [7, 7, 7, 7]
    assert long_tail_counts(7, 1, 10.0) == [7]


@pytest.mark.parametrize("imb", [0.5, 0, -3.0, math.nan, math.inf, True, "10"])
def test_long_tail_counts_rejects_bad_imb_factor(imb):
    with pytest.raises(ValueError, match="imb_factor"):
        long_tail_counts(100, 10, imb)


def test_long_tail_counts_rejects_bad_sizes():
    with pytest.raises(ValueError, match="n_max"):
        long_tail_counts(0, 10, 10.0)
    with pytest.raises(ValueError, match="num_classes"):
        long_tail_counts(100, 0, 10.0)


# ---- digits_lt ----------------------------------------------------------------------------------


def test_digits_lt_splits():
    x_train, y_train, x_test, y_test = digits_lt(imb_factor=10.0, test_per_class=50, seed=0)
    assert x_train.dtype == x_test.dtype == torch.float32
    assert y_train.dtype == y_test.dtype == torch.int64
    assert x_train.shape == (len(y_train), 64) and x_test.shape == (len(y_test), 64)

    assert torch.bincount(y_test).tolist() == [50] * 10
    pool = int(np.bincount(_digits_labels()).min()) - 50
    assert pool == 124
    assert torch.bincount(y_train).tolist() == long_tail_counts(pool, 10, 10.0)
    assert torch.bincount(y_train).tolist() == [124, 96, 74, 57, 44, 34, 26, 20, 16, 12]

    # the digits set has no duplicate images, so equal rows would mean a shared sample
    train_rows = {r.tobytes() for r in x_train.numpy()}
    assert len(train_rows) == len(y_train)
    assert not train_rows & {r.tobytes() for r in x_test.numpy()}

    # standardised with training statistics
    assert x_train.mean(0).abs().max() < 1e-4
    std = x_train.std(0, unbiased=False)
    assert torch.all(((std - 1).abs() < 1e-3) | (std == 0))


def test_long_tail_split_indices_disjoint():
    labels = _digits_labels()
    train, test = long_tail_split(labels, 20.0, 30, seed=3)
    assert not set(train.tolist()) & set(test.tolist())
    assert len(set(train.tolist())) == len(train)
    assert np.bincount(labels[test]).tolist() == [30] * 10
    assert np.bincount(labels[train]).tolist() == long_tail_counts(144, 10, 20.0)


def test_digits_lt_deterministic_for_a_seed():
    a, b, c = digits_lt(seed=0), digits_lt(seed=0), digits_lt(seed=1)
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    assert not torch.equal(a[0], c[0])


def test_digits_lt_rejects_empty_classes():
    with pytest.raises(ValueError, match="imb_factor"):
        digits_lt(imb_factor=500.0)


def test_digits_lt_names_the_extra_without_sklearn(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # import now raises ImportError
    with pytest.raises(ImportError, match=re.escape("sse_sam_fast[cli]")):
        digits_lt()
    assert main(["train", "--epochs", "1"]) == 1
    assert "sse_sam_fast[cli]" in capsys.readouterr().err


# ---- train ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("opt", ["sgd", "sam", "imbsam", "ssesam"])
def test_train_each_optimizer(opt, capsys):
    assert main(["train", "--epochs", "2", "--opt", opt, "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert len(re.findall(r"^epoch\s+\d+/2\s+loss [0-9.]+\s+test acc [0-9.]+", out, re.M)) == 2
    assert "tail classes (count < eta=40): [5, 6, 7, 8, 9]" in out
    acc = _accuracies(out)
    assert all(0 <= v <= 1 for v in acc.values())
    assert math.isclose(acc["overall"], (acc["head"] + acc["tail"]) / 2, abs_tol=1e-3)
    assert re.search(r"^wall time\s+[0-9.]+ s", out, re.M)


def test_train_ssesam_switches_stage(capsys):
    assert main(["train", "--epochs", "4", "--gamma", "0.5", "--backend", "reference"]) == 0
    stages = re.findall(r"^epoch.*stage (\d)$", capsys.readouterr().out, re.M)
    assert stages == ["1", "1", "2", "2"]


def test_train_ssesam_defaults_learn_the_tail(capsys):
    # measured with the defaults: tail accuracy 0.86-0.90 over seeds 0-4 (chance 0.1)
    assert main(["train", "--opt", "ssesam"]) == 0
    acc = _accuracies(capsys.readouterr().out)
    assert acc["tail"] > 0.7
    assert acc["head"] > 0.9


def test_train_leaves_thread_count_alone():
    before = torch.get_num_threads()
    assert main(["train", "--epochs", "1", "--opt", "sgd", "--threads", "1"]) == 0
    assert torch.get_num_threads() == before


@pytest.mark.parametrize(
    "argv, option",
    [
        (["--imb-factor", "0.5"], "--imb-factor"),
        (["--imb-factor", "500"], "--imb-factor"),
        (["--eta", "5"], "--eta"),  # every class has >= 12 samples: no tail class
        (["--eta", "1000"], "--eta"),  # no head class
        (["--epochs", "0"], "--epochs"),
        (["--batch-size", "-1"], "--batch-size"),
        (["--gamma", "1.5"], "--gamma"),
        (["--tail-rho", "-0.1"], "--tail-rho"),
        (["--opt", "adam"], "--opt"),
        (["--seed", "-1"], "--seed"),
        (["--device", "nosuchdevice"], "--device"),
    ],
)
def test_train_rejects_bad_arguments(argv, option, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", *argv])
    assert exc.value.code == 2
    assert option in capsys.readouterr().err


def test_main_needs_a_command(capsys):
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2


def test_python_dash_m():
    proc = subprocess.run(
        [sys.executable, "-m", "sse_sam_fast", "train", "--epochs", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "tail accuracy" in proc.stdout
