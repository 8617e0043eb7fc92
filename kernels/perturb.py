"""Perturb the weights of a flat bucket from a snapshot, in one pass.

SAM-family steps move the weights by ``e = rho * g / (||g|| + 1e-16)`` (Foret et
al. 2021; ImbSAM, Zhou et al. 2023; SSE-SAM, arXiv 2412.13715) and later move
them back.  Undoing the move by subtraction returns ``w`` only within a rounding,
so every perturbation is taken from a snapshot ``w0`` of the unperturbed weights
and restoring is the exact copy ``w <- w0``.  :func:`perturb_` does

    save=True:   w0 <- w;  w <- w  + s * g[row]     (first perturbation of a step)
    save=False:            w <- w0 + s * g[row]     (any later one, e.g. head -> tail)

with ``s = rho / (sqrt(sumsq) + 1e-16)``, where ``sumsq`` is a device fp32 scalar
(usually an entry of :func:`kernels.norms.grouped_sumsq`).  The scale is computed
inside the kernel so the norm never travels to the host.  The restore itself is
``w.copy_(w0)``, or the load of ``w0`` in :func:`kernels.update.restore_sgd_`.

The snapshot is a copy of the stored bits (``-0.0``, subnormals and NaN payloads
included), never converted.  The perturbed value is computed in fp32 whatever the
storage dtype and rounded to it once (round-to-nearest-even, as torch's ``.to``);
in fp32 the GPU may contract ``w0 + s * g`` into an FMA, a difference of the order
of fp32 rounding.  The zero padding of the bucket stays zero because ``g`` is zero
there.

Traffic per element: ``save=True`` reads ``w`` and ``g[row]`` and writes ``w0`` and
``w``; ``save=False`` reads ``w0`` and ``g[row]`` and writes ``w``, whatever the
previous perturbation was.
"""

from __future__ import annotations

import operator

import torch
import triton
import triton.language as tl

BLOCK_SIZE = 1024

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _perturb_kernel(
    w_ptr,
    w0_ptr,
    g_ptr,
    sumsq_ptr,
    rho,
    n_elements,
    SAVE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """SAVE: w0 <- w, w <- w + s * g; else w <- w0 + s * g; s = rho / (sqrt(sumsq) + 1e-16)."""
    pid = tl.program_id(0).to(tl.int64)
    offsets = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    if SAVE:
        base = tl.load(w_ptr + offsets, mask=mask, other=0.0)
        # Stored as loaded, without a round trip through fp32, so that the
        # restore w <- w0 is bit-identical for every value.
        tl.store(w0_ptr + offsets, base, mask=mask)
    else:
        base = tl.load(w0_ptr + offsets, mask=mask, other=0.0)
    # Each program recomputes the scale: one scalar load is cheaper than a
    # separate launch, and it keeps the norm off the host.
    # 1e-16 is added to the norm, not to the sum of squares, as in the
    # published SAM code, so a zero gradient gives a zero (not NaN) step.
    scale = rho / (tl.sqrt(tl.load(sumsq_ptr)) + 1e-16)
    g = tl.load(g_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    w = base.to(tl.float32) + scale * g
    tl.store(w_ptr + offsets, w.to(w_ptr.dtype.element_ty), mask=mask)


def perturb_(w: torch.Tensor, w0: torch.Tensor, g: torch.Tensor, add, save: bool) -> torch.Tensor:
    """In place: ``w <- base + s * g[row]``, ``base = w`` (saved to ``w0``) or ``w0``; returns ``w``.

    Args:
        w: contiguous 1-D weight bucket of length N (fp32, bf16 or fp16).
        w0: contiguous 1-D snapshot of ``w``'s shape, dtype and device, sharing no
            memory with ``w`` or ``g``.  Written when ``save``, read otherwise.
        g: contiguous ``(k, N)`` gradient buffer of ``w``'s dtype and device.
        add: ``(row, sumsq, rho)``: perturb along ``g[row]``.  ``sumsq`` is a
            one-element fp32 tensor on ``w``'s device holding ``||g[row]||^2``;
            ``rho`` a Python float.  ``s = rho / (sqrt(sumsq) + 1e-16)``.
        save: ``True`` for the first perturbation of a step: ``w0 <- w``, then
            ``w <- w + s * g[row]``.  ``False`` for a later one: ``w <- w0 + s *
            g[row]``, so the previous perturbation leaves no trace.

    Restoring is ``w.copy_(w0)`` (bit-identical) or the ``w0`` argument of
    :func:`kernels.update.restore_sgd_`.
    """
    _check_bucket(w, g)
    _check_snapshot(w0, w, g)
    g_row, sumsq, rho = _check_shift(add, g, "add")
    if not isinstance(save, bool):
        raise ValueError(f"save must be a bool, got {save!r}")
    n_elements = w.numel()
    if n_elements == 0:
        return w
    grid = (triton.cdiv(n_elements, BLOCK_SIZE),)
    _perturb_kernel[grid](w, w0, g_row, sumsq, rho, n_elements, SAVE=save, BLOCK_SIZE=BLOCK_SIZE)
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


def _check_snapshot(w0, w: torch.Tensor, g: torch.Tensor) -> None:
    """w0: contiguous, w's shape, dtype and device, no memory shared with w or g."""
    if not isinstance(w0, torch.Tensor) or w0.shape != w.shape:
        raise ValueError(f"w0 must be a tensor of shape ({w.shape[0]},), got {_describe(w0)}")
    if w0.dtype != w.dtype:
        raise ValueError(f"w0 must have w's dtype {w.dtype}, got {w0.dtype}")
    if w0.device != w.device:
        raise ValueError(f"w0 must be on w's device {w.device}, got {w0.device}")
    if not w0.is_contiguous():
        raise ValueError("w0 must be contiguous")
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
    """Validate ``(row, sumsq, rho)``; returns ``(g[row], sumsq, float(rho))``."""
    if not isinstance(term, tuple) or len(term) != 3:
        raise ValueError(f"{name} must be a tuple (row, sumsq, rho), got {term!r}")
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
