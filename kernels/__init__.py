"""Triton kernels for flat SAM-family buckets (see DESIGN.md section 4).

A bucket is one 1-D weight tensor ``w`` of length N and one ``(k, N)`` gradient
tensor ``g`` whose rows are the gradient sets (head, tail, accumulator).
Norms stay on the device; every kernel computes in fp32 and rounds on store.

- :func:`grouped_sumsq`: ``||g[r]||^2`` for several rows in one launch, deterministic.
- :func:`shift_`: ``w += s_a g[a] - s_b g[b]``, ``s = rho / (||g|| + 1e-16)``.
- :func:`restore_sgd_`: restore plus a ``torch.optim.SGD`` step in one pass.
"""

from .norms import grouped_sumsq
from .perturb import shift_
from .update import restore_sgd_

__all__ = ["grouped_sumsq", "restore_sgd_", "shift_"]
