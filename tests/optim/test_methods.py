"""Pin the specification itself: the reference backend against updates derived
by hand on a problem whose gradients have a closed form."""

import math

import pytest
import torch
from torch import nn

from sse_sam_fast import SAM, SSESAM, ImbSAM

X = torch.tensor([[1.0, 2.0], [-1.0, 0.5], [0.3, -2.0], [2.0, 1.0], [-0.5, -1.5]], dtype=torch.float64)
Y = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0], dtype=torch.float64)
TAIL = torch.tensor([False, True, False, True, False])
W0 = [0.4, -0.3]
LR = 0.1


class Linear2(nn.Module):
    """l_i(w) = (w·x_i − y_i)² / 2, so ∇l_i = (w·x_i − y_i)·x_i."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(W0, dtype=torch.float64))

    def forward(self, x):
        return x @ self.w


def losses(model):
    return 0.5 * (model(X) - Y) ** 2


def grad(w, rows, c=1.0):
    """c · Σ_{i∈rows} ∇l_i(w) / B, by hand."""
    g = [0.0, 0.0]
    for i in rows:
        r = w[0] * X[i, 0].item() + w[1] * X[i, 1].item() - Y[i].item()
        g[0] += c * r * X[i, 0].item() / len(Y)
        g[1] += c * r * X[i, 1].item() / len(Y)
    return g


def perturbed(w, g, rho):
    n = math.sqrt(g[0] ** 2 + g[1] ** 2) + 1e-16
    return [w[0] + rho * g[0] / n, w[1] + rho * g[1] / n]


HEAD = [i for i in range(5) if not TAIL[i]]
TAILS = [i for i in range(5) if TAIL[i]]
ALL = list(range(5))


def expected(method, rho_h=0.0, rho_t=0.0, rho=0.0):
    w = W0
    if method == "sam":
        g = grad(perturbed(w, grad(w, ALL), rho), ALL)
    elif method == "imbsam":
        g_t = grad(perturbed(w, grad(w, TAILS, 2.0), rho), TAILS, 2.0)
        g_h = grad(w, HEAD)
        g = [g_t[0] + g_h[0], g_t[1] + g_h[1]]
    else:
        g_h = grad(perturbed(w, grad(w, HEAD), rho_h), HEAD)
        g_t = grad(perturbed(w, grad(w, TAILS), rho_t), TAILS)
        g = [g_h[0] + g_t[0], g_h[1] + g_t[1]]
    return [w[0] - LR * g[0], w[1] - LR * g[1]]


def one_step(make, backend):
    model = Linear2()
    opt = make(torch.optim.SGD(model.parameters(), lr=LR), model, backend)
    opt.step(lambda: losses(model), TAIL)
    return model.w.detach().tolist(), opt


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_sam_by_hand(backend):
    got, _ = one_step(lambda b, m, be: SAM(b, m, 0.3, backend=be), backend)
    assert got == pytest.approx(expected("sam", rho=0.3), abs=1e-12)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_imbsam_by_hand(backend):
    got, _ = one_step(lambda b, m, be: ImbSAM(b, m, 0.25, backend=be), backend)
    assert got == pytest.approx(expected("imbsam", rho=0.25), abs=1e-12)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_ssesam_stage1_by_hand(backend):
    got, _ = one_step(lambda b, m, be: SSESAM(b, m, 0.2, 0.5, backend=be), backend)
    assert got == pytest.approx(expected("ssesam", rho_h=0.2, rho_t=0.5), abs=1e-12)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_ssesam_stage2_by_hand(backend):
    def make(b, m, be):
        opt = SSESAM(b, m, 0.2, 0.5, gamma=0.5, total_epochs=2, backend=be)
        opt.update_rho()  # epoch 1 of 2 done: 1 >= 0.5·2, stage 2
        return opt

    got, opt = one_step(make, backend)
    assert opt.stage == 2 and opt.rho_is == [0.0, 0.5]
    assert got == pytest.approx(expected("ssesam", rho_h=0.0, rho_t=0.5), abs=1e-12)


def test_hand_derivation_is_not_trivially_sgd():
    """The perturbations matter at these radii: the pinned updates differ from SGD's."""
    plain = expected("ssesam")
    for other in (expected("sam", rho=0.3), expected("imbsam", rho=0.25), expected("ssesam", 0.2, 0.5)):
        assert abs(other[0] - plain[0]) + abs(other[1] - plain[1]) > 1e-3


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_zero_gradient_group_is_no_nan(backend):
    """A group whose gradient is exactly zero is perturbed by 0, not by NaN (the 1e-16)."""
    model = Linear2()
    opt = SSESAM(torch.optim.SGD(model.parameters(), lr=LR), model, 0.2, 0.5, backend=backend)
    opt.step(lambda: losses(model) * 0.0, TAIL)
    assert model.w.detach().tolist() == W0
