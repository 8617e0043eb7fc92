"""Long-tailed data sets for the CLI, the tests and the examples.

The long-tail profile is the exponential one of the literature (Cui et al.,
CVPR 2019; LDAM-DRW, ImbSAM and SSE-SAM build CIFAR-LT the same way): class
``c`` of ``C`` keeps ``n_c = int(n_max · imb_factor^(-c / (C - 1)))`` training
samples, so class 0 is the most frequent and ``n_0 / n_{C-1} ≈ imb_factor``.
The test split stays balanced, so per-class accuracies are comparable.

scikit-learn (the ``cli`` extra) is imported only when a data set is loaded.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

_EXTRA_HINT = "pip install 'sse_sam_fast[cli]'"


def long_tail_counts(n_max: int, num_classes: int, imb_factor: float) -> list[int]:
    """Training-set size of each class: ``int(n_max · imb_factor^(-c / (num_classes - 1)))``.

    >>> long_tail_counts(100, 5, 10.0)
    [100, 56, 31, 17, 10]
    """
    if isinstance(n_max, bool) or not isinstance(n_max, int) or n_max < 1:
        raise ValueError(f"n_max must be an int >= 1, got {n_max!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
    if (
        isinstance(imb_factor, bool)
        or not isinstance(imb_factor, (int, float))
        or not math.isfinite(imb_factor)
        or imb_factor < 1
    ):
        raise ValueError(f"imb_factor must be a finite number >= 1, got {imb_factor!r}")
    if num_classes == 1:
        return [n_max]
    return [int(n_max * imb_factor ** (-c / (num_classes - 1))) for c in range(num_classes)]


def long_tail_split(
    labels: np.ndarray, imb_factor: float, test_per_class: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(train, test)`` of a long-tailed training set and a balanced test set.

    Each class gives ``test_per_class`` random samples to the test split; the rest
    of it is its training pool. Class ``c`` then keeps ``long_tail_counts(m, C,
    imb_factor)[c]`` random samples of its pool, ``m`` the smallest pool, so every
    class can supply its count. The two splits never share a sample.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError("labels must be a non-empty 1-D array of integer class indices")
    if isinstance(test_per_class, bool) or not isinstance(test_per_class, int) or test_per_class < 1:
        raise ValueError(f"test_per_class must be an int >= 1, got {test_per_class!r}")
    classes = np.unique(labels)
    if classes[0] != 0 or classes[-1] != classes.size - 1:
        raise ValueError(f"labels must cover the classes 0..C-1 without gaps, got {classes.tolist()}")
    sizes = np.bincount(labels)
    pool = int(sizes.min()) - test_per_class
    if pool < 1:
        raise ValueError(
            f"test_per_class={test_per_class} leaves no training samples for the smallest class "
            f"({int(sizes.min())} samples)"
        )
    counts = long_tail_counts(pool, classes.size, imb_factor)
    if counts[-1] < 1:
        raise ValueError(
            f"imb_factor={imb_factor} leaves class {classes.size - 1} without training samples "
            f"(largest class keeps {pool}); use imb_factor <= {pool}"
        )
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c, n in enumerate(counts):
        idx = rng.permutation(np.flatnonzero(labels == c))
        test.append(idx[:test_per_class])
        train.append(idx[test_per_class : test_per_class + n])
    return np.concatenate(train), np.concatenate(test)


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ImportError(
            f"the digits data set needs scikit-learn, which is not installed: {_EXTRA_HINT}"
        ) from exc
    bunch = load_digits()  # bundled with scikit-learn: no download
    return bunch.data, bunch.target


def digits_lt(
    imb_factor: float = 10.0, test_per_class: int = 50, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Long-tailed 8x8 digits (scikit-learn's bundled copy of the UCI set).

    Returns ``(x_train, y_train, x_test, y_test)``: float32 features of shape
    ``(N, 64)`` and int64 labels. The test split holds ``test_per_class`` samples
    of each of the 10 classes; the training split follows :func:`long_tail_split`
    (with the defaults: 124 samples of class 0 down to 12 of class 9).

    Features are standardised per pixel with the training split's mean and
    standard deviation (pixels constant in training, such as the always-blank
    corners, are only centred). Zero-mean, unit-variance inputs let one SGD
    learning rate suit every pixel; dividing by 16 would leave the rarely inked
    border pixels with tiny inputs and gradients. Only training statistics are
    used, so nothing about the test split leaks into training.
    """
    data, target = _load_digits()
    train_idx, test_idx = long_tail_split(target, imb_factor, test_per_class, seed)
    x_train, x_test = data[train_idx], data[test_idx]
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0)
    std[std == 0] = 1.0
    x_train = (x_train - mean) / std
    x_test = (x_test - mean) / std
    return (
        torch.from_numpy(x_train.astype(np.float32)),
        torch.from_numpy(target[train_idx].astype(np.int64)),
        torch.from_numpy(x_test.astype(np.float32)),
        torch.from_numpy(target[test_idx].astype(np.int64)),
    )
