"""Perturb the weights of a flat bucket from a snapshot, in one pass.

SAM-family steps move the weights by ``e = rho * g / (||g|| + 1e-16)`` (Foret et
al. 2021; ImbSAM, Zhou et al. 2023; SSE-SAM, arXiv 2412.13715) and later move
them back.  Undoing the move by subtraction returns ``w`` only within a rounding,
so every perturbation is taken from a snapshot ``w0`` of the unperturbed weights
and restoring is the exact copy ``w <- w0``.  :func:`perturb_` does

    save=True:   w0 <- w;  w <- w  + s * g[row]     (first perturbation of a step)
    save=False:            w <- w0 + s * g[row]     (any later one, e.g. head -> tail)

with ``s = rho / (sqrt(sumsq) + 1e-16)``, where ``sumsq`` is a device fp32 scalar
(usually an entry of :func:`.norms.grouped_sumsq`).  With ``adaptive=True`` the
move is ASAM's (Kwon et al. 2021) ``e = rho * T^2 g / ||T g||``, ``T = |base|``:

    w <- base + s * base**2 * g[row]                (base = the unperturbed w or w0)

with ``sumsq = ||base * g[row]||^2`` (``grouped_sumsq(g, [row], w=base)``, taken
before this call).  ``start``/``end`` restrict the whole operation, snapshot
included, to the elements ``[start, end)`` (one parameter group of a bucket);
elements outside are not touched in ``w`` or ``w0``.  The scale is computed
inside the kernel so the norm never travels to the host.  The restore itself is
``w.copy_(w0)``, or the load of ``w0`` in :func:`.update.restore_sgd_`.

The snapshot is a copy of the stored bits (``-0.0``, subnormals and NaN payloads
included), never converted.  The perturbed value is computed in fp32 whatever the
storage dtype and rounded to it once (round-to-nearest-even, as torch's ``.to``);
in fp32 the GPU may contract ``w0 + s * g`` into an FMA, a difference of the order
of fp32 rounding.  The zero padding of the bucket stays zero because ``g`` is zero
there.

Traffic per element of the range: ``save=True`` reads ``w`` and ``g[row]`` and
writes ``w0`` and ``w``; ``save=False`` reads ``w0`` and ``g[row]`` and writes
``w``, whatever the previous perturbation was.  The adaptive move reads no further
buffer: ``T`` is the base the kernel loads anyway.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._constants import EPS
from ._checks import _check_bool, _check_bucket, _check_range, _check_shift, _check_snapshot

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
    ADAPTIVE: tl.constexpr,
    EPS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """SAVE: w0 <- w, w <- w + s * g; else w <- w0 + s * g; s = rho / (sqrt(sumsq) + 1e-16).
    ADAPTIVE: the move is s * base**2 * g (base = the w or w0 loaded, in fp32)."""
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
    base_f = base.to(tl.float32)
    if ADAPTIVE:
        # ASAM's T^2 g with T = |base|: the unperturbed weight already loaded
        w = base_f + scale * (base_f * base_f) * g
    else:
        w = base_f + scale * g
    tl.store(w_ptr + offsets, w.to(w_ptr.dtype.element_ty), mask=mask)


def perturb_(
    w: torch.Tensor,
    w0: torch.Tensor,
    g: torch.Tensor,
    add,
    save: bool,
    check: bool = True,
    *,
    adaptive: bool = False,
    start: int = 0,
    end: int | None = None,
) -> torch.Tensor:
    """In place: ``w <- base + s * g[row]``, ``base = w`` (saved to ``w0``) or ``w0``; returns ``w``.

    Arguments:

    - ``w``: contiguous 1-D weight bucket of length N (fp32, bf16 or fp16).
    - ``w0``: contiguous 1-D snapshot of ``w``'s shape, dtype and device, sharing no
      memory with ``w`` or ``g``.  Written when ``save``, read otherwise.
    - ``g``: contiguous ``(k, N)`` gradient buffer of ``w``'s dtype and device.
    - ``add``: ``(row, sumsq, rho)``: perturb along ``g[row]``.  ``sumsq`` is a
      one-element fp32 tensor on ``w``'s device holding ``||g[row]||^2``
      (``||base * g[row]||^2`` when ``adaptive``); ``rho`` a Python float.
      ``s = rho / (sqrt(sumsq) + 1e-16)``.
    - ``save``: ``True`` for the first perturbation of a step: ``w0 <- w``, then
      ``w <- w + s * g[row]``.  ``False`` for a later one: ``w <- w0 + s *
      g[row]``, so the previous perturbation leaves no trace.
    - ``check``: validate the arguments (``False``: the caller validated this
      buffer layout once already).
    - ``adaptive``: ASAM: the move is ``s * base**2 * g[row]`` (in fp32, ``base``
      as loaded), i.e. ``rho * T^2 g / ||T g||`` with ``T = |base|``.
    - ``start``, ``end``: only elements ``[start, end)`` are read and written, ``w0``
      included (``end`` defaults to N).

    Restoring is ``w.copy_(w0)`` (bit-identical) or the ``w0`` argument of
    :func:`.update.restore_sgd_`.
    """
    if check:
        _check_bucket(w, g)
        _check_snapshot(w0, w, g)
        add = _check_shift(add, g, "add")
        _check_bool(save, "save")
        _check_bool(adaptive, "adaptive")
        _check_range(start, w.shape[0] if end is None else end, w.shape[0])
    end = w.shape[0] if end is None else end
    row, sumsq, rho = add
    n_elements = end - start
    if n_elements == 0:
        return w
    # Views, not copies: the range is an offset of each pointer.
    grid = (triton.cdiv(n_elements, BLOCK_SIZE),)
    _perturb_kernel[grid](
        w[start:end],
        w0[start:end],
        g[row, start:end],
        sumsq,
        rho,
        n_elements,
        SAVE=bool(save),
        ADAPTIVE=bool(adaptive),
        EPS=EPS,
        BLOCK_SIZE=BLOCK_SIZE,
    )
    return w
