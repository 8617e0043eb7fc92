"""The triton backend against the published code (sse_sam_fast.published): through Triton's interpreter
on CPU tensors here, compiled on CUDA where a GPU is present."""

import copy

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from sse_sam_fast import SAM, SSESAM  # noqa: E402
from sse_sam_fast.backends import resolve_backend  # noqa: E402
from sse_sam_fast.verify import Case, assert_close, default_cases, run, run_published, tolerance_key  # noqa: E402

CASES = (
    default_cases((torch.float32,))
    + [Case(method=m, model="mlp", dtype=torch.bfloat16) for m in ("sam", "imbsam", "ssesam")]
    + [Case(method="ssesam", model="bn_cnn", dtype=torch.bfloat16)]
)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("api", ["step", "official"])
def test_triton_matches_published_code(case, api):
    expected = run_published(case)
    key = tolerance_key(case.dtype, "triton")
    assert_close(run(case, "triton", api), expected, key, f"{case.name} triton/{api}")


def test_fused_sgd_path_is_taken_and_momentum_lives_in_the_flat_buffer():
    case = Case(method="ssesam")
    model, opt = case.build("triton")
    x, y, tail = next(case.batches())
    opt.step(lambda: F.cross_entropy(model(x), y, reduction="none"), tail)
    be = opt._backend
    flat = be._momentum[0]
    assert flat is not None and flat.any()
    for p in model.parameters():
        buf = opt.optimizer.state[p]["momentum_buffer"]
        assert flat.data_ptr() <= buf.data_ptr() < flat.data_ptr() + flat.numel() * flat.element_size()


def test_momentum_loaded_from_a_state_dict_is_adopted():
    case = Case(method="sam", steps=4)
    batches = list(case.batches())
    model, opt = case.build("triton")
    for x, y, tail in batches:
        opt.step(lambda: F.cross_entropy(model(x), y, reduction="none"), tail)
    expected = [p.detach().clone() for p in model.parameters()]
    model, opt = case.build("triton")
    for x, y, tail in batches[:2]:
        opt.step(lambda: F.cross_entropy(model(x), y, reduction="none"), tail)
    saved = {"model": model.state_dict(), "opt": opt.state_dict()}
    fresh, opt2 = case.build("triton")
    fresh.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    for x, y, tail in batches[2:]:
        opt2.step(lambda: F.cross_entropy(fresh(x), y, reduction="none"), tail)
    for a, b in zip(fresh.parameters(), expected):
        assert torch.equal(a, b)


def test_non_sgd_base_and_hooks_fall_back_to_the_base_step():
    for case in (Case(method="imbsam", base="adam", steps=2), Case(method="sam", steps=2)):
        model, opt = case.build("triton")
        calls = []
        opt.optimizer.register_step_post_hook(lambda *a: calls.append(1))
        for x, y, tail in case.batches():
            opt.step(lambda: F.cross_entropy(model(x), y, reduction="none"), tail)
        assert len(calls) == 2  # the base optimizer's own step() ran


def test_auto_dispatch():
    cpu = [torch.zeros(1)]
    assert resolve_backend("auto", cpu) == "torch"
    if torch.cuda.is_available():
        assert resolve_backend("auto", [torch.zeros(1, device="cuda")]) == "triton"


def test_triton_on_cpu_without_the_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="CUDA"):
        SAM(torch.optim.SGD(model.parameters(), lr=0.1), model, backend="triton")


def test_missing_triton_is_a_clear_error(monkeypatch):
    import sse_sam_fast.backends as backends

    monkeypatch.setattr(backends, "triton_available", lambda: False)
    model = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="needs Triton"):
        SSESAM(torch.optim.SGD(model.parameters(), lr=0.1), model, 0.05, 0.1, backend="triton")
    assert resolve_backend("auto", list(model.parameters())) == "torch"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", default_cases((torch.float32,)), ids=lambda c: c.name)
def test_cuda_triton_matches_published_code_on_cpu(case):
    expected = run_published(case)
    assert_close(run(case, "triton", "step", device="cuda"), expected, torch.float32, f"cuda {case.name}")


def test_momentum_restarts_after_the_base_state_is_emptied():
    """Loading a state_dict saved before any step empties optimizer.state; the next
    fused step must start the momentum again and register it."""
    results = []
    for backend in ("reference", "triton"):
        case = Case(method="sam", steps=4)
        model, opt = case.build(backend)
        fresh = copy.deepcopy(opt.state_dict())
        for i, (x, y, tail) in enumerate(case.batches()):
            opt.step(lambda: F.cross_entropy(model(x), y, reduction="none"), tail)
            if i == 0:
                opt.load_state_dict(fresh)
        assert all("momentum_buffer" in opt.optimizer.state[p] for p in model.parameters())
        results.append([p.detach().clone() for p in model.parameters()])
    assert_close(results[1], results[0], torch.float32, "after emptied state")


def test_launch_arguments_are_checked_once_per_layout(monkeypatch):
    """Per-step host work: the launchers validate a buffer layout on its first
    launch and trust it afterwards; a new layout is validated again."""
    import sse_sam_fast.kernels._checks as checks
    import sse_sam_fast.kernels.perturb as perturb
    import sse_sam_fast.kernels.update as update

    calls = []
    real = checks._check_bucket
    for module in (perturb, checks):
        monkeypatch.setattr(module, "_check_bucket", lambda w, g: (calls.append(1), real(w, g))[1])
    case = Case(method="ssesam", steps=6)
    model, opt = case.build("triton")
    x, y, tail = next(iter(case.batches()))
    step = lambda: opt.step(lambda: F.cross_entropy(model(x), y, reduction="none"), tail)
    step()  # first step: the generic update path creates the momentum buffers
    step()  # first fused step: perturb and restore_sgd check their arguments
    first = len(calls)
    assert first > 0
    for _ in range(3):
        step()
    assert len(calls) == first
    next(model.parameters()).data = next(model.parameters()).data.clone()  # a new layout
    step()
    assert len(calls) > first
    assert update._check_restore_sgd is checks._check_restore_sgd


def test_auto_never_picks_triton_for_float64(monkeypatch):
    """float64 is refused by the triton backend at construction; auto must not pick it."""

    class FakeCuda:
        device = torch.device("cuda")
        data = torch.empty(0)  # a plain tensor's storage, not a DTensor shard

    fp64, fp32 = FakeCuda(), FakeCuda()
    fp64.dtype, fp32.dtype = torch.float64, torch.float32
    assert resolve_backend("auto", [fp32]) == "triton"
    assert resolve_backend("auto", [fp32, fp64]) == "torch"


def test_the_fused_update_follows_param_group_changes_between_steps():
    """The fused update's view of the param groups is kept from step to step;
    turning momentum off in a group, or moving a parameter to another group,
    must be seen at the next step, as torch's own step sees it."""
    from torch import nn

    def run(backend):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
        first, last = list(model[0].parameters()), list(model[2].parameters())
        base = torch.optim.SGD(
            [{"params": first}, {"params": last, "lr": 0.05, "momentum": 0.5}], lr=0.1, momentum=0.9
        )
        opt = SAM(base, model, 0.1, backend=backend)
        g = torch.Generator().manual_seed(1)
        fused = []
        for i in range(7):
            x, y = torch.randn(10, 5, generator=g), torch.randint(0, 3, (10,), generator=g)
            if i == 3:
                base.param_groups[1]["momentum"] = 0.0
            if i == 5:  # the first layer's bias moves to the second group
                bias = base.param_groups[0]["params"].pop()
                base.param_groups[1]["params"].append(bias)
            opt.step(lambda: F.cross_entropy(model(x), y, reduction="none"))
            fused.append(opt._backend.fused_last if backend == "triton" else None)
        return [p.detach().clone() for p in model.parameters()], fused

    (triton, fused), (torch_, _) = run("triton"), run("torch")
    assert fused[2:] == [True] * 5  # the first step creates the momentum buffers
    assert_close(triton, torch_, torch.float32, "param groups changed")


@pytest.mark.parametrize("sync_free", [False, True])
def test_sgd_without_momentum_takes_the_fused_update_from_the_first_step(sync_free):
    """No momentum buffer to create: even a step taken back on the device (the
    sync-free path, and every captured SGD step) is fused from the start."""
    from torch import nn

    def run(backend):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
        opt = SAM(torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=1e-3), model, 0.1, backend=backend)
        opt._force_sync_free = sync_free
        g = torch.Generator().manual_seed(1)
        fused = []
        for _ in range(3):
            x, y = torch.randn(10, 5, generator=g), torch.randint(0, 3, (10,), generator=g)
            opt.step(lambda: F.cross_entropy(model(x), y, reduction="none"))
            fused.append(opt._backend.fused_last)
        return [p.detach().clone() for p in model.parameters()], fused

    (triton, fused), (torch_, _) = run("triton"), run("torch")
    assert fused == [True] * 3
    assert_close(triton, torch_, torch.float32, "plain SGD")
