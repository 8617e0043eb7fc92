"""Pass counts of the one-call step: forwards and backwards per method and stage."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sse_sam_fast import SAM, SSESAM, ImbSAM


class Counting(nn.Module):
    """Counts forward passes, and backward passes through its output."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        self.forwards = self.backwards = 0

    def forward(self, x):
        self.forwards += 1
        out = self.net(x)
        out.register_hook(self._count_backward)
        return out

    def _count_backward(self, grad):
        self.backwards += 1


def make(method, model, stage=1, **kw):
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    if method == "sam":
        return SAM(base, model, 0.05, **kw)
    if method == "imbsam":
        return ImbSAM(base, model, 0.05, **kw)
    opt = SSESAM(base, model, 0.05, 0.1, gamma=0.5, total_epochs=2, **kw)
    if stage == 2:
        opt.update_rho()
    return opt


def count(method, stage, tail, backend="torch"):
    torch.manual_seed(0)
    model = Counting()
    opt = make(method, model, stage, backend=backend)
    x, y = torch.randn(len(tail), 8), torch.randint(0, 4, (len(tail),))
    opt.step(lambda: F.cross_entropy(model(x), y, reduction="none"), torch.tensor(tail))
    return model.forwards, model.backwards


MIXED = [True, False, False, True, False]


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize(
    "method,stage,passes",
    [("sam", 1, (2, 2)), ("imbsam", 1, (2, 3)), ("ssesam", 1, (3, 4)), ("ssesam", 2, (2, 3))],
)
def test_exact_schedule_pass_counts(method, stage, passes, backend):
    assert count(method, stage, MIXED, backend) == passes


@pytest.mark.parametrize(
    "method,stage,tail,passes",
    [
        ("ssesam", 1, [True] * 5, (2, 2)),  # no head: the head group gets no pass at all
        ("ssesam", 1, [False] * 5, (2, 2)),
        ("ssesam", 2, [False] * 5, (1, 1)),  # head only, rho_H = 0: plain SGD cost
        ("imbsam", 1, [False] * 5, (1, 1)),
        ("imbsam", 1, [True] * 5, (2, 2)),
        ("sam", 1, [False] * 5, (2, 2)),  # SAM ignores the mask
    ],
)
def test_empty_groups_cost_nothing(method, stage, tail, passes):
    assert count(method, stage, tail) == passes


def test_rho_zero_sam_is_one_pass():
    torch.manual_seed(0)
    model = Counting()
    opt = SAM(torch.optim.SGD(model.parameters(), lr=0.1), model, 0.0)
    x, y = torch.randn(5, 8), torch.randint(0, 4, (5,))
    opt.step(lambda: F.cross_entropy(model(x), y, reduction="none"))
    assert (model.forwards, model.backwards) == (1, 1)
