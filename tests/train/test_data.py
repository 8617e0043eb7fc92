"""Long-tailed data sets: the profile, digits, the Gaussian mixture, CIFAR from pickles, augmentation.

The CIFAR files are tests.train.short_runs.write_fake_cifar's, so no test needs the real ones.
"""

from __future__ import annotations

import math
import pickle
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from sse_sam_fast.train.data import (
    CIFAR_STATS,
    LongTailData,
    cifar_files,
    cifar_lt,
    digits_lt,
    load_dataset,
    long_tail_counts,
    long_tail_split,
    normalize_images,
    random_crop_flip,
    synthetic_lt,
)
from tests.train.short_runs import write_fake_cifar


def _digits_labels() -> np.ndarray:
    from sklearn.datasets import load_digits

    return load_digits().target


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
    pytest.importorskip("sklearn")
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
    pytest.importorskip("sklearn")
    labels = _digits_labels()
    train, test = long_tail_split(labels, 20.0, 30, seed=3)
    assert not set(train.tolist()) & set(test.tolist())
    assert len(set(train.tolist())) == len(train)
    assert np.bincount(labels[test]).tolist() == [30] * 10
    assert np.bincount(labels[train]).tolist() == long_tail_counts(144, 10, 20.0)


def test_digits_lt_deterministic_for_a_seed():
    pytest.importorskip("sklearn")
    a, b, c = digits_lt(seed=0), digits_lt(seed=0), digits_lt(seed=1)
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    assert not torch.equal(a[0], c[0])


def test_digits_lt_rejects_empty_classes():
    pytest.importorskip("sklearn")
    with pytest.raises(ValueError, match="imb_factor"):
        digits_lt(imb_factor=500.0)


def test_digits_lt_names_the_extra_without_sklearn(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # import now raises ImportError
    with pytest.raises(ImportError, match=re.escape("sse_sam_fast[cli]")):
        digits_lt()


# ---- synthetic_lt -------------------------------------------------------------------------------


def test_synthetic_lt_profile_and_shapes():
    x_train, y_train, x_test, y_test = synthetic_lt(7, imb_factor=20, n_max=60, test_per_class=9, dim=5)
    assert torch.bincount(y_train).tolist() == long_tail_counts(60, 7, 20)
    assert torch.bincount(y_test).tolist() == [9] * 7
    assert x_train.shape == (len(y_train), 5) and x_test.shape == (len(y_test), 5)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64


def test_synthetic_lt_is_a_mixture_around_class_means():
    x, y, _, _ = synthetic_lt(3, imb_factor=1, n_max=4000, dim=4, separation=6.0, seed=2)
    means = torch.stack([x[y == c].mean(0) for c in range(3)])
    spread = torch.stack([x[y == c].std(0) for c in range(3)])
    assert torch.allclose(spread, torch.ones_like(spread), atol=0.06)  # unit noise
    gaps = torch.cdist(means, means)[~torch.eye(3, dtype=torch.bool)]
    assert gaps.min() > 2.0  # distinct centres: the classes are learnable


def test_synthetic_lt_seeded_and_any_number_of_classes():
    a, b = synthetic_lt(300, seed=4), synthetic_lt(300, seed=4)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[0], synthetic_lt(300, seed=5)[0])
    assert int(a[1].max()) == 299


def test_synthetic_lt_rejects_empty_tail():
    with pytest.raises(ValueError, match="imb_factor"):
        synthetic_lt(5, imb_factor=1000, n_max=500)


# ---- CIFAR-LT from pickles ------------------------------------------------------------------------


@pytest.mark.parametrize("name, classes", [("cifar10-lt", 10), ("cifar100-lt", 100)])
def test_cifar_lt_reads_the_pickle_layout(tmp_path, name, classes):
    per_class = 12 if classes == 10 else 6
    write_fake_cifar(tmp_path, name, per_class=per_class, test_per_class=2)
    x_train, y_train, x_test, y_test = cifar_lt(name, tmp_path, imb_factor=3)
    assert x_train.dtype == torch.uint8 and x_train.shape == (len(y_train), 3, 32, 32)
    assert torch.bincount(y_train, minlength=classes).tolist() == long_tail_counts(per_class, classes, 3)
    assert torch.bincount(y_test).tolist() == [2] * classes  # the whole balanced test set
    assert x_test.shape == (2 * classes, 3, 32, 32)

    # every kept image is a distinct training image of its class, in the CHW layout
    with open(cifar_files(name, tmp_path)[0], "rb") as f:
        first = pickle.load(f, encoding="bytes")
    label_key = b"labels" if classes == 10 else b"fine_labels"
    # the first file holds all of CIFAR-100's training set, a fifth of CIFAR-10's
    originals = {row.tobytes(): label for row, label in zip(first[b"data"], first[label_key])}
    kept = [(img.reshape(-1).numpy().tobytes(), int(label)) for img, label in zip(x_train, y_train)]
    assert len({k for k, _ in kept}) == len(kept)
    for key, label in kept:
        if key in originals:
            assert originals[key] == label
    assert sum(key in originals for key, _ in kept) > 0


def test_cifar_lt_subset_is_fixed(tmp_path):
    write_fake_cifar(tmp_path)
    a, b = cifar_lt("cifar10-lt", tmp_path, 4), cifar_lt("cifar10-lt", tmp_path, 4)
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_cifar_lt_missing_files_say_where(tmp_path):
    with pytest.raises(FileNotFoundError) as exc:
        cifar_lt("cifar100-lt", tmp_path / "nowhere")
    msg = str(exc.value)
    assert str((tmp_path / "nowhere" / "cifar-100-python").resolve()) in msg
    assert "train, test" in msg and "--download" in msg

    write_fake_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="missing: data_batch_3"):
        cifar_lt("cifar10-lt", tmp_path)


def test_cifar_lt_rejects_corrupt_files(tmp_path):
    write_fake_cifar(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(b"not a pickle at all")
    with pytest.raises(ValueError, match="test_batch is not a readable CIFAR pickle"):
        cifar_lt("cifar10-lt", tmp_path)
    path.write_bytes(pickle.dumps({b"data": np.zeros((4, 100), np.uint8), b"labels": [0, 1, 2, 3]}))
    with pytest.raises(ValueError, match=r"\(N, 3072\)"):
        cifar_lt("cifar10-lt", tmp_path)
    path.write_bytes(pickle.dumps({b"pixels": 1}))
    with pytest.raises(ValueError, match="expected a dict with keys"):
        cifar_lt("cifar10-lt", tmp_path)


def test_cifar_lt_imbalance_too_large_for_the_files(tmp_path):
    write_fake_cifar(tmp_path, per_class=20)
    with pytest.raises(ValueError, match="imb_factor"):
        cifar_lt("cifar10-lt", tmp_path, imb_factor=100)


def test_download_needs_torchvision(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)
    with pytest.raises(ImportError, match="torchvision is not installed"):
        cifar_lt("cifar10-lt", tmp_path, download=True)
    write_fake_cifar(tmp_path)  # files present: nothing to download, torchvision not needed
    assert len(cifar_lt("cifar10-lt", tmp_path, 4, download=True)[1]) > 0


def test_download_uses_torchvision_only_when_asked(tmp_path, monkeypatch):
    calls = []

    def fake_cifar10(root, train, download):
        calls.append((root, train, download))
        if not train:
            write_fake_cifar(Path(root))

    datasets = types.SimpleNamespace(CIFAR10=fake_cifar10)
    monkeypatch.setitem(sys.modules, "torchvision", types.SimpleNamespace(datasets=datasets))
    monkeypatch.setitem(sys.modules, "torchvision.datasets", datasets)
    with pytest.raises(FileNotFoundError):
        cifar_lt("cifar10-lt", tmp_path)  # not asked: no download
    assert calls == []
    assert len(cifar_lt("cifar10-lt", tmp_path, 4, download=True)[0]) > 0
    assert calls == [(str(tmp_path), True, True), (str(tmp_path), False, True)]


# ---- augmentation ---------------------------------------------------------------------------------


def _crops(image: torch.Tensor, padding: int) -> list[torch.Tensor]:
    c, h, w = image.shape
    padded = torch.zeros(c, h + 2 * padding, w + 2 * padding, dtype=image.dtype)
    padded[:, padding : padding + h, padding : padding + w] = image
    out = []
    for dy in range(2 * padding + 1):
        for dx in range(2 * padding + 1):
            crop = padded[:, dy : dy + h, dx : dx + w]
            out += [crop, crop.flip(2)]
    return out


def test_random_crop_flip_is_a_padded_crop_maybe_flipped():
    images = torch.randint(1, 256, (64, 3, 6, 5), dtype=torch.uint8)  # no zero pixel: padding shows
    out = random_crop_flip(images, torch.Generator().manual_seed(0), padding=2)
    assert out.shape == images.shape and out.dtype == torch.uint8
    flipped = shifted = 0
    for src, dst in zip(images, out):
        assert any(torch.equal(dst, crop) for crop in _crops(src, 2))
        flipped += not any(torch.equal(dst, crop) for crop in _crops(src, 2)[::2])
        shifted += bool((dst == 0).any())
    # 64 draws: flips and shifts both occur (each misses all 64 with probability < 1e-18)
    assert 0 < flipped < 64 and 0 < shifted < 64


def test_random_crop_flip_follows_its_generator():
    images = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    a = random_crop_flip(images, torch.Generator().manual_seed(3))
    b = random_crop_flip(images, torch.Generator().manual_seed(3))
    c = random_crop_flip(images, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    for src, dst in zip(images, random_crop_flip(images, torch.Generator(), padding=0)):
        assert torch.equal(dst, src) or torch.equal(dst, src.flip(2))


def test_normalize_images_by_hand():
    images = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 2, 2)
    out = normalize_images(images, (0.0, 0.2, 0.5), (1.0, 0.5, 0.25))
    assert out.dtype == torch.float32
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([0.0, 0.0, 2.0]))


def test_long_tail_data_batches(tmp_path):
    write_fake_cifar(tmp_path)
    data = load_dataset("cifar10-lt", 4, data_dir=tmp_path)
    assert isinstance(data, LongTailData) and data.images and data.augment and data.num_classes == 10
    assert (data.mean, data.std) == CIFAR_STATS["cifar10-lt"]
    idx = torch.arange(8)
    x = data.train_inputs(idx, torch.Generator().manual_seed(0))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32
    assert torch.equal(x, data.train_inputs(idx, torch.Generator().manual_seed(0)))
    expected = normalize_images(data.x_test[:5], data.mean, data.std)
    assert torch.equal(data.test_inputs(0, 5), expected)  # no augmentation at test time

    features = load_dataset("synthetic-lt", 10, num_classes=4)
    assert not features.images and features.class_counts == long_tail_counts(500, 4, 10)
    idx = torch.tensor([3, 1])
    assert torch.equal(features.train_inputs(idx, torch.Generator()), features.x_train[idx])


def test_load_dataset_rejects_unknown_names():
    with pytest.raises(ValueError, match="dataset must be one of"):
        load_dataset("imagenet-lt", 10)
