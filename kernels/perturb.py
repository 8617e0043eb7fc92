"""Perturb the weights of a flat bucket from a snapshot, in one pass.

SAM-family steps move the weights by ``e = rho * g / (||g|| + 1e-16)`` (Foret et
al. 2021; ImbSAM, Zhou et al. 2023; SSE-SAM, arXiv 2412.13715) and later move
them back.  Undoing the move by subtraction returns ``w`` only within a rounding,
so every perturbation is taken from a snapshot ``w0`` of the unperturbed weights
and restoring is the exact copy ``w <- w0``.  :func:`perturb_` does

    save=True:   w0 <- w;  w <- w  + s * g[row]     (first perturbation of a step)
    save=False:            w <- w0 + s * g[row]     (any later one, e.g. head -> tail)

with ``s = rho / (sqrt(sumsq) + 1e-16)``, where ``sumsq`` is a device fp32 scalar
(usually an entry of :func:`.norms.grouped_sumsq`).  The scale is computed
inside the kernel so the norm never travels to the host.  The restore itself is
``w.copy_(w0)``, or the load of ``w0`` in :func:`.update.restore_sgd_`.

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

import torch
import triton
import triton.language as tl

from .._constants import EPS
from ._checks import _check_bucket, _check_shift, _check_snapshot

BLOCK_SIZE = 1024


@triton.jit
def _perturb_kernel(
    w_ptr,
    w0_ptr,
    g_ptr,
    sumsq_ptr,
    rho,
    n_elements,
    SAVE: tl.constexpr,
    EPS: tl.constexpr,
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
    scale = rho / (tl.sqrt(tl.load(sumsq_ptr)) + EPS)
    g = tl.load(g_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    w = base.to(tl.float32) + scale * g
    tl.store(w_ptr + offsets, w.to(w_ptr.dtype.element_ty), mask=mask)


def perturb_(
    w: torch.Tensor, w0: torch.Tensor, g: torch.Tensor, add, save: bool, check: bool = True
) -> torch.Tensor:
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
        check: validate the arguments (``False``: the caller validated this
            buffer layout once already).

    Restoring is ``w.copy_(w0)`` (bit-identical) or the ``w0`` argument of
    :func:`.update.restore_sgd_`.
    """
    if check:
        _check_bucket(w, g)
        _check_snapshot(w0, w, g)
        add = _check_shift(add, g, "add")
        if not isinstance(save, bool):
            raise ValueError(f"save must be a bool, got {save!r}")
    row, sumsq, rho = add
    g_row = g[row]
    n_elements = w.numel()
    if n_elements == 0:
        return w
    grid = (triton.cdiv(n_elements, BLOCK_SIZE),)
    _perturb_kernel[grid](w, w0, g_row, sumsq, rho, n_elements, SAVE=save, EPS=EPS, BLOCK_SIZE=BLOCK_SIZE)
    return w
