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
    bit-identical (a NaN batch would otherwise poison every later evaluation).

    The saved copy is one flat buffer per (device, dtype), so saving, restoring
    and the device-side select cost a few launches per step, not one per
    buffer of every layer (three per layer: about a hundred on a ResNet-32)."""

    def __init__(self, batchnorms: Sequence[nn.Module]):
        # every tracking layer, in training mode or not: a closure may switch it
        buffers = [
            buf
            for m in batchnorms
            if m.track_running_stats
            for buf in (m.running_mean, m.running_var, m.num_batches_tracked)
            if buf is not None
        ]
        self.groups: dict[tuple, list[Tensor]] = {}
        for buf in buffers:
            self.groups.setdefault((buf.device, buf.dtype), []).append(buf)
        with torch.no_grad():
            # torch.cat copies every buffer in one launch; the flat copy is new memory
            self.saved = {k: torch.cat([b.reshape(-1) for b in bufs]) for k, bufs in self.groups.items()}

    def _parts(self, flat: Tensor, bufs: list[Tensor]) -> list[Tensor]:
        return [part.view_as(b) for part, b in zip(flat.split([b.numel() for b in bufs]), bufs)]

    @torch.no_grad()
    def restore(self) -> None:
        for key, bufs in self.groups.items():
            torch._foreach_copy_(bufs, self._parts(self.saved[key], bufs))

    @torch.no_grad()
    def keep_if(self, ok: Tensor) -> None:
        """On the device: keep the new statistics where ``ok``, else the saved ones
        (a select, so a NaN in the new ones cannot leak into the kept ones)."""
        for key, bufs in self.groups.items():
            new = torch.cat([b.reshape(-1) for b in bufs])
            torch.where(ok.to(new.device), new, self.saved[key], out=new)
            torch._foreach_copy_(bufs, self._parts(new, bufs))
