"""Grouped squared L2 norms of gradient rows.

For a gradient buffer ``g`` of shape ``(k, N)`` and a list of row indices
``rows``, :func:`grouped_sumsq` returns

    out[j] = sum_i g[rows[j], i] ** 2        (accumulated in fp32)

for every listed row in one launch, so the head and tail norms that SAM, ImbSAM
and SSE-SAM need (``||g|| = sqrt(out[j])``) cost a single read of the rows.
The result stays on the device: the scale ``rho / (sqrt(out[j]) + 1e-16)`` is
computed by the kernels that consume it (``.perturb``, ``.update``).

Determinism: the reduction never uses atomics.  Program ``(slot, j)`` sums the
blocks ``slot, slot + n_slots, slot + 2 n_slots, ...`` of row ``rows[j]`` in that
order into a fixed partial-sum slot; a second tiny kernel adds the slots of each
row in a fixed order.  ``n_slots`` depends only on ``N``, so two runs on the same
input are bit-identical.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ._checks import SUPPORTED_DTYPES, _check_row, _describe

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
    partial_ptr,
    row0,
    row1,
    row2,
    row3,
    row_stride,
    n_elements,
    n_slots,
    iters_per_slot,
    BLOCK_SIZE: tl.constexpr,
):
    """partial[j, slot] = sum over blocks b = slot + t * n_slots (t < iters_per_slot)
    of sum_i g[row_j, b * BLOCK_SIZE + i] ** 2, accumulated lane-wise in fp32."""
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
        x = tl.load(row_start + offsets, mask=mask, other=0.0).to(tl.float32)
        acc += x * x
    tl.store(partial_ptr + j.to(tl.int64) * n_slots + slot, tl.sum(acc, axis=0))


@triton.jit
def _sum_slots_kernel(partial_ptr, out_ptr, n_slots, BLOCK_SIZE: tl.constexpr):
    """out[j] = sum_slot partial[j, slot], one program per row, fixed tree order."""
    j = tl.program_id(0).to(tl.int64)
    offsets = tl.arange(0, BLOCK_SIZE)
    partial = tl.load(partial_ptr + j * n_slots + offsets, mask=offsets < n_slots, other=0.0)
    tl.store(out_ptr + j, tl.sum(partial, axis=0))


def grouped_sumsq(g: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
    """Squared L2 norm of each listed row of ``g``: ``out[j] = ||g[rows[j]]||^2``.

    Args:
        g: contiguous ``(k, N)`` gradient buffer, fp32, bf16 or fp16.
        rows: row indices in ``[0, k)``; repeats are allowed.

    Returns:
        fp32 tensor of shape ``(len(rows),)`` on ``g``'s device.  Zeros when ``N == 0``.
        Up to ``MAX_ROWS_PER_LAUNCH`` rows cost one partial-sum launch.
    """
    if not isinstance(g, torch.Tensor) or g.dim() != 2:
        raise ValueError(f"g must be a 2-D tensor of shape (k, N), got {_describe(g)}")
    if g.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"g must be float32, bfloat16 or float16, got {g.dtype}")
    if not g.is_contiguous():
        raise ValueError("g must be contiguous (row stride N)")
    rows = [_check_row(r, g.shape[0], "rows") for r in rows]
    out = torch.zeros(len(rows), dtype=torch.float32, device=g.device)
    n_elements = g.shape[1]
    if n_elements == 0 or not rows:
        return out

    n_blocks = triton.cdiv(n_elements, BLOCK_SIZE)
    n_slots = min(n_blocks, MAX_SLOTS)
    iters_per_slot = triton.cdiv(n_blocks, n_slots)
    for first in range(0, len(rows), MAX_ROWS_PER_LAUNCH):
        chunk = rows[first : first + MAX_ROWS_PER_LAUNCH]
        padded = chunk + [chunk[-1]] * (MAX_ROWS_PER_LAUNCH - len(chunk))
        partial = torch.empty((len(chunk), n_slots), dtype=torch.float32, device=g.device)
        _sumsq_partial_kernel[(n_slots, len(chunk))](
            g,
            partial,
            *padded,
            g.stride(0),
            n_elements,
            n_slots,
            iters_per_slot,
            BLOCK_SIZE=BLOCK_SIZE,
        )
        _sum_slots_kernel[(len(chunk),)](
            partial,
            out[first:],
            n_slots,
            BLOCK_SIZE=triton.next_power_of_2(MAX_SLOTS),
        )
    return out
