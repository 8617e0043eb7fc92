"""Restore the weights and apply the SGD update in one pass.

The last phase of a SAM-family step restores ``w`` from its perturbed value and
hands the perturbed-point gradient to the base optimizer.  For a base
``torch.optim.SGD`` both fit in one read of each buffer.  Over elements
``[start, end)`` of a bucket, :func:`restore_sgd_` computes in fp32

    w     = w - s_b * g[row_b]                      restore, s_b = rho_b / (sqrt(sumsq_b) + 1e-16)
    d     = g[grad_row] + g[extra_row]              (ImbSAM: tail + clean head gradient)
    g[grad_row] <- d                                what p.grad shows afterwards
    d     = d + weight_decay * w                    if weight_decay != 0
    buf   = d                                       if momentum != 0, first step
    buf   = momentum * buf + (1 - dampening) * d    if momentum != 0, later steps
    d     = d + momentum * buf  (nesterov)  or  d = buf
    w     = w - lr * d

which is ``torch.optim.SGD`` (``maximize=False``, single-tensor and foreach paths)
applied to the restored weights, term for term and in the same order.  Values
that the unfused sequence "restore, then ``p.grad.add_(extra)``, then
``SGD.step``" keeps in tensors (the restored ``w``, the summed gradient, the
momentum buffer) are rounded to their storage dtype (round-to-nearest-even)
where it stores them, and are used rounded.  torch also rounds its temporaries
(``d + weight_decay * w``, ``momentum * buf``, the nesterov sum) to the parameter
dtype; here they stay fp32, so in bf16 or fp16 the results can differ from torch
by about one unit in the last place of the operands, and in fp32 by FMA
contraction on the GPU.

Each parameter group of a bucket is a contiguous range with its own
hyperparameters, so the optimizer runs one launch per group.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from .perturb import _check_bucket, _check_row, _check_shift, _describe

BLOCK_SIZE = 1024


@triton.jit
def _restore_sgd_kernel(
    w_ptr,
    grad_ptr,
    extra_ptr,
    sub_g_ptr,
    sub_sumsq_ptr,
    sub_rho,
    buf_ptr,
    lr,
    momentum,
    dampening,
    weight_decay,
    n_elements,
    HAS_SUB: tl.constexpr,
    HAS_EXTRA: tl.constexpr,
    HAS_WEIGHT_DECAY: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,
    FIRST_STEP: tl.constexpr,
    NESTEROV: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """Restore w along g_b, then one SGD step with d = grad + extra (see module doc).

    The flags choose code paths exactly where torch's SGD branches on the host
    (``weight_decay != 0``, ``momentum != 0``, buffer absent, ``nesterov``); the
    hyperparameter values themselves stay runtime arguments.
    """
    pid = tl.program_id(0).to(tl.int64)
    offsets = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    w = tl.load(w_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_SUB:
        sub_scale = sub_rho / (tl.sqrt(tl.load(sub_sumsq_ptr)) + 1e-16)
        g_b = tl.load(sub_g_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        # Rounded as a separate restore would store it: rounding w_pert - e to
        # the storage grid usually recovers the pre-perturbation w exactly,
        # whereas the unrounded value keeps the perturbation's rounding error.
        w = (w - sub_scale * g_b).to(w_ptr.dtype.element_ty).to(tl.float32)
    d = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_EXTRA:
        d = d + tl.load(extra_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        # Rounded before use so that g[grad_row] (what p.grad shows) is exactly
        # the gradient the update consumed, as with torch's grad.add_(extra).
        d = d.to(grad_ptr.dtype.element_ty)
        tl.store(grad_ptr + offsets, d, mask=mask)
        d = d.to(tl.float32)
    if HAS_WEIGHT_DECAY:
        d = d + weight_decay * w
    if HAS_MOMENTUM:
        if FIRST_STEP:
            buf = d
        else:
            buf = tl.load(buf_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            buf = momentum * buf + (1.0 - dampening) * d
        # The update reads the buffer as stored, like torch's, so the next step
        # continues from exactly the state this one used.
        buf = buf.to(buf_ptr.dtype.element_ty)
        tl.store(buf_ptr + offsets, buf, mask=mask)
        buf = buf.to(tl.float32)
        if NESTEROV:
            d = d + momentum * buf
        else:
            d = buf
    w = w - lr * d
    tl.store(w_ptr + offsets, w.to(w_ptr.dtype.element_ty), mask=mask)


def restore_sgd_(
    w: torch.Tensor,
    g: torch.Tensor,
    grad_row: int,
    sub,
    extra_rows: Sequence[int],
    momentum_buf: torch.Tensor | None,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    first_step: bool,
    start: int = 0,
    end: int | None = None,
) -> torch.Tensor:
    """In place over ``[start, end)``: restore ``w``, then one ``torch.optim.SGD`` step.

    Args:
        w: contiguous 1-D weight bucket of length N (fp32, bf16 or fp16).
        g: contiguous ``(k, N)`` gradient buffer of ``w``'s dtype and device.
        grad_row: row holding the gradient at the perturbed point; receives
            ``g[grad_row] + g[extra_rows[0]]`` when an extra row is given.
        sub: ``None`` or ``(row_b, sumsq_b, rho_b)`` as in :func:`kernels.perturb.shift_`:
            ``w <- w - rho_b / (sqrt(sumsq_b) + 1e-16) * g[row_b]`` before the update.
        extra_rows: zero or one further row added to the gradient.
        momentum_buf: contiguous 1-D tensor of length N, dtype ``w.dtype`` or fp32;
            required when ``momentum != 0``, ignored otherwise.
        lr, momentum, dampening, weight_decay, nesterov: as in ``torch.optim.SGD``.
        first_step: the buffer does not exist yet in torch's terms; it is set to
            the gradient instead of being decayed (``dampening`` is not applied).
        start, end: element range of one parameter group; ``end`` defaults to N.

    Returns ``w``.  Elements outside ``[start, end)`` are not touched.
    """
    _check_bucket(w, g)
    n_total = w.shape[0]
    grad_row = _check_row(grad_row, g, "grad_row")
    sub_args = _check_shift(sub, g, "sub")
    extra_rows = list(extra_rows)
    if len(extra_rows) > 1:
        raise ValueError(f"extra_rows: at most one extra row is supported, got {extra_rows}")
    extra_rows = [_check_row(r, g, "extra_rows") for r in extra_rows]
    end = n_total if end is None else end
    if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end <= n_total):
        raise ValueError(
            f"start, end must satisfy 0 <= start <= end <= {n_total}, got start={start!r}, end={end!r}"
        )
    has_momentum = momentum != 0
    if has_momentum:
        if not isinstance(momentum_buf, torch.Tensor) or momentum_buf.shape != w.shape:
            raise ValueError(
                f"momentum_buf must be a tensor of shape ({n_total},) when "
                f"momentum != 0, got {_describe(momentum_buf)}"
            )
        if momentum_buf.dtype not in (w.dtype, torch.float32):
            raise ValueError(f"momentum_buf must be {w.dtype} or float32, got {momentum_buf.dtype}")
        if momentum_buf.device != w.device:
            raise ValueError(f"momentum_buf must be on w's device {w.device}, got {momentum_buf.device}")
        if not momentum_buf.is_contiguous():
            raise ValueError("momentum_buf must be contiguous")
    n_elements = end - start
    if n_elements == 0:
        return w

    rows = slice(start, end)
    grad = g[grad_row, rows]
    extra = g[extra_rows[0], rows] if extra_rows else grad
    if sub_args is not None:
        sub_g, sub_sumsq, sub_rho = sub_args
        sub_g = sub_g[rows]
    else:
        # Stand-ins for the disabled branch, never read.
        sub_g, sub_sumsq, sub_rho = grad, grad, 0.0
    buf = momentum_buf[rows] if has_momentum else grad
    grid = (triton.cdiv(n_elements, BLOCK_SIZE),)
    _restore_sgd_kernel[grid](
        w[rows],
        grad,
        extra,
        sub_g,
        sub_sumsq,
        sub_rho,
        buf,
        float(lr),
        float(momentum),
        float(dampening),
        float(weight_decay),
        n_elements,
        HAS_SUB=sub_args is not None,
        HAS_EXTRA=bool(extra_rows),
        HAS_WEIGHT_DECAY=weight_decay != 0,
        HAS_MOMENTUM=has_momentum,
        FIRST_STEP=bool(first_step),
        NESTEROV=bool(nesterov),
        BLOCK_SIZE=BLOCK_SIZE,
    )
    return w
