"""pytest-benchmark suites: `make bench` (or `pytest benchmarks`); not part of
the default test run. Inputs come from sse_sam_fast.verify.Case, the cases the
parity tests verify, so what is timed is what is tested."""

import pytest
import torch

from sse_sam_fast.verify import Case, per_sample_losses, published_step

pytest.importorskip("pytest_benchmark")

CASES = {
    "ssesam-bn_cnn": Case(method="ssesam", model="bn_cnn", batch=64),
    "imbsam-mlp": Case(method="imbsam", model="mlp", batch=256),
}


HOWS = ["published", "exact/reference", "exact/torch"]
# split changes BatchNorm's batch statistics: timed only where it is the same update
COMBOS = [(n, h) for n in CASES for h in HOWS] + [("imbsam-mlp", "split/torch")]


@pytest.mark.parametrize("name,how", COMBOS)
def test_whole_step(benchmark, name, how):
    case = CASES[name]
    schedule, backend = how.split("/") if "/" in how else ("official", "reference")
    model, opt = case.build(backend)
    x, y, tail = next(case.batches())

    def closure(idx=None):
        return per_sample_losses(model, x, y) if idx is None else per_sample_losses(model, x[idx], y[idx])

    if schedule == "official":
        benchmark(published_step, opt, model, x, y, tail, case.method)
    else:
        benchmark(opt.step, closure, tail, schedule=schedule)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_optimizer_side_resnet32(benchmark, backend):
    """The optimizer side of a stage-1 step alone (see bench.optimizer_side)."""
    from sse_sam_fast.bench import optimizer_side
    from sse_sam_fast.train.models import resnet32

    model = resnet32(100)
    benchmark.pedantic(
        optimizer_side,
        args=(model, torch.device("cpu"), [backend]),
        kwargs={"steps": 3, "warmup": 1},
        rounds=3,
    )
