"""The engine's optimizer manners: construction checks, call order, state_dict,
schedulers, zero_grad."""

import copy
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sse_sam_fast import SAM, SSESAM, ImbSAM
from sse_sam_fast.verify import Case, per_sample_losses
from tests.support import assert_bitwise, snapshot


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def sgd(model, **kw):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, **kw)


# ---- construction --------------------------------------------------------------
@pytest.mark.parametrize(
    "build,error,words",
    [
        (lambda m: SAM(sgd(m), m, rho=-0.1), ValueError, "rho"),
        (lambda m: SAM(sgd(m), m, rho=float("nan")), ValueError, "rho"),
        (lambda m: SAM(sgd(m), m, rho="0.1"), TypeError, "rho"),
        (lambda m: ImbSAM(sgd(m), m, rho=-1.0), ValueError, "rho"),
        (lambda m: ImbSAM(sgd(m), m, tail_weight=-2.0), ValueError, "tail_weight"),
        (lambda m: SSESAM(sgd(m), m, -0.05, 0.1), ValueError, "head_rho"),
        (lambda m: SSESAM(sgd(m), m, 0.05, -0.1), ValueError, "tail_rho"),
        (lambda m: SSESAM(sgd(m), m, 0.05, 0.1, gamma=1.5), ValueError, "gamma"),
        (lambda m: SSESAM(sgd(m), m, 0.05, 0.1, gamma=-0.1), ValueError, "gamma"),
        (lambda m: SSESAM(sgd(m), m, 0.05, 0.1, total_epochs=0), ValueError, "total_epochs"),
        (lambda m: SSESAM(sgd(m), m, 0.05, 0.1, total_epochs=2.5), ValueError, "total_epochs"),
        (lambda m: SAM(sgd(m), m, backend="cuda"), ValueError, "backend"),
        (lambda m: SAM(object(), m), TypeError, "optimizer"),
        (lambda m: SAM(sgd(m), "model"), TypeError, "model"),
        (lambda m: SAM(torch.optim.SGD(m[0].parameters(), lr=0.1), m), ValueError, "optimizer does not hold"),
        (lambda m: SAM(SAM(sgd(m), m, backend="reference"), m), TypeError, "base optimizer"),
    ],
)
def test_invalid_arguments_name_the_argument(build, error, words):
    with pytest.raises(error, match=words):
        build(mlp())


def test_gamma_zero_never_switches_and_never_crashes():
    m = mlp()
    opt = SSESAM(sgd(m), m, 0.05, 0.1, gamma=0, total_epochs=3)
    for _ in range(10):
        opt.update_rho()
    assert opt.rho_is == [0.05, 0.1] and opt.stage == 1 and opt.epoch_count == 10


def test_stage_switch_at_gamma_times_total_epochs():
    m = mlp()
    opt = SSESAM(sgd(m), m, 0.05, 0.1, gamma=0.7, total_epochs=10)
    stages = []
    for _ in range(10):
        stages.append(opt.rho_is[0])
        opt.update_rho()
    assert stages == [0.05] * 7 + [0.0] * 3


# ---- step() inputs ----------------------------------------------------------------
@pytest.mark.parametrize(
    "closure,mask,error,words",
    [
        (lambda m, x: F.cross_entropy(m(x), torch.zeros(4, dtype=torch.long)), None, ValueError, "shape"),
        (lambda m, x: m(x), None, ValueError, "shape"),
        (lambda m, x: 3.0, None, TypeError, "tensor"),
        (lambda m, x: m(x).sum(1).detach(), None, ValueError, "require grad"),
        (lambda m, x: m(x).sum(1), torch.zeros(3, dtype=torch.bool), ValueError, "tail_mask must have shape"),
        (lambda m, x: m(x).sum(1), torch.zeros(4), TypeError, "tail_mask must be a bool"),
        (lambda m, x: m(x).sum(1), None, TypeError, "tail_mask"),
    ],
)
def test_bad_step_inputs(closure, mask, error, words):
    m = mlp()
    opt = SSESAM(sgd(m), m, 0.05, 0.1)
    x = torch.randn(4, 6)
    before = [p.detach().clone() for p in m.parameters()]
    with pytest.raises(error, match=words):
        opt.step(lambda: closure(m, x), mask)
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), before))


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_closure_failing_in_a_perturbed_pass_leaves_weights_restored(backend):
    m = mlp()
    opt = SSESAM(sgd(m), m, 0.5, 0.5, backend=backend)
    x, y = torch.randn(6, 6), torch.randint(0, 3, (6,))
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 3:
            raise KeyError("data loader died")
        return F.cross_entropy(m(x), y, reduction="none")

    before = [p.detach().clone() for p in m.parameters()]
    with pytest.raises(KeyError):
        opt.step(closure, torch.tensor([True, False] * 3))
    for a, b in zip(m.parameters(), before):
        torch.testing.assert_close(a.detach(), b, atol=1e-7, rtol=0)
    opt.step(lambda: F.cross_entropy(m(x), y, reduction="none"), torch.tensor([True, False] * 3))


def test_official_methods_out_of_order():
    m = mlp()
    opt = ImbSAM(sgd(m), m)
    with pytest.raises(RuntimeError, match="third_step"):
        opt.third_step()
    opt2 = SSESAM(sgd(m), m, 0.05, 0.1)
    with pytest.raises(RuntimeError, match="compute_grad_sum_and_restore_p"):
        opt2.compute_grad_sum_and_restore_p()
    with pytest.raises(ValueError, match="n_i"):
        opt2.compute_and_add_epsilon(2)


# ---- state_dict ------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_state_dict_round_trip_mid_stage_one(backend):
    case = Case(method="ssesam", model="bn_cnn", steps=8)
    batches = list(case.batches())

    def train(model, opt, part):
        for step, (x, y, tail) in part:
            opt.step(lambda: per_sample_losses(model, x, y), tail)
            if step % 2 == 1:
                opt.update_rho()

    model, opt = case.build(backend)
    train(model, opt, list(enumerate(batches)))
    expected = [p.detach().clone() for p in model.parameters()]

    model, opt = case.build(backend)
    train(model, opt, list(enumerate(batches))[:3])
    assert opt.stage == 1 and opt.epoch_count == 1
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
    fresh, opt2 = case.build(backend)
    fresh.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    assert opt2.epoch_count == 1 and opt2.rho_is == opt.rho_is
    train(fresh, opt2, list(enumerate(batches))[3:])
    assert opt2.stage == 2
    for a, b in zip(fresh.parameters(), expected):
        assert torch.equal(a, b)


def test_state_dict_carries_the_stage_and_validates():
    m = mlp()
    opt = SSESAM(sgd(m), m, 0.05, 0.1, gamma=0.5, total_epochs=2)
    opt.update_rho()
    sd = opt.state_dict()
    assert sd["stage"]["epoch_count"] == 1 and sd["stage"]["rho_is"] == [0.0, 0.1]
    other = SSESAM(sgd(m), m, 0.05, 0.1, gamma=0.5, total_epochs=2)
    other.load_state_dict(sd)
    assert other.rho_is == [0.0, 0.1] and other.stage == 2
    # the base optimizer's own (sd's param groups carry a copy of the stage, for DCP)
    base = opt.optimizer.state_dict()
    with pytest.raises(ValueError, match="lacks 'stage'.*base optimizer's own state_dict"):
        other.load_state_dict(base)
    with pytest.raises(ValueError, match="epoch_count"):
        other.load_state_dict({**base, "stage": {**sd["stage"], "epoch_count": -1}})
    # the layout before torch's, in old checkpoints, still loads
    fresh = SSESAM(sgd(m), m, 0.05, 0.1, gamma=0.5, total_epochs=2)
    fresh.load_state_dict({"base": base, "stage": sd["stage"], "nonfinite_steps": 0})
    assert fresh.rho_is == [0.0, 0.1] and fresh.stage == 2


def test_state_dict_has_torchs_layout():
    """``state`` and ``param_groups`` at the top, as torch tooling reads them (the
    learning rate, torch.distributed.checkpoint), the method's entries beside."""
    m = mlp()
    opt = SSESAM(sgd(m), m, 0.05, 0.1, gamma=0.5, total_epochs=2)
    x, y = torch.randn(6, 6), torch.randint(0, 3, (6,))
    opt.step(lambda: F.cross_entropy(m(x), y, reduction="none"), y == 2)
    sd = opt.state_dict()
    assert sd["param_groups"][0]["lr"] == 0.1
    assert set(sd) == {"state", "param_groups", "stage", "nonfinite_steps"}
    # a copy of the method's entries rides in the first group, which DCP keeps
    groups = [dict(g) for g in sd["param_groups"]]
    assert groups[0].pop("sse_sam_fast") == {"stage": sd["stage"], "nonfinite_steps": 0}
    assert groups == opt.optimizer.state_dict()["param_groups"]
    own = opt.optimizer.state_dict()["state"]
    for a, b in zip(sd["state"].values(), own.values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])


# ---- optimizer manners -----------------------------------------------------------
@pytest.mark.parametrize("attach", ["wrapper", "base"])
def test_lr_scheduler_attached_to_either(attach):
    m = mlp()
    opt = SAM(sgd(m), m)
    assert opt.param_groups is opt.optimizer.param_groups
    sched = torch.optim.lr_scheduler.StepLR(opt if attach == "wrapper" else opt.optimizer, 1, gamma=0.5)
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    opt.step(lambda: F.cross_entropy(m(x), y, reduction="none"))
    sched.step()
    assert opt.optimizer.param_groups[0]["lr"] == pytest.approx(0.05)


def test_repr_names_method_hyperparameters_and_base():
    m = mlp()
    r = repr(SSESAM(sgd(m), m, 0.05, 0.1, gamma=0.7, total_epochs=200, backend="torch"))
    assert r.startswith("SSESAM(head_rho=0.05, tail_rho=0.1, gamma=0.7, total_epochs=200")
    assert "backend='torch'" in r and "SGD" in r


def test_step_under_no_grad():
    m = mlp()
    opt = SSESAM(sgd(m), m, 0.05, 0.1)
    x, y = torch.randn(6, 6), torch.randint(0, 3, (6,))
    before = m[0].weight.detach().clone()
    with torch.no_grad():
        opt.step(lambda: F.cross_entropy(m(x), y, reduction="none"), y == 2)
    assert not torch.equal(m[0].weight, before)


def test_scheduler_on_the_wrapper_survives_load_state_dict():
    m = mlp()
    opt = SAM(sgd(m), m)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    opt.load_state_dict(opt.state_dict())  # replaces the base optimizer's param_groups and state
    assert opt.param_groups is opt.optimizer.param_groups and opt.state is opt.optimizer.state
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    opt.step(lambda: F.cross_entropy(m(x), y, reduction="none"))
    sched.step()
    assert opt.optimizer.param_groups[0]["lr"] == pytest.approx(0.05)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_official_methods_right_after_a_rebind_keep_the_users_gradient(backend):
    results = []
    for rebind in (False, True):
        m = mlp()
        opt = ImbSAM(sgd(m), m, 0.1, backend=backend)
        x, y = torch.randn(6, 6), torch.randint(0, 3, (6,))
        tail = y == 2
        if rebind:
            for p in m.parameters():
                p.data = p.data.clone()  # re-bound behind the optimizer's back
        loss = F.cross_entropy(m(x), y, reduction="none")
        (loss[~tail].sum() / 6).backward(retain_graph=True)
        opt.first_step()
        (2 * loss[tail].sum() / 6).backward()
        opt.second_step()
        (2 * F.cross_entropy(m(x), y, reduction="none")[tail].sum() / 6).backward()
        opt.third_step()
        results.append([p.detach().clone() for p in m.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_a_parameter_unfrozen_after_construction_trains_like_the_reference(backend):
    results = {}
    for be in ("reference", backend):
        m = mlp()
        m[0].requires_grad_(False)
        opt = SAM(sgd(m), m, 0.1, backend=be)
        m[0].requires_grad_(True)
        x, y = torch.randn(6, 6), torch.randint(0, 3, (6,))
        for _ in range(3):
            opt.step(lambda: F.cross_entropy(m(x), y, reduction="none"))
        results[be] = [p.detach().clone() for p in m.parameters()]
    for a, b in zip(results["reference"], results[backend]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_failed_base_step_leaves_no_stale_slots():
    results = []
    for backend in ("reference", "torch"):
        m = mlp()
        opt = SSESAM(sgd(m), m, 0.05, 0.1, backend=backend)
        fail = [True]

        def hook(*_):
            if fail.pop():
                raise RuntimeError("once")

        fail.insert(0, False)
        handle = opt.optimizer.register_step_pre_hook(hook)
        x, y = torch.randn(6, 6), torch.randint(0, 3, (6,))
        with pytest.raises(RuntimeError, match="once"):
            opt.step(lambda: F.cross_entropy(m(x), y, reduction="none"), y == 2)
        assert not opt._backend.holding
        handle.remove()
        opt.step(lambda: F.cross_entropy(m(x), y, reduction="none"), y == 2)
        results.append([p.detach().clone() for p in m.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)


def test_stage_state_round_trips_completely():
    m = mlp()
    saved = SSESAM(sgd(m), m, 0.07, 0.2, gamma=0.5, total_epochs=4)
    other = SSESAM(sgd(m), m, 0.01, 0.3, gamma=0.9, total_epochs=100)
    other.load_state_dict(saved.state_dict())
    assert (other.head_rho, other.gamma, other.total_epochs, other.rho_is) == (0.07, 0.5, 4, [0.07, 0.2])
    for _ in range(2):
        other.update_rho()
    assert other.stage == 2


# ---- real numbers from argparse, YAML, NumPy (issue 11, item 11) ---------------------
def test_real_numbers_of_any_kind_are_accepted_as_the_published_code_does():
    m = mlp()
    opt = SSESAM(sgd(m), m, np.float32(0.05), torch.tensor(0.1), gamma=np.float64(0.5), total_epochs=4.0)
    assert (opt.head_rho, opt.rho_is[1], opt.gamma, opt.total_epochs) == (
        float(np.float32(0.05)), float(torch.tensor(0.1)), 0.5, 4,
    )  # fmt: skip
    assert all(type(x) is float for x in (opt.head_rho, *opt.rho_is, opt.gamma))
    assert type(opt.total_epochs) is int
    for total in (np.int64(4), torch.tensor(4), np.float32(4.0), torch.tensor(4.0), Fraction(8, 2)):
        assert SSESAM(sgd(m), m, 0.05, 0.1, gamma=0.5, total_epochs=total).total_epochs == 4
    assert SAM(sgd(m), m, torch.tensor(0.05, dtype=torch.float64)).rho == 0.05
    imb = ImbSAM(sgd(m), m, np.float16(0.5), tail_weight=np.int32(3))
    assert (imb.rho, imb.tail_weight) == (0.5, 3.0) and type(imb.tail_weight) is float
    assert SAM(sgd(m), m, 0).rho == 0.0  # an int radius, as before
    # and they train like the Python floats they stand for
    results = []
    for kind in (float, np.float32):
        model = mlp()
        o = SSESAM(sgd(model), model, float(kind(0.05)), kind(0.1), gamma=kind(0.5), total_epochs=kind(2))
        x, y = torch.randn(6, 6), torch.randint(0, 3, (6,))
        o.step(lambda: F.cross_entropy(model(x), y, reduction="none"), y == 2)
        results.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize(
    "kwargs,error,words",
    [
        ({"head_rho": float("nan")}, ValueError, "head_rho"),
        ({"head_rho": float("inf")}, ValueError, "head_rho"),
        ({"head_rho": np.float32("nan")}, ValueError, "head_rho"),
        ({"head_rho": torch.tensor(float("inf"))}, ValueError, "head_rho"),
        ({"tail_rho": -0.1}, ValueError, "tail_rho"),
        ({"tail_rho": np.float64(-1)}, ValueError, "tail_rho"),
        ({"tail_rho": torch.tensor(-0.1)}, ValueError, "tail_rho"),
        ({"head_rho": True}, TypeError, "head_rho"),
        ({"head_rho": np.bool_(True)}, TypeError, "head_rho"),
        ({"head_rho": torch.tensor(True)}, TypeError, "head_rho"),
        ({"head_rho": "0.05"}, TypeError, "head_rho"),
        ({"head_rho": 0.05j}, TypeError, "head_rho"),
        ({"head_rho": torch.tensor([0.05])}, TypeError, "head_rho"),
        ({"head_rho": None}, TypeError, "head_rho"),
        ({"head_rho": 10**400}, ValueError, "head_rho"),
        ({"gamma": float("nan")}, ValueError, "gamma"),
        ({"gamma": np.float32(1.5)}, ValueError, "gamma"),
        ({"gamma": "0.7"}, TypeError, "gamma"),
        ({"gamma": True}, TypeError, "gamma"),
        ({"total_epochs": 200.5}, ValueError, "total_epochs"),
        ({"total_epochs": float("inf")}, ValueError, "total_epochs"),
        ({"total_epochs": float("nan")}, ValueError, "total_epochs"),
        ({"total_epochs": 0.0}, ValueError, "total_epochs"),
        ({"total_epochs": np.int64(-3)}, ValueError, "total_epochs"),
        ({"total_epochs": torch.tensor(2.5)}, ValueError, "total_epochs"),
        ({"total_epochs": True}, TypeError, "total_epochs"),
        ({"total_epochs": "200"}, TypeError, "total_epochs"),
    ],
)
def test_non_real_non_finite_and_negative_values_are_refused_naming_the_argument(kwargs, error, words):
    m = mlp()
    args = {"head_rho": 0.05, "tail_rho": 0.1, "gamma": 0.5, "total_epochs": 4, **kwargs}
    with pytest.raises(error, match=words):
        SSESAM(sgd(m), m, **args)


def test_load_state_dict_takes_integral_floats_for_counts():
    m = mlp()
    opt = SSESAM(sgd(m), m, 0.05, 0.1, gamma=0.5, total_epochs=4)
    sd = opt.state_dict()
    sd = {
        **sd,
        "nonfinite_steps": 2.0,
        "stage": {**sd["stage"], "epoch_count": np.float64(3.0), "total_epochs": 4.0},
    }
    opt.load_state_dict(sd)
    assert (opt.epoch_count, opt.total_epochs, opt.nonfinite_steps, opt.stage) == (3, 4, 2, 2)
    assert all(type(x) is int for x in (opt.epoch_count, opt.total_epochs, opt.nonfinite_steps))
    for bad in (2.5, float("nan"), -1, "2", True):
        with pytest.raises((ValueError, TypeError), match="nonfinite_steps"):
            opt.load_state_dict({**sd, "nonfinite_steps": bad})
        with pytest.raises((ValueError, TypeError), match="epoch_count"):
            opt.load_state_dict({**sd, "stage": {**sd["stage"], "epoch_count": bad}})


# ---- load_state_dict: all or nothing (issue 11, items 8 and 9) ---------------------------
def _trained(method="ssesam", backend="torch"):
    m = mlp()
    opt = {
        "sam": lambda: SAM(sgd(m), m, 0.05, backend=backend),
        "imbsam": lambda: ImbSAM(sgd(m), m, 0.05, backend=backend),
        "ssesam": lambda: SSESAM(sgd(m), m, 0.05, 0.1, gamma=0.5, total_epochs=4, backend=backend),
    }[method]()
    x, y = torch.randn(6, 6), torch.randint(0, 3, (6,))
    opt.step(lambda: F.cross_entropy(m(x), y, reduction="none"), y == 2)
    return m, opt


def _other_state(method):
    """A valid state of the same method with a different stage and momentum."""
    m, opt = _trained(method)
    x, y = torch.randn(6, 6), torch.randint(0, 3, (6,))
    opt.step(lambda: F.cross_entropy(m(x), y, reduction="none"), y == 2)  # other momentum
    opt.param_groups[0]["lr"] = 0.05
    if method == "ssesam":
        for _ in range(3):
            opt.update_rho()
    opt.nonfinite_steps = 5
    return opt.state_dict()


@pytest.mark.parametrize(
    "method,edit,words",
    [
        ("imbsam", lambda sd: sd["stage"].update(rho=0.3, tail_weight=-1), "tail_weight"),
        ("imbsam", lambda sd: sd["stage"].pop("tail_weight"), "lacks 'tail_weight'"),
        ("sam", lambda sd: sd["stage"].update(tail_weight=2.0), "saved from another method"),
        ("ssesam", lambda sd: sd.update(nonfinite_steps=-1), "nonfinite_steps"),
        ("ssesam", lambda sd: sd.update(nonfinite_steps="3"), "nonfinite_steps"),
        ("ssesam", lambda sd: sd["stage"].update(rho_is=[0.1]), "rho_is"),
        ("ssesam", lambda sd: sd["stage"].update(total_epochs=0), "total_epochs"),
        ("ssesam", lambda sd: sd["stage"].update(gamma=float("nan")), "gamma"),
        ("ssesam", lambda sd: sd["param_groups"][0]["params"].pop(), "param groups of sizes"),
        ("ssesam", lambda sd: sd.pop("state"), "lacks 'state'"),
        ("ssesam", lambda sd: sd.update(kept={20: []}), "slots \\['20'\\]"),
        ("ssesam", lambda sd: sd.update(extra=1), "unknown keys"),
        ("ssesam", lambda sd: sd.update(stage=[1, 2]), "must be a dict"),
    ],
)
def test_a_refused_state_dict_changes_nothing(method, edit, words):
    m, opt = _trained(method)
    before, skipped = snapshot(m, opt), opt.nonfinite_steps
    sd = _other_state(method)
    edit(sd)
    with pytest.raises((ValueError, TypeError), match=words):
        opt.load_state_dict(sd)
    assert_bitwise(snapshot(m, opt), before)
    assert opt.nonfinite_steps == skipped and opt.param_groups is opt.optimizer.param_groups


def test_a_base_load_failing_late_rolls_the_stage_and_the_base_back():
    m, opt = _trained("ssesam")
    before, skipped = snapshot(m, opt), opt.nonfinite_steps

    def fail(_optimizer):
        raise RuntimeError("post hook")

    opt.optimizer.register_load_state_dict_post_hook(fail)  # runs after torch replaced the state
    with pytest.raises(RuntimeError, match="post hook"):
        opt.load_state_dict(_other_state("ssesam"))
    assert_bitwise(snapshot(m, opt), before)
    assert opt.nonfinite_steps == skipped and opt.param_groups is opt.optimizer.param_groups


@pytest.mark.parametrize("method", ["sam", "imbsam", "ssesam"])
def test_a_base_optimizers_own_state_dict_is_refused_naming_the_stage(method):
    m, opt = _trained(method)
    before, skipped = snapshot(m, opt), opt.nonfinite_steps
    stage_keys = list(opt.state_dict()["stage"])
    with pytest.raises(ValueError, match="lacks 'stage'") as exc:
        opt.load_state_dict(copy.deepcopy(opt.optimizer.state_dict()))
    for key in stage_keys:
        assert key in str(exc.value)
    assert "base optimizer's own state_dict" in str(exc.value)
    assert_bitwise(snapshot(m, opt), before)
    assert opt.nonfinite_steps == skipped and opt.param_groups is opt.optimizer.param_groups


# ---- float64 with the triton backend (issue 11, item 10) ---------------------------------
def test_triton_refuses_float64_at_construction_and_leaves_the_parameters_alone():
    pytest.importorskip("triton")
    m = mlp().double()
    ptrs = [p.data_ptr() for p in m.parameters()]
    with pytest.raises(ValueError, match=r"torch\.float64.*backend='torch'"):
        SSESAM(sgd(m), m, 0.05, 0.1, backend="triton")
    assert [p.data_ptr() for p in m.parameters()] == ptrs  # not moved into a flat buffer
    SSESAM(sgd(m), m, 0.05, 0.1, backend="torch")  # the suggested way works


# ---- parameters beyond the model's; a re-bind in the middle of official methods ----
def _temperature_setup(backend, late=False):
    torch.manual_seed(0)
    m = mlp()
    temp = nn.Parameter(torch.tensor(1.5))
    params = list(m.parameters()) if late else [*m.parameters(), temp]
    base = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    opt = SSESAM(base, m, 0.05, 0.1, backend=backend)
    if late:
        opt.add_param_group({"params": [temp], "lr": 0.05})
    return m, temp, opt


@pytest.mark.parametrize("late", [False, True], ids=["with-model", "add_param_group"])
def test_parameters_the_base_holds_beyond_the_model_step_alike_on_every_backend(late):
    """A learnable loss temperature takes part in the step like a model parameter:
    perturbed, restored, updated once, its gradient zeroed between steps."""
    x, y = torch.randn(8, 6), torch.arange(8) % 3
    results = {}
    for backend in ("reference", "torch", "triton"):
        m, temp, opt = _temperature_setup(backend, late)
        for _ in range(3):
            opt.step(lambda: F.cross_entropy(m(x) * temp, y, reduction="none"), y == 2)
        results[backend] = [t.detach().clone() for t in [*m.parameters(), temp]]
    assert not torch.equal(results["reference"][-1], torch.tensor(1.5))
    for backend in ("torch", "triton"):
        for a, b in zip(results[backend], results["reference"]):
            torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_a_rebind_between_official_methods_leaves_a_usable_optimizer(backend):
    m = mlp()
    opt = SAM(sgd(m), m, 0.5, backend=backend)
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    before = [p.detach().clone() for p in m.parameters()]
    F.cross_entropy(m(x), y).backward()
    opt.first_step()
    for p in m.parameters():
        p.data = p.data.clone()  # what model.to() does to every parameter
    F.cross_entropy(m(x), y).backward()
    if backend == "reference":  # per-parameter state follows the parameter: nothing to refuse
        opt.second_step()
        return
    with pytest.raises(RuntimeError, match="abandoned and the weights restored"):
        opt.second_step()
    assert all(torch.equal(p, b) for p, b in zip(m.parameters(), before))
    # the documented way on: a new backward and a new sequence
    opt.zero_grad()
    F.cross_entropy(m(x), y).backward()
    opt.first_step()
    F.cross_entropy(m(x), y).backward()
    opt.second_step()
    assert not any(torch.equal(p, b) for p, b in zip(m.parameters(), before))


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_add_param_group_between_official_methods_restores_the_weights(backend):
    """The refusal abandons the step: no perturbed weights left behind, and the
    next sequence (with the new parameter) runs."""
    m = mlp()
    opt = SAM(sgd(m), m, 0.5, backend=backend)
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    before = [p.detach().clone() for p in m.parameters()]
    F.cross_entropy(m(x), y).backward()
    opt.first_step()
    temp = nn.Parameter(torch.tensor(1.5))
    opt.add_param_group({"params": [temp], "lr": 0.05})
    F.cross_entropy(m(x), y).backward()
    with pytest.raises(RuntimeError, match="abandoned and the weights restored"):
        opt.second_step()
    for p, b in zip(m.parameters(), before):
        if backend == "reference":  # its official methods subtract the move
            torch.testing.assert_close(p, b, atol=1e-6, rtol=0)
        else:
            assert torch.equal(p, b)
    opt.zero_grad()
    (F.cross_entropy(m(x), y) * temp).backward()
    opt.first_step()
    (F.cross_entropy(m(x), y) * temp).backward()
    opt.second_step()
    assert not torch.equal(temp.detach(), torch.tensor(1.5))


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_parameters_taken_out_of_the_base_optimizer_are_refused(backend):
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    base = torch.optim.SGD([{"params": model[0].parameters()}, {"params": model[1].parameters()}], lr=0.1)
    opt = SAM(base, model, 0.05, backend=backend)
    x, y = torch.randn(6, 4), torch.randint(0, 2, (6,))
    closure = lambda: F.cross_entropy(model(x), y, reduction="none")
    opt.step(closure)
    base.param_groups[1]["params"] = [model[1].weight, nn.Parameter(torch.zeros(2))]  # same count
    with pytest.raises(RuntimeError, match="taken out of the base optimizer"):
        opt.step(closure)
    base.param_groups[1]["params"] = [model[1].weight, model[1].bias]
    opt.step(closure)
    base.param_groups[1]["params"][1] = nn.Parameter(torch.zeros(2))  # swapped in place
    with pytest.raises(RuntimeError, match="taken out of the base optimizer"):
        opt.step(closure)
