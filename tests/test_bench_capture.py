"""bench's sgd-graph row when its capture fails: the eager SGD step, with a warning."""

import contextlib

import pytest
import torch
from torch import nn

import sse_sam_fast.bench as bench
import sse_sam_fast.optim.capture as capture


class _Stream:
    def wait_stream(self, other):
        pass


@contextlib.contextmanager
def _failing(graph):
    # fails before the body: on a CPU the body would run, where a recording runs nothing
    raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
    yield


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def test_a_failed_sgd_capture_times_the_eager_step(monkeypatch):
    monkeypatch.setattr(torch.cuda, "Stream", _Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: _Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", object)
    monkeypatch.setattr(capture, "recording", _failing)
    x, y = torch.randn(6, 5), torch.tensor([0, 1, 2, 0, 1, 2])
    hp = dict(lr=0.1, momentum=0.9, weight_decay=1e-3)
    graphed = _model()
    with pytest.warns(RuntimeWarning, match="sgd-graph: capture failed .*the row times the eager SGD step"):
        step = bench._graphed_sgd(graphed, torch.optim.SGD(graphed.parameters(), **hp), x, y)
    for _ in range(2):
        step()
    eager = _model()
    sgd = torch.optim.SGD(eager.parameters(), **hp)
    for _ in range(5):  # three warm-ups, then the two steps
        sgd.zero_grad()
        bench.per_sample_losses(eager, x, y).mean().backward()
        sgd.step()
    for a, b in zip(graphed.state_dict().values(), eager.state_dict().values()):
        assert torch.equal(a, b)
