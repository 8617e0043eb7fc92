"""Triton kernels for flat SAM-family buckets (see docs/ARCHITECTURE.md, "Kernels").

The folder sits at the top of the repository and installs as
``sse_sam_fast.kernels`` (a top-level ``kernels`` would clash with an unrelated
package of that name).

A bucket is one 1-D weight tensor ``w`` of length N and one ``(k, N)`` gradient
tensor ``g`` whose rows are the gradient sets (head, tail, accumulator).
Norms stay on the device; every kernel computes in fp32 and rounds on store.
The unperturbed weights are kept in a snapshot ``w0`` of ``w``'s shape and dtype,
so restoring is an exact copy rather than a subtraction.

- :func:`grouped_sumsq`: ``||g[r]||^2`` for several rows in one launch, deterministic;
  ``w=`` gives ASAM's ``||w g[r]||^2``, ``plus=p`` the norm of ``g[r] + g[p]``
  (rounded as torch stores the sum), ``start=``/``end=`` one element range.
- :func:`perturb_`: ``w <- w0 + s g[r]``, ``s = rho / (||g[r]|| + 1e-16)``; with
  ``save`` it first takes the snapshot ``w0 <- w`` in the same pass;
  ``adaptive=True`` moves by ASAM's ``s w0^2 g[r]``; ``start=``/``end=`` one range.
- :func:`restore_sgd_`: restore ``w <- w0`` plus a ``torch.optim.SGD`` step in one
  pass; ``clip=`` (a device scalar) scales the gradient first, as gradient clipping.

Each call is one pass over its buffers and the options add no launch.  Per
element they add only what they name: the adaptive norm reads ``w`` and ``plus``
reads ``g[p]`` once more; the adaptive move and ``clip`` read no further buffer.
"""

from .norms import grouped_sumsq
from .perturb import perturb_
from .update import restore_sgd_

__all__ = ["grouped_sumsq", "perturb_", "restore_sgd_"]
