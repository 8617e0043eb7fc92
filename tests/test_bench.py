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
