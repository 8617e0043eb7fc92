"""Argument checks of the engine: each raises naming the argument."""

from __future__ import annotations

import inspect
import math

import torch
from torch import Tensor


def check_rho(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float >= 0, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite float >= 0, got {value}")
    return float(value)


def check_schedule(gamma, total_epochs) -> tuple[float, int]:
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 <= gamma <= 1:
        raise ValueError(f"gamma must be a float in [0, 1], got {gamma!r}")
    if isinstance(total_epochs, bool) or not isinstance(total_epochs, int) or total_epochs < 1:
        raise ValueError(f"total_epochs must be an int >= 1, got {total_epochs!r}")
    return float(gamma), total_epochs


def check_losses(losses, batch: int | None = None) -> Tensor:
    if not isinstance(losses, Tensor):
        raise TypeError(f"closure must return a tensor of per-sample losses, got {type(losses).__name__}")
    if losses.dim() != 1:
        raise ValueError(
            f"closure must return per-sample losses of shape (B,), got shape {tuple(losses.shape)}; "
            "use reduction='none'"
        )
    if batch is not None and losses.shape[0] != batch:
        raise ValueError(f"closure returned {losses.shape[0]} losses, expected {batch} (the same batch)")
    if losses.shape[0] == 0 and batch is None:
        raise ValueError("closure returned an empty batch of losses")
    if not losses.requires_grad:
        raise ValueError("closure returned losses that do not require grad (was it run under no_grad?)")
    return losses


def check_mask(tail_mask, losses: Tensor | None = None) -> Tensor:
    if not isinstance(tail_mask, Tensor) or tail_mask.dtype != torch.bool:
        raise TypeError(f"tail_mask must be a bool tensor of shape (B,), got {tail_mask!r:.80}")
    if losses is None:
        if tail_mask.dim() != 1 or tail_mask.numel() == 0:
            raise ValueError(f"tail_mask must have shape (B,) with B >= 1, got {tuple(tail_mask.shape)}")
        return tail_mask
    if tail_mask.shape != losses.shape:
        raise ValueError(
            f"tail_mask must have shape {tuple(losses.shape)} (one flag per sample), "
            f"got {tuple(tail_mask.shape)}"
        )
    if tail_mask.device != losses.device:
        raise ValueError(f"tail_mask is on {tail_mask.device}, the losses on {losses.device}")
    return tail_mask


def micro_batches(closure, tail_mask) -> tuple[list, list]:
    """A closure and a mask, or equal-length lists of them (gradient accumulation)."""
    if isinstance(closure, (list, tuple)):
        closures = list(closure)
        if not closures:
            raise ValueError("closure: an empty list of micro-batch closures")
        if tail_mask is None:
            masks = [None] * len(closures)
        elif isinstance(tail_mask, (list, tuple)) and len(tail_mask) == len(closures):
            masks = list(tail_mask)
        else:
            raise ValueError("tail_mask must be a list with one mask per micro-batch closure")
    else:
        if isinstance(tail_mask, (list, tuple)):
            raise ValueError("tail_mask is a list but closure is not: pass one closure per micro-batch")
        closures, masks = [closure], [tail_mask]
    for c in closures:
        if not callable(c):
            raise TypeError("step() needs a closure that returns the per-sample losses of the batch")
    return closures, masks


def takes_index(closure) -> bool:
    """Whether ``closure`` accepts a positional argument (the split schedule's ``idx``)."""
    try:
        params = inspect.signature(closure).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return any(p.kind in positional or p.kind == inspect.Parameter.VAR_POSITIONAL for p in params)
