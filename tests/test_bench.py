"""bench.py is a user of the library: it times the public official methods on
planted gradients and never reaches into an optimizer's private state."""

import inspect
import math
import os
import re

import pytest
import torch

import sse_sam_fast.bench as bench
from sse_sam_fast import SSESAM
from sse_sam_fast.backends import triton_available
from sse_sam_fast.verify import assert_close, tolerance_key

CPU = torch.device("cpu")
# triton runs on CPU tensors only through the interpreter (conftest.py sets it)
BACKENDS = ["reference", "torch"] + (
    ["triton"] if triton_available() and os.environ.get("TRITON_INTERPRET") == "1" else []
)


def tiny():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def test_bench_uses_no_private_optimizer_state():
    source = inspect.getsource(bench)
    assert "._backend" not in source
    assert not re.search(r"\bopt\._", source), "bench reaches into a private attribute of the optimizer"


def test_optimizer_side_reports_every_backend():
    model = tiny()
    res = bench.optimizer_side(model, CPU, BACKENDS, steps=2, warmup=1)
    assert list(res) == BACKENDS
    n = sum(p.numel() for p in model.parameters())
    for backend, r in res.items():
        assert set(r) == {"median_s", "p20_s", "p80_s", "bytes", "gbps"}
        for key, value in r.items():
            assert math.isfinite(value) and value > 0, f"{backend} {key} = {value}"
        assert r["p20_s"] <= r["median_s"] <= r["p80_s"]
        assert r["bytes"] == bench.PASSES_STAGE1[backend] * n * 4


@pytest.mark.parametrize("backend", BACKENDS)
def test_planted_step_is_seen_as_a_real_backward(backend):
    """The planted gradients do not depend on the weights, so the step's update is
    the base SGD step with the sum of the two perturbed gradients: a backend that
    missed a planted gradient (a flat backend's hook not called) would skip it."""
    model, ref = tiny(), tiny()
    hp = dict(lr=0.1, momentum=0.9, weight_decay=1e-3)
    opt = SSESAM(torch.optim.SGD(model.parameters(), **hp), model, 0.05, 0.1, backend=backend)
    sgd = torch.optim.SGD(ref.parameters(), **hp)
    params, ref_params = list(model.parameters()), list(ref.parameters())
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        grads = [[torch.randn(p.shape, generator=gen) for p in params] for _ in range(4)]
        assert bench._official_step(opt, params, grads, CPU) > 0
        for p, g1, g3 in zip(ref_params, grads[1], grads[3]):
            p.grad = g1 + g3
        sgd.step()
        assert all(p.grad is None or not p.grad.any() for p in params), "update() leaves zero grads"
    key = tolerance_key(torch.float32, backend)
    assert_close(params, ref_params, key, f"{backend} after 3 planted steps")


# ---- whole steps -----------------------------------------------------------------------------
def tiny_bn(num_classes=5):
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Flatten(),
        torch.nn.Linear(3 * 32 * 32, 8),
        torch.nn.BatchNorm1d(8),
        torch.nn.ReLU(),
        torch.nn.Linear(8, num_classes),
    )


def inputs(device="cpu", b=12):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(b, 3, 32, 32, generator=g), torch.randint(0, 5, (b,), generator=g)
    tail = torch.arange(b) % 4 == 0
    return x.to(device), y.to(device), tail.to(device)


@pytest.mark.parametrize("method, stage", [("ssesam", 1), ("ssesam", 2), ("sam", 1), ("imbsam", 1)])
def test_whole_step_rows_on_cpu(method, stage):
    schedules = ("exact/torch", "captured/torch")
    res = bench.whole_step(tiny_bn(), *inputs(), stage, 2, 1, schedules, method=method)
    assert list(res) == ["sgd", "sgd-graph", "published", *schedules]
    assert set(res["sgd-graph"].values()) == {None}  # n/a: CUDA graphs need a GPU
    for name in ["sgd", "published", *schedules]:
        r = res[name]
        assert r["p20_s"] <= r["median_s"] <= r["p80_s"] and r["x_sgd"] > 0 and r["x_published"] > 0
        assert r["x_sgd_graph"] is None
    assert res["sgd"]["x_sgd"] == 1.0 and res["published"]["x_published"] == 1.0
    assert res["captured/torch"]["graphed"] is False  # a CPU runs the captured step eagerly
    assert res["exact/torch"]["graphed"] is None
    text = bench.report(res, gpu=False)
    assert "(CUDA only)" in text and "captured/* ran eagerly" in text
    # the medians beside the ratios, on a CPU too (peak memory is CUDA's)
    assert "median ms (p20–p80)" in text and "peak MB" not in text
    row = next(line for line in text.splitlines() if line.startswith("published"))
    assert row.endswith(
        f"{res['published']['median_s'] * 1e3:.2f} ({res['published']['p20_s'] * 1e3:.2f}–"
        f"{res['published']['p80_s'] * 1e3:.2f})"
    )


def test_whole_step_times_each_method_through_its_own_step(monkeypatch):
    """The published row drives the method it names: SAM's official loop, not SSE-SAM's."""
    seen = []
    original = bench.published_step
    monkeypatch.setattr(bench, "published_step", lambda *a: seen.append(a[-1]) or original(*a))
    bench.whole_step(tiny_bn(), *inputs(), 1, 1, 0, ("exact/torch",), method="sam")
    assert seen == ["sam"]


@pytest.mark.parametrize(
    "quick, methods, cases",
    [
        (True, None, ["m stage 1", "m stage 2"]),
        (False, None, ["m stage 1", "m stage 2", "m sam", "m imbsam"]),
        (True, ["imbsam"], ["m imbsam"]),
    ],
)
def test_whole_step_tables_follow_quick_and_methods(monkeypatch, quick, methods, cases):
    from types import SimpleNamespace

    monkeypatch.setitem(bench.MODELS, "m", tiny_bn)
    monkeypatch.setattr(bench, "whole_step", lambda *a, **kw: {})  # the tables, not the timing
    args = SimpleNamespace(batch=4, tail_frac=0.25, steps=1, warmup=0, quick=quick, methods=methods)
    done = []
    bench._whole_steps(args, ["m"], ["torch"], CPU, lambda key, rows: done.append(key))
    assert done == cases


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graphed_sgd_is_the_eager_sgd_step():
    """The captured-SGD row times what an eager SGD step does: same weights after
    the warm-up and three replays as after six eager steps."""
    x, y, _ = inputs("cuda")
    graphed, eager = tiny_bn().cuda(), tiny_bn().cuda()
    hp = dict(lr=0.1, momentum=0.9, weight_decay=1e-3)
    step = bench._graphed_sgd(graphed, torch.optim.SGD(graphed.parameters(), **hp), x, y)
    for _ in range(3):
        step()
    sgd = torch.optim.SGD(eager.parameters(), **hp)
    for _ in range(6):
        sgd.zero_grad()
        bench.per_sample_losses(eager, x, y).mean().backward()
        sgd.step()
    assert_close(list(graphed.state_dict().values()), list(eager.state_dict().values()), torch.float32, "sgd")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_whole_step_rows_replay_graphs():
    if not triton_available():
        pytest.skip("graphs are captured with the triton backend")
    schedules = ("exact/triton", "captured/triton")
    res = bench.whole_step(tiny_bn().cuda(), *inputs("cuda"), 1, 3, 1, schedules)
    assert res["sgd-graph"]["median_s"] > 0 and res["exact/triton"]["x_sgd_graph"] > 0
    assert res["captured/triton"]["graphed"] is True


# ---- the GPU check script -------------------------------------------------------------------
def test_gpu_check_fits_ten_minutes_and_eight_files():
    """One device run of at most 10 minutes: the steps' limits add up to less, and
    what it leaves under $OUT is at most 8 files, none in a folder."""
    import pathlib
    import subprocess

    script = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    limits = [int(n) for n in re.findall(r"^\s*step \w+ (\d+) ", text, re.M)]
    env = [int(n) for n in re.findall(r"timeout (\d+) ", text)]
    grace = 5 * len(limits)  # timeout -k 5: a step that ignores SIGTERM is killed 5 s later
    assert len(limits) == 6 and sum(limits) + sum(env) + grace <= 600, (limits, env)
    logs = set(re.findall(r"^\s*step (\w+) ", text, re.M)) | {"summary"}
    merged = set(re.findall(r'rm -f "\$OUT/(\w+)\.txt"', text))  # appended to summary.txt at the end
    assert merged <= logs - {"summary"}
    assert len(logs - merged) + len({"bench.json", "bench.png"}) <= 8
