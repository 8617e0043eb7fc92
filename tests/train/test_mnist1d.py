"""MNIST-1D-LT: the generated signals, their cache, the long-tailed split, the 1-D CNN,
and short runs of ``train`` and ``compare`` on it.

The default data set (20,000 signals, about 4 s to generate) is generated once per module
into a temporary cache that the CLI tests then read; the other data tests generate a few
hundred signals.
"""

from __future__ import annotations

import random
import re
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("mnist1d", reason="mnist1d-lt needs the cli extra (mnist1d)")

from sse_sam_fast.cli import main  # noqa: E402
from sse_sam_fast.train import data as data_module  # noqa: E402
from sse_sam_fast.train.config import OptionError, TrainConfig, default_eta, resolve  # noqa: E402
from sse_sam_fast.train.data import (  # noqa: E402
    MNIST1D_CACHE,
    load_dataset,
    long_tail_counts,
    mnist1d_arrays,
    mnist1d_lt,
)
from sse_sam_fast.train.metrics import profile_thresholds  # noqa: E402
from sse_sam_fast.train.models import Cnn1d, cnn1d  # noqa: E402

# int(1700 · 100^(-c/9)): 1,700 of the 2,000 signals per class are left after the 300 test ones
DEFAULT_COUNTS = [1700, 1019, 610, 366, 219, 131, 78, 47, 28, 17]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A --data-dir whose cache holds the default arrays (generated once here)."""
    root = tmp_path_factory.mktemp("data")
    mnist1d_arrays(cache_dir=root / MNIST1D_CACHE)
    return root


def _same_rng_state(a, b) -> bool:
    return a[0] == b[0] and np.array_equal(a[1], b[1]) and a[2:] == b[2:]


# ---- the signals ---------------------------------------------------------------------------------


def test_arrays_shape_dtype_and_classes():
    x, y = mnist1d_arrays(per_class=30)
    assert x.shape == (300, 40) and x.dtype == np.float32
    assert y.dtype == np.int64 and np.bincount(y).tolist() == [30] * 10
    assert np.isfinite(x).all() and x.std() > 0.5  # standardised signals, not zeros


def test_generation_is_one_fixed_draw_and_leaves_global_rngs_alone():
    np.random.seed(123)
    random.seed(123)
    np_before, py_before = np.random.get_state(), random.getstate()
    a = mnist1d_arrays(per_class=20)
    # mnist1d seeds numpy's and Python's global generators; a run must not see that
    assert _same_rng_state(np.random.get_state(), np_before)
    assert random.getstate() == py_before
    b = mnist1d_arrays(per_class=20)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_cache_is_written_read_back_and_equal_to_a_fresh_draw(tmp_path, monkeypatch):
    fresh = mnist1d_arrays(per_class=25)
    written = mnist1d_arrays(per_class=25, cache_dir=tmp_path)
    (path,) = tmp_path.glob("mnist1d-*-25-per-class.npz")

    def no_generator(per_class):
        raise AssertionError("the cache should have been read")

    monkeypatch.setattr(data_module, "_generate_mnist1d", no_generator)
    read = mnist1d_arrays(per_class=25, cache_dir=tmp_path)
    for a, b, c in zip(fresh, written, read):
        assert a.dtype == b.dtype == c.dtype
        assert np.array_equal(a, b) and np.array_equal(a, c)
    assert not list(tmp_path.glob("*.tmp.npz"))  # the temporary file was renamed
    assert path.stat().st_size > 0


def test_damaged_or_foreign_cache_is_replaced(tmp_path):
    expected = mnist1d_arrays(per_class=15)
    mnist1d_arrays(per_class=15, cache_dir=tmp_path)
    (path,) = tmp_path.glob("*.npz")
    for damage in (b"", b"not an npz file"):
        path.write_bytes(damage)
        x, y = mnist1d_arrays(per_class=15, cache_dir=tmp_path)
        assert np.array_equal(x, expected[0]) and np.array_equal(y, expected[1])
    np.savez(path, x=np.zeros((150, 40), np.float32), y=np.zeros(150, np.int64))  # wrong labels
    x, y = mnist1d_arrays(per_class=15, cache_dir=tmp_path)
    assert np.array_equal(x, expected[0]) and np.array_equal(y, expected[1])
    with np.load(path) as f:  # and the file holds the right arrays again
        assert np.array_equal(f["y"], expected[1])


def test_unwritable_cache_only_costs_time(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")  # a file where the cache folder should go: mkdir fails
    x, y = mnist1d_arrays(per_class=10, cache_dir=blocker / "mnist1d")
    assert np.bincount(y).tolist() == [10] * 10 and x.shape == (100, 40)


def test_missing_package_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mnist1d.data", None)  # import now raises ImportError
    with pytest.raises(ImportError, match=re.escape("sse_sam_fast[cli]")):
        mnist1d_arrays(per_class=10, cache_dir=tmp_path)


def test_rejects_bad_sizes():
    with pytest.raises(ValueError, match="per_class"):
        mnist1d_arrays(per_class=0)
    with pytest.raises(ValueError, match="test_per_class"):
        mnist1d_lt(test_per_class=20, per_class=20)  # nothing left to train on
    with pytest.raises(ValueError, match="imb_factor"):
        mnist1d_lt(imb_factor=50, test_per_class=10, per_class=30)  # 20 // 50: class 9 empty


# ---- the long-tailed split ----------------------------------------------------------------------


def test_default_split_counts_shapes_and_balance(data_dir):
    x_train, y_train, x_test, y_test = mnist1d_lt(cache_dir=data_dir / MNIST1D_CACHE)
    assert torch.bincount(y_train).tolist() == DEFAULT_COUNTS == long_tail_counts(1700, 10, 100)
    assert torch.bincount(y_test).tolist() == [300] * 10
    assert x_train.shape == (sum(DEFAULT_COUNTS), 40) and x_test.shape == (3000, 40)
    assert x_train.dtype == x_test.dtype == torch.float32
    assert y_train.dtype == y_test.dtype == torch.int64
    # noisy real-valued signals never repeat, so a shared row would be a shared sample
    train_rows = {r.tobytes() for r in x_train.numpy()}
    assert len(train_rows) == len(y_train)
    assert not train_rows & {r.tobytes() for r in x_test.numpy()}


def test_split_is_deterministic_per_seed():
    small = {"imb_factor": 10.0, "test_per_class": 10, "per_class": 40}
    a, b = mnist1d_lt(seed=3, **small), mnist1d_lt(seed=3, **small)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert torch.bincount(a[1]).tolist() == long_tail_counts(30, 10, 10.0)
    c = mnist1d_lt(seed=4, **small)
    assert torch.equal(torch.bincount(a[1]), torch.bincount(c[1]))  # same profile ...
    assert not torch.equal(a[0], c[0])  # ... other samples


def test_load_dataset_uses_the_data_dir_cache(data_dir, monkeypatch):
    def no_generator(per_class):
        raise AssertionError("the cache under data_dir should have been read")

    monkeypatch.setattr(data_module, "_generate_mnist1d", no_generator)
    data = load_dataset("mnist1d-lt", 100.0, seed=1, data_dir=data_dir)
    assert data.num_classes == 10 and not data.images
    assert data.class_counts == DEFAULT_COUNTS
    assert load_dataset("mnist1d-lt", 10.0, data_dir=data_dir).class_counts == long_tail_counts(1700, 10, 10)


# ---- the 1-D CNN --------------------------------------------------------------------------------


def test_cnn1d_is_the_papers_convnet():
    model = cnn1d(40, 10)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv1d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size[0], c.stride[0]) for c in convs] == [
        (1, 25, 5, 2),
        (25, 25, 3, 2),
        (25, 25, 3, 2),
    ]
    assert model.fc.in_features == 125  # 40 -> 19 -> 10 -> 5 positions, 25 channels each
    assert sum(p.numel() for p in model.parameters()) == 5210
    assert model(torch.randn(7, 40)).shape == (7, 10)
    assert cnn1d(64, 3)(torch.randn(2, 64)).shape == (2, 3)
    with pytest.raises(ValueError, match="length"):
        Cnn1d(2)


def test_cnn1d_losses_are_per_sample():
    # no normalisation layer: the split schedule is exact for it
    torch.manual_seed(0)
    model, x = cnn1d(), torch.randn(6, 40)
    together = model(x)
    alone = torch.cat([model(x[i : i + 1]) for i in range(6)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)


# ---- configuration ------------------------------------------------------------------------------


def test_defaults_and_eta():
    cfg = resolve(TrainConfig(dataset="mnist1d-lt", device="cpu"))
    assert (cfg.model, cfg.epochs, cfg.imb_factor, cfg.batch_size, cfg.lr) == ("mlp", 40, 100.0, 64, 0.05)
    assert cfg.threads == 1
    assert profile_thresholds(DEFAULT_COUNTS) == (340.0, 68.0)
    # the Few threshold for every method: the tail is the Few classes 7-9
    etas = {default_eta("mnist1d-lt", m, DEFAULT_COUNTS) for m in ("sgd", "sam", "imbsam", "ssesam")}
    assert etas == {68.0}
    assert default_eta("synthetic-lt", "ssesam", DEFAULT_COUNTS) == 340.0  # other profiles unchanged


def test_cnn1d_only_on_signals():
    assert resolve(TrainConfig(dataset="mnist1d-lt", model="cnn1d", device="cpu")).threads == 1
    for dataset in ("digits-lt", "cifar10-lt"):
        with pytest.raises(OptionError, match="cnn1d needs 1-D signals") as exc:
            resolve(TrainConfig(dataset=dataset, model="cnn1d", device="cpu"))
        assert exc.value.option == "--model"
    with pytest.raises(OptionError, match="needs 3x32x32 images"):
        resolve(TrainConfig(dataset="mnist1d-lt", model="resnet32", device="cpu"))


# ---- the CLI ------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [["--opt", "sgd"], ["--opt", "ssesam", "--model", "cnn1d"]])
def test_train_on_mnist1d_lt(argv, data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--dataset", "mnist1d-lt", "--data-dir", str(data_dir), "--epochs", "2", "--no-plot"]
    assert main(["train", "--out", str(out), *common, *argv]) == 0
    text = capsys.readouterr().out
    assert f"4215 train / 3000 test (balanced), 10 classes; train counts {DEFAULT_COUNTS}" in text
    assert "groups: many (n > 340): 0-3; medium: 4-6; few (n < 68): 7-9" in text
    assert "tail classes (count < eta=68): 7-9; head classes: 0-6" in text
    assert len(re.findall(r"^epoch\s+\d/2 ", text, re.M)) == 2
    few = float(re.search(r"^few\s+([0-9.]+)%", text, re.M).group(1))
    assert 0 <= few <= 100
    assert re.search(r"^wall time [0-9.]+ s for 2 epochs", text, re.M)
    assert "model: cnn1d, Cnn1d (0.01M parameters" in text if "cnn1d" in argv else "model: mlp" in text


def test_train_learns_mnist1d_lt(data_dir, tmp_path, capsys):
    # SGD with the defaults for 10 epochs: the Many classes (1700 down to 366 samples) are
    # learnt well above chance (0.1); measured 0.82 at 40 epochs
    argv = ["--dataset", "mnist1d-lt", "--data-dir", str(data_dir), "--opt", "sgd", "--epochs", "10"]
    assert main(["train", "--out", str(tmp_path / "run"), "--no-plot", "--quiet", *argv]) == 0
    many = float(re.search(r"^many\s+([0-9.]+)%", capsys.readouterr().out, re.M).group(1))
    assert many > 60


def test_compare_on_mnist1d_lt(data_dir, tmp_path, capsys):
    argv = ["compare", "--dataset", "mnist1d-lt", "--data-dir", str(data_dir), "--seeds", "2"]
    argv += ["--methods", "sgd", "ssesam", "--epochs", "1", "--out", str(tmp_path), "--no-plot"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"^\| (sgd|ssesam) \|(.*)\|$", out, re.M)
    assert [r[0] for r in rows] == ["sgd", "ssesam"]
    assert all(len(re.findall(r"\d+\.\d\d ± \d+\.\d\d", r[1])) == 7 for r in rows)
    assert "head/tail at eta = 68 for every method" in out
    assert {"sgd-seed0", "sgd-seed1", "ssesam-seed0", "ssesam-seed1"} <= {p.name for p in tmp_path.iterdir()}
