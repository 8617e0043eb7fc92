"""The library used as an adversarial user would (issue 11): bad input to every
entry point, non-finite values in every pass of every method, resume at every
stage, mixed precision with and without a GradScaler, DDP with shards that
lack a group. Every case runs on every backend.

Wherever a call is refused or a step skipped, ``tests.support.snapshot`` and
``assert_bitwise`` check that the weights, the optimizer state (base state,
stage, hyperparameters) and the BatchNorm running statistics are bitwise what
they were.
"""

from __future__ import annotations

import copy
import os
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sse_sam_fast import SAM, SSESAM, ImbSAM
from sse_sam_fast.verify import assert_close
from tests.support import PoisonGrad, assert_bitwise, snapshot, spawn_bounded

BACKENDS = ["reference", "torch", "triton"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    if request.param == "triton":
        pytest.importorskip("triton")
    return request.param


# ---- the model, the data, the optimizers ------------------------------------------------
G = torch.Generator().manual_seed(11)
X, Y = torch.randn(10, 6, generator=G), torch.randint(0, 3, (10,), generator=G)
TAIL = torch.tensor([True, False] * 5)


def bn_mlp(dtype=torch.float32):
    """BatchNorm in training mode: every refused or skipped step must also leave
    its running statistics alone."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)


def make(method, model, backend, **kw):
    base = sgd(model)
    if method == "sam":
        return SAM(base, model, 0.07, backend=backend, **kw)
    if method == "imbsam":
        return ImbSAM(base, model, 0.06, backend=backend, **kw)
    return SSESAM(base, model, 0.05, 0.11, gamma=0.5, total_epochs=4, backend=backend, **kw)


def clean(model, x=X, y=Y):
    def closure(idx=None):
        xs, ys = (x, y) if idx is None else (x[idx], y[idx])
        return F.cross_entropy(model(xs), ys, reduction="none")

    return closure


def trained(method, backend, **kw):
    """A model and optimizer after one step: momentum buffers and BatchNorm statistics exist."""
    model = bn_mlp()
    opt = make(method, model, backend, **kw)
    opt.step(clean(model), TAIL)
    return model, opt


def assert_trains_on(model, opt):
    """The optimizer is usable: a step moves the weights and keeps them finite."""
    before = [p.detach().clone() for p in model.parameters()]
    opt.step(clean(model), TAIL)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


# ---- bad arguments to the constructors ------------------------------------------------------
CONSTRUCTORS = {
    "sam-rho-nan": (lambda m, be: SAM(sgd(m), m, float("nan"), backend=be), ValueError, "rho"),
    "sam-rho-bool": (lambda m, be: SAM(sgd(m), m, True, backend=be), TypeError, "rho"),
    "sam-rho-1d-tensor": (lambda m, be: SAM(sgd(m), m, torch.tensor([0.05]), backend=be), TypeError, "rho"),
    "imbsam-tail-weight-inf": (
        lambda m, be: ImbSAM(sgd(m), m, tail_weight=float("inf"), backend=be),
        ValueError,
        "tail_weight",
    ),
    "ssesam-head-rho-negative": (
        lambda m, be: SSESAM(sgd(m), m, -0.05, 0.1, backend=be),
        ValueError,
        "head_rho",
    ),
    "ssesam-tail-rho-string": (
        lambda m, be: SSESAM(sgd(m), m, 0.05, "0.1", backend=be),
        TypeError,
        "tail_rho",
    ),
    "ssesam-gamma-nan": (
        lambda m, be: SSESAM(sgd(m), m, 0.05, 0.1, gamma=float("nan"), backend=be),
        ValueError,
        "gamma",
    ),
    "ssesam-total-epochs-fractional": (
        lambda m, be: SSESAM(sgd(m), m, 0.05, 0.1, total_epochs=2.5, backend=be),
        ValueError,
        "total_epochs",
    ),
    "bn-stats": (lambda m, be: SAM(sgd(m), m, bn_stats="none", backend=be), ValueError, "bn_stats"),
    "nonfinite": (lambda m, be: SAM(sgd(m), m, nonfinite="ignore", backend=be), ValueError, "nonfinite"),
    "local-perturbation": (
        lambda m, be: SAM(sgd(m), m, local_perturbation=1, backend=be),
        TypeError,
        "local_perturbation",
    ),
    "optimizer-missing-params": (
        lambda m, be: SAM(torch.optim.SGD(m[0].parameters(), lr=0.1), m, backend=be),
        ValueError,
        "optimizer does not hold",
    ),
    "model-not-a-module": (lambda m, be: SAM(sgd(m), "model", backend=be), TypeError, "model"),
    "wrapped-twice": (
        lambda m, be: SAM(SAM(sgd(m), m, backend="reference"), m, backend=be),
        TypeError,
        "base",
    ),
}


@pytest.mark.parametrize("build,error,words", CONSTRUCTORS.values(), ids=CONSTRUCTORS.keys())
def test_constructor_refuses_naming_the_argument_and_touches_nothing(backend, build, error, words):
    model = bn_mlp()
    before, ptrs = snapshot(model), [p.data_ptr() for p in model.parameters()]
    with pytest.raises(error, match=words):
        build(model, backend)
    assert_bitwise(snapshot(model), before)
    assert [p.data_ptr() for p in model.parameters()] == ptrs  # not moved into a flat buffer


def test_constructor_takes_numpy_scalars_tensors_and_integral_floats(backend):
    model = bn_mlp()
    opt = SSESAM(
        sgd(model), model, np.float32(0.05), torch.tensor(0.11), gamma=np.float64(0.5), total_epochs=4.0,
        backend=backend,
    )  # fmt: skip
    assert opt.total_epochs == 4 and opt.gamma == 0.5
    assert_trains_on(model, opt)


def test_float64_parameters(backend):
    model = bn_mlp(torch.float64)
    if backend == "triton":  # the kernels compute on fp32, bf16 and fp16 only
        ptrs = [p.data_ptr() for p in model.parameters()]
        with pytest.raises(ValueError, match=r"float64.*backend='torch'"):
            make("ssesam", model, backend)
        assert [p.data_ptr() for p in model.parameters()] == ptrs
    else:
        opt = make("ssesam", model, backend)
        opt.step(clean(model, X.double()), TAIL)
        assert all(torch.isfinite(p).all() for p in model.parameters())


# ---- bad input to step() -------------------------------------------------------------------
def _labels_out_of_range(model):
    # the forward runs (and updates BatchNorm's statistics) before the loss fails
    return lambda: F.cross_entropy(model(X), torch.full_like(Y, 7), reduction="none")


def _third_call(model, action):
    calls = []

    def closure():
        calls.append(1)
        losses = F.cross_entropy(model(X), Y, reduction="none")
        return action(losses) if len(calls) == 3 else losses

    return closure


def _raise(exc):
    raise exc


STEP_INPUTS = {
    "scalar-loss": (lambda m: lambda: clean(m)().mean(), {}, ValueError, "shape"),
    "logits-not-losses": (lambda m: lambda: m(X), {}, ValueError, "shape"),
    "not-a-tensor": (lambda m: lambda: 3.0, {}, TypeError, "tensor"),
    "detached-losses": (lambda m: lambda: clean(m)().detach(), {}, ValueError, "require grad"),
    "not-callable": (lambda m: "closure", {}, TypeError, "closure"),
    "empty-closure-list": (lambda m: [], {}, ValueError, "empty list"),
    "closure-list-mask-mismatch": (
        lambda m: [clean(m), clean(m)],
        {"tail_mask": [TAIL]},
        ValueError,
        "one mask",
    ),
    "mask-short": (clean, {"tail_mask": TAIL[:8]}, ValueError, "tail_mask must have shape"),
    "mask-long": (clean, {"tail_mask": torch.cat([TAIL, TAIL])}, ValueError, "tail_mask must have shape"),
    "mask-2d": (clean, {"tail_mask": TAIL[None]}, ValueError, "tail_mask must have shape"),
    "mask-float": (clean, {"tail_mask": TAIL.float()}, TypeError, "tail_mask must be a bool"),
    "mask-missing": (clean, {"tail_mask": None}, TypeError, "tail_mask"),
    "mask-on-meta": (clean, {"tail_mask": TAIL.to("meta")}, ValueError, "tail_mask is on meta"),
    "split-mask-on-meta": (
        clean,
        {"tail_mask": TAIL.to("meta"), "schedule": "split"},
        ValueError,
        "tail_mask is on meta, the parameters on cpu",
    ),
    "schedule-name": (clean, {"schedule": "fast"}, ValueError, "schedule"),
    "split-without-index": (
        lambda m: lambda: clean(m)(),
        {"schedule": "split"},
        TypeError,
        "closure\\(idx\\)",
    ),
    "scaler-not-a-scaler": (clean, {"scaler": object()}, TypeError, "scaler"),
    "labels-out-of-range": (_labels_out_of_range, {}, (IndexError, RuntimeError), None),
    "perturbed-pass-wrong-count": (
        lambda m: _third_call(m, lambda losses: losses[:4]),
        {},
        ValueError,
        "expected 10",
    ),
    "perturbed-pass-raises": (
        lambda m: _third_call(m, lambda losses: _raise(KeyError("data loader died"))),
        {},
        KeyError,
        "data loader",
    ),
}


@pytest.mark.parametrize("closure,kwargs,error,words", STEP_INPUTS.values(), ids=STEP_INPUTS.keys())
def test_step_refuses_bad_input_and_changes_nothing(backend, closure, kwargs, error, words):
    model, opt = trained("ssesam", backend)
    before = snapshot(model, opt)
    kwargs = {"tail_mask": TAIL, **kwargs}
    with pytest.raises(error, match=words):
        opt.step(closure(model), **kwargs)
    assert_bitwise(snapshot(model, opt), before)
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    assert_trains_on(model, opt)


@pytest.mark.parametrize("schedule", ["split", "auto"])
@pytest.mark.parametrize("mask", [TAIL[:8], torch.cat([TAIL, TAIL[:2]])], ids=["short", "long"])
def test_split_and_auto_check_the_mask_before_any_pass(backend, schedule, mask):
    model, opt = trained("ssesam", backend)
    model.eval()  # no BatchNorm in training mode: "auto" picks split
    before, forwards = snapshot(model, opt), []
    hook = model.register_forward_pre_hook(lambda *_: forwards.append(1))
    with pytest.raises(ValueError, match="tail_mask must have shape"):
        opt.step(clean(model), mask, schedule=schedule)
    hook.remove()
    assert forwards == []  # refused before any pass ran
    assert_bitwise(snapshot(model, opt), before)


# ---- the official methods -----------------------------------------------------------------
def _backward(model, members=None, x=X):
    losses = F.cross_entropy(model(x), Y, reduction="none")
    (losses.mean() if members is None else losses[members].sum() / len(Y)).backward()


OFFICIAL = {
    "sam-second-first": ("sam", lambda m, o: o.second_step(), RuntimeError, "second_step"),
    "imbsam-third-first": ("imbsam", lambda m, o: o.third_step(), RuntimeError, "third_step"),
    "imbsam-second-first": ("imbsam", lambda m, o: o.second_step(), RuntimeError, "second_step"),
    "ssesam-n-i": ("ssesam", lambda m, o: o.compute_and_add_epsilon(2), ValueError, "n_i"),
    "ssesam-restore-first": (
        "ssesam",
        lambda m, o: o.compute_grad_sum_and_restore_p(),
        RuntimeError,
        "compute_grad_sum_and_restore_p",
    ),
    "ssesam-update-first": ("ssesam", lambda m, o: o.update(), RuntimeError, "update"),
}


@pytest.mark.parametrize("method,calls,error,words", OFFICIAL.values(), ids=OFFICIAL.keys())
def test_official_methods_out_of_order(backend, method, calls, error, words):
    model, opt = trained(method, backend)
    before = snapshot(model, opt)
    with pytest.raises(error, match=words):
        calls(model, opt)
    assert_bitwise(snapshot(model, opt), before)
    assert_trains_on(model, opt)


def test_sam_first_step_twice_keeps_the_first_perturbation(backend):
    model, opt = trained("sam", backend)
    _backward(model)
    opt.first_step()
    _backward(model)  # in training mode: BatchNorm's statistics move here, not in first_step
    perturbed = snapshot(model, opt)
    with pytest.raises(RuntimeError, match="first_step"):
        opt.first_step()
    assert_bitwise(snapshot(model, opt), perturbed)
    opt.zero_grad()
    _backward(model)
    opt.second_step()  # the sequence is still usable
    assert_trains_on(model, opt)


def test_step_inside_an_open_official_sequence_is_refused(backend):
    model, opt = trained("sam", backend)
    _backward(model)
    opt.first_step()
    perturbed = snapshot(model, opt)
    with pytest.raises(RuntimeError, match="first_step"):
        opt.step(clean(model), TAIL)
    assert_bitwise(snapshot(model, opt), perturbed)
    _backward(model)
    opt.second_step()
    assert_trains_on(model, opt)


def test_step_after_a_pending_gradient_sum_raises_on_every_backend(backend):
    """compute_grad_sum_and_restore_p() without update(): step() must not discard the sum."""
    model, opt = trained("ssesam", backend)
    _backward(model, ~TAIL)
    opt.compute_and_add_epsilon(0)
    _backward(model, ~TAIL)
    opt.compute_grad_sum_and_restore_p()
    pending = snapshot(model, opt)
    with pytest.raises(RuntimeError):
        opt.step(clean(model), TAIL)
    assert_bitwise(snapshot(model, opt), pending)
    opt.update()  # the pending sum is still there
    assert not all(torch.equal(a, b) for a, b in zip(pending["weights"], model.parameters()))
    assert_trains_on(model, opt)


def _first_step_then(rebind, backend):
    model, opt = trained("sam", backend)
    model.eval()  # the test's own forwards leave BatchNorm's statistics alone
    before = snapshot(model, opt)
    _backward(model)
    opt.first_step()
    if rebind:
        with torch.no_grad():
            for p in model.parameters():
                p.data = p.data.clone()  # re-bound behind the optimizer's back
    _backward(model)
    return model, opt, before


def test_rebinding_between_first_and_second_step_leaves_a_usable_optimizer(backend):
    model, opt, before = _first_step_then(True, backend)
    if backend == "reference":  # per parameter: the restore writes into whatever p holds now
        opt.second_step()
        twin, twin_opt, _ = _first_step_then(False, backend)
        twin_opt.second_step()
        assert_bitwise(snapshot(model, opt), snapshot(twin, twin_opt))
    else:  # the flat buffers no longer hold the weights: refused, the weights come back
        with pytest.raises(RuntimeError, match="re-bound"):
            opt.second_step()
        assert_bitwise(snapshot(model, opt), before)
    assert_trains_on(model, opt)
    _backward(model)
    opt.first_step()  # the official methods work again too
    _backward(model)
    opt.second_step()


# ---- load_state_dict ----------------------------------------------------------------------
def _other(method, backend):
    """A valid state of the same method: other momentum, lr, stage and skip count."""
    model, opt = trained(method, backend)
    opt.step(clean(model), TAIL)
    opt.param_groups[0]["lr"] = 0.05
    if method == "ssesam":
        for _ in range(3):
            opt.update_rho()
    opt.nonfinite_steps = 4
    return copy.deepcopy(opt.state_dict())


def _edit(sd, path, value):
    node = sd
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return sd


LOADS = {
    "base-own-state-dict": (
        "ssesam",
        lambda sd, o: copy.deepcopy(o.optimizer.state_dict()),
        ValueError,
        "stage",
    ),
    "not-a-dict": ("ssesam", lambda sd, o: [sd], TypeError, "state_dict"),
    "nonfinite-steps-negative": (
        "ssesam",
        lambda sd, o: _edit(sd, ["nonfinite_steps"], -1),
        ValueError,
        "nonfinite",
    ),
    "epoch-count-string": (
        "ssesam",
        lambda sd, o: _edit(sd, ["stage", "epoch_count"], "3"),
        TypeError,
        "epoch_count",
    ),
    "group-sizes": (
        "ssesam",
        lambda sd, o: _edit(sd, ["param_groups", 0, "params"], [0, 1]),
        ValueError,
        "sizes",
    ),
    "imbsam-tail-weight": (
        "imbsam",
        lambda sd, o: _edit(sd, ["stage", "tail_weight"], -1),
        ValueError,
        "tail_weight",
    ),
    "another-methods-stage": (
        "sam",
        lambda sd, o: _edit(sd, ["stage", "tail_weight"], 2.0),
        ValueError,
        "stage",
    ),
}


@pytest.mark.parametrize("method,damage,error,words", LOADS.values(), ids=LOADS.keys())
def test_load_state_dict_is_all_or_nothing(backend, method, damage, error, words):
    model, opt = trained(method, backend)
    before, skipped = snapshot(model, opt), opt.nonfinite_steps
    with pytest.raises(error, match=words):
        opt.load_state_dict(damage(_other(method, backend), opt))
    assert_bitwise(snapshot(model, opt), before)
    assert opt.nonfinite_steps == skipped
    assert_trains_on(model, opt)


# ---- non-finite values in every pass of every method -------------------------------------------
def poisoned(model, which, kind, bad=None, value=float("nan")):
    """A closure whose ``which``-th call (1-based) has a non-finite ``value``: in the
    input batch (``input``), the losses (``loss``: multiplied; ``shift``: added, so
    that only the losses are non-finite, not the gradients) or the gradient of the
    ``bad`` samples (``grad``, through tests.support.PoisonGrad)."""
    calls = []

    def closure():
        calls.append(1)
        hit = len(calls) == which
        x = X.clone()
        if hit and kind == "input":
            x[3] = value
        out = model(x)
        if hit and kind == "grad":
            out = PoisonGrad.apply(out, bad)
        losses = F.cross_entropy(out, Y, reduction="none")
        if hit and kind == "shift":
            return losses + torch.where(torch.arange(len(losses)) == 3, value, 0.0)
        return losses * value if hit and kind == "loss" else losses

    return closure


INF = float("inf")
# (method, call, kind, samples): SAM's calls are clean then perturbed; ImbSAM's clean
# then perturbed tail; SSE-SAM's (stage 1) clean, perturbed head, perturbed tail
PASSES = {
    "sam-clean-input": ("sam", 1, "input", None, float("nan")),
    "sam-clean-forward": ("sam", 1, "loss", None, float("nan")),
    "sam-clean-backward": ("sam", 1, "grad", torch.ones(10, dtype=torch.bool), float("nan")),
    "sam-perturbed-forward-inf": ("sam", 2, "loss", None, INF),
    "sam-perturbed-backward": ("sam", 2, "grad", torch.ones(10, dtype=torch.bool), float("nan")),
    "imbsam-clean-input-inf": ("imbsam", 1, "input", None, INF),
    "imbsam-clean-forward": ("imbsam", 1, "loss", None, float("nan")),
    "imbsam-clean-head-backward": ("imbsam", 1, "grad", ~TAIL, float("nan")),
    "imbsam-clean-tail-backward": ("imbsam", 1, "grad", TAIL, float("nan")),
    "imbsam-perturbed-tail-input": ("imbsam", 2, "input", None, float("nan")),
    "imbsam-perturbed-tail-forward": ("imbsam", 2, "loss", None, float("nan")),
    "imbsam-perturbed-tail-backward": ("imbsam", 2, "grad", TAIL, float("nan")),
    "ssesam-clean-input": ("ssesam", 1, "input", None, float("nan")),
    "ssesam-clean-forward-inf": ("ssesam", 1, "loss", None, INF),
    "ssesam-clean-head-backward": ("ssesam", 1, "grad", ~TAIL, float("nan")),
    "ssesam-clean-tail-backward": ("ssesam", 1, "grad", TAIL, float("nan")),
    "ssesam-perturbed-head-input": ("ssesam", 2, "input", None, float("nan")),
    "ssesam-perturbed-head-forward": ("ssesam", 2, "loss", None, float("nan")),
    "ssesam-perturbed-head-backward": ("ssesam", 2, "grad", ~TAIL, float("nan")),
    "ssesam-perturbed-tail-forward": ("ssesam", 3, "loss", None, float("nan")),
    "ssesam-perturbed-tail-backward-inf": ("ssesam", 3, "grad", TAIL, INF),
    # one loss -inf, every gradient finite: only the loss check can see it
    "sam-clean-forward-minus-inf": ("sam", 1, "shift", None, -INF),
    "ssesam-perturbed-tail-forward-minus-inf": ("ssesam", 3, "shift", None, -INF),
}


@pytest.mark.parametrize("method,which,kind,bad,value", PASSES.values(), ids=PASSES.keys())
def test_a_non_finite_pass_skips_the_step_bitwise(backend, method, which, kind, bad, value):
    model, opt = trained(method, backend)
    before = snapshot(model, opt)
    with pytest.warns(RuntimeWarning, match="non-finite value in the"):
        opt.step(poisoned(model, which, kind, bad, value), TAIL)
    assert_bitwise(snapshot(model, opt), before)
    assert opt.nonfinite_steps == 1 and opt.state_dict()["nonfinite_steps"] == 1
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    assert_trains_on(model, opt)
    model.eval()  # the running statistics kept no NaN: evaluation still works
    assert torch.isfinite(model(X)).all()


@pytest.mark.parametrize("method,which,kind,bad", [("imbsam", 2, "loss", None), ("ssesam", 1, "grad", TAIL)])
def test_nonfinite_raise_restores_everything_first(backend, method, which, kind, bad):
    model, opt = trained(method, backend, nonfinite="raise")
    before = snapshot(model, opt)
    with pytest.raises(FloatingPointError, match="non-finite"):
        opt.step(poisoned(model, which, kind, bad), TAIL)
    assert_bitwise(snapshot(model, opt), before)
    assert opt.nonfinite_steps == 0
    assert_trains_on(model, opt)


def test_fp16_losses_summing_past_65504_are_finite(backend):
    """Every per-sample loss finite, their sum past fp16's largest value: no skip."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).half()
    opt = make("ssesam", model, backend)
    x = torch.randn(4096, 6).half()
    y = torch.randint(0, 3, (4096,))
    tail = y == 2
    before = [p.detach().clone() for p in model.parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        # each loss about 21 (a constant added: the gradients stay small), their sum about 86000
        opt.step(lambda: F.cross_entropy(model(x), y, reduction="none") + 20, tail)
    assert opt.nonfinite_steps == 0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


# ---- resume at every stage -------------------------------------------------------------------
def _batches(n=6):
    g = torch.Generator().manual_seed(5)
    for _ in range(n):
        x, y = torch.randn(10, 6, generator=g), torch.randint(0, 3, (10,), generator=g)
        yield x, y, y == 2


def _train(model, opt, batches, start, stop, method):
    for step in range(start, stop):
        x, y, tail = batches[step]
        opt.step(clean(model, x, y), tail)
        if method == "ssesam":
            opt.update_rho()  # one step per epoch: stage 2 from the 3rd epoch on (gamma 0.5 of 4)


@pytest.mark.parametrize(
    "method,save_after",
    [("ssesam", 0), ("ssesam", 1), ("ssesam", 2), ("ssesam", 3), ("ssesam", 6), ("imbsam", 3), ("sam", 3)],
    ids=["fresh", "stage1", "at-switch", "stage2", "late-stage2", "imbsam", "sam"],
)
def test_resume_continues_bitwise(backend, method, save_after):
    batches = list(_batches(8))
    model = bn_mlp()
    opt = make(method, model, backend)
    _train(model, opt, batches, 0, 8, method)
    expected = snapshot(model, opt)

    model = bn_mlp()
    opt = make(method, model, backend)
    _train(model, opt, batches, 0, save_after, method)
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
    fresh = bn_mlp()
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1.0)  # nothing of the fresh model's own weights may survive
    opt2 = make(method, fresh, backend)
    fresh.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    assert opt2.state_dict()["stage"] == saved["opt"]["stage"]
    _train(fresh, opt2, batches, save_after, 8, method)
    assert_bitwise(snapshot(fresh, opt2), expected)


# ---- mixed precision --------------------------------------------------------------------------
def _autocast(model, dtype, x=X):
    def closure():
        with torch.autocast("cpu", dtype=dtype):
            return F.cross_entropy(model(x).float(), Y, reduction="none")

    return closure


def test_bf16_autocast_matches_the_reference_backend(backend):
    results = []
    for be in ("reference", backend):
        model = bn_mlp()
        opt = make("ssesam", model, be)
        for _ in range(3):
            opt.step(_autocast(model, torch.bfloat16), TAIL)
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_grad_scaler_step_equals_the_unscaled_step(backend):
    results = []
    for scaled in (False, True):
        model = bn_mlp()
        opt = make("ssesam", model, backend)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12) if scaled else None
        for _ in range(3):
            opt.step(clean(model), TAIL, scaler=scaler)
            if scaler is not None:
                scaler.update()
        results.append([p.detach().clone() for p in model.parameters()])
    assert_close(results[1], results[0], torch.float32, f"GradScaler {backend}")


def test_fp16_grad_scaler_overflow_skips_bitwise_and_backs_off(backend):
    model, opt = trained("ssesam", backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)  # fp16 gradients overflow at this scale
    before = snapshot(model, opt)
    opt.step(_autocast(model, torch.float16), TAIL, scaler=scaler)
    scaler.update()
    assert_bitwise(snapshot(model, opt), before)
    assert scaler.get_scale() < 2.0**127
    scaler.update(2.0**10)
    opt.step(_autocast(model, torch.float16), TAIL, scaler=scaler)
    assert not torch.equal(next(model.parameters()), before["weights"][0])


def _nan_loss_finite_grads(model):
    """Losses whose value is NaN while every gradient is finite: the NaN is a detached constant."""
    return lambda: clean(model)() + torch.full((10,), float("nan"))


@pytest.mark.parametrize("with_scaler", [False, True], ids=["no-scaler", "scaler"])
def test_a_nan_loss_with_finite_gradients_is_one_policy(backend, with_scaler):
    model, opt = trained("ssesam", backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if with_scaler else None
    before = snapshot(model, opt)
    with pytest.warns(RuntimeWarning, match="non-finite value in the clean forward"):
        opt.step(_nan_loss_finite_grads(model), TAIL, scaler=scaler)
    assert_bitwise(snapshot(model, opt), before)
    assert opt.nonfinite_steps == 1
    if scaler is not None:
        scaler.update()
        assert scaler.get_scale() < 2.0**10  # backs off as for a non-finite gradient


def test_a_nan_loss_with_a_scaler_raises_under_nonfinite_raise(backend):
    model, opt = trained("ssesam", backend, nonfinite="raise")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    before = snapshot(model, opt)
    with pytest.raises(FloatingPointError, match="clean forward"):
        opt.step(_nan_loss_finite_grads(model), TAIL, scaler=scaler)
    assert_bitwise(snapshot(model, opt), before)


# ---- DDP: shards without a group ------------------------------------------------------------------
def _ddp_shards():
    """Three steps of 12 samples on 2 shards: rank 0 without tail samples, then
    rank 1 without head samples, then no tail sample anywhere."""
    g = torch.Generator().manual_seed(9)
    for step in range(3):
        x, y = torch.randn(12, 6, generator=g), torch.randint(0, 3, (12,), generator=g)
        tail = y == 2
        if step == 0:
            tail[:6] = False
        elif step == 1:
            tail[6:] = True
        else:
            tail[:] = False
        yield x, y, tail


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


@pytest.mark.long  # two processes (tests.support.spawn_bounded): make test-long
def test_ddp_shards_without_a_group_follow_one_process(ddp_runs):
    backend, out = ddp_runs
    model = _mlp()
    opt = SSESAM(sgd(model), model, 0.05, 0.11, backend=backend)
    for x, y, tail in _ddp_shards():
        opt.step(clean(model, x, y), tail)
    expected = [p.detach() for p in model.parameters()]
    assert_close(torch.load(f"{out}/shards.0"), expected, torch.float32, f"DDP {backend}")


# ---- DDP: a parameter used on one process only ----------------------------------------------------
class _Branchy(nn.Module):
    """``extra`` takes part only when asked: under DDP, on one process only."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body, self.extra = nn.Linear(6, 3), nn.Linear(6, 3)

    def forward(self, x, use_extra: bool):
        out = self.body(x)
        return out + self.extra(x) if use_extra else out


def _unused_opt(method, model, backend):
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    if method == "sam":
        return SAM(base, model, 0.1, backend=backend)
    return SSESAM(base, model, 0.05, 0.11, backend=backend)


def _ddp_batches_unused():
    g = torch.Generator().manual_seed(5)
    for _ in range(3):
        x, y = torch.randn(12, 6, generator=g), torch.randint(0, 3, (12,), generator=g)
        yield x, y, y == 2


@pytest.mark.long  # two processes (tests.support.spawn_bounded): make test-long
@pytest.mark.parametrize("method", ["sam", "ssesam"])
def test_ddp_a_parameter_used_on_one_process_steps_on_every_process(ddp_runs, method):
    """find_unused_parameters=True and ``extra`` used by rank 0's shard only: both
    replicas take the update of one process on the whole batch (DDP's reducer
    would give rank 1 the averaged gradient too). Per-parameter gradient hooks
    left ``extra`` out of rank 1's step, and the replicas drifted apart."""
    backend, out = ddp_runs
    model = _Branchy()
    opt = _unused_opt(method, model, backend)
    for x, y, tail in _ddp_batches_unused():
        opt.step(
            lambda: torch.cat([F.cross_entropy(model(x[:6], True), y[:6], reduction="none"),
                               F.cross_entropy(model(x[6:], False), y[6:], reduction="none")]),
            tail,
        )  # fmt: skip
    expected = [p.detach() for p in model.parameters()]
    for rank in (0, 1):
        params = torch.load(f"{out}/unused-{method}.{rank}")
        assert_close(params, expected, torch.float32, f"DDP rank {rank} {backend}")


# ---- a closure that calls backward() itself -------------------------------------------------------
@pytest.mark.parametrize("retain", [True, False])
@pytest.mark.parametrize("method", ["sam", "ssesam"])
def test_a_closure_that_calls_backward_is_refused_and_changes_nothing(backend, method, retain):
    """The davda54/sam habit in the one-call step: with retain_graph the step
    applied a different update without a word, without it torch's raw "backward
    through the graph a second time" came out."""
    model, opt = trained(method, backend)
    x_grads = [torch.full_like(p, 0.5) for p in model.parameters()]  # gradients the caller left
    for p, g in zip(model.parameters(), x_grads):
        p.grad = g.clone()
    before = snapshot(model, opt)
    grads = [p.grad.clone() for p in model.parameters()]

    def closure():
        losses = F.cross_entropy(model(X), Y, reduction="none")
        losses.mean().backward(retain_graph=retain)
        return losses

    with pytest.raises(ValueError, match="closure called backward.*returns the per-sample losses"):
        opt.step(closure, TAIL)
    assert_bitwise(snapshot(model, opt), before)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    opt.step(clean(model), TAIL)  # and the next step runs


# ---- sparse gradients -------------------------------------------------------------------------------
class _Bag(nn.Module):
    def __init__(self, sparse: bool):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.out = nn.Embedding(7, 4, sparse=sparse), nn.Linear(4, 3)

    def forward(self, idx):
        return self.out(self.emb(idx))


def test_sparse_gradients_are_refused_naming_the_parameter(backend):
    """The flat backends made sparse gradients dense (weight decay then decayed
    every row, and Adam ran where torch alone refuses): one refusal everywhere."""
    model = _Bag(sparse=True)
    before = snapshot(model)
    with pytest.raises(ValueError, match="emb.weight gets sparse gradients.*sparse=False"):
        SAM(torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=1e-2), model, backend=backend)
    assert_bitwise(snapshot(model), before)


@pytest.mark.parametrize("flat", ["torch", "triton"])
def test_a_sparse_gradient_from_elsewhere_is_named(flat):
    pytest.importorskip("triton") if flat == "triton" else None
    model = _Bag(sparse=False)
    opt = SAM(torch.optim.SGD(model.parameters(), lr=0.1), model, backend=flat)
    model.emb.sparse = True  # switched on after construction
    idx, y = torch.tensor([1, 2, 3, 1]), torch.tensor([0, 1, 2, 0])
    with pytest.raises(ValueError, match="parameter 0 of the optimizer got a torch.sparse_coo gradient"):
        opt.step(lambda: F.cross_entropy(model(idx), y, reduction="none"))


# ---- complex parameters with ASAM --------------------------------------------------------------------
class _ComplexLinear(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.w = nn.Parameter(torch.randn(3, 6, dtype=torch.complex64))

    def forward(self, x):
        return (x.to(torch.complex64) @ self.w.T).abs()


@pytest.mark.parametrize("flat", ["torch"])
def test_complex_parameters_under_asam_move_by_the_magnitude_squared(flat):
    """T = |w|: the move is |w|² g, not the complex square w² g (the reference's
    meaning; the triton kernels refuse complex parameters)."""
    results = []
    for backend in ("reference", flat):
        model = _ComplexLinear()
        opt = SAM(torch.optim.SGD(model.parameters(), lr=0.1), model, 0.3, adaptive=True, backend=backend)
        for _ in range(3):
            opt.step(lambda: F.cross_entropy(model(X), Y, reduction="none"))
        results.append(model.w.detach().clone())
    torch.testing.assert_close(results[1], results[0], atol=2e-6, rtol=1e-5)


# ---- running statistics of other normalisation layers ------------------------------------------------
def _instance_norm_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 8), nn.Unflatten(1, (2, 4)), nn.InstanceNorm1d(2, track_running_stats=True),
        nn.Flatten(), nn.Tanh(), nn.Linear(8, 3),
    )  # fmt: skip


@pytest.mark.parametrize("sync_free", [False, True])
def test_a_skipped_step_leaves_instance_norm_statistics_alone(backend, sync_free):
    """InstanceNorm(track_running_stats=True) got NaN statistics from a step
    reported as skipped; it is a normalisation layer like BatchNorm."""
    model = _instance_norm_model()
    opt = make("ssesam", model, backend)
    opt._force_sync_free = sync_free
    opt.step(clean(model), TAIL)
    before = snapshot(model, opt)
    x = X.clone()
    x[0, 0] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        opt.step(clean(model, x), TAIL)
    assert opt.nonfinite_steps == 1
    assert_bitwise(snapshot(model, opt), before)


def test_clean_statistics_policy_covers_instance_norm(backend):
    """bn_stats="clean": only the forward at w updates InstanceNorm's statistics too."""
    only_clean = []
    for policy in ("clean", "all"):
        model = _instance_norm_model()
        opt = make("ssesam", model, backend, bn_stats=policy)
        at_w = copy.deepcopy(model)
        at_w(X)  # the clean forward alone
        opt.step(clean(model), TAIL)
        only_clean.append(torch.equal(model[2].running_mean, at_w[2].running_mean))
    assert only_clean == [True, False]


def _nan_in_the_perturbed_pass(model):
    """The second forward (SAM's perturbed pass) returns NaN losses with finite gradients."""
    calls = []

    def closure():
        calls.append(1)
        losses = clean(model)()
        return losses + torch.full((10,), float("nan")) if len(calls) == 2 else losses

    return closure


@pytest.mark.parametrize("nonfinite", ["skip", "raise"])
def test_a_scaler_does_not_hide_a_nan_loss_of_a_perturbed_pass(backend, nonfinite):
    """With a GradScaler every pass's loss is checked as without one: the scaler
    sees only finite gradients and would apply the step."""
    model, opt = trained("sam", backend, nonfinite=nonfinite)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    before = snapshot(model, opt)
    if nonfinite == "raise":
        with pytest.raises(FloatingPointError, match="perturbed all"):
            opt.step(_nan_in_the_perturbed_pass(model), scaler=scaler)
    else:
        with pytest.warns(RuntimeWarning, match="non-finite value in the perturbed all pass"):
            opt.step(_nan_in_the_perturbed_pass(model), scaler=scaler)
        assert opt.nonfinite_steps == 1
    assert_bitwise(snapshot(model, opt), before)
    scaler.update()
    assert scaler.get_scale() < 2.0**10
    opt.step(clean(model), scaler=scaler)  # and training goes on
    scaler.update()
    assert not torch.equal(next(model.parameters()), before["weights"][0])


# ---- DDP: shards of unequal sizes, one empty, a NaN on one process ---------------------------------
def _uneven_steps():
    """(x, y, tail, rank 0's share, NaN on rank 0): 6/6, then 12/0 (rank 1 empty),
    then 9/3, then 6/6 with rank 0's losses NaN (finite gradients)."""
    g = torch.Generator().manual_seed(11)
    for cut, nan in ((6, False), (12, False), (9, False), (6, True)):
        x, y = torch.randn(12, 6, generator=g), torch.randint(0, 3, (12,), generator=g)
        yield x, y, y == 2, cut, nan


def _uneven_losses(model, x, y, nan):
    losses = F.cross_entropy(model(x), y, reduction="none")
    return losses + torch.full_like(losses, float("nan")) if nan else losses


def _ddp_worker_cases(rank, world, init, backend, out):
    """Every DDP case of this module in one process group (a spawn costs seconds)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    for method in ("sam", "ssesam"):
        model = nn.parallel.DistributedDataParallel(_Branchy(), find_unused_parameters=True)
        opt = _unused_opt(method, model, backend)
        for x, y, tail in _ddp_batches_unused():
            shard = slice(rank * 6, (rank + 1) * 6)
            losses = lambda: F.cross_entropy(model(x[shard], rank == 0), y[shard], reduction="none")
            opt.step(losses, tail[shard])
        torch.save([p.detach().clone() for p in model.parameters()], f"{out}/unused-{method}.{rank}")
        model = nn.parallel.DistributedDataParallel(_mlp())
        opt = _unused_opt(method, model, backend)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            for x, y, tail, cut, nan in _uneven_steps():
                part = slice(0, cut) if rank == 0 else slice(cut, 12)
                bad = nan and rank == 0
                opt.step(lambda: _uneven_losses(model, x[part], y[part], bad), tail[part])
        saved = ([p.detach().clone() for p in model.parameters()], opt.nonfinite_steps)
        torch.save(saved, f"{out}/uneven-{method}.{rank}")
    model = nn.parallel.DistributedDataParallel(_mlp())
    opt = SSESAM(sgd(model), model, 0.05, 0.11, backend=backend)
    for x, y, tail in _ddp_shards():
        shard = slice(rank * 6, (rank + 1) * 6)
        opt.step(lambda: F.cross_entropy(model(x[shard]), y[shard], reduction="none"), tail[shard])
    torch.save([p.detach().clone() for p in model.parameters()], f"{out}/shards.{rank}")
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # as in test_passes: gloo's teardown at interpreter exit aborts now and then


@pytest.fixture(scope="module", params=BACKENDS)
def ddp_runs(request, tmp_path_factory):
    """(backend, folder): the DDP cases run once per backend on 2 gloo processes,
    bounded in time: a process that waits forever fails the tests."""
    if request.param == "triton":
        pytest.importorskip("triton")
    out = tmp_path_factory.mktemp(f"ddp-{request.param}")
    spawn_bounded(_ddp_worker_cases, (2, f"file://{out}/pg", request.param, str(out)))
    return request.param, str(out)


@pytest.mark.long  # two processes (tests.support.spawn_bounded): make test-long
@pytest.mark.parametrize("method", ["sam", "ssesam"])
def test_ddp_uneven_and_empty_shards_step_as_one_process_on_their_union(ddp_runs, method):
    """An empty shard contributes nothing (it hung the other process before); shards
    of unequal sizes weigh by their samples; a NaN on one process skips the step on
    every process."""
    backend, out = ddp_runs
    model = _mlp()
    opt = _unused_opt(method, model, backend)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for x, y, tail, cut, nan in _uneven_steps():
            opt.step(lambda: torch.cat([_uneven_losses(model, x[:cut], y[:cut], nan),
                                        _uneven_losses(model, x[cut:], y[cut:], False)]), tail)  # fmt: skip
    expected = [p.detach() for p in model.parameters()]
    assert opt.nonfinite_steps == 1
    for rank in (0, 1):
        params, skipped = torch.load(f"{out}/uneven-{method}.{rank}")
        assert skipped == 1, f"rank {rank} skipped {skipped} steps"
        assert_close(params, expected, torch.float32, f"DDP rank {rank} {backend}")


@pytest.mark.parametrize(
    "build,typo,meant",
    [
        (lambda m, **kw: SSESAM(sgd(m), m, 0.05, 0.1, **kw), "backened", "backend"),
        (lambda m, **kw: ImbSAM(sgd(m), m, 0.05, **kw), "tail_wieght", "tail_weight"),
        (lambda m, **kw: SAM(sgd(m), m, 0.05, **kw), "max_grad", "max_grad_norm"),
    ],
)
def test_a_misspelt_option_is_named_with_the_closest_accepted_one(build, typo, meant):
    model = bn_mlp()
    words = rf"unknown option '{typo}'; did you mean '{meant}'\?.*accepted: {meant}, "
    with pytest.raises(TypeError, match=words):
        build(model, **{typo: 1})
