"""Head/tail bookkeeping for long-tailed data."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def tail_classes(class_counts: Sequence[int] | Tensor, eta: float) -> Tensor:
    """Indices of the classes whose training-set count is below ``eta``.

    >>> tail_classes([500, 120, 30, 8], eta=100)
    tensor([2, 3])
    """
    counts = torch.as_tensor(class_counts)
    if counts.dim() != 1 or counts.numel() == 0:
        raise ValueError(f"class_counts must be a non-empty 1-D sequence, got shape {tuple(counts.shape)}")
    if counts.dtype.is_floating_point or counts.dtype == torch.bool or (counts < 0).any():
        raise ValueError("class_counts must hold non-negative integer counts")
    return torch.nonzero(counts < eta).flatten()


def tail_mask(targets: Tensor, tail_classes: Sequence[int] | Tensor) -> Tensor:
    """Bool mask of shape ``targets.shape``: True where the target is a tail class."""
    if not isinstance(targets, Tensor) or targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise TypeError("targets must be an integer tensor of class indices")
    tails = torch.as_tensor(tail_classes, dtype=targets.dtype, device=targets.device)
    return torch.isin(targets, tails)
