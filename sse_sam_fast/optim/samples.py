"""Which samples each pass of a step sees: the axis between the two schedules.

- :class:`Exact`: every pass sees the whole micro-batch. One clean forward is
  shared by the groups' backwards (``retain_graph``); a group is a weighting of
  the batch's losses (its tail mask, on the device).
- :class:`Split`: each group's passes run on that group's samples only; the
  mask becomes sample indices on the host before any pass.

:class:`~.passes.StepRun` asks its schedule and never branches on it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .checks import SampleIndex, check_mask


def _accumulation(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


class Exact:
    """Every pass on the whole micro-batch."""

    split = False

    def prepare(self, run, mb, mask) -> None:
        """The clean forward runs here; the mask is checked against its losses.
        A step whose every group reuses its kept move has no clean pass and runs
        no clean forward, unless it needs the batch size before its first pass
        (micro-batches without a mask: the size comes with the first losses)."""
        if not run.plan.clean and (run.plan.masked or len(run.closures) == 1):
            if run.plan.masked:
                mb.mask = check_mask(mask, device=run.be.params[0].device, allow_empty=run.dist.lockstep)
            mb.size = mask.shape[0] if run.plan.masked else None
            return
        mb.losses = run.call(mb, None, None)
        mb.size = mb.losses.shape[0]
        if run.plan.masked:
            mb.mask = check_mask(mask, mb.losses)

    def tails(self, batches) -> list[int]:
        """The tail samples of each micro-batch, on the host (one synchronisation)."""
        return torch.stack([mb.mask.sum() for mb in batches]).tolist()

    def count(self, batches, members: str, total: int) -> Tensor:
        """The samples of ``members`` over the micro-batches, on the device."""
        tail = torch.stack([mb.mask.sum() for mb in batches]).sum()
        return tail if members == "tail" else total - tail

    def subset(self, mb, members: str) -> None:
        return None

    def weigh(self, w: Tensor, mb, members: str) -> None:
        """Zero the weights of the samples outside ``members``, in place (one launch;
        the weights are finite)."""
        if members == "tail":
            w.mul_(mb.mask)
        elif members == "head":
            w.masked_fill_(mb.mask, 0.0)

    def own(self, mb, members: str, losses: Tensor) -> Tensor:
        """The sum of the losses of ``members``' samples (in fp32 or wider: finite
        fp16 losses can sum past 65504)."""
        losses = losses.detach()
        if members != "all":  # a select, not a product: another sample's inf must not make a NaN
            losses = torch.where(mb.mask if members == "tail" else ~mb.mask, losses, 0.0)
        return losses.sum(dtype=_accumulation(losses.dtype))

    def clean(self, run, mb, groups) -> list[Tensor]:
        """Each group's backward from the shared forward; returns the losses' sum,
        over the samples of the groups that have a clean pass (a reused group's
        samples count at its perturbed weights, :meth:`own`)."""
        if mb.losses is None:  # no clean forward: every group reuses its kept move
            return []
        for i, g in enumerate(groups):
            run.backward(g, mb, mb.losses, retain=i + 1 < len(groups))
            run.be.accumulate(g.slot)
        losses, mb.losses = mb.losses.detach(), None  # frees the graph of a micro-batch no group used
        run.check("clean forward", losses)
        members = [g.members for g in groups] if run.plan.reused else ["all"]
        return [self.own(mb, m, losses) for m in members]


class Split(Exact):
    """Every pass of a group on the group's samples only."""

    split = True

    def prepare(self, run, mb, mask) -> None:
        mask = check_mask(mask, device=run.be.params[0].device, allow_empty=run.dist.lockstep)
        index = {"head": torch.nonzero(~mask).flatten(), "tail": torch.nonzero(mask).flatten()}
        if run.plan.corrected:  # reuse_policy="correction": one pass over the whole batch
            index["all"] = torch.arange(mask.shape[0], device=mask.device)
        mb.mask, mb.size = mask, mask.shape[0]
        mb.index = {k: SampleIndex.of(v, mask.shape[0]) for k, v in index.items()}

    def tails(self, batches) -> list[int]:
        return [mb.index["tail"].numel() for mb in batches]  # nonzero() brought them to the host

    def count(self, batches, members: str, total: int) -> int:
        return sum(mb.index[members].numel() for mb in batches)

    def subset(self, mb, members: str) -> Tensor:
        return mb.index[members]

    def weigh(self, w: Tensor, mb, members: str) -> None:
        """Nothing to zero: the pass saw the group's samples only."""

    def own(self, mb, members: str, losses: Tensor) -> Tensor:
        return super().own(mb, "all", losses)  # the pass saw the group's samples only

    def clean(self, run, mb, groups) -> list[Tensor]:
        """A forward and backward per group on its samples; returns their losses' sums."""
        sums = []
        for g in groups:
            idx = mb.index[g.members]
            losses = run.call(mb, idx, idx.numel())
            run.backward(g, mb, losses)
            run.be.accumulate(g.slot)
            run.check(f"clean {g.members}", losses.detach())
            sums.append(self.own(mb, g.members, losses))
        return sums
