"""Restore the weights and apply the SGD update in one pass.

The last phase of a SAM-family step restores ``w`` to its unperturbed value and
hands the perturbed-point gradient to the base optimizer.  For a base
``torch.optim.SGD`` both fit in one read of each buffer.  The restore is exact:
the weights are read from the snapshot ``w0`` that :func:`.perturb.perturb_`
saved, instead of from the perturbed ``w``.  Over elements ``[start, end)`` of a
bucket, :func:`restore_sgd_` computes in fp32

    w     = w0                                      restore (w as is when w0 is None)
    d     = g[grad_row] + g[extra_row]              (ImbSAM: tail + clean head gradient)
    d     = clip * d                                if clip (gradient clipping; rounded)
    d     = d + weight_decay * w                    if weight_decay != 0
    buf   = d                                       if momentum != 0, first step
    buf   = momentum * buf + (1 - dampening) * d    if momentum != 0, later steps
    d     = d + momentum * buf  (nesterov)  or  d = buf
    w     = w - lr * d

which is ``torch.optim.SGD`` (``maximize=False``, single-tensor and foreach paths)
applied to the restored weights, term for term and in the same order.  ``clip``
is a one-element fp32 device tensor holding a clipping coefficient the caller
computed (already clamped, like ``clip_coef_clamped`` in
``torch.nn.utils.clip_grad_norm_``, e.g. from ``grouped_sumsq(g, [grad_row],
plus=extra_row)``); it is read from memory, so a replayed CUDA graph uses the
value of the step.  Values that the unfused sequence "``w.copy_(w0)``, then
``p.grad.add_(extra)``, then ``p.grad.mul_(clip)`` (the fp32 factor: ``clip``
has one dimension; a 0-dim CUDA factor would be rounded to the gradient's dtype
first), then ``SGD.step``" keeps in
tensors (the summed and the clipped gradient, the momentum buffer) are
rounded to their storage dtype (round-to-nearest-even) where it stores them, and
are used rounded.  torch also rounds its temporaries (``d + weight_decay * w``,
``momentum * buf``, the nesterov sum) to the parameter dtype; here they stay
fp32, so in bf16 or fp16 the results can differ from torch by about one unit in
the last place of the operands, and in fp32 by FMA contraction on the GPU.

The summed gradient is not written back to ``g``: the optimizer zeroes the
gradient rows right after the step, so the store would be wasted traffic.  Per
element the kernel reads ``w0`` (or ``w``), ``g[grad_row]``, the extra row if
any and the momentum buffer after the first step, and writes the buffer (if
momentum) and ``w``; ``clip``, ``ok`` and ``hyper`` are scalars, not per-element
traffic.

Each parameter group of a bucket is a contiguous range with its own
hyperparameters, so the optimizer runs one launch per group.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ._checks import _check_restore_sgd

BLOCK_SIZE = 1024


@triton.jit
def _restore_sgd_kernel(
    w_ptr,
    w0_ptr,
    grad_ptr,
    extra_ptr,
    buf_ptr,
    ok_ptr,
    hyper_ptr,
    clip_ptr,
    lr,
    momentum,
    dampening,
    weight_decay,
    n_elements,
    HAS_W0: tl.constexpr,
    HAS_EXTRA: tl.constexpr,
    HAS_WEIGHT_DECAY: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,
    FIRST_STEP: tl.constexpr,
    NESTEROV: tl.constexpr,
    HAS_OK: tl.constexpr,
    HYPER_ON_DEVICE: tl.constexpr,
    HAS_CLIP: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """Restore w from w0, then one SGD step with d = grad + extra (see module doc).

    The flags choose code paths exactly where torch's SGD branches on the host
    (``weight_decay != 0``, ``momentum != 0``, buffer absent, ``nesterov``); the
    hyperparameter values themselves stay runtime arguments.
    """
    pid = tl.program_id(0).to(tl.int64)
    offsets = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    if HAS_OK:
        ok = tl.load(ok_ptr) != 0
    if HYPER_ON_DEVICE:
        # a replayed CUDA graph keeps its arguments: values an LR scheduler
        # changes between replays are read from memory instead
        lr = tl.load(hyper_ptr)
        momentum = tl.load(hyper_ptr + 1)
        dampening = tl.load(hyper_ptr + 2)
        weight_decay = tl.load(hyper_ptr + 3)
    # The perturbed w is never read when the snapshot is given: the update
    # starts from the pre-perturbation weights bit for bit.
    if HAS_W0:
        w_base = tl.load(w0_ptr + offsets, mask=mask, other=0.0)
    else:
        w_base = tl.load(w_ptr + offsets, mask=mask, other=0.0)
    w = w_base.to(tl.float32)
    d = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_EXTRA:
        d = d + tl.load(extra_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        # Rounded before use, as torch's grad.add_(extra) stores it, so the
        # update consumes the same gradient as the unfused sequence.
        d = d.to(grad_ptr.dtype.element_ty).to(tl.float32)
    if HAS_CLIP:
        # rounded as torch's p.grad.mul_(clip_coef) stores the clipped gradient
        d = (d * tl.load(clip_ptr)).to(grad_ptr.dtype.element_ty).to(tl.float32)
    if HAS_WEIGHT_DECAY:
        d = d + weight_decay * w
    if HAS_MOMENTUM:
        if FIRST_STEP:
            buf = d
        else:
            buf_old = tl.load(buf_ptr + offsets, mask=mask, other=0.0)
            buf = momentum * buf_old.to(tl.float32) + (1.0 - dampening) * d
        # The update reads the buffer as stored, like torch's, so the next step
        # continues from exactly the state this one used.
        buf = buf.to(buf_ptr.dtype.element_ty)
        if HAS_OK:
            # a failed step does not write the buffer: its bits stay as they
            # were, on a first step too (whatever memory the caller handed in)
            tl.store(buf_ptr + offsets, buf, mask=tl.where(ok, mask, False))
        else:
            tl.store(buf_ptr + offsets, buf, mask=mask)
        buf = buf.to(tl.float32)
        if NESTEROV:
            d = d + momentum * buf
        else:
            d = buf
    w = (w - lr * d).to(w_ptr.dtype.element_ty)
    if HAS_OK:
        # the device's verdict on the step: where it failed, the weights are the
        # restored ones, as stored (no round trip through fp32)
        w = tl.where(ok, w, w_base)
    tl.store(w_ptr + offsets, w, mask=mask)


def restore_sgd_(
    w: torch.Tensor,
    g: torch.Tensor,
    grad_row: int,
    w0: torch.Tensor | None,
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
    ok: torch.Tensor | None = None,
    hyper: torch.Tensor | None = None,
    check: bool = True,
    *,
    clip: torch.Tensor | None = None,
) -> torch.Tensor:
    """In place over ``[start, end)``: restore ``w``, then one ``torch.optim.SGD`` step.

    Arguments:

    - ``w``: contiguous 1-D weight bucket of length N (fp32, bf16 or fp16).
    - ``g``: contiguous ``(k, N)`` gradient buffer of ``w``'s dtype and device.
    - ``grad_row``: row holding the gradient at the perturbed point.
    - ``w0``: the snapshot saved by :func:`.perturb.perturb_` (contiguous, ``w``'s
      shape, dtype and device, no memory shared with ``w`` or ``g``): the
      update starts from ``w0`` and the perturbed ``w`` is not read.
      ``None`` when ``w`` is already restored.
    - ``extra_rows``: zero or one further row added to the gradient.  The sum is
      not stored: ``g`` is left unchanged.
    - ``momentum_buf``: contiguous 1-D tensor of length N, dtype ``w.dtype`` or fp32;
      required when ``momentum != 0``, ignored otherwise.
    - ``lr``, ``momentum``, ``dampening``, ``weight_decay``, ``nesterov``: as in ``torch.optim.SGD``.
    - ``first_step``: the buffer does not exist yet in torch's terms; it is set to
      the gradient instead of being decayed (``dampening`` is not applied).
    - ``start``, ``end``: element range of one parameter group; ``end`` defaults to N.
    - ``ok``: a one-element bool tensor on ``w``'s device, or None. Where it holds
      False the step does not take effect: ``w`` gets the restored weights
      and the momentum buffer is not written (its bits stay as they were,
      on a first step too: the caller decides whether the buffer exists).
    - ``hyper``: a float32 tensor ``[lr, momentum, dampening, weight_decay]`` on
      ``w``'s device, or None. The kernel reads those values from it (for a
      CUDA graph whose learning rate changes between replays); the float
      arguments still choose the code path (``momentum != 0``, ...).
    - ``check``: validate the arguments (``False``: the caller validated this
      buffer layout once already; a launch then costs no Python checks).
    - ``clip``: None, or a one-element float32 tensor on ``w``'s device holding an
      already clamped gradient-clipping coefficient: the gradient (after
      the extra row) is multiplied by it and rounded to ``g``'s dtype,
      before weight decay.

    Returns ``w``.  Elements outside ``[start, end)`` are not touched.
    """
    n_total = w.shape[0]
    end = n_total if end is None else end
    extra_rows = list(extra_rows)
    has_momentum = momentum != 0
    if check:
        _check_restore_sgd(
            w, g, grad_row, w0, extra_rows, momentum_buf, has_momentum,
            start, end, ok, hyper, clip,
        )  # fmt: skip
    n_elements = end - start
    if n_elements == 0:
        return w

    rows = slice(start, end)
    grad = g[grad_row, rows]
    extra = g[extra_rows[0], rows] if extra_rows else grad
    # Stand-ins for disabled branches are valid pointers that are never read.
    snapshot = w0[rows] if w0 is not None else grad
    buf = momentum_buf[rows] if has_momentum else grad
    grid = (triton.cdiv(n_elements, BLOCK_SIZE),)
    _restore_sgd_kernel[grid](
        w[rows],
        snapshot,
        grad,
        extra,
        buf,
        *(t if t is not None else grad for t in (ok, hyper, clip)),
        *(float(x) for x in (lr, momentum, dampening, weight_decay)),
        n_elements,
        HAS_W0=w0 is not None,
        HAS_EXTRA=bool(extra_rows),
        HAS_WEIGHT_DECAY=weight_decay != 0,
        HAS_MOMENTUM=has_momentum,
        FIRST_STEP=bool(first_step),
        NESTEROV=bool(nesterov),
        HAS_OK=ok is not None,
        HYPER_ON_DEVICE=hyper is not None,
        HAS_CLIP=clip is not None,
        BLOCK_SIZE=BLOCK_SIZE,
    )
    return w
