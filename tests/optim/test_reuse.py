"""``reuse=K``: a perturbed group's clean gradient is kept and moves the weights
of the next ``K - 1`` steps, which skip that group's clean pass; with
``reuse_policy="correction"`` the difference between the SAM and the clean
gradient is kept and added to the next steps' clean gradient."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sse_sam_fast import SAM, SSESAM, ImbSAM
from sse_sam_fast.optim.plan import CORRECTION, KEPT
from tests.support import assert_bitwise, snapshot

BACKENDS = ["reference", "torch", "triton"]
RHO, HEAD_RHO, TAIL_RHO = 0.05, 0.05, 0.1


class Net(nn.Module):
    """An MLP that records the batch size of every forward and backward."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))
        self.forwards, self.backwards = [], []

    def forward(self, x):
        self.forwards.append(x.shape[0])
        out = self.net(x)
        if out.requires_grad:
            out.register_hook(lambda g: self.backwards.append(g.shape[0]))
        return out


def build(method, backend="torch", reuse=2, model=None, **kw):
    model = Net() if model is None else model
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    if method == "sam":
        opt = SAM(base, model, RHO, backend=backend, reuse=reuse, **kw)
    elif method == "imbsam":
        opt = ImbSAM(base, model, RHO, backend=backend, reuse=reuse, **kw)
    else:
        opt = SSESAM(
            base, model, HEAD_RHO, TAIL_RHO, gamma=0.5, total_epochs=2, backend=backend, reuse=reuse, **kw
        )
    return model, opt


def batch(i, n=10):
    g = torch.Generator().manual_seed(100 + i)
    x, y = torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)
    tail = torch.zeros(n, dtype=torch.bool)
    tail[torch.randperm(n, generator=g)[: n // 3]] = True
    return x, y, tail


def step(model, opt, i, schedule="exact"):
    x, y, tail = batch(i)
    if schedule == "split":
        closure = lambda idx=slice(None): F.cross_entropy(model(x[idx]), y[idx], reduction="none")
        return opt.step(closure, tail, "split")
    return opt.step(lambda: F.cross_entropy(model(x), y, reduction="none"), tail)


def groups(method, opt):
    """``(members, weight, rho)`` per group, as each method's docstring states them."""
    if method == "sam":
        return [("all", 1.0, opt.rho)]
    if method == "imbsam":
        return [("head", 1.0, 0.0), ("tail", 2.0, opt.rho)]
    return [("head", 1.0, opt.rho_is[0]), ("tail", 1.0, opt.rho_is[1])]


def independent_update(method, model, opt, i):
    """The reuse step on batch ``i`` computed by hand, on copies: each perturbed
    group's gradient at ``w + rho·g/(||g|| + 1e-16)`` with ``g`` its kept gradient
    from ``state_dict``, an unperturbed group's at ``w``, then the base step."""
    sd = copy.deepcopy(opt.state_dict())  # a base loading it would share the momentum tensors
    twin = copy.deepcopy(model)
    base = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    base.load_state_dict({"state": sd["state"], "param_groups": sd["param_groups"]})
    x, y, tail = batch(i)
    member = {"all": torch.ones_like(tail), "head": ~tail, "tail": tail}
    params = list(twin.parameters())
    total = [torch.zeros_like(p) for p in params]
    for members, weight, rho in groups(method, opt):
        w0 = [p.detach().clone() for p in params]
        if rho > 0:
            kept = sd["kept"][int(KEPT[members])]
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(k) for k in kept]))
            with torch.no_grad():
                for p, k in zip(params, kept):
                    p.add_(k * (rho / (norm + 1e-16)))
        losses = F.cross_entropy(twin(x), y, reduction="none")
        grads = torch.autograd.grad(weight * losses[member[members]].sum() / len(y), params)
        with torch.no_grad():
            for p, w, t, g in zip(params, w0, total, grads):
                p.copy_(w)
                t.add_(g)
    for p, t in zip(params, total):
        p.grad = t
    base.step()
    return [p.detach() for p in params]


@pytest.mark.parametrize("schedule", ["exact", "split"])
@pytest.mark.parametrize("method", ["sam", "imbsam", "ssesam"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_reuse_step_equals_the_update_by_hand_with_the_kept_gradient(backend, method, schedule):
    model, opt = build(method, backend, reuse=3)
    step(model, opt, 0, schedule)  # computes and keeps
    for i in (1, 2):  # two steps reuse what step 0 kept
        if i == 2:
            if method == "ssesam":
                opt.rho_is[1] = 0.2  # a radius changed between steps takes effect on the kept direction
            else:
                opt.rho = 0.2
        expected = independent_update(method, model, opt, i)
        step(model, opt, i, schedule)
        for p, e in zip(model.parameters(), expected):
            torch.testing.assert_close(p.detach(), e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["sam", "imbsam", "ssesam"])
def test_reuse_1_is_the_step_and_the_computing_steps_of_reuse_k_are_too(backend, method):
    """reuse=1 keeps nothing; with reuse=K the steps that compute (the first, and
    every K-th) give the update of a step without reuse from the same state."""
    model, plain = build(method, backend, reuse=1)
    model_k, opt_k = build(method, backend, reuse=4)
    assert "kept" not in plain.state_dict()
    step(model, plain, 0)
    step(model_k, opt_k, 0)
    assert_bitwise(list(model.parameters()), list(model_k.parameters()))
    for i in (1, 2, 3):
        step(model_k, opt_k, i)
    # the fifth step computes anew: from model_k's state, a step without reuse gives the same
    twin, twin_opt = build(method, backend, reuse=1, model=copy.deepcopy(model_k))
    twin_opt.load_state_dict(copy.deepcopy(opt_k.state_dict()))  # a load shares the momentum tensors
    step(model_k, opt_k, 4)
    step(twin, twin_opt, 4)
    assert_bitwise(list(model_k.parameters()), list(twin.parameters()))


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize(
    "method,schedule,first,reused",
    [
        # (forward sizes, backward sizes) of a computing step, then of a reuse step
        ("sam", "exact", ([10, 10], [10, 10]), ([10], [10])),
        ("imbsam", "exact", ([10, 10], [10, 10, 10]), ([10, 10], [10, 10])),
        ("imbsam", "split", ([7, 3, 3], [7, 3, 3]), ([7, 3], [7, 3])),
        ("ssesam", "exact", ([10, 10, 10], [10, 10, 10, 10]), ([10, 10], [10, 10])),
        # without BatchNorm, one forward and backward over the batch, each sample at its group's w + e
        ("ssesam", "split", ([7, 3, 7, 3], [7, 3, 7, 3]), ([7, 3], [7, 3])),
    ],
)
def test_pass_counts_of_a_reuse_step(backend, method, schedule, first, reused):
    model, opt = build(method, backend, reuse=2)
    step(model, opt, 0, schedule)
    assert (model.forwards, model.backwards) == first
    model.forwards, model.backwards = [], []
    step(model, opt, 1, schedule)
    assert (model.forwards, model.backwards) == reused
    model.forwards, model.backwards = [], []
    step(model, opt, 2, schedule)  # reuse=2: computes again
    assert (model.forwards, model.backwards) == first


def test_the_loss_of_a_reuse_step_is_taken_where_each_sample_was_evaluated():
    """Split and exact report the same loss; on a reuse step it is the mean of each
    sample's loss at its group's perturbed weights (no clean forward ran)."""
    losses = {}
    for schedule in ("exact", "split"):
        model, opt = build("ssesam", "torch", reuse=2)
        step(model, opt, 0, schedule)
        expected = _losses_at_kept_moves(model, opt, 1)
        losses[schedule] = step(model, opt, 1, schedule)
        torch.testing.assert_close(losses[schedule], expected)


def _losses_at_kept_moves(model, opt, i):
    sd, x, y, tail = opt.state_dict(), *batch(i)
    twin = copy.deepcopy(model)
    params = list(twin.parameters())
    out = torch.zeros(len(y))
    for members, rho, mask in (("head", opt.rho_is[0], ~tail), ("tail", opt.rho_is[1], tail)):
        kept = sd["kept"][int(KEPT[members])]
        norm = torch.linalg.vector_norm(torch.cat([k.flatten() for k in kept]))
        with torch.no_grad():
            moved = [p + k * (rho / (norm + 1e-16)) for p, k in zip(params, kept)]
            for p, m in zip(params, moved):
                p.copy_(m)
            out[mask] = F.cross_entropy(twin(x), y, reduction="none")[mask]
            for p, q in zip(params, model.parameters()):
                p.copy_(q)
    return out.mean()


@pytest.mark.parametrize("backend", BACKENDS)
def test_entering_stage_2_drops_the_head_gradient_and_keeps_the_tail_one(backend):
    model, opt = build("ssesam", backend, reuse=3)
    step(model, opt, 0)
    assert sorted(opt.state_dict()["kept"]) == [int(KEPT["head"]), int(KEPT["tail"])]
    opt.update_rho()  # stage 2: rho_H = 0
    model.forwards, model.backwards = [], []
    step(model, opt, 1)
    # the head has its clean pass at w, the tail reuses: one forward and two backwards fewer
    assert (model.forwards, model.backwards) == ([10, 10], [10, 10])
    assert list(opt.state_dict()["kept"]) == [int(KEPT["tail"])]


@pytest.mark.parametrize("policy", ["perturbation", "correction"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("save_after", [1, 2])
def test_resume_mid_reuse_is_bitwise(backend, save_after, policy):
    model, opt = build("ssesam", backend, reuse=3, reuse_policy=policy)
    for i in range(save_after):
        step(model, opt, i)
    sd = copy.deepcopy(opt.state_dict())
    weights = [p.detach().clone() for p in model.parameters()]
    assert sd["kept_age"] == save_after
    for i in range(save_after, 5):
        step(model, opt, i)

    resumed_model = Net(seed=1)  # other weights: all of them come from the checkpoint
    with torch.no_grad():
        for p, w in zip(resumed_model.parameters(), weights):
            p.copy_(w)
    resumed_model, resumed = build("ssesam", backend, reuse=3, model=resumed_model, reuse_policy=policy)
    resumed.load_state_dict(sd)
    resumed_model.forwards = []
    step(resumed_model, resumed, save_after)
    # it reused the checkpoint's kept values: two perturbed forwards, or one clean one
    assert len(resumed_model.forwards) == (2 if policy == "perturbation" else 1)
    for i in range(save_after + 1, 5):
        step(resumed_model, resumed, i)
    assert_bitwise(list(model.parameters()), list(resumed_model.parameters()))


def test_a_checkpoint_of_another_k_loads():
    """reuse=1 ignores kept gradients; a reuse run started from a checkpoint
    without them computes them at its first step."""
    model, opt = build("sam", reuse=4)
    step(model, opt, 0)
    _, plain = build("sam", reuse=1, model=copy.deepcopy(model))
    plain.load_state_dict(opt.state_dict())
    assert "kept" not in plain.state_dict()
    model2, again = build("sam", reuse=4, model=copy.deepcopy(model))
    again.load_state_dict(plain.state_dict())
    model2.forwards = []
    step(model2, again, 1)
    assert model2.forwards == [10, 10]  # computed anew


@pytest.mark.parametrize("policy", ["perturbation", "correction"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_skipped_first_step_keeps_nothing_and_the_next_computes(backend, policy):
    model, opt = build("ssesam", backend, reuse=3, reuse_policy=policy)
    before = snapshot(model, opt)
    x, y, tail = batch(0)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step(lambda: F.cross_entropy(model(x), y, reduction="none") * float("nan"), tail)
    after = snapshot(model, opt)
    after.pop("kept_age"), before.pop("kept_age")
    assert_bitwise(after, before)
    assert opt.nonfinite_steps == 1 and opt.state_dict()["kept"] == {}
    model.forwards = []
    step(model, opt, 1)
    assert len(model.forwards) == 3  # computed: the clean forward and two perturbed ones


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_step_that_keeps_reads_its_verdict_on_the_host_and_a_reusing_one_does_not(backend):
    """Sync-free (forced, as on CUDA): a NaN in a step that keeps gradients is
    found on the host (a warning, nothing kept); in a reusing step the device
    takes it back and the host learns only when it reads the count."""
    import warnings

    model, opt = build("ssesam", backend, reuse=2)
    opt._force_sync_free = True
    x, y, tail = batch(0)
    nan = lambda: F.cross_entropy(model(x), y, reduction="none") * float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step(nan, tail)
    assert opt.state_dict()["kept"] == {}
    step(model, opt, 1)  # computes and keeps
    before = snapshot(model, opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(nan, tail)  # reuses: taken back on the device, no warning
    after = snapshot(model, opt)
    assert (before.pop("kept_age"), after.pop("kept_age")) == (1, 2)  # every call counts
    assert_bitwise(after, before)
    assert opt.nonfinite_steps == 2


@pytest.mark.parametrize(
    "value,error",
    [
        (0, ValueError),
        (-2, ValueError),
        (1.5, ValueError),
        (True, TypeError),
        ("2", TypeError),
        (None, TypeError),
    ],
)
def test_a_bad_k_is_refused_naming_reuse(value, error):
    with pytest.raises((ValueError, TypeError), match="reuse"):
        build("sam", reuse=value)


def test_the_official_methods_refuse_reuse():
    model, opt = build("sam", reuse=2)
    x, y, _ = batch(0)
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="reuse=2 applies to step"):
        opt.first_step()
    with pytest.raises(TypeError, match="reuse"):
        SAM(Net().parameters(), torch.optim.SGD, rho=0.05, lr=0.1, reuse=2)


@pytest.mark.parametrize(
    "method,policy,backend",
    [
        ("ssesam", "perturbation", "torch"),
        ("ssesam", "perturbation", "triton"),
        ("ssesam", "correction", "torch"),
        ("ssesam", "correction", "triton"),
        ("sam", "perturbation", "triton"),  # a reusing step without a clean forward: the batch
        ("imbsam", "correction", "triton"),  # size comes with the perturbed pass's losses
    ],
)
def test_captured_reuse_steps_replay_and_give_the_eager_update(
    fake_graphs, monkeypatch, method, policy, backend
):
    """capture with reuse=2 (a CUDA stand-in on the CPU): the steps that keep
    gradients run eagerly (their verdict is read on the host), the reusing ones
    warm up, are recorded and replayed, and the run is the eager run bit for bit."""
    from tests.optim.test_capture import _capturable_adam_on_cpu, _ce, _state
    from tests.optim.test_capture import batches as capture_batches
    from tests.optim.test_capture import build as capture_build

    base = "sgd" if backend == "triton" else "adam-capturable"  # the bases a graph takes per backend
    if base != "sgd":
        _capturable_adam_on_cpu(monkeypatch)

    def run(api):
        model, opt = capture_build(method, backend, base=base)
        radii = (0.05, 0.1) if method == "ssesam" else (0.05,)
        opt = type(opt)(opt.optimizer, model, *radii, backend=backend, reuse=2, reuse_policy=policy)
        opt._force_sync_free = True  # as on CUDA
        captured, graphed = opt.capture(_ce(model)), []
        for x, y, tail in capture_batches(14):
            if api == "capture":
                captured(x, y, tail_mask=tail)
                graphed.append(captured.graphed)
            else:
                opt.step(lambda: _ce(model)(x, y), tail)
        return _state(model) + [torch.tensor(opt._kept_age)], graphed

    (cap, graphed), (eager, _) = run("capture"), run("step")
    # odd calls reuse: 3 warm-ups, a checked recording, then replays; even calls keep, eagerly
    assert graphed == [False] * 9 + [True, False, True, False, True]
    assert_bitwise(cap, eager)


# ---- reuse_policy="correction" ------------------------------------------------------------
def sam_and_clean_gradients(method, model, opt, i):
    """By hand, at the current weights: the SAM gradient of the method on batch
    ``i`` (each perturbed group at ``w + rho·g_k/(||g_k|| + 1e-16)``, the others at
    ``w``) and the clean gradient ``Σ_k ∇L_k(w)``."""
    x, y, tail = batch(i)
    member = {"all": torch.ones_like(tail), "head": ~tail, "tail": tail}
    twin = copy.deepcopy(model)
    params = list(twin.parameters())
    sam, clean = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    for members, weight, rho in groups(method, opt):
        loss = lambda: weight * F.cross_entropy(twin(x), y, reduction="none")[member[members]].sum() / len(y)
        g = torch.autograd.grad(loss(), params)
        for c, t in zip(clean, g):
            c.add_(t)
        if rho > 0:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in g]))
            w0 = [p.detach().clone() for p in params]
            with torch.no_grad():
                for p, t in zip(params, g):
                    p.add_(t * (rho / (norm + 1e-16)))
            g = torch.autograd.grad(loss(), params)
            with torch.no_grad():
                for p, w in zip(params, w0):
                    p.copy_(w)
        for a, t in zip(sam, g):
            a.add_(t)
    return sam, clean


def _norm(ts):
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in ts]))


@pytest.mark.parametrize("schedule", ["exact", "split"])
@pytest.mark.parametrize("method", ["sam", "imbsam", "ssesam"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_the_kept_correction_and_the_corrected_step_equal_the_computation_by_hand(backend, method, schedule):
    model, opt = build(method, backend, reuse=3, reuse_policy="correction")
    sam, clean = sam_and_clean_gradients(method, model, opt, 0)
    step(model, opt, 0, schedule)
    d = opt.state_dict()["kept"][int(CORRECTION)]
    for got, s, c in zip(d, sam, clean):  # (g_SAM - g) / ||g||
        torch.testing.assert_close(got, (s - c) / (_norm(clean) + 1e-16), rtol=1e-5, atol=1e-7)
    for i in (1, 2):
        sd = copy.deepcopy(opt.state_dict())
        _, clean = sam_and_clean_gradients(method, model, opt, i)
        twin = copy.deepcopy(model)
        base = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
        base.load_state_dict({"state": sd["state"], "param_groups": sd["param_groups"]})
        for p, c, k in zip(twin.parameters(), clean, d):
            p.grad = c + _norm(clean) * k  # g + ||g|| d
        base.step()
        model.forwards, model.backwards = [], []
        step(model, opt, i, schedule)
        assert (model.forwards, model.backwards) == ([10], [10])  # an SGD step's passes
        for p, e in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(p.detach(), e.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_radius_change_computes_the_correction_anew(backend):
    model, opt = build("ssesam", backend, reuse=4, reuse_policy="correction")
    step(model, opt, 0)
    step(model, opt, 1)
    opt.update_rho()  # stage 2: rho_H = 0
    assert "kept" in opt.state_dict() and opt.state_dict()["kept"] == {}  # computed with other radii
    model.forwards, model.backwards = [], []
    step(model, opt, 2)
    assert (model.forwards, model.backwards) == ([10, 10], [10, 10, 10])  # stage 2's computing step
    opt.rho_is[1] = 0.2  # a scheduler moving the tail radius
    model.forwards = []
    step(model, opt, 3)
    assert model.forwards == [10, 10]


def test_correction_refuses_what_it_cannot_honour():
    with pytest.raises(ValueError, match="reuse_policy"):
        build("sam", reuse=2, reuse_policy="orthogonal")
    with pytest.raises(ValueError, match="local_perturbation"):
        build("sam", reuse=2, reuse_policy="correction", local_perturbation=True)
    model, opt = build("sam", reuse=2, reuse_policy="correction")
    x, y, _ = batch(0)
    with pytest.raises(ValueError, match="scaler"):
        opt.step(lambda: F.cross_entropy(model(x), y, reduction="none"), scaler=torch.amp.GradScaler("cpu"))


@pytest.mark.parametrize("policy", ["perturbation", "correction"])
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_micro_batches_reuse_like_one_batch(backend, policy):
    """Two micro-batches of a batch step as the batch, computing and reusing steps alike."""
    runs = []
    for halves in (False, True):
        model, opt = build("ssesam", backend, reuse=2, reuse_policy=policy)
        for i in range(3):
            x, y, tail = batch(i)
            parts = [slice(0, 5), slice(5, 10)] if halves else [slice(0, 10)]
            closures = [
                (lambda s: lambda: F.cross_entropy(model(x[s]), y[s], reduction="none"))(s) for s in parts
            ]
            opt.step(closures, [tail[s] for s in parts])
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_a_grad_scaler_keeps_unscaled_gradients(backend):
    """reuse_policy="perturbation" under a GradScaler (fp32 here, so scaling is
    exact up to rounding): the kept gradients are the unscaled ones, and the run
    follows the one without a scaler."""
    runs = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0**10)):
        model, opt = build("ssesam", backend, reuse=2)
        for i in range(4):
            x, y, tail = batch(i)
            opt.step(lambda: F.cross_entropy(model(x), y, reduction="none"), tail, scaler=scaler)
            if scaler is not None:
                scaler.update()
        runs.append(([p.detach().clone() for p in model.parameters()], opt.state_dict()["kept"]))
    (w0, kept0), (w1, kept1) = runs
    for a, b in zip(w0, w1):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for slot in kept0:
        for a, b in zip(kept0[slot], kept1[slot]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_the_kept_correction_of_complex_parameters_is_the_same_on_both_kinds_of_backend():
    """The correction's norm keeps a complex gradient's imaginary part on the
    reference backend too (``.float()`` would drop it), as the flat rows do."""
    from tests.optim.test_adversarial import _ComplexLinear
    from tests.support import X, Y

    kept = []
    for backend in ("reference", "torch"):
        model = _ComplexLinear()
        opt = SAM(torch.optim.SGD(model.parameters(), lr=0.1), model, 0.3, backend=backend, reuse=2,
                  reuse_policy="correction")  # fmt: skip
        opt.step(lambda: F.cross_entropy(model(X), Y, reduction="none"))
        kept.append(opt.state_dict()["kept"][int(CORRECTION)][0])
    torch.testing.assert_close(kept[0], kept[1], atol=1e-6, rtol=1e-5)
