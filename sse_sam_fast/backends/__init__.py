"""Backends: where the gradients of a grouped-perturbation step live and how the
step's buffer operations run. The interface is :class:`~.base.Backend`:

=============  =======================================================
``reference``  a per-parameter loop mirroring the published code: the spec
``torch``      flat buffers per (device, dtype), a few torch ops per phase
``triton``     the same buffers with the fused kernels of ``sse_sam_fast.kernels``
=============  =======================================================

``auto`` picks ``triton`` on CUDA when Triton is installed, else ``torch``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

import torch
from torch import Tensor

from .base import EPS, Adaptive, Backend, Ending, Perturbation, Radius, Slot
from .flat import usable

__all__ = [
    "BACKENDS",
    "EPS",
    "Adaptive",
    "Backend",
    "Ending",
    "Perturbation",
    "Radius",
    "Slot",
    "make_backend",
    "resolve_backend",
]

BACKENDS = ("auto", "triton", "torch", "reference")


def triton_available() -> bool:
    # find_spec, not import: importing triton fixes whether kernels are
    # interpreted, and TRITON_INTERPRET may still be set after this check
    return importlib.util.find_spec("triton") is not None


def resolve_backend(name: str, params: Sequence[Tensor]) -> str:
    """``auto``: ``triton`` when the parameters are CUDA tensors of a dtype the
    kernels compute and Triton imports, else ``torch`` (FSDP2's DTensor shards
    included: the flat backends mirror them); ``reference`` for parameters of
    another tensor subclass whose storage another system owns."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name == "auto" and not all(usable(p) for p in params):
        return "reference"
    if name == "auto":
        on_cuda = all(p.device.type == "cuda" for p in params)
        # the kernels compute float32, bfloat16 and float16 parameters only
        kernel_dtypes = all(p.dtype in (torch.float32, torch.bfloat16, torch.float16) for p in params)
        return "triton" if on_cuda and kernel_dtypes and triton_available() else "torch"
    if name == "triton" and not triton_available():
        raise ValueError("backend='triton' needs Triton: pip install 'sse_sam_fast[triton]' (or use 'torch')")
    return name


def make_backend(name: str, optimizer: torch.optim.Optimizer, params: Sequence[Tensor], sums=None) -> Backend:
    """``sums``: sums a tensor of local sums of squares over the processes that
    hold the other shards, in place (FSDP2; see ``Backend.sums``)."""
    name = resolve_backend(name, params)
    if name == "reference":
        from .reference import ReferenceBackend

        return ReferenceBackend(optimizer, params, sums)
    if name == "triton":
        from .triton import TritonBackend

        return TritonBackend(optimizer, params, sums)
    from .flat import TorchBackend

    return TorchBackend(optimizer, params, sums)
