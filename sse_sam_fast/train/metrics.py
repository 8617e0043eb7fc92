"""Accuracy by class frequency: per class, Many / Medium / Few, head / tail.

The long-tail literature reports accuracy on a balanced test set split by the
training count ``n_c`` of each class: **Many** ``n_c > 100``, **Medium**
``20 <= n_c <= 100``, **Few** ``n_c < 20`` (CIFAR-100-LT, ImageNet-LT). Those
absolute numbers only make sense for one profile; for the other data sets the
thresholds sit where they sit on CIFAR-100-LT's at imbalance 100 (``n`` from 500
down to 5): at the same fractions of the profile's log range,

    many = n_max · (n_max / n_min)^(-log 5 / log 100)      (100 on CIFAR-100-LT)
    few  = n_max · (n_max / n_min)^(-log 25 / log 100)     (20 on CIFAR-100-LT)

rounded to the integers that split the classes the same way (``many`` down,
``few`` up). On digits-LT (124 down to 12 samples) that gives Many ``n > 54``
(classes 0-3), Medium (4-6), Few ``n < 25`` (7-9); on CIFAR-10-LT at imbalance
100, Many ``n > 1000`` and Few ``n < 200`` (four, three and three classes).

**Head / tail** follow the optimizer's ``eta``: tail classes have ``n_c < eta``
(:func:`sse_sam_fast.tail_classes`). Group accuracies are means of per-class
accuracies; "all" is the mean over every class, which on a balanced test set is
the plain accuracy.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

CIFAR100_THRESHOLDS = (100.0, 20.0)  # (many: n > 100, few: n < 20)
_MANY_POSITION = math.log(5) / math.log(100)
_FEW_POSITION = math.log(25) / math.log(100)
GROUPS = ("many", "medium", "few")
REPORTED = ("all", "many", "medium", "few", "head", "tail")


def per_class_accuracy(pred: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """Accuracy of each class, float64 ``(num_classes,)`` on the CPU; NaN for a
    class without test samples."""
    if pred.shape != target.shape or pred.dim() != 1:
        raise ValueError(f"pred and target must be 1-D of one shape, got {pred.shape} and {target.shape}")
    correct = (pred == target).to(torch.float64)
    hits = torch.zeros(num_classes, dtype=torch.float64, device=target.device).index_add_(0, target, correct)
    seen = torch.bincount(target, minlength=num_classes).to(torch.float64)
    return (hits / seen).cpu()  # 0 / 0 = NaN: no test sample, no accuracy


def profile_thresholds(class_counts: Sequence[int]) -> tuple[float, float]:
    """``(many, few)`` thresholds placed on this profile where 100 and 20 sit on
    CIFAR-100-LT's, as integers (see the module docstring)."""
    n_max, n_min = max(class_counts), min(class_counts)
    if n_min < 1:
        raise ValueError(f"class counts must be >= 1, got {list(class_counts)}")
    ratio = n_max / n_min
    # counts are integers: n > x  <=>  n > floor(x), n < x  <=>  n < ceil(x); the 1e-9 absorbs
    # the rounding of the power (500 · 100^-0.349... is 100.00000000000001)
    many = math.floor(n_max * ratio**-_MANY_POSITION + 1e-9)
    few = math.ceil(n_max * ratio**-_FEW_POSITION - 1e-9)
    return float(many), float(few)


def frequency_groups(class_counts: Sequence[int], many: float, few: float) -> dict[str, list[int]]:
    """Classes per group: Many ``n > many``, Few ``n < few``, Medium the rest."""
    if not few <= many:
        raise ValueError(f"the few threshold ({few:g}) must not exceed the many threshold ({many:g})")
    groups: dict[str, list[int]] = {g: [] for g in GROUPS}
    for c, n in enumerate(class_counts):
        groups["many" if n > many else "few" if n < few else "medium"].append(c)
    return groups


def head_tail_groups(class_counts: Sequence[int], eta: float) -> dict[str, list[int]]:
    """``{"head": classes with n >= eta, "tail": classes with n < eta}``."""
    return {
        "head": [c for c, n in enumerate(class_counts) if n >= eta],
        "tail": [c for c, n in enumerate(class_counts) if n < eta],
    }


def group_accuracy(per_class: Sequence[float] | Tensor, groups: dict[str, list[int]]) -> dict[str, float]:
    """``{"all": mean over classes, <group>: mean over its classes}``; classes
    without test samples (NaN) are left out; an empty group gives NaN."""
    acc = torch.as_tensor(per_class, dtype=torch.float64)
    out = {"all": _nanmean(acc)}
    for name, classes in groups.items():
        out[name] = _nanmean(acc[list(classes)]) if classes else math.nan
    return out


def _nanmean(values: Tensor) -> float:
    values = values[~values.isnan()]
    return float(values.mean()) if values.numel() else math.nan


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``n - 1``; 0 for a single value)."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("mean_std needs at least one value")
    mean = sum(vals) / len(vals)
    if len(vals) == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))


def class_ranges(classes: Sequence[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0-2, 5, 7-8"``."""
    parts, run = [], []
    for c in sorted(classes):
        if run and c == run[-1] + 1:
            run.append(c)
            continue
        if run:
            parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [c]
    if run:
        parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ", ".join(parts) if parts else "none"
