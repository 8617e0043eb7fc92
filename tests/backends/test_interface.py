"""The declared backend interface: every backend implements it, and the flat
backends size their own gradient rows."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sse_sam_fast import SAM, SSESAM, ImbSAM
from sse_sam_fast.backends import Backend
from sse_sam_fast.backends.base import Slot


def _step(opt, m, n=8):
    x, y = torch.randn(n, 6), torch.arange(n) % 3
    opt.step(lambda: F.cross_entropy(m(x), y, reduction="none"), y == 2)


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_every_backend_is_a_backend(backend):
    m = nn.Linear(6, 3)
    opt = SAM(torch.optim.SGD(m.parameters(), lr=0.1), m, backend=backend)
    assert isinstance(opt._backend, Backend) and opt._backend.name == backend


@pytest.mark.parametrize(
    "cls, args, rows",
    [(SAM, (0.05,), 2), (ImbSAM, (0.05,), 3), (SSESAM, (0.05, 0.1), 3)],
)
def test_flat_backend_grows_rows_to_what_the_method_keeps(cls, args, rows):
    m = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = cls(torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), m, *args, backend="torch")
    for _ in range(3):
        _step(opt, m)
    assert opt._backend.rows == rows
    assert all(b.g.shape[0] == rows for b in opt._backend.buckets)
    # p.grad is still a view of the live row after the buffer grew
    live = opt._backend.live
    assert all(p.grad.data_ptr() == v.data_ptr() for p, v in zip(m.parameters(), opt._backend._views[live]))


def test_growing_keeps_the_rows_contents():
    m = nn.Linear(4, 2)
    opt = SAM(torch.optim.SGD(m.parameters(), lr=0.1), m, backend="torch")
    be = opt._backend
    m(torch.randn(3, 4)).sum().backward()
    be.adopt()
    grads = [p.grad.clone() for p in m.parameters()]
    be.take(Slot(0))
    m(torch.randn(3, 4)).square().sum().backward()
    be.take(Slot(1))  # a third row: live + two slots
    assert be.rows == 3
    row = be.slots[Slot(0)][0]
    assert all(torch.equal(v, g) for v, g in zip(be._views[row], grads))
