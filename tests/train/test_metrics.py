"""Accuracy by class frequency: per class, Many / Medium / Few thresholds, head / tail, mean ± std."""

from __future__ import annotations

import math

import pytest
import torch

from sse_sam_fast.train.data import long_tail_counts
from sse_sam_fast.train.metrics import (
    CIFAR100_THRESHOLDS,
    class_ranges,
    frequency_groups,
    group_accuracy,
    head_tail_groups,
    mean_std,
    per_class_accuracy,
    profile_thresholds,
)

DIGITS = [124, 96, 74, 57, 44, 34, 26, 20, 16, 12]


def test_per_class_accuracy_by_hand():
    target = torch.tensor([0, 0, 0, 1, 1, 3])
    pred = torch.tensor([0, 1, 0, 1, 2, 3])
    acc = per_class_accuracy(pred, target, 4)
    assert acc.dtype == torch.float64 and acc.device.type == "cpu"
    assert acc[:2].tolist() == [2 / 3, 1 / 2] and acc[3] == 1
    assert math.isnan(acc[2])  # no test sample of class 2
    with pytest.raises(ValueError, match="1-D"):
        per_class_accuracy(pred[:3], target, 4)


def test_profile_thresholds_reproduce_the_literature_on_cifar100_lt():
    assert profile_thresholds(long_tail_counts(500, 100, 100)) == CIFAR100_THRESHOLDS == (100.0, 20.0)


@pytest.mark.parametrize(
    "counts, expected, sizes",
    [
        (DIGITS, (54.0, 25.0), (4, 3, 3)),  # digits-LT, imbalance 10
        (long_tail_counts(5000, 10, 100), (1000.0, 200.0), (4, 3, 3)),  # CIFAR-10-LT
        (long_tail_counts(500, 10, 100), (100.0, 20.0), (4, 3, 3)),  # synthetic-LT defaults
    ],
)
def test_profile_thresholds_scaled(counts, expected, sizes):
    many, few = profile_thresholds(counts)
    assert (many, few) == expected
    groups = frequency_groups(counts, many, few)
    assert tuple(len(groups[g]) for g in ("many", "medium", "few")) == sizes


def test_frequency_groups_boundaries():
    # many: n > 100; few: n < 20; 100 and 20 themselves are medium
    groups = frequency_groups([500, 101, 100, 20, 19, 5], 100, 20)
    assert groups == {"many": [0, 1], "medium": [2, 3], "few": [4, 5]}
    with pytest.raises(ValueError, match="must not exceed"):
        frequency_groups([5, 1], 10, 20)


def test_head_tail_groups():
    assert head_tail_groups(DIGITS, 40) == {"head": [0, 1, 2, 3, 4], "tail": [5, 6, 7, 8, 9]}
    assert head_tail_groups([100, 99], 100) == {"head": [0], "tail": [1]}


def test_group_accuracy_means_of_classes():
    per_class = [1.0, 0.5, 0.0, math.nan]
    acc = group_accuracy(per_class, {"a": [0, 1], "b": [2, 3], "c": []})
    assert acc["all"] == pytest.approx(0.5)  # NaN class left out
    assert acc["a"] == pytest.approx(0.75) and acc["b"] == 0.0
    assert math.isnan(acc["c"])


def test_mean_std_sample_deviation():
    mean, std = mean_std([0.9, 0.8, 0.7])
    assert mean == pytest.approx(0.8) and std == pytest.approx(0.1)
    assert mean_std([0.5]) == (0.5, 0.0)
    with pytest.raises(ValueError):
        mean_std([])


def test_class_ranges():
    assert class_ranges([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7-8"
    assert class_ranges([3]) == "3" and class_ranges([]) == "none"
