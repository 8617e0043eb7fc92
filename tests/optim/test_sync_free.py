"""The sync-free step (the default of the flat backends on CUDA): empty groups
by arithmetic, the non-finite verdict on the device. Forced here on CPU, it must
give the host-verdict step's results bit for bit or within the fp32 table."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sse_sam_fast import SAM, SSESAM, ImbSAM
from sse_sam_fast.verify import assert_close
from tests.support import TAIL, PoisonGrad, X, Y, assert_bitwise, snapshot, tensors

BACKENDS = ["torch", "triton"]


def bn_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))


def build(method, backend, base="sgd", sync_free=True, seed=0):
    model = bn_model(seed)
    if base == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True)
    elif base == "sgd-plain":
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
    elif base == "sgd-fused":
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3, fused=True)
    elif base == "adam-fused":
        opt = torch.optim.Adam(model.parameters(), lr=1e-2, fused=True)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    cls, args = {"sam": (SAM, (0.1,)), "imbsam": (ImbSAM, (0.1,)), "ssesam": (SSESAM, (0.05, 0.1))}[method]
    wrapper = cls(opt, model, *args, backend=backend)
    wrapper._force_sync_free = sync_free
    return model, wrapper


def steps(model, opt, masks):
    for mask in masks:
        opt.step(lambda: F.cross_entropy(model(X), Y, reduction="none"), mask)


MASKS = [TAIL, torch.zeros(10, dtype=torch.bool), torch.ones(10, dtype=torch.bool), TAIL]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "method,base",
    [("sam", "sgd"), ("imbsam", "sgd"), ("ssesam", "sgd"), ("ssesam", "sgd-plain"), ("ssesam", "adam")],
)
def test_sync_free_matches_the_host_verdict_step(method, base, backend):
    """Batches with an empty head and an empty tail group included: the plan
    keeps the group, whose zero gradient moves nothing."""
    results = []
    for sync_free in (False, True):
        model, opt = build(method, backend, base, sync_free)
        steps(model, opt, MASKS)
        results.append(tensors(snapshot(model, opt)))
    assert_close(results[1], results[0], torch.float32, f"{method} {base} {backend}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_group_runs_its_passes_instead_of_reading_counts(backend):
    model, opt = build("ssesam", backend)
    calls = []

    def closure():
        calls.append(1)
        return F.cross_entropy(model(X), Y, reduction="none")

    opt.step(closure, torch.zeros(10, dtype=torch.bool))  # no tail sample
    assert len(calls) == 3  # the clean forward and both perturbed forwards: no host count


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("base", ["sgd", "adam", "adam-fused"])
@pytest.mark.parametrize(
    "which,kind,bad",
    [(1, "loss", None), (1, "grad", TAIL), (2, "loss", None), (3, "grad", TAIL), (1, "input", None)],
)
def test_device_verdict_skips_bit_identically(which, kind, bad, base, backend):
    model, opt = build("ssesam", backend, base)
    steps(model, opt, [TAIL, TAIL])  # the optimizer state exists: the verdict stays on the device
    before = snapshot(model, opt)
    calls = []

    def closure():
        calls.append(1)
        x = X.clone()
        if len(calls) == which and kind == "input":
            x[0, 0] = float("nan")  # reaches the BatchNorm running statistics
        out = model(x)
        if len(calls) == which and kind == "grad":
            out = PoisonGrad.apply(out, bad)
        losses = F.cross_entropy(out, Y, reduction="none")
        return losses * float("nan") if len(calls) == which and kind == "loss" else losses

    opt.step(closure, TAIL)  # no warning, no synchronisation: counted on the device
    assert_bitwise(snapshot(model, opt), before)
    assert opt._skipped_device is not None and opt.nonfinite_steps == 1
    steps(model, opt, [TAIL])
    assert not torch.equal(next(model.parameters()), before["weights"][0])
    assert opt.nonfinite_steps == 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("base", ["sgd-fused", "adam-fused"])
def test_fused_optimizers_skip_inside_their_step_without_a_state_copy(base, backend):
    """torch's fused SGD, Adam and AdamW take ``found_inf``: a step taken back on
    the device is skipped inside their kernel, and the optimizer state is never
    copied to be selected back."""
    model, opt = build("ssesam", backend, base)
    steps(model, opt, [TAIL, TAIL])
    before = snapshot(model, opt)
    opt.step(lambda: F.cross_entropy(model(X), Y, reduction="none") * float("nan"), TAIL)
    assert_bitwise(snapshot(model, opt), before)
    assert opt.nonfinite_steps == 1
    assert opt._backend._state_copy.buffers() == []  # no state was ever copied
    fresh_model, fresh = build("ssesam", backend, base, sync_free=False)
    steps(fresh_model, fresh, [TAIL, TAIL, TAIL])
    steps(model, opt, [TAIL])  # the skipped step left no trace
    ours, theirs = tensors(snapshot(model, opt)), tensors(snapshot(fresh_model, fresh))
    assert_close(ours, theirs, torch.float32, "after a skip")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("base", ["sgd", "adam", "adam-fused"])
def test_a_first_step_that_fails_creates_no_state(base, backend):
    """The first step creates the optimizer state: that one verdict is read on
    the host, and a failed first step leaves no state behind."""
    model, opt = build("sam", backend, base)
    before = snapshot(model)
    opt.step(lambda: F.cross_entropy(model(X), Y, reduction="none") * float("nan"))
    assert_bitwise(snapshot(model), before)
    assert not any(opt.optimizer.state[p] for p in model.parameters())
    assert opt.nonfinite_steps == 1
    # and the next step starts the state as a first step would
    fresh_model, fresh = build("sam", backend, base, sync_free=False)
    steps(model, opt, [TAIL])
    steps(fresh_model, fresh, [TAIL])
    ours, theirs = tensors(snapshot(model, opt)), tensors(snapshot(fresh_model, fresh))
    assert_close(ours, theirs, torch.float32, "after a failure")


def test_raise_policy_reads_the_verdict_on_the_host():
    model, opt = build("ssesam", "torch")
    opt.nonfinite = "raise"
    steps(model, opt, [TAIL])
    with pytest.raises(FloatingPointError, match="clean forward"):
        opt.step(lambda: F.cross_entropy(model(X), Y, reduction="none") * float("nan"), TAIL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("base", ["sgd", "adam"])
@pytest.mark.parametrize("replace", ["object", "memory"])
def test_statistics_and_state_replaced_between_steps_are_taken_back_too(replace, base, backend):
    """The copies a step takes back are kept from step to step; a BatchNorm
    buffer and an optimizer state tensor replaced since the last step (a new
    object, or the same object over new memory) must be the ones saved."""
    model, opt = build("ssesam", backend, base)
    steps(model, opt, [TAIL, TAIL])
    bn, p = model[1], model[0].weight
    key = "momentum_buffer" if base == "sgd" else "exp_avg"
    with torch.no_grad():
        new_var, new_state = bn.running_var + 1.0, opt.optimizer.state[p][key] * 0.5
    if replace == "object":
        bn.running_var = new_var
        opt.optimizer.state[p][key] = new_state
    else:
        bn.running_var.data = new_var
        opt.optimizer.state[p][key].data = new_state
    before = snapshot(model, opt)
    nan_input = X.clone()
    nan_input[0, 0] = float("nan")  # reaches the running statistics of the clean forward
    opt.step(lambda: F.cross_entropy(model(nan_input), Y, reduction="none"), TAIL)
    assert_bitwise(snapshot(model, opt), before)
    assert opt.nonfinite_steps == 1
