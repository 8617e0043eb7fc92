"""Grouped squared L2 norms of gradient rows.

For a gradient buffer ``g`` of shape ``(k, N)`` and a list of row indices
``rows``, :func:`grouped_sumsq` returns

    out[j] = sum_{start <= i < end} x_i ** 2        (accumulated in fp32)
    x_i    = g[rows[j], i]                          by default
    x_i    = round(g[rows[j], i] + g[plus, i])      with ``plus`` (the sum rounded
                                                    to g's dtype, as torch stores it)
    x_i    = x_i * w[i]                             with ``w`` (in fp32)

for every listed row in one launch, so the head and tail norms that SAM, ImbSAM
and SSE-SAM need (``||g|| = sqrt(out[j])``) cost a single read of the rows.  With
``w`` it is ASAM's ``||T g||^2``, ``T = |w|`` (Kwon et al. 2021; the square makes
the absolute value unnecessary); with ``plus`` it is the norm of a gradient that
the unfused code would first sum into a tensor (ImbSAM's tail + head gradient,
for gradient clipping), without storing the sum.  ``start``/``end`` restrict the
sum to one element range (one parameter group of a bucket), read through pointer
offsets.  The result stays on the device: the scale ``rho / (sqrt(out[j]) +
1e-16)`` is computed by the kernels that consume it (``.perturb``, ``.update``).

Traffic per element of the range and per listed row: reads ``g[row]``, plus
``g[plus]`` with ``plus`` and ``w`` with ``w`` (the adaptive norm reads ``w``
once more than the plain norm); writes nothing but the partial sums.

Determinism: the reduction never uses atomics.  Program ``(slot, j)`` sums the
blocks ``slot, slot + n_slots, slot + 2 n_slots, ...`` of row ``rows[j]`` in that
order into a fixed partial-sum slot; a second tiny kernel adds the slots of each
row in a fixed order.  ``n_slots`` depends only on the range length
``end - start``, so two runs on the same input are bit-identical.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ._checks import _check_grad_buffer, _check_norm_weight, _check_range, _check_row

BLOCK_SIZE = 1024
# Enough programs per row to saturate a GPU's memory bandwidth on a multi-MB
# bucket, few enough that the final reduce is one block.
MAX_SLOTS = 256
# Row indices travel as scalar arguments: a device index tensor would need a
# host-to-device copy on every step.  More rows are split into further launches.
MAX_ROWS_PER_LAUNCH = 4


@triton.jit(do_not_specialize=["row0", "row1", "row2", "row3"])
def _sumsq_partial_kernel(
    g_ptr,
    w_ptr,
    plus_ptr,
    partial_ptr,
    row0,
    row1,
    row2,
    row3,
    row_stride,
    n_elements,
    n_slots,
    iters_per_slot,
    HAS_W: tl.constexpr,
    HAS_PLUS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """partial[j, slot] = sum over blocks b = slot + t * n_slots (t < iters_per_slot)
    of sum_i x[b * BLOCK_SIZE + i] ** 2, accumulated lane-wise in fp32, with
    x = g[row_j] (HAS_PLUS: rounded g[row_j] + plus; HAS_W: times w)."""
    slot = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    row = tl.where(j == 0, row0, tl.where(j == 1, row1, tl.where(j == 2, row2, row3)))
    row_start = g_ptr + row.to(tl.int64) * row_stride
    lanes = tl.arange(0, BLOCK_SIZE)
    # fp32 lanes whatever the storage dtype: bf16 sums lose the tail of small
    # gradients, and per-lane accumulation keeps each addend in a fixed place.
    acc = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    # Same trip count for every program; blocks past the end are fully masked.
    for t in range(0, iters_per_slot):
        block = slot + t * n_slots
        offsets = block * BLOCK_SIZE + lanes
        mask = offsets < n_elements
        x = tl.load(row_start + offsets, mask=mask, other=0.0)
        if HAS_PLUS:
            # rounded to the storage dtype, as the summed gradient torch would
            # hold in p.grad, then used as stored
            y = tl.load(plus_ptr + offsets, mask=mask, other=0.0)
            x = (x.to(tl.float32) + y.to(tl.float32)).to(g_ptr.dtype.element_ty)
        x = x.to(tl.float32)
        if HAS_W:
            x = x * tl.load(w_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        acc += x * x
    tl.store(partial_ptr + j.to(tl.int64) * n_slots + slot, tl.sum(acc, axis=0))


@triton.jit
def _sum_slots_kernel(partial_ptr, out_ptr, n_slots, BLOCK_SIZE: tl.constexpr):
    """out[j] = sum_slot partial[j, slot], one program per row, fixed tree order."""
    j = tl.program_id(0).to(tl.int64)
    offsets = tl.arange(0, BLOCK_SIZE)
    partial = tl.load(partial_ptr + j * n_slots + offsets, mask=offsets < n_slots, other=0.0)
    tl.store(out_ptr + j, tl.sum(partial, axis=0))


def grouped_sumsq(
    g: torch.Tensor,
    rows: Sequence[int],
    *,
    w: torch.Tensor | None = None,
    plus: int | None = None,
    start: int = 0,
    end: int | None = None,
) -> torch.Tensor:
    """Squared L2 norm of each listed row of ``g``: ``out[j] = ||g[rows[j]]||^2``.

    Arguments:

    - ``g``: contiguous ``(k, N)`` gradient buffer, fp32, bf16 or fp16.
    - ``rows``: row indices in ``[0, k)``; repeats are allowed.
    - ``w``: None, or a contiguous 1-D tensor of length N of ``g``'s dtype and
      device: each element is multiplied by ``w[i]`` (in fp32) before it is
      squared, ``out[j] = ||w * g[rows[j]]||^2`` (ASAM's ``||T g||^2``).
    - ``plus``: None, or a row index in ``[0, k)``: the norm of ``g[rows[j]] +
      g[plus]``, the sum rounded to ``g``'s dtype (as torch's ``a + b``
      stores it) before ``w`` and the square.
    - ``start``, ``end``: only elements ``[start, end)`` count (``0 <= start <= end <=
      N``; ``end`` defaults to N).

    Returns an fp32 tensor of shape ``(len(rows),)`` on ``g``'s device.  Zeros when the
    range is empty.  Up to ``MAX_ROWS_PER_LAUNCH`` rows cost one partial-sum launch.
    """
    _check_grad_buffer(g)
    rows = [_check_row(r, g.shape[0], "rows") for r in rows]
    n_total = g.shape[1]
    end = n_total if end is None else end
    _check_range(start, end, n_total)
    if w is not None:
        _check_norm_weight(w, g)
    if plus is not None:
        plus = _check_row(plus, g.shape[0], "plus")
    out = torch.zeros(len(rows), dtype=torch.float32, device=g.device)
    n_elements = end - start
    if n_elements == 0 or not rows:
        return out

    # The range is a pointer offset (a view, not a copy): row r's element i is
    # at flat[r * N + i], inside the view for every row and i < end - start.
    flat = g.view(-1)[start:]
    # Stand-ins for disabled inputs are valid pointers that are never read.
    w_at = w[start:] if w is not None else flat
    plus_at = flat[plus * g.stride(0) :] if plus is not None else flat
    n_blocks = triton.cdiv(n_elements, BLOCK_SIZE)
    n_slots = min(n_blocks, MAX_SLOTS)
    iters_per_slot = triton.cdiv(n_blocks, n_slots)
    for first in range(0, len(rows), MAX_ROWS_PER_LAUNCH):
        chunk = rows[first : first + MAX_ROWS_PER_LAUNCH]
        padded = chunk + [chunk[-1]] * (MAX_ROWS_PER_LAUNCH - len(chunk))
        partial = torch.empty((len(chunk), n_slots), dtype=torch.float32, device=g.device)
        _sumsq_partial_kernel[(n_slots, len(chunk))](
            flat,
            w_at,
            plus_at,
            partial,
            *padded,
            g.stride(0),
            n_elements,
            n_slots,
            iters_per_slot,
            HAS_W=w is not None,
            HAS_PLUS=plus is not None,
            BLOCK_SIZE=BLOCK_SIZE,
        )
        _sum_slots_kernel[(len(chunk),)](
            partial,
            out[first:],
            n_slots,
            BLOCK_SIZE=triton.next_power_of_2(MAX_SLOTS),
        )
    return out
