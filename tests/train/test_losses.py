"""Per-sample long-tail losses: shapes, hand-computed values, DRW, devices."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sse_sam_fast.train.losses import (
    LOSSES,
    CrossEntropy,
    LDAMLoss,
    LogitAdjustedLoss,
    NormedLinear,
    VSLoss,
    build_loss,
    class_balanced_weights,
    ldam_margins,
    log_prior,
)

COUNTS = [100, 10, 1]


def _batch(b: int = 7, c: int = 3, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, c, generator=g, dtype=dtype).requires_grad_()
    target = torch.randint(0, c, (b,), generator=g)
    return logits, target


def _ce_by_hand(z: list[float], y: int) -> float:
    return -z[y] + math.log(sum(math.exp(v) for v in z))


@pytest.mark.parametrize("name", LOSSES)
def test_every_loss_is_per_sample_and_differentiable(name):
    loss_fn = build_loss(name, COUNTS, drw_epoch=0)
    loss_fn.set_epoch(0)
    logits, target = _batch()
    losses = loss_fn(logits, target)
    assert losses.shape == (7,) and losses.dtype == torch.float32
    assert torch.isfinite(losses).all() and (losses >= 0).all()
    losses.mean().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("name", LOSSES)
def test_every_loss_in_float64(name):
    logits, target = _batch(dtype=torch.float64)
    assert build_loss(name, COUNTS)(logits, target).dtype == torch.float64


def test_ce_is_cross_entropy():
    logits, target = _batch()
    assert torch.equal(CrossEntropy()(logits, target), F.cross_entropy(logits, target, reduction="none"))


def test_ldam_margins_by_hand():
    # n^(-1/4) = 0.3162, 0.5623, 1; scaled so the largest is 0.5
    expected = [0.5 * 100**-0.25, 0.5 * 10**-0.25, 0.5]
    assert torch.allclose(ldam_margins(COUNTS), torch.tensor(expected))
    assert torch.allclose(ldam_margins(COUNTS, max_margin=1.0), 2 * torch.tensor(expected))


def test_ldam_loss_by_hand():
    z, y = [0.2, -0.4, 0.1], 1
    margin = 0.5 * 10**-0.25
    shifted = [30 * 0.2, 30 * (-0.4 - margin), 30 * 0.1]
    loss = LDAMLoss(COUNTS)(torch.tensor([z]), torch.tensor([y]))
    assert math.isclose(float(loss), _ce_by_hand(shifted, y), rel_tol=1e-5)


def test_class_balanced_weights_by_hand():
    beta = 0.9
    raw = [(1 - beta) / (1 - beta**n) for n in COUNTS]
    expected = [3 * r / sum(raw) for r in raw]
    assert torch.allclose(class_balanced_weights(COUNTS, beta), torch.tensor(expected))
    w = class_balanced_weights(COUNTS)  # beta 0.9999: close to inverse frequency
    assert math.isclose(float(w.sum()), 3, rel_tol=1e-6)
    assert w[0] < w[1] < w[2]
    assert torch.allclose(class_balanced_weights(COUNTS, 0.0), torch.ones(3))


def test_ldam_drw_weights_switch_on_at_the_drw_epoch():
    logits, target = _batch(b=12)
    loss_fn = LDAMLoss(COUNTS, drw_epoch=3)
    plain = LDAMLoss(COUNTS)
    for epoch in range(3):
        loss_fn.set_epoch(epoch)
        assert torch.equal(loss_fn(logits, target), plain(logits, target))
    loss_fn.set_epoch(3)
    weights = class_balanced_weights(COUNTS)[target]
    assert torch.allclose(loss_fn(logits, target), plain(logits, target) * weights)
    plain.set_epoch(10_000)  # drw_epoch None: never re-weighted
    assert not plain.reweight


def test_logit_adjustment_by_hand():
    z, y = [0.2, -0.4, 0.1], 2
    prior = [n / 111 for n in COUNTS]
    adjusted = [v + 1.5 * math.log(p) for v, p in zip(z, prior)]
    loss = LogitAdjustedLoss(COUNTS, tau=1.5)(torch.tensor([z]), torch.tensor([y]))
    assert math.isclose(float(loss), _ce_by_hand(adjusted, y), rel_tol=1e-5)
    # a uniform prior shifts every logit equally: plain cross-entropy
    logits, target = _batch()
    uniform = LogitAdjustedLoss([5, 5, 5])(logits, target)
    assert torch.allclose(uniform, F.cross_entropy(logits, target, reduction="none"), atol=1e-6)


def test_vs_loss_by_hand():
    z, y = [0.2, -0.4, 0.1], 1
    gamma, tau = 0.3, 0.7
    delta = [(n / 100) ** gamma for n in COUNTS]
    prior = [n / 111 for n in COUNTS]
    adjusted = [d * v + tau * math.log(p) for v, d, p in zip(z, delta, prior)]
    loss = VSLoss(COUNTS, gamma=gamma, tau=tau)(torch.tensor([z]), torch.tensor([y]))
    assert math.isclose(float(loss), _ce_by_hand(adjusted, y), rel_tol=1e-5)


def test_vs_reduces_to_la_and_ce():
    logits, target = _batch()
    la = LogitAdjustedLoss(COUNTS, tau=0.5)(logits, target)
    assert torch.allclose(VSLoss(COUNTS, gamma=0.0, tau=0.5)(logits, target), la)
    ce = F.cross_entropy(logits, target, reduction="none")
    assert torch.allclose(VSLoss(COUNTS, gamma=0.0, tau=0.0)(logits, target), ce)


def test_log_prior():
    assert torch.allclose(log_prior([1, 3]).exp(), torch.tensor([0.25, 0.75]))


@pytest.mark.parametrize("counts", [[5, 0, 2], [], [[1, 2]], [1.5, 2.0]])
def test_bad_counts_are_rejected(counts):
    with pytest.raises(ValueError, match="class_counts"):
        build_loss("la", counts)


def test_bad_names_and_shapes():
    with pytest.raises(ValueError, match="loss must be one of"):
        build_loss("focal", COUNTS)
    logits, target = _batch()
    with pytest.raises(ValueError, match="built for 4"):
        build_loss("vs", [4, 3, 2, 1])(logits, target)
    with pytest.raises(ValueError, match="expected logits"):
        build_loss("ce", COUNTS)(logits[0], target)


def test_buffers_follow_the_module():
    loss_fn = build_loss("vs", COUNTS)
    names = {n for n, _ in loss_fn.named_buffers()}
    assert names == {"scales", "offsets"}
    assert {n for n, _ in build_loss("ldam", COUNTS).named_buffers()} == {"margins", "drw_weights"}
    moved = loss_fn.to(torch.float64)
    assert moved.scales.dtype == torch.float64


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", LOSSES)
def test_losses_on_cuda_match_cpu(name):
    logits, target = _batch(b=16)
    cpu = build_loss(name, COUNTS, drw_epoch=0)
    cpu.set_epoch(0)
    gpu = build_loss(name, COUNTS, drw_epoch=0).cuda()
    gpu.set_epoch(0)
    out = gpu(logits.detach().cuda(), target.cuda())
    assert out.device.type == "cuda"
    assert torch.allclose(out.cpu(), cpu(logits.detach(), target), atol=1e-5)


def test_normed_linear_gives_cosines():
    layer = NormedLinear(5, 3)
    x = torch.randn(4, 5)
    out = layer(x)
    w = layer.weight.detach()
    expected = torch.stack([F.cosine_similarity(x, w[:, c].expand(4, 5), dim=1) for c in range(3)], 1)
    assert torch.allclose(out, expected, atol=1e-6)
    assert out.abs().max() <= 1 + 1e-6
    assert "in_features=5, out_features=3" in repr(layer)
