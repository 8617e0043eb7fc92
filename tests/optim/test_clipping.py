"""``max_grad_norm``: the base step's gradient clipped by its global norm, as
``torch.nn.utils.clip_grad_norm_`` clips it (verify's cases check every method
and backend against the reference; these tests check the reference itself and
the paths verify does not take)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sse_sam_fast import SAM, SSESAM
from sse_sam_fast.verify import Case, assert_close, per_sample_losses

BACKENDS = ["reference", "torch", "triton"]


def _setup(backend, cls=SAM, max_grad_norm=None, **kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    args = (0.05,) if cls is SAM else (0.05, 0.1)
    return model, cls(base, model, *args, backend=backend, max_grad_norm=max_grad_norm, **kw)


def _batches(n=4):
    g = torch.Generator().manual_seed(3)
    for _ in range(n):
        x, y = torch.randn(20, 8, generator=g), torch.randint(0, 3, (20,), generator=g)
        yield x, y, y == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_official_sam_clips_like_clip_grad_norm_before_second_step(backend):
    # for SAM the gradient in p.grad before second_step() is the final one: torch's
    # own clip_grad_norm_ there is the oracle
    model, opt = _setup(backend, max_grad_norm=0.05)
    model_ref, opt_ref = _setup("reference")
    for x, y, _ in _batches():
        for m, o in ((model, opt), (model_ref, opt_ref)):
            per_sample_losses(m, x, y).mean().backward()
            o.first_step()
            per_sample_losses(m, x, y).mean().backward()
            if o is opt_ref:
                norm = torch.nn.utils.clip_grad_norm_(m.parameters(), 0.05)
                assert norm > 0.05  # the case clips
            o.second_step()
    assert_close(list(model.parameters()), list(model_ref.parameters()), what="clipped SAM")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_norm_above_the_gradients_changes_nothing(backend):
    runs = []
    for max_norm in (None, 1e6):
        model, opt = _setup(backend, SSESAM, max_norm)
        for x, y, tail in _batches():
            opt.step(lambda: per_sample_losses(model, x, y), tail)
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))  # the factor is exactly 1


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_the_sync_free_step_clips_as_the_host_one(backend):
    runs = []
    for sync_free in (False, True):
        model, opt = _setup(backend, SSESAM, 0.05)
        opt._force_sync_free = sync_free
        for x, y, tail in _batches():
            opt.step(lambda: per_sample_losses(model, x, y), tail)
        runs.append(list(model.parameters()))
    assert_close(runs[1], runs[0], what="sync-free clipped step")


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_under_amp_the_unscaled_gradient_is_clipped(backend):
    # a power-of-two scale changes no rounding: clipping the scaled gradient would
    # leave it (the norm is 2**12 times larger), clipping the unscaled one matches
    runs = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0**12)):
        model, opt = _setup(backend, SSESAM, 0.05)
        for x, y, tail in _batches():
            opt.step(lambda: per_sample_losses(model, x, y), tail, scaler=scaler)
            if scaler is not None:
                scaler.update()
        runs.append(list(model.parameters()))
    assert_close(runs[1], runs[0], what="clipping under a GradScaler")


def test_verify_has_clipping_and_asam_cases_on_every_method():
    from sse_sam_fast.verify import default_cases

    names = [c.name for c in default_cases()]
    for method in ("sam", "imbsam", "ssesam"):
        assert any(n.startswith(method) and "clip" in n for n in names)
        assert any(n.startswith(method) and "asam" in n for n in names)
    assert Case(hparams={"max_grad_norm": 0.1}).name.endswith("clip0.1")


@pytest.mark.parametrize(
    "value,error",
    [(-1.0, ValueError), (0.0, ValueError), (float("nan"), ValueError), (float("inf"), ValueError),
     ("1.0", TypeError), (True, TypeError)],
)  # fmt: skip
def test_bad_max_grad_norm_is_named(value, error):
    with pytest.raises(error, match="max_grad_norm"):
        _setup("torch", max_grad_norm=value)


def test_adaptive_must_be_a_bool():
    with pytest.raises(TypeError, match="adaptive"):
        _setup("torch", SSESAM, adaptive=1)


def test_repr_shows_the_options_that_are_on():
    _, opt = _setup("torch", SSESAM, 0.5, adaptive=True)
    assert "adaptive=True" in repr(opt) and "max_grad_norm=0.5" in repr(opt)
    assert "adaptive" not in repr(_setup("torch")[1])

