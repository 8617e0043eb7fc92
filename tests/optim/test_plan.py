"""The step plan: built from host values, pruned by counts only on request."""

import torch

from sse_sam_fast import SAM, SSESAM, ImbSAM
from sse_sam_fast.optim.plan import Group, StepPlan


def _groups(opt):
    return tuple(opt._groups())


def _opt(cls, *args):
    m = torch.nn.Linear(3, 2)
    return cls(torch.optim.SGD(m.parameters(), lr=0.1), m, *args, backend="reference")


def test_methods_are_group_configurations():
    assert _groups(_opt(SAM, 0.07)) == (Group("all", 1.0, 0.07),)
    assert _groups(_opt(ImbSAM, 0.07)) == (Group("head", 1.0, 0.0), Group("tail", 2.0, 0.07))
    sse = _opt(SSESAM, 0.05, 0.1, 0.5, 2)
    assert _groups(sse) == (Group("head", 1.0, 0.05), Group("tail", 1.0, 0.1))
    sse.update_rho()
    assert _groups(sse) == (Group("head", 1.0, 0.0), Group("tail", 1.0, 0.1))


def test_perturbed_and_unperturbed_groups():
    plan = StepPlan((Group("head", 1.0, 0.0), Group("tail", 2.0, 0.1)), split=False)
    assert plan.masked
    assert plan.perturbed == (Group("tail", 2.0, 0.1),)
    assert plan.unperturbed == (Group("head", 1.0, 0.0),)
    assert not StepPlan((Group("all", 1.0, 0.1),), split=False).masked


def test_without_drops_only_empty_members():
    plan = StepPlan((Group("head", 1.0, 0.05), Group("tail", 1.0, 0.1)), split=True)
    assert plan.without({"all": False, "head": False, "tail": True}).groups == (Group("head", 1.0, 0.05),)
    assert plan.without({"all": False, "head": False, "tail": False}) == plan
    assert plan.without({"all": True, "head": True, "tail": True}).groups == ()


def test_groups_have_distinct_slots():
    assert len({Group(m, 1.0, 0.0).slot for m in ("all", "head", "tail")}) == 3
