"""Running statistics of the normalisation layers around a step.

The layers are every ``torch.nn.modules.batchnorm._NormBase``
(``_torch_private.NORM_LAYERS``): BatchNorm (and SyncBatchNorm) and InstanceNorm
with ``track_running_stats=True``. A skipped or
refused step puts their statistics back bit for bit; ``bn_stats="clean"`` keeps
the forwards at perturbed weights from updating them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

from torch import Tensor, nn

from .. import _torch_private


def find_layers(model: nn.Module, kind: type | tuple[type, ...]) -> list[nn.Module]:
    """The modules of ``model`` (itself included) that are instances of ``kind``,
    each once; looked up at every step, so that a layer swapped in since the
    last one is found."""
    return _torch_private.find_modules(model, kind)


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
    # InstanceNorm hands its statistics to F.instance_norm whatever the flag says:
    # they are hidden from it instead
    hidden = [_torch_private.buffers_of(m) for m in layers if isinstance(m, _torch_private.INSTANCE_NORMS)]
    kept = [(bufs["running_mean"], bufs["running_var"]) for bufs in hidden]
    # object.__setattr__: a plain flag needs none of Module.__setattr__'s checks for
    # parameters, buffers and submodules, which cost host time at every perturbed pass
    for m in layers:
        object.__setattr__(m, "track_running_stats", False)
    for bufs in hidden:
        bufs["running_mean"] = bufs["running_var"] = None
    try:
        yield
    finally:
        for m in layers:
            object.__setattr__(m, "track_running_stats", True)
        for bufs, (mean, var) in zip(hidden, kept):
            bufs["running_mean"], bufs["running_var"] = mean, var


def running_stats(batchnorms: Sequence[nn.Module]) -> list[Tensor]:
    """The running statistics of every tracking BatchNorm layer, in training mode
    or not (a closure may switch it): what a skipped step must leave bit-identical
    (a NaN batch would otherwise poison every later evaluation). The step keeps
    them in one :class:`~sse_sam_fast._saved.Saved` of the optimizer's: a few
    launches per step, not three per layer."""
    return [
        buf
        for m in batchnorms
        if m.track_running_stats
        for buf in (m.running_mean, m.running_var, m.num_batches_tracked)
        if buf is not None
    ]
