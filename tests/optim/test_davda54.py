"""The davda54/sam convention: ``SAM(params, base_optimizer_cls, rho, adaptive,
**kwargs)``, scripts that change only their import line.

The oracle is ``sse_sam_fast.published.Davda54SAM``, a transcription of
davda54/sam's update independent of the engine: one global norm over every
parameter with a gradient (``|w|·g`` for adaptive groups), per-group ``rho``,
the move ``rho·T²·g/(norm + EPS)``, the old weights copied back before the
base step.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sse_sam_fast import SAM
from sse_sam_fast.published import Davda54SAM as Oracle

BACKENDS = ["reference", "torch", "triton"]


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 4))


def _groups(model, two_groups: bool, adaptive_second: bool | None = None):
    params = list(model.parameters())
    if not two_groups:
        return model.parameters()
    second = {"params": params[2:], "lr": 0.02, "rho": 0.2}
    if adaptive_second is not None:
        second["adaptive"] = adaptive_second
    return [{"params": params[:2]}, second]


def _batches(n):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(32, 10, generator=g), torch.randint(0, 4, (32,), generator=g)) for _ in range(n)]


def _script(sam_class, pattern, base, adaptive, two_groups, scheduler=True, steps=6, **options):
    """A davda54/sam training loop; only ``sam_class`` changes between the two runs.
    Yields the parameters and the kept gradients after every step."""
    model = _model()
    kw = dict(lr=0.1, momentum=0.9, nesterov=True) if base is torch.optim.SGD else dict(lr=1e-2)
    opt = sam_class(_groups(model, two_groups), base, rho=0.05, adaptive=adaptive, **kw, **options)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps) if scheduler else None
    for x, y in _batches(steps):
        loss = lambda: F.cross_entropy(model(x), y)
        if pattern == "two-steps":
            loss().backward()
            opt.first_step(zero_grad=True)
            loss().backward()
            opt.second_step(zero_grad=True)
        else:

            def closure():
                out = loss()
                out.backward()
                return out

            loss().backward()
            opt.step(closure)
            grads = [p.grad.clone() for p in model.parameters()]  # second_step() kept them
            opt.zero_grad()
            yield [p.detach().clone() for p in model.parameters()], grads
            if sched is not None:
                sched.step()
            continue
        yield [p.detach().clone() for p in model.parameters()], None
        if sched is not None:
            sched.step()


def _assert_same(actual, expected, what):
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-6, msg=what)


# davda54/sam itself makes a scheduler warn in the two-call pattern; ours counts second_step()
pytestmark = pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pattern", ["two-steps", "closure"])
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("base", [torch.optim.SGD, torch.optim.Adam], ids=["sgd-nesterov", "adam"])
def test_a_davda54_script_follows_davda54_at_every_step(backend, pattern, adaptive, base):
    ours = _script(SAM, pattern, base, adaptive, two_groups=True, backend=backend)
    theirs = _script(Oracle, pattern, base, adaptive, two_groups=True)
    for step, ((w, g), (w_ref, g_ref)) in enumerate(zip(ours, theirs, strict=True)):
        _assert_same(w, w_ref, f"weights after step {step}")
        if g is not None:
            _assert_same(g, g_ref, f"kept grads, step {step}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_adaptive_per_param_group(backend):
    # the first group plain, the second ASAM with its own rho: flat buffers run by range
    def run(cls, adaptive_second=True, **options):
        model = _model()
        groups = _groups(model, True, adaptive_second=adaptive_second)
        opt = cls(groups, torch.optim.SGD, rho=0.05, lr=0.1, **options)
        for x, y in _batches(4):
            F.cross_entropy(model(x), y).backward()
            opt.first_step(zero_grad=True)
            F.cross_entropy(model(x), y).backward()
            opt.second_step(zero_grad=True)
        return [p.detach() for p in model.parameters()]

    ours, theirs = run(SAM, backend=backend), run(Oracle)
    _assert_same(ours, theirs, "adaptive second group")
    assert not torch.allclose(ours[-1], run(Oracle, adaptive_second=False)[-1])  # and it matters


@pytest.mark.parametrize("backend", BACKENDS)
def test_first_step_without_zero_grad_keeps_the_gradient(backend):
    # davda54's default: the second backward adds to g, and the base steps with g + g'
    def run(cls, **options):
        model = _model()
        opt = cls(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, **options)
        for x, y in _batches(3):
            F.cross_entropy(model(x), y).backward()
            opt.first_step()
            F.cross_entropy(model(x), y).backward()
            opt.second_step()
            grads = [p.grad.clone() for p in model.parameters()]
            opt.zero_grad()
        return [p.detach() for p in model.parameters()], grads

    (w, g), (w_ref, g_ref) = run(SAM, backend=backend), run(Oracle)
    _assert_same(w, w_ref, "weights")
    _assert_same(g, g_ref, "gradients left by second_step()")


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_round_trip_mid_run(backend):
    def build(model):
        return SAM(_groups(model, True), torch.optim.SGD, rho=0.05, adaptive=True, lr=0.1, momentum=0.9,
                   backend=backend)  # fmt: skip

    def steps(model, opt, batches):
        for x, y in batches:
            F.cross_entropy(model(x), y).backward()
            opt.step(lambda: F.cross_entropy(model(x), y).backward())
            opt.zero_grad()

    batches = _batches(6)
    model = _model()
    opt = build(model)
    steps(model, opt, batches)
    model2 = _model()
    opt2 = build(model2)
    steps(model2, opt2, batches[:3])
    saved = opt2.state_dict()
    model3 = _model()
    model3.load_state_dict(model2.state_dict())
    opt3 = build(model3)
    opt3.param_groups[1]["rho"] = 0.7  # a resumed run takes the saved radii, not the new ones
    opt3.load_state_dict(saved)
    assert opt3.param_groups[1]["rho"] == 0.2
    steps(model3, opt3, batches[3:])
    _assert_same(list(model3.parameters()), list(model.parameters()), "resumed run")


@pytest.mark.parametrize("by_keyword", [False, True])
def test_the_wrapper_exposes_davda54s_names(by_keyword):
    model = _model()
    if by_keyword:  # SAM(params=..., base_optimizer=..., ...) as davda54's README writes it
        opt = SAM(params=_groups(model, True), base_optimizer=torch.optim.SGD, rho=0.05, lr=0.1)
    else:
        opt = SAM(_groups(model, True), base_optimizer=torch.optim.SGD, rho=0.05, lr=0.1)
    assert opt.base_optimizer is opt.optimizer
    assert opt.param_groups is opt.base_optimizer.param_groups
    assert [g["rho"] for g in opt.param_groups] == [0.05, 0.2]
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.02]
    assert [g["adaptive"] for g in opt.param_groups] == [False, False]
    with pytest.raises(TypeError, match="capture"):
        opt.capture(lambda x: x)


@pytest.mark.parametrize(
    "build,error,words",
    [
        (lambda m: SAM(m.parameters(), "SGD", lr=0.1), TypeError, "base_optimizer"),
        (lambda m: SAM(next(m.parameters()), torch.optim.SGD, lr=0.1), TypeError, "params"),
        (lambda m: SAM([], torch.optim.SGD, lr=0.1), ValueError, "params"),
        (lambda m: SAM(m.parameters(), torch.optim.SGD, rho=-1.0, lr=0.1), ValueError, "rho"),
        (lambda m: SAM(m.parameters(), torch.optim.SGD, adaptive="yes", lr=0.1), TypeError, "adaptive"),
        (lambda m: SAM([{"params": m.parameters(), "rho": float("inf")}], torch.optim.SGD, lr=0.1),
         ValueError, "rho"),  # fmt: skip
        (lambda m: SAM(m.parameters(), torch.optim.SGD, max_grad_norm=0), ValueError, "max_grad_norm"),
        (lambda m: SAM(m.parameters(), torch.optim.SGD, lr=0.1, backend="gpu"), ValueError, "backend"),
        (lambda m: SAM(m.parameters(), lambda groups: object()), TypeError, "base_optimizer"),
        (lambda m: SAM([{"params": []}], torch.optim.SGD, lr=0.1), ValueError, "params"),
        (lambda m: SAM([next(m.parameters()), {"params": []}], torch.optim.SGD, lr=0.1), TypeError, "params"),
        (lambda m: SAM(m.parameters(), torch.optim.SGD, lr=0.1, nonfinite="raise"), TypeError, "nonfinite"),
        (lambda m: SAM(m.parameters(), torch.optim.SGD, lr=0.1, bn_stats="all"), TypeError, "bn_stats"),
    ],
)
def test_bad_arguments_name_the_argument(build, error, words):
    with pytest.raises(error, match=words):
        build(_model())


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_raising_closure_leaves_the_weights_and_a_usable_optimizer(backend):
    model = _model()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, backend=backend)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = _batches(1)[0]
    F.cross_entropy(model(x), y).backward()

    def closure():
        raise RuntimeError("data loader died")

    with pytest.raises(RuntimeError, match="loader"):
        opt.step(closure)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
    with pytest.raises(ValueError, match="closure"):
        opt.step()
    F.cross_entropy(model(x), y).backward()
    opt.step(lambda: F.cross_entropy(model(x), y).backward())  # the next step runs
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), before))


def test_a_scheduler_on_the_wrapper_sees_second_step_as_the_step():
    model = _model()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, backend="torch")
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    x, y = _batches(1)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        F.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        F.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)
        sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == 0.05


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_grad_keeping_the_tensors_keeps_parameters_in_the_step(backend):
    # zero_grad(set_to_none=False): a parameter no later backward reaches still has a
    # (zero) gradient, so the base step decays it and moves its momentum, as in torch
    def run(cls, **options):
        torch.manual_seed(0)
        a, b = nn.Linear(4, 3), nn.Linear(4, 3)
        params = [*a.parameters(), *b.parameters()]
        opt = cls(params, torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=0.1, **options)
        x = torch.randn(8, 4)
        for step in range(3):
            opt.zero_grad(set_to_none=False)
            loss = lambda: a(x).square().mean() + (b(x).square().mean() if step == 0 else 0)
            loss().backward()
            opt.first_step()
            loss().backward()
            opt.second_step()
        return [p.detach() for p in params]

    _assert_same(run(SAM, backend=backend), run(Oracle), "set_to_none=False")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_refused_group_value_leaves_the_gradient_for_a_retry(backend):
    model = _model()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, backend=backend)
    oracle_model = _model()
    oracle = Oracle(oracle_model.parameters(), torch.optim.SGD, lr=0.1)
    x, y = _batches(1)[0]
    for m in (model, oracle_model):
        F.cross_entropy(m(x), y).backward()
    opt.param_groups[0]["adaptive"] = 1
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['adaptive'\]"):
        opt.first_step()
    opt.param_groups[0]["adaptive"] = False
    opt.param_groups[0]["rho"] = -1.0
    with pytest.raises(ValueError, match="rho"):
        opt.first_step()
    opt.param_groups[0]["rho"] = 0.05
    for m, o in ((model, opt), (oracle_model, oracle)):
        o.first_step(zero_grad=True)
        F.cross_entropy(m(x), y).backward()
        o.second_step(zero_grad=True)
    _assert_same(list(model.parameters()), list(oracle_model.parameters()), "after the retry")


def test_a_group_added_later_gets_the_default_rho_and_adaptive():
    model, extra = _model(), nn.Linear(3, 3)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.3, adaptive=True, lr=0.1)
    opt.add_param_group({"params": extra.parameters()})
    assert (opt.param_groups[1]["rho"], opt.param_groups[1]["adaptive"]) == (0.3, True)


def _davda54_state(model):
    """What davda54/sam's ``SAM.state_dict()`` holds after a step: its own state
    (``old_p`` per parameter; its base optimizer's momentum is not in it) and the
    param groups it shares with the base, carrying ``rho`` and ``adaptive``."""
    groups = [
        {"params": [0, 1], "rho": 0.05, "adaptive": False, "lr": 0.1, "momentum": 0.9, "dampening": 0,
         "weight_decay": 0, "nesterov": False, "maximize": False, "foreach": None, "differentiable": False,
         "fused": None},
        {"params": [2, 3], "rho": 0.2, "adaptive": False, "lr": 0.02, "momentum": 0.9, "dampening": 0,
         "weight_decay": 0, "nesterov": False, "maximize": False, "foreach": None, "differentiable": False,
         "fused": None},
    ]  # fmt: skip
    state = {i: {"old_p": p.detach().clone()} for i, p in enumerate(model.parameters())}
    return {"state": state, "param_groups": groups}


def test_a_real_davda54_state_dict_loads():
    model = _model()
    opt = SAM(_groups(model, True), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    opt.load_state_dict(_davda54_state(model))
    assert [g["rho"] for g in opt.param_groups] == [0.05, 0.2]
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.02]
    assert not any(opt.optimizer.state[p] for p in model.parameters())  # old_p dropped


def test_per_group_radii_loaded_into_the_one_call_form_are_refused():
    """They would show in param_groups while every group moved with one rho."""
    model = _model()
    davda = SAM(_groups(model, True), torch.optim.SGD, rho=0.05, lr=0.1)
    saved = davda.state_dict()
    one_call = SAM(torch.optim.SGD(_groups(model, True), lr=0.1), model, rho=0.05)
    before = copy.deepcopy(one_call.optimizer.state_dict())
    for state in (saved, _davda54_state(model)):
        with pytest.raises(ValueError, match=r"per-group rho \[0.05, 0.2\].*one rho"):
            one_call.load_state_dict(state)
        assert one_call.optimizer.state_dict() == before
