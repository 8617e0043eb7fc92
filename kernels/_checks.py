"""Argument checks shared by the kernel launchers: each raises ValueError naming
the argument, before anything is launched."""

from __future__ import annotations

import operator

import torch

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_grad_buffer(g) -> None:
    """g: contiguous 2-D ``(k, N)`` of a supported dtype."""
    if not isinstance(g, torch.Tensor) or g.dim() != 2:
        raise ValueError(f"g must be a 2-D tensor of shape (k, N), got {_describe(g)}")
    if g.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"g must be float32, bfloat16 or float16, got {g.dtype}")
    if not g.is_contiguous():
        raise ValueError("g must be contiguous (row stride N)")


def _check_like(t, name: str, shape: tuple, ref: torch.Tensor, ref_name: str) -> None:
    """t: a contiguous tensor of ``shape`` with ``ref``'s dtype and device."""
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must be a tensor of shape {tuple(shape)}, got {_describe(t)}")
    if t.dtype != ref.dtype:
        raise ValueError(f"{name} must have {ref_name}'s dtype {ref.dtype}, got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name} must be on {ref_name}'s device {ref.device}, got {t.device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def _check_norm_weight(w, g: torch.Tensor) -> None:
    """w (the ASAM weights of a norm): contiguous 1-D (N,), g's dtype and device."""
    _check_like(w, "w", (g.shape[1],), g, "g")


def _check_bool(value, name: str) -> None:
    """A flag that picks a compiled code path: exactly True or False."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")


def _check_bucket(w, g) -> None:
    """w: contiguous 1-D (N,); g: contiguous (k, N), same dtype and device."""
    if not isinstance(w, torch.Tensor) or w.dim() != 1:
        raise ValueError(f"w must be a 1-D tensor, got {_describe(w)}")
    if w.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"w must be float32, bfloat16 or float16, got {w.dtype}")
    if not w.is_contiguous():
        raise ValueError("w must be contiguous")
    if not isinstance(g, torch.Tensor) or g.dim() != 2 or g.shape[1] != w.shape[0]:
        raise ValueError(f"g must have shape (k, {w.shape[0]}), got {_describe(g)}")
    if g.dtype != w.dtype:
        raise ValueError(f"g must have w's dtype {w.dtype}, got {g.dtype}")
    if g.device != w.device:
        raise ValueError(f"g must be on w's device {w.device}, got {g.device}")
    if not g.is_contiguous():
        raise ValueError("g must be contiguous (row stride N)")


def _check_snapshot(w0, w: torch.Tensor, g: torch.Tensor) -> None:
    """w0: contiguous, w's shape, dtype and device, no memory shared with w or g."""
    _check_like(w0, "w0", tuple(w.shape), w, "w")
    # The kernels read one buffer while other programs write the other: an
    # overlap would mix perturbed and saved values.
    for name, other in (("w", w), ("g", g)):
        if _overlaps(w0, other):
            raise ValueError(f"w0 must not share memory with {name}")


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the byte ranges of two contiguous tensors intersect."""
    if a.numel() == 0 or b.numel() == 0:
        return False
    a_start, b_start = a.data_ptr(), b.data_ptr()
    a_end = a_start + a.numel() * a.element_size()
    b_end = b_start + b.numel() * b.element_size()
    return a_start < b_end and b_start < a_end


def _check_row(row, k: int, name: str) -> int:
    """An int row index in ``[0, k)``."""
    try:
        if isinstance(row, bool):
            raise TypeError
        row = operator.index(row)
    except TypeError:
        raise ValueError(f"{name}: row must be an int, got {row!r}") from None
    if not 0 <= row < k:
        raise ValueError(f"{name}: row {row} out of range [0, {k})")
    return row


def _check_shift(term, g: torch.Tensor, name: str):
    """Validate ``(row, sumsq, rho)``; returns ``(row, sumsq, float(rho))``."""
    if not isinstance(term, tuple) or len(term) != 3:
        raise ValueError(f"{name} must be a tuple (row, sumsq, rho), got {term!r}")
    row, sumsq, rho = term
    row = _check_row(row, g.shape[0], name)
    if not isinstance(sumsq, torch.Tensor) or sumsq.numel() != 1:
        raise ValueError(f"{name}: sumsq must be a one-element tensor, got {_describe(sumsq)}")
    if sumsq.dtype != torch.float32:
        raise ValueError(f"{name}: sumsq must be float32, got {sumsq.dtype}")
    if sumsq.device != g.device:
        raise ValueError(f"{name}: sumsq must be on device {g.device}, got {sumsq.device}")
    if isinstance(rho, torch.Tensor) or isinstance(rho, bool):
        raise ValueError(f"{name}: rho must be a Python float, got {rho!r}")
    try:
        rho = float(rho)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: rho must be a float, got {rho!r}") from None
    return row, sumsq, rho


def _check_momentum_buf(buf, w: torch.Tensor) -> None:
    """buf: contiguous, w's shape and device, w's dtype or fp32."""
    if not isinstance(buf, torch.Tensor) or buf.shape != w.shape:
        raise ValueError(
            f"momentum_buf must be a tensor of shape ({w.shape[0]},) when momentum != 0, got {_describe(buf)}"
        )
    if buf.dtype not in (w.dtype, torch.float32):
        raise ValueError(f"momentum_buf must be {w.dtype} or float32, got {buf.dtype}")
    if buf.device != w.device:
        raise ValueError(f"momentum_buf must be on w's device {w.device}, got {buf.device}")
    if not buf.is_contiguous():
        raise ValueError("momentum_buf must be contiguous")


def _check_ok(ok, w: torch.Tensor) -> None:
    """ok: a one-element bool tensor on w's device."""
    if not isinstance(ok, torch.Tensor) or ok.numel() != 1 or ok.dtype != torch.bool:
        raise ValueError(f"ok must be a one-element bool tensor, got {_describe(ok)}")
    if ok.device != w.device:
        raise ValueError(f"ok must be on w's device {w.device}, got {ok.device}")


def _check_clip(clip, w: torch.Tensor) -> None:
    """clip: a one-element float32 tensor on w's device."""
    if not isinstance(clip, torch.Tensor) or clip.numel() != 1 or clip.dtype != torch.float32:
        raise ValueError(f"clip must be a one-element float32 tensor, got {_describe(clip)}")
    if clip.device != w.device:
        raise ValueError(f"clip must be on w's device {w.device}, got {clip.device}")


def _check_restore_sgd(
    w, g, grad_row, w0, extra_rows, momentum_buf, has_momentum, start, end, ok, hyper, clip
):
    """Every argument of :func:`.update.restore_sgd_` but the hyperparameter values."""
    _check_bucket(w, g)
    _check_row(grad_row, g.shape[0], "grad_row")
    if w0 is not None:
        _check_snapshot(w0, w, g)
    _check_extra_rows(extra_rows, g.shape[0])
    _check_range(start, end, w.shape[0])
    if has_momentum:
        _check_momentum_buf(momentum_buf, w)
    if ok is not None:
        _check_ok(ok, w)
    if hyper is not None:
        _check_hyper(hyper, w)
    if clip is not None:
        _check_clip(clip, w)


def _check_extra_rows(rows: list, k: int) -> None:
    """At most one extra row index in ``[0, k)``."""
    if len(rows) > 1:
        raise ValueError(f"extra_rows: at most one extra row is supported, got {rows}")
    for r in rows:
        _check_row(r, k, "extra_rows")


def _check_range(start, end, n_total: int) -> None:
    """Ints with ``0 <= start <= end <= n_total``."""
    if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end <= n_total):
        raise ValueError(
            f"start, end must satisfy 0 <= start <= end <= {n_total}, got start={start!r}, end={end!r}"
        )


def _check_hyper(hyper, w: torch.Tensor) -> None:
    """hyper: float32 [lr, momentum, dampening, weight_decay] on w's device."""
    if not isinstance(hyper, torch.Tensor) or hyper.shape != (4,) or hyper.dtype != torch.float32:
        raise ValueError(f"hyper must be a float32 tensor of shape (4,), got {_describe(hyper)}")
    if hyper.device != w.device:
        raise ValueError(f"hyper must be on w's device {w.device}, got {hyper.device}")


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {tuple(x.shape)} ({x.dtype})"
    return type(x).__name__
