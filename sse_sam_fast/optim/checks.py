"""Argument checks of the engine: each raises naming the argument."""

from __future__ import annotations

import inspect
import math
import numbers

import torch
from torch import Tensor

from .. import _torch_private

_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def real(name: str, value, accepted: str) -> float:
    """``value`` as a float if it is a real number: a Python or NumPy int or
    float, a ``Fraction``, or a 0-dim real tensor, which is what argparse, YAML
    and NumPy hand over. Bools, strings, complex numbers and anything else are a
    ``TypeError`` naming the argument; ``accepted`` says what would do."""
    if isinstance(value, Tensor):
        if value.dim() != 0 or value.dtype == torch.bool or value.is_complex() or value.is_meta:
            raise TypeError(
                f"{name} must be {accepted}, got a tensor of shape {tuple(value.shape)} ({value.dtype})"
            )
        return float(value.item())
    # bool is an int, numpy's bool_ is no Real: both refused as flags, not numbers
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {accepted}, got {type(value).__name__} {value!r:.40}")
    try:
        return float(value)
    except OverflowError:  # an int past the float range
        raise ValueError(f"{name} must be {accepted}, got {value!r:.40}") from None


def check_bool(name: str, value) -> bool:
    """A flag: exactly True or False (1, "yes" or a tensor are refused)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r:.40}")
    return value


def check_rho(name: str, value) -> float:
    """A radius or a weight: a finite real number >= 0, as a float."""
    accepted = "a finite real number >= 0"
    x = real(name, value, accepted)
    if not math.isfinite(x) or x < 0:
        raise ValueError(f"{name} must be {accepted}, got {value!r:.40}")
    return x


def check_count(name: str, value, minimum: int = 0) -> int:
    """A count (epochs, steps): an integer >= ``minimum``; an integral float
    (``200.0``, ``np.float32(3)``) or a 0-dim tensor holding one is accepted."""
    accepted = f"an integer >= {minimum}"
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        n = int(value)  # exact for ints past 2**53
    elif isinstance(value, Tensor) and value.dim() == 0 and value.dtype in _INT_DTYPES and not value.is_meta:
        n = int(value.item())
    else:
        x = real(name, value, accepted)
        if not math.isfinite(x) or not x.is_integer():
            raise ValueError(f"{name} must be {accepted}, got {value!r:.40}")
        n = int(x)
    if n < minimum:
        raise ValueError(f"{name} must be {accepted}, got {value!r:.40}")
    return n


def check_schedule(gamma, total_epochs) -> tuple[float, int]:
    """SSE-SAM's ``gamma`` (a real number in [0, 1]) and ``total_epochs`` (a count >= 1)."""
    accepted = "a real number in [0, 1]"
    g = real("gamma", gamma, accepted)
    if not 0 <= g <= 1:  # NaN fails both comparisons
        raise ValueError(f"gamma must be {accepted}, got {gamma!r:.40}")
    return g, check_count("total_epochs", total_epochs, 1)


def check_losses(losses, batch: int | None = None, allow_empty: bool = False) -> Tensor:
    """Per-sample losses of shape ``(batch,)``; ``allow_empty``: a process's shard
    may be empty (DDP), the others' samples make the step."""
    if not isinstance(losses, Tensor):
        raise TypeError(f"closure must return a tensor of per-sample losses, got {type(losses).__name__}")
    if losses.dim() != 1:
        raise ValueError(
            f"closure must return per-sample losses of shape (B,), got shape {tuple(losses.shape)}; "
            "use reduction='none'"
        )
    if batch is not None and losses.shape[0] != batch:
        raise ValueError(f"closure returned {losses.shape[0]} losses, expected {batch} (the same batch)")
    if losses.shape[0] == 0 and batch is None and not allow_empty:
        raise ValueError("closure returned an empty batch of losses")
    if not losses.requires_grad:
        raise ValueError("closure returned losses that do not require grad (was it run under no_grad?)")
    return losses


def check_mask(
    tail_mask, losses: Tensor | None = None, device: torch.device | None = None, allow_empty: bool = False
) -> Tensor:
    """``tail_mask`` for ``losses`` (exact), or before any forward (split) for
    parameters on ``device`` (``allow_empty``: a DDP shard may hold no sample)."""
    if not isinstance(tail_mask, Tensor) or tail_mask.dtype != torch.bool:
        raise TypeError(f"tail_mask must be a bool tensor of shape (B,), got {tail_mask!r:.80}")
    if losses is None:
        if tail_mask.dim() != 1 or (tail_mask.numel() == 0 and not allow_empty):
            raise ValueError(f"tail_mask must have shape (B,) with B >= 1, got {tuple(tail_mask.shape)}")
        if device is not None and tail_mask.device != device:
            raise ValueError(f"tail_mask is on {tail_mask.device}, the parameters on {device}")
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


def need_keys(where: str, mapping, keys) -> None:
    """``mapping`` is a dict holding every key of ``keys``; else a named error."""
    if not isinstance(mapping, dict):
        raise TypeError(f"{where} must be a dict, got {type(mapping).__name__}")
    missing = [k for k in keys if k not in mapping]
    if missing:
        raise ValueError(f"{where} lacks {', '.join(map(repr, missing))}; it has {sorted(map(str, mapping))}")


def check_base_state(base, optimizer: torch.optim.Optimizer) -> None:
    """``base`` has the layout of ``optimizer``'s state_dict: the checks torch
    makes in ``load_state_dict``, made before anything else is loaded."""
    need_keys("state_dict", base, ["state", "param_groups"])
    groups = base["param_groups"]
    if not isinstance(groups, (list, tuple)) or not all(
        isinstance(g, dict) and isinstance(g.get("params"), (list, tuple)) for g in groups
    ):
        raise ValueError("state_dict['param_groups'] must be a list of dicts with a 'params' list")
    saved = [len(g["params"]) for g in groups]
    held = [len(g["params"]) for g in optimizer.param_groups]
    if saved != held:
        raise ValueError(f"state_dict has param groups of sizes {saved}; the base optimizer {held}")


class SampleIndex(Tensor):
    """The sample indices a ``split`` closure gets. A split closure never shows
    the batch it indexes, so a tail mask of the wrong length would silently
    train on part of the batch (or index past its end). Indexing a tensor with
    these indices (``x[idx]``, ``index_select`` along dim 0, also after
    ``idx.to(device)``) first checks that tensor's length against the mask's, and
    raises the exact schedule's error before anything is read out of range.
    Everything else the closure does with them gives plain tensors."""

    batch: int

    @staticmethod
    def of(idx: Tensor, batch: int) -> SampleIndex:
        out = idx.as_subclass(SampleIndex)
        out.batch = batch
        return out

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is Tensor.__getitem__ and isinstance(args[0], Tensor) and args[0].dim() > 0:
            key = args[1][0] if isinstance(args[1], tuple) and args[1] else args[1]
            cls._check(args[0], key)
        elif func in (Tensor.index_select, torch.index_select):
            source = args[0]
            dim = args[1] if len(args) > 1 else kwargs.get("dim")
            key = args[2] if len(args) > 2 else kwargs.get("index")
            if isinstance(source, Tensor) and source.dim() > 0 and dim in (0, -source.dim()):
                cls._check(source, key)
        out = _torch_private.call_unwrapped(func, args, kwargs)
        if func in (Tensor.to, Tensor.cuda, Tensor.cpu) and isinstance(args[0], SampleIndex):
            # idx.to(device): still the indices of the same batch
            if isinstance(out, Tensor) and not isinstance(out, SampleIndex):
                out = SampleIndex.of(out, args[0].batch)
        return out

    @staticmethod
    def _check(source: Tensor, key) -> None:
        if isinstance(key, SampleIndex) and source.shape[0] != key.batch:
            raise ValueError(
                f"tail_mask must have shape ({source.shape[0]},) (one flag per sample), got ({key.batch},)"
            )
