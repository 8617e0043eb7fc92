"""The step plan: which passes a step runs, on which samples, with which
radius and weight.

A method is a list of :class:`Group` s. A plan is built from them and the
schedule alone, host values only, so building it never waits for the device.
Dropping the groups that have no samples in the batch is a separate, explicit
step (:meth:`StepPlan.without`), the only one that needs counts.

Passes of a plan, in order (``F`` a forward, ``B`` a backward):

1. clean: every group's backward at ``w``. ``exact``: one shared forward per
   micro-batch and one backward per group (``retain_graph``); ``split``: a
   forward and backward per group on that group's samples only.
2. perturbed: for every group with ``rho > 0`` in turn, ``w = w0 + e_k`` and a
   forward and backward of that group (on the whole batch in ``exact``, on its
   own samples in ``split``).
3. the base step from the restored ``w`` with the perturbed groups' gradients
   plus the clean gradients of the groups with ``rho = 0``.

With ``reuse=K`` a perturbed group may take its move from the clean gradient
kept from an earlier step (:attr:`StepPlan.reused`): it then has no clean
pass, only its perturbed one. With ``reuse_policy="correction"`` a reusing
step (:attr:`StepPlan.corrected`) has one clean pass of all groups together
and adds the kept difference between the SAM and the clean gradient.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

from ..backends import Slot

SCHEDULES = ("exact", "split", "auto")  # the values of step(schedule=...)
REUSE_POLICIES = ("perturbation", "correction")  # what the steps between reuse=K's computing steps reuse

MEMBERS = ("all", "head", "tail")
# the backend slot holding each group's clean gradient between passes
_SLOTS = {members: Slot(i) for i, members in enumerate(MEMBERS)}
# the lasting slot holding each group's clean gradient kept for later steps (reuse=K)
KEPT = {members: Slot(len(MEMBERS) + i) for i, members in enumerate(MEMBERS)}
# the lasting slot of reuse_policy="correction": (SAM gradient - clean gradient) / ||clean gradient||
CORRECTION = Slot(2 * len(MEMBERS))


class Group(NamedTuple):
    """Group ``k`` of a method: the loss ``L_k = weight · Σ_{i∈members} l_i / B``
    is perturbed with radius ``rho`` (not at all when ``rho = 0``). With
    ``per_group`` the sum is divided by the group's own sample count over the
    step, ``max(n_k, 1)``, instead of ``B``: an empty group contributes nothing."""

    members: str  # "all" | "head" | "tail"
    weight: float
    rho: float
    per_group: bool = False

    @property
    def slot(self) -> Slot:
        return _SLOTS[self.members]

    @property
    def kept(self) -> Slot:
        return KEPT[self.members]


@dataclass(frozen=True)
class StepPlan:
    groups: tuple[Group, ...]
    split: bool  # each group's passes on its own samples (else every pass sees the batch)
    reused: frozenset[str] = frozenset()  # perturbed groups moved by their kept gradient
    keep: str = ""  # what the step keeps for later steps: "", "perturbations" or "correction"
    corrected: bool = False  # one clean pass of all groups plus the kept correction

    @property
    def masked(self) -> bool:
        """Whether the groups need a tail mask."""
        return any(g.members != "all" for g in self.groups)

    @property
    def perturbed(self) -> tuple[Group, ...]:
        return tuple(g for g in self.groups if g.rho > 0)

    @property
    def unperturbed(self) -> tuple[Group, ...]:
        """Groups whose clean gradient enters the update as it is."""
        return tuple(g for g in self.groups if g.rho == 0)

    @property
    def clean(self) -> tuple[Group, ...]:
        """Groups with a clean pass: all but the reused ones."""
        return tuple(g for g in self.groups if g.members not in self.reused)

    @property
    def fresh(self) -> tuple[Group, ...]:
        """Perturbed groups whose move comes from this step's clean gradient."""
        return tuple(g for g in self.perturbed if g.members not in self.reused)

    def source(self, g: Group) -> Slot:
        """The slot group ``g``'s move is formed from."""
        return g.kept if g.members in self.reused else g.slot

    def without(self, empty: Mapping[str, bool]) -> StepPlan:
        """The plan without the groups whose members are ``empty`` in this batch:
        an empty group gets no pass at all."""
        groups = tuple(g for g in self.groups if not empty.get(g.members, False))
        return StepPlan(groups, self.split, self.reused, self.keep, self.corrected)
