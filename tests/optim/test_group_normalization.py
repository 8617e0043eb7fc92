"""ImbSAM's ``normalization="group"``: each group's loss averaged over its own
samples, as the ImbSAM baseline of the SSE-SAM repository does, against a
hand-written loop of that update."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sse_sam_fast import ImbSAM
from sse_sam_fast.verify import assert_close

RHO, TAIL_WEIGHT, LR, MOMENTUM, WD = 0.06, 1.5, 0.1, 0.9, 1e-3


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 6))


def _batches(steps=5, size=20):
    """Random masks, then a batch without tail samples, then one without head samples."""
    g = torch.Generator().manual_seed(7)
    for step in range(steps):
        x, y = torch.randn(size, 16, generator=g), torch.randint(0, 6, (size,), generator=g)
        tail = y >= 4
        if step == 2:
            tail = torch.zeros_like(tail)
        elif step == 3:
            tail = torch.ones_like(tail)
        yield x, y, tail


def _losses(model, x, y):
    return F.cross_entropy(model(x), y, reduction="none")


def _group_mean(losses, members):
    # an empty group contributes nothing (the published code divides by zero here)
    return losses[members].sum() / max(int(members.sum()), 1)


def oracle(steps=5):
    """The group-mean ImbSAM update written out: ``L_H = mean_H l``,
    ``L_T = tail_weight·mean_T l``, ``e = rho·g_T/(||g_T||+1e-16)``, base step with
    ``∇L_H(w) + ∇L_T(w+e)``."""
    model = _model()
    params = list(model.parameters())
    base = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WD)
    for x, y, tail in _batches(steps):
        losses = _losses(model, x, y)
        g_head = torch.autograd.grad(_group_mean(losses, ~tail), params, retain_graph=True)
        g_tail = torch.autograd.grad(TAIL_WEIGHT * _group_mean(losses, tail), params, allow_unused=True)
        g_tail = [torch.zeros_like(p) if g is None else g for p, g in zip(params, g_tail)]
        norm = torch.stack([g.norm() for g in g_tail]).norm()
        moves = [RHO * g / (norm + 1e-16) for g in g_tail]
        with torch.no_grad():
            for p, e in zip(params, moves):
                p.add_(e)
        perturbed = torch.autograd.grad(TAIL_WEIGHT * _group_mean(_losses(model, x, y), tail), params)
        with torch.no_grad():
            for p, e, gh, gt in zip(params, moves, g_head, perturbed):
                p.sub_(e)
                p.grad = gh + gt
        base.step()
        base.zero_grad()
    return [p.detach().clone() for p in params]


def train(backend, schedule="exact", micro=1, sync_free=None, steps=5):
    model = _model()
    base = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
    opt = ImbSAM(base, model, RHO, tail_weight=TAIL_WEIGHT, normalization="group", backend=backend)
    opt._force_sync_free = sync_free
    for x, y, tail in _batches(steps):
        xs, ys, masks = x.chunk(micro), y.chunk(micro), list(tail.chunk(micro))

        def closure(i):
            def run(idx=None):
                xi, yi = (xs[i], ys[i]) if idx is None else (xs[i][idx], ys[i][idx])
                return _losses(model, xi, yi)

            return run

        closures = [closure(i) for i in range(micro)]
        opt.step(closures if micro > 1 else closures[0], masks if micro > 1 else masks[0], schedule=schedule)
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
@pytest.mark.parametrize("schedule", ["exact", "split"])
def test_group_mean_update_matches_the_oracle(backend, schedule):
    assert_close(train(backend, schedule), oracle(), torch.float32, f"{backend}/{schedule}")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_group_mean_without_host_verdict(backend):
    """The device-verdict path keeps empty groups in the plan: their count is
    clamped to 1 on the device and they weigh nothing."""
    assert_close(train(backend, sync_free=True), oracle(), torch.float32, backend)


@pytest.mark.parametrize("schedule", ["exact", "split"])
def test_micro_batches_count_over_the_whole_step(schedule):
    """Three micro-batches: the group means are over their union, so the update
    is that of one batch."""
    assert_close(train("torch", schedule, micro=3), oracle(), torch.float32, schedule)


def test_the_oracle_tells_the_normalisations_apart():
    model = _model()
    base = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
    opt = ImbSAM(base, model, RHO, tail_weight=TAIL_WEIGHT, backend="torch")
    for x, y, tail in _batches():
        opt.step(lambda: _losses(model, x, y), tail)
    with pytest.raises(AssertionError):
        assert_close([p.detach() for p in model.parameters()], oracle(), torch.float32, "batch")


def test_batch_normalization_is_the_default():
    model = _model()
    opt = ImbSAM(torch.optim.SGD(model.parameters(), lr=LR), model)
    assert (opt.normalization, opt.tail_weight) == ("batch", 2.0)
    assert [g.per_group for g in opt._groups()] == [False, False]
    group = ImbSAM(torch.optim.SGD(model.parameters(), lr=LR), model, normalization="group")
    # the SSE-SAM repository's baseline has no tail weight
    assert (group.normalization, group.tail_weight) == ("group", 1.0)
    explicit = ImbSAM(torch.optim.SGD(model.parameters(), lr=LR), model, tail_weight=3, normalization="group")
    assert explicit.tail_weight == 3.0


def test_option_is_checked_saved_and_shown():
    model = _model()

    def make(**kw):
        return ImbSAM(torch.optim.SGD(model.parameters(), lr=LR), model, **kw)

    with pytest.raises(ValueError, match="normalization"):
        make(normalization="mean")
    opt = make(normalization="group")
    assert "normalization='group'" in repr(opt)
    sd = opt.state_dict()
    assert sd["stage"]["normalization"] == "group"
    fresh = make()
    fresh.load_state_dict(sd)
    assert fresh.normalization == "group" and fresh.tail_weight == 1.0
    # a state saved before the option existed loads with the default
    del sd["stage"]["normalization"]
    fresh.load_state_dict(sd)
    assert fresh.normalization == "batch"
    sd["stage"]["normalization"] = "sum"
    with pytest.raises(ValueError, match="normalization"):
        fresh.load_state_dict(sd)
    assert fresh.normalization == "batch"
