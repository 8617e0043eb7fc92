"""Perturb, restore and switch the weights of a flat bucket in one pass.

SAM-family steps move the weights by ``e = rho * g / (||g|| + 1e-16)`` (Foret et
al. 2021; ImbSAM, Zhou et al. 2023; SSE-SAM, arXiv 2412.13715) and later move
them back.  :func:`shift_` does any of

    perturb:  w <- w + s_a * g[a]
    restore:  w <- w - s_b * g[b]
    switch:   w <- w + s_a * g[a] - s_b * g[b]    (restore head, perturb tail)

with ``s = rho / (sqrt(sumsq) + 1e-16)``, where ``sumsq`` is a device fp32 scalar
(usually an entry of :func:`kernels.norms.grouped_sumsq`).  The scale is computed
inside the kernel so the norm never travels to the host.

Arithmetic is fp32 whatever the storage dtype, evaluated left to right,
``(w + s_a * g[a]) - s_b * g[b]``, and rounded to the storage dtype once
(round-to-nearest-even, as torch's ``.to``).  The torch expression
``w.add_(g_a, alpha=s_a).sub_(g_b, alpha=s_b)`` rounds after each op in bf16 or
fp16, so the fused switch can differ from it by one unit in the last place; in
fp32 the GPU may contract ``w + s * g`` into an FMA, a difference of the order of
fp32 rounding.  The zero padding of the bucket stays zero because ``g`` is zero
there.
"""

from __future__ import annotations

import operator

import torch
import triton
import triton.language as tl

BLOCK_SIZE = 1024

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _shift_kernel(
    w_ptr,
    add_g_ptr,
    add_sumsq_ptr,
    add_rho,
    sub_g_ptr,
    sub_sumsq_ptr,
    sub_rho,
    n_elements,
    HAS_ADD: tl.constexpr,
    HAS_SUB: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """w <- (w + s_a * g_a) - s_b * g_b in fp32, s = rho / (sqrt(sumsq) + 1e-16)."""
    pid = tl.program_id(0).to(tl.int64)
    offsets = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    w = tl.load(w_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_ADD:
        # Each program recomputes the scale: one scalar load is cheaper than a
        # separate launch, and it keeps the norm off the host.
        # 1e-16 is added to the norm, not to the sum of squares, as in the
        # published SAM code, so a zero gradient gives a zero (not NaN) step.
        add_scale = add_rho / (tl.sqrt(tl.load(add_sumsq_ptr)) + 1e-16)
        g_a = tl.load(add_g_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        w = w + add_scale * g_a
    if HAS_SUB:
        sub_scale = sub_rho / (tl.sqrt(tl.load(sub_sumsq_ptr)) + 1e-16)
        g_b = tl.load(sub_g_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        w = w - sub_scale * g_b
    tl.store(w_ptr + offsets, w.to(w_ptr.dtype.element_ty), mask=mask)


def shift_(w: torch.Tensor, g: torch.Tensor, add=None, sub=None) -> torch.Tensor:
    """In place: ``w <- w + s_a * g[row_a] - s_b * g[row_b]``; returns ``w``.

    Args:
        w: contiguous 1-D weight bucket of length N (fp32, bf16 or fp16).
        g: contiguous ``(k, N)`` gradient buffer of ``w``'s dtype and device.
        add: ``None`` or ``(row_a, sumsq_a, rho_a)``: perturb along ``g[row_a]``.
        sub: ``None`` or ``(row_b, sumsq_b, rho_b)``: undo a perturbation along
            ``g[row_b]``.  ``sumsq`` is a one-element fp32 tensor on ``w``'s device
            holding ``||g[row]||^2``; ``rho`` a Python float.  ``s = rho /
            (sqrt(sumsq) + 1e-16)``.

    With both ``None`` nothing is launched.
    """
    _check_bucket(w, g)
    add_args = _check_shift(add, g, "add")
    sub_args = _check_shift(sub, g, "sub")
    n_elements = w.numel()
    if n_elements == 0 or (add_args is None and sub_args is None):
        return w
    # An absent term still needs pointer arguments; w and g are valid stand-ins
    # that the disabled branch never reads.
    add_g, add_sumsq, add_rho = add_args if add_args is not None else (g, w, 0.0)
    sub_g, sub_sumsq, sub_rho = sub_args if sub_args is not None else (g, w, 0.0)
    grid = (triton.cdiv(n_elements, BLOCK_SIZE),)
    _shift_kernel[grid](
        w,
        add_g,
        add_sumsq,
        add_rho,
        sub_g,
        sub_sumsq,
        sub_rho,
        n_elements,
        HAS_ADD=add_args is not None,
        HAS_SUB=sub_args is not None,
        BLOCK_SIZE=BLOCK_SIZE,
    )
    return w


# Argument checks shared with kernels.update.


def _check_bucket(w, g) -> None:
    """w: contiguous 1-D (N,); g: contiguous (k, N), same dtype and device."""
    if not isinstance(w, torch.Tensor) or w.dim() != 1:
        raise ValueError(f"w must be a 1-D tensor, got {_describe(w)}")
    if w.dtype not in _SUPPORTED_DTYPES:
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


def _check_row(row, g: torch.Tensor, name: str) -> int:
    try:
        if isinstance(row, bool):
            raise TypeError
        row = operator.index(row)
    except TypeError:
        raise ValueError(f"{name}: row must be an int, got {row!r}") from None
    if not 0 <= row < g.shape[0]:
        raise ValueError(f"{name}: row {row} out of range [0, {g.shape[0]})")
    return row


def _check_shift(term, g: torch.Tensor, name: str):
    """Validate ``(row, sumsq, rho)``; returns ``(g[row], sumsq, float(rho))`` or None."""
    if term is None:
        return None
    if not isinstance(term, tuple) or len(term) != 3:
        raise ValueError(f"{name} must be None or a tuple (row, sumsq, rho), got {term!r}")
    row, sumsq, rho = term
    row = _check_row(row, g, name)
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
    return g[row], sumsq, rho


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {tuple(x.shape)} ({x.dtype})"
    return type(x).__name__
