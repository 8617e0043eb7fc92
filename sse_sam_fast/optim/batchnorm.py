"""BatchNorm running statistics around a step."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import Tensor, nn


def _tracking(batchnorms: Sequence[nn.Module]) -> list[nn.Module]:
    return [m for m in batchnorms if m.training and m.track_running_stats]


@contextlib.contextmanager
def frozen(batchnorms: Sequence[nn.Module], policy: str):
    """With ``bn_stats="clean"``, forwards at perturbed weights leave the running
    statistics alone. In training mode a BatchNorm layer normalises with the
    batch statistics either way; with ``track_running_stats`` off it just does
    not update them: no copy, no launch, and bit-identical (a NaN batch cannot
    reach the running statistics)."""
    layers = _tracking(batchnorms) if policy == "clean" else []
    for m in layers:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in layers:
            m.track_running_stats = True


class RunningStats:
    """The running statistics of the tracking BatchNorm layers as they were
    before a step's first forward, so that a skipped step leaves them
    bit-identical (a NaN batch would otherwise poison every later evaluation)."""

    def __init__(self, batchnorms: Sequence[nn.Module]):
        # every tracking layer, in training mode or not: a closure may switch it
        self.buffers: list[Tensor] = [
            buf
            for m in batchnorms
            if m.track_running_stats
            for buf in (m.running_mean, m.running_var, m.num_batches_tracked)
            if buf is not None
        ]
        self.saved = [torch.empty_like(b) for b in self.buffers]
        if self.buffers:  # one multi-tensor launch, not one copy per buffer
            torch._foreach_copy_(self.saved, self.buffers)

    @torch.no_grad()
    def restore(self) -> None:
        if self.buffers:
            torch._foreach_copy_(self.buffers, self.saved)

    @torch.no_grad()
    def keep_if(self, ok: Tensor) -> None:
        """On the device: keep the new statistics where ``ok``, else the saved ones."""
        for buf, old in zip(self.buffers, self.saved):
            torch.where(ok.to(buf.device), buf, old, out=buf)
