"""The flat-buffer layout of the torch backend: views, rebinding, buckets."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sse_sam_fast import SAM, SSESAM


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def sgd(model, **kw):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, **kw)


def test_weights_are_views_and_gradients_are_autograds():
    """Weights live in the flat buffer; p.grad is autograd's, None meaning no
    gradient, and zero_grad keeps torch's two meanings."""
    m = mlp()
    opt = SSESAM(sgd(m), m, 0.05, 0.1, backend="torch")
    bucket = opt._backend.buckets[0]
    for p in m.parameters():
        base = bucket.w.data_ptr()
        assert base <= p.data_ptr() < base + bucket.w.numel() * 4
        assert (p.data_ptr() - base) % 128 == 0  # segments aligned within the buffer
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    F.cross_entropy(m(x), y).backward()
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in m.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in m.parameters())
    opt.step(lambda: F.cross_entropy(m(x), y, reduction="none"), y == 2)
    assert all(p.grad is None for p in m.parameters())  # as after optimizer.zero_grad()
    assert not bucket.w[m[0].weight.numel() : 64].any()  # padding stays zero
    assert not any(hasattr(p, "_post_accumulate_grad_hooks") and p._post_accumulate_grad_hooks
                   for p in m.parameters())  # fmt: skip


def test_rebound_parameters_are_reflattened():
    m = mlp()
    opt = SAM(sgd(m), m, backend="torch")
    m.double()  # re-binds every p.data behind the optimizer's back
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.randint(0, 3, (5,))
    before = [p.detach().clone() for p in m.parameters()]
    opt.step(lambda: F.cross_entropy(m(x), y, reduction="none"))
    assert opt._backend.buckets[0].w.dtype == torch.float64
    assert all(not torch.equal(a, b) for a, b in zip(m.parameters(), before))


def test_rebinding_in_the_middle_of_official_methods_is_an_error():
    m = mlp()
    opt = SAM(sgd(m), m, backend="torch")
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    F.cross_entropy(m(x), y).backward()
    opt.first_step()
    m[0].weight.data = m[0].weight.data.clone()
    F.cross_entropy(m(x), y).backward()
    with pytest.raises(RuntimeError, match="re-bound"):
        opt.second_step()


def test_grads_set_to_none_by_the_base_are_adopted():
    """Scripts that call base.zero_grad() (set_to_none) still work with flat buffers."""
    results = []
    for backend in ("reference", "torch"):
        m = mlp()
        opt = SAM(sgd(m), m, 0.1, backend=backend)
        x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
        for _ in range(3):
            opt.optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(m(x), y).backward()
            opt.first_step()
            opt.optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(m(x), y).backward()
            opt.second_step()
        results.append([p.detach().clone() for p in m.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)


def test_mixed_dtypes_make_several_buckets_with_one_global_norm():
    results = []
    for backend in ("reference", "torch"):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3).double())
        opt = SAM(sgd(m), m, 0.2, backend=backend)
        x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
        for _ in range(3):
            opt.step(lambda: F.cross_entropy(m[2](m[1](m[0](x)).double()), y, reduction="none"))
        results.append([p.detach().clone() for p in m.parameters()])
        if backend == "torch":
            assert len(opt._backend.buckets) == 2
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)


class _Shard(torch.Tensor):
    """A tensor subclass whose storage another system owns, and not a DTensor (which the flat
    backends mirror: tests/optim/test_fsdp.py)."""


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_parameters_another_system_owns_are_refused_and_auto_picks_reference(backend):
    pytest.importorskip("triton") if backend == "triton" else None
    m = mlp()
    m[2].weight = nn.Parameter(m[2].weight.detach().clone().as_subclass(_Shard))
    before = [p.detach().clone() for p in m.parameters()]
    with pytest.raises(ValueError, match="another system owns.*_Shard.*reference"):
        SAM(sgd(m), m, backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))  # nothing was re-bound
    assert type(m[2].weight.data) is _Shard
    assert SAM(sgd(m), m, backend="auto").backend == "reference"


class _SometimesUsed(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body, self.extra = nn.Linear(6, 3), nn.Linear(6, 3)

    def forward(self, x, use_extra):
        return self.body(x) + self.extra(x) if use_extra else self.body(x)


@pytest.mark.parametrize("method", ["sam", "ssesam"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_parameter_used_every_other_step_follows_the_reference(backend, method):
    """No gradient in a step (``p.grad is None``) leaves no trace in a gradient row
    that a later step reuses: rows are not zeroed between steps, so a row is made
    a valid set where its first gradient of a step lands."""
    pytest.importorskip("triton") if backend == "triton" else None
    results = []
    for name in ("reference", backend):
        m = _SometimesUsed()
        base = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
        opt = SAM(base, m, 0.1, backend=name) if method == "sam" else SSESAM(base, m, 0.05, 0.1, backend=name)
        g = torch.Generator().manual_seed(3)
        for step in range(4):
            x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
            opt.step(lambda: F.cross_entropy(m(x, step % 2 == 0), y, reduction="none"), y == 2)
        results.append([p.detach().clone() for p in m.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, atol=2e-6, rtol=1e-5)
