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
    # the views of every row were made again for the grown buffer
    assert all(len(views) == len(list(m.parameters())) for views in opt._backend._views)
    assert all(v.data_ptr() == opt._backend.buckets[0].g[r].data_ptr() for r, (v, *_) in
               enumerate(opt._backend._views))  # fmt: skip


def test_growing_keeps_the_rows_contents():
    m = nn.Linear(4, 2)
    opt = SAM(torch.optim.SGD(m.parameters(), lr=0.1), m, backend="torch")
    be = opt._backend
    m(torch.randn(3, 4)).sum().backward()
    grads = [p.grad.clone() for p in m.parameters()]
    be.adopt()
    be.take(Slot(0))
    m(torch.randn(3, 4)).square().sum().backward()
    be.take(Slot(1))  # a third row: live + two slots
    assert be.rows == 3
    row = be.slots[Slot(0)][0]
    assert all(torch.equal(v, g) for v, g in zip(be._views[row], grads))


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_a_lasting_slot_outlives_steps_and_new_layouts(backend):
    """A method's state across steps (a reused perturbation): a lasting slot
    survives finish, a re-bound parameter's new layout and export/load."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    m[0].bias.requires_grad_(False)  # no gradient: exported as None
    opt = SSESAM(torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), m, 0.05, 0.1, backend=backend)
    be, keep = opt._backend, Slot(20)
    be.lasting.add(keep)
    m(torch.randn(4, 6)).square().sum().backward()
    kept = [None if p.grad is None else p.grad.clone() for p in m.parameters()]
    be.adopt()
    be.take(keep)
    be.abort()
    for _ in range(2):
        _step(opt, m)
    m[2].weight.data = m[2].weight.data.clone()  # a new layout at the next step
    _step(opt, m)
    assert be.holds(keep) and not be.holding
    got = be.export(keep)
    assert [g is None for g in got] == [k is None for k in kept] == [False, True, False, False]
    assert all(torch.equal(g, k) for g, k in zip(got, kept) if k is not None)
    be.load(keep, [None if k is None else 2 * k for k in kept])
    assert all(torch.equal(g, 2 * k) for g, k in zip(be.export(keep), kept) if k is not None)
