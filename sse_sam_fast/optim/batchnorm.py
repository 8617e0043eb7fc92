"""BatchNorm running statistics around a step."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

from torch import nn

from .._saved import Saved


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


class RunningStats(Saved):
    """The running statistics of the tracking BatchNorm layers as they were
    before a step's first forward, so that a skipped step leaves them
    bit-identical (a NaN batch would otherwise poison every later evaluation).
    One flat copy per dtype (:class:`Saved`): a few launches per step, not three
    per layer."""

    def __init__(self, batchnorms: Sequence[nn.Module]):
        # every tracking layer, in training mode or not: a closure may switch it
        super().__init__(
            [
                buf
                for m in batchnorms
                if m.track_running_stats
                for buf in (m.running_mean, m.running_var, m.num_batches_tracked)
                if buf is not None
            ]
        )
