"""Host work per step. On a GPU at CIFAR sizes a step waits on the host, so what
the library adds to a step must not grow with the number of parameters or
BatchNorm layers: whole-buffer operations, never one per tensor (a view per
tensor per step cost more host time than the copies it served)."""

import collections

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from sse_sam_fast import SSESAM


def _model(layers: int) -> nn.Module:
    parts = [m for _ in range(layers) for m in (nn.Linear(4, 4, bias=False), nn.BatchNorm1d(4), nn.ReLU())]
    return nn.Sequential(*parts, nn.Linear(4, 4))


class _EngineOps(TorchDispatchMode):
    """The operators the step dispatches outside the model's passes and the base
    optimizer's own step (views and other metadata operators included)."""

    def __init__(self):
        super().__init__()
        self.inside = 0  # > 0: in a forward, a backward or the base step
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.inside:
            self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))

    def around(self, fn):
        def wrapped(*args, **kwargs):
            self.inside += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self.inside -= 1

        return wrapped


def _engine_ops(layers, backend, base, stage, monkeypatch) -> collections.Counter:
    torch.manual_seed(0)
    model = _model(layers)
    if base == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    sse = SSESAM(opt, model, 0.05, 0.1, backend=backend)
    sse._force_sync_free = True  # the path a CUDA step takes
    if stage == 2:
        sse.rho_is[0] = 0.0
    count = _EngineOps()
    monkeypatch.setattr(torch.autograd, "backward", count.around(torch.autograd.backward))
    monkeypatch.setattr(opt, "step", count.around(opt.step))
    x, y = torch.randn(8, 4), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    closure = count.around(lambda: F.cross_entropy(model(x), y, reduction="none"))
    for _ in range(3):  # the first steps create state and layouts
        sse.step(closure, y >= 3)
    with count:
        sse.step(closure, y >= 3)
    return count.ops


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("base", ["sgd", "adam"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_the_engine_dispatches_as_much_for_many_tensors_as_for_few(backend, base, stage, monkeypatch):
    if backend == "triton":
        pytest.importorskip("triton")
    few = _engine_ops(2, backend, base, stage, monkeypatch)
    many = _engine_ops(6, backend, base, stage, monkeypatch)  # 3x the parameters and BatchNorm layers
    assert sum(few.values()) > 0
    grew = {op: (few[op], many[op]) for op in set(few) | set(many) if few[op] != many[op]}
    assert not grew, f"operators per step that grow with the tensors (few, many): {grew}"
