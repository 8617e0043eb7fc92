"""Every backend and API against the published code as transcribed in
``sse_sam_fast.published`` (the ground truth, see ``sse_sam_fast.verify``)."""

import pytest
import torch

from sse_sam_fast.verify import Case, assert_close, compare, default_cases, run, run_published

CASES = default_cases((torch.float32, torch.bfloat16))
COMBOS = [("reference", "step"), ("reference", "official"), ("torch", "step"), ("torch", "official")]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("backend,api", COMBOS, ids=lambda v: str(v))
def test_matches_published_code(case, backend, api):
    expected = run_published(case)
    assert_close(run(case, backend, api), expected, case.dtype, f"{case.name} {backend}/{api}")


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("api", ["official", "step"])
def test_frozen_and_unused_parameters_are_left_alone(backend, api):
    case = Case(method="ssesam", frozen=True, unused=True)
    model, _ = case.build(backend)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model_after, opt = case.build(backend)
    from sse_sam_fast.verify import per_sample_losses, published_step

    for x, y, tail in case.batches():
        if api == "official":
            published_step(opt, model_after, x, y, tail, "ssesam")
        else:
            opt.step(lambda: per_sample_losses(model_after, x, y), tail)
    after = dict(model_after.named_parameters())
    frozen = "inner.0.weight"
    assert not after[frozen].requires_grad
    assert torch.equal(after[frozen], before[frozen])
    # no gradient ever reached it: weight decay and momentum must not touch it either
    assert torch.equal(after["unused.weight"], before["unused.weight"])
    assert not torch.equal(after["inner.2.weight"], before["inner.2.weight"])


def test_backends_really_differ_from_a_wrong_update():
    """The comparison is sharp enough to see a wrong radius (guards the tolerances)."""
    case = Case(method="ssesam")
    wrong = Case(method="ssesam", hparams={"tail_rho": 0.1101})
    assert not compare(run(wrong, "torch", "step"), run_published(case)).ok
