"""The pass runners: one call of ``step()`` carrying out a :class:`StepPlan`
over one or more micro-batches.

A step ends on a host or a device verdict (:mod:`.verdict`). With a device
verdict (sync-free) empty groups are not dropped from the plan (that needs
counts on the host): they run with a zero gradient, and the ``1e-16`` in the
norm makes their perturbation exactly zero. Processes are the distribution
strategy's business (:mod:`.distribution`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .. import _torch_private
from .._saved import Saved
from ..backends import Ending, Perturbation
from . import batchnorm
from .checks import check_losses
from .plan import CORRECTION, Group, StepPlan
from .samples import Exact, Split
from .verdict import Verdict

_WHOLE = Exact()  # the weighing of a pass over the whole batch, whatever the schedule


@dataclass
class MicroBatch:
    closure: Callable[..., Tensor]
    mask: Tensor | None
    size: int | None  # None: known from the first losses (a step without clean forward)
    losses: Tensor | None = None  # exact: the clean forward, dropped once its backwards ran
    index: dict[str, Tensor] | None = None  # split: the sample indices of head and tail
    counts: dict[str, int] = field(default_factory=dict)  # samples of each group's members
    weights: dict[tuple, Tensor] = field(default_factory=dict)  # see StepRun._weights


class StepRun:
    """One ``step()``: the clean passes, the perturbed passes, the non-finite
    verdict and the base step, through the optimizer's backend."""

    def __init__(self, opt, plan: StepPlan, closures: Sequence[Callable], masks: Sequence, scaler):
        self.opt, self.be, self.dist, self.scaler = opt, opt._backend, opt._dist, scaler
        self.samples = Split() if plan.split else Exact()  # which samples each pass sees
        # split needs the sample indices on the host anyway, a scaler reads its own
        # verdict, nonfinite="raise" must know before it returns, and a step keeping
        # its clean gradients for later steps (reuse=K) keeps only finite ones
        on_host = plan.split or scaler is not None or opt.nonfinite == "raise" or plan.keep
        self.sync_free = opt._sync_free() and not on_host
        self.verdict = Verdict(on_device=self.sync_free)
        self.grads_before: list | None = None  # p.grad before the first closure: (g, version, copy)
        self.closure_backward = False  # the closure called backward() itself
        self.normalisers: dict[str, int | Tensor] = {}  # per-group normalisers, once per step
        self.plan, self.closures, self.masks = plan, closures, masks
        self.sums: list[Tensor] = []  # the step's loss, summed per pass (see _loss)

    # ---- before any backward -------------------------------------------------------
    def call(self, mb: MicroBatch, idx: Tensor | None, n: int | None) -> Tensor:
        first = self.grads_before is None
        if first:  # a closure that calls backward() does so at every call: the first tells
            grads = [p.grad for p in self.be.params]  # None after every step; a copy only of stray ones
            self.grads_before = [
                (g, None, None) if g is None else (g, _torch_private.version(g), g.detach().clone())
                for g in grads
            ]
        with torch.enable_grad():  # step() may run under no_grad, as torch.optim's do
            losses = mb.closure() if idx is None else mb.closure(idx)
        if first and any(
            p.grad is not g or (g is not None and _torch_private.version(g) != version)
            for p, (g, version, _) in zip(self.be.params, self.grads_before)
        ):
            self.closure_backward = True
            raise ValueError(
                "the closure called backward() (the gradients changed while it ran): in "
                "opt.step(closure, tail_mask) the closure returns the per-sample losses, shape (B,), "
                "and the optimizer runs every backward itself; nothing was changed"
            )
        losses = check_losses(losses, n, allow_empty=self.dist.lockstep)
        self.loss_dtype = losses.dtype  # the dtype step() returns its loss in
        return losses

    def _prepare(self, closure, mask) -> MicroBatch:
        """exact: the clean forward runs here; split: the mask gives each group's samples."""
        mb = MicroBatch(closure, None, 0)
        self.samples.prepare(self, mb, mask)
        return mb

    def _empty(self, plan: StepPlan) -> dict[str, bool]:
        """Which members have no sample in the step. Reads the tail counts on the
        host: one synchronisation for all micro-batches. Under DDP the global
        counts decide, so that every process runs the same passes and collectives."""
        for mb in self.batches:
            if mb.size is not None:  # else one micro-batch, checked by its first pass
                mb.counts["all"] = mb.size
        if plan.masked:
            for mb, t in zip(self.batches, self.samples.tails(self.batches)):
                mb.counts.update(tail=t, head=mb.size - t)
        keys = sorted(self.batches[0].counts)
        if not keys:
            return {}
        totals = self.dist.totals([sum(mb.counts[k] for mb in self.batches) for k in keys])
        return {k: total == 0 for k, total in zip(keys, totals)}

    @property
    def total(self) -> int:
        """The samples of the step's micro-batches (known once every one has losses)."""
        return sum(mb.size for mb in self.batches)

    def _runs(self, g: Group, mb: MicroBatch) -> bool:
        # a micro-batch without samples of the group skips its pass, but under DDP
        # the forwards must match across processes (buffer broadcasts); a batch
        # whose size its first pass tells (no count) runs it
        return self.sync_free or self.dist.lockstep or mb.counts.get(g.members, 1) > 0

    def check(self, name: str, value: Tensor) -> None:
        self.verdict.check(name, value)

    def _count(self, g: Group) -> int | Tensor:
        """The normaliser of group ``g``'s loss: ``B``, or with ``per_group`` the
        group's samples over every micro-batch of the step, ``max(n_k, 1)`` (an
        empty group then weighs nothing). ``exact`` counts on the device, without
        a synchronisation; ``split`` has the counts on the host already. Under DDP
        the global count divided by the world size, so that the averaged gradient
        is the mean over the group's samples of every process: shards of unequal
        sizes, one of them empty, step as one process on their union."""
        if not g.per_group and not self.dist.lockstep:
            return self.total
        key = g.members if g.per_group else "batch"
        if key not in self.normalisers:
            if key in ("all", "batch"):
                n = self.total
            else:
                n = self.samples.count(self.batches, g.members, self.total)
            self.normalisers[key] = self.dist.normaliser(n)
        return self.normalisers[key]

    def _weights(self, g: Group, mb: MicroBatch, losses: Tensor, whole: bool = False) -> Tensor:
        """``d L_k / d l_i``: ``c_k / n_k`` for the samples of group ``k`` (``n_k = B``,
        or the group's count), 0 for the others. Made once per step for the clean
        and the perturbed pass of a group (a few launches each). ``whole``: the
        losses are the whole batch's, whatever the schedule."""
        key = (g, losses.shape, losses.dtype, whole)
        w = mb.weights.get(key)
        if w is None:
            n = self._count(g)
            if isinstance(n, Tensor):
                w = torch.ones_like(losses, requires_grad=False).mul_((g.weight / n).to(losses))
            else:
                w = torch.full_like(losses, g.weight / n, requires_grad=False)
            (_WHOLE if whole else self.samples).weigh(w, mb, g.members)
            mb.weights[key] = w
        return w

    def backward(self, g: Group, mb: MicroBatch, losses: Tensor, retain: bool = False) -> None:
        with torch.enable_grad():
            out = torch.dot(losses, self._weights(g, mb, losses))
            (out if self.scaler is None else self.scaler.scale(out)).backward(retain_graph=retain)

    # ---- the step ------------------------------------------------------------------------
    def run(self) -> Tensor:
        """The step; returns the mean loss at ``w``. Any exception leaves the
        weights and BatchNorm statistics bit-identical and the gradients zero."""
        be = self.be
        self.batchnorms = self.opt._batchnorms  # one walk over the modules per step
        stats = self.opt._stats
        stats.save(batchnorm.running_stats(self.batchnorms))  # before the first forward
        try:
            plan = self.plan
            self.batches = [self._prepare(c, m) for c, m in zip(self.closures, self.masks)]
            # a corrected step weighs an empty group's samples by 0 in its one pass: no counts needed
            skip_counts = self.sync_free or plan.corrected
            self.plan = plan if skip_counts else plan.without(self._empty(plan))
            be.begin()
            loss = self._passes()
            ok = self.dist.agree(self.verdict.ok())  # one verdict for every process
            if ok is not None and not self.sync_free:
                if self.verdict.settle(self.opt, ok, lambda: (be.abort(), stats.restore()), self.scaler):
                    return loss
                ok = None
            if self.plan.keep:  # the verdict was read: these gradients are finite
                self._keep()
        except BaseException:
            be.abort()
            stats.restore()
            if self.closure_backward:  # the gradients as the caller left them
                for p, (_, _, copy) in zip(be.params, self.grads_before):
                    p.grad = copy
            raise
        try:
            self._finish(ok, stats)
        except BaseException:  # the base step raised: the backend reset itself
            stats.restore()
            raise
        return loss

    def _keep(self) -> None:
        """Keep what the next steps reuse (``reuse=K``)."""
        plan, be = self.plan, self.be
        if plan.keep == "perturbations":
            for g in plan.fresh:
                be.keep(g.slot, g.kept)
        elif plan.perturbed:  # "correction": without a perturbed pass there is nothing to correct
            be.keep_difference(CORRECTION, [g.slot for g in plan.perturbed], [g.slot for g in plan.groups])
            self.opt._kept_groups = tuple(self.opt._groups())  # d holds for these radii only

    def _passes(self) -> Tensor:
        if self.plan.corrected:
            return self._corrected_pass()
        self._clean_passes()
        moves = self._perturbations()
        for g in self.plan.perturbed:
            self._perturbed_pass(g, moves[g])
        self._reduce_final()
        self._check_sum()
        return self._loss()

    def _corrected_pass(self) -> Tensor:
        """``reuse_policy="correction"``, a reusing step: one clean pass of the
        groups' summed loss over each micro-batch (a forward and a backward over
        the batch, BatchNorm as in SGD), then ``live += ||live|| · d`` with the
        kept ``d = (SAM gradient - clean gradient) / ||clean gradient||``."""
        for mb in self.batches:
            losses, mb.losses = mb.losses, None
            if losses is None:  # split: the clean forward is this pass
                losses = self.call(mb, self.samples.subset(mb, "all"), mb.size)
            weights = [
                self._weights(g, mb, losses, whole=True) for g in self.plan.groups if self._runs(g, mb)
            ]
            with torch.enable_grad():
                torch.dot(losses, sum(weights[1:], weights[0])).backward()
            self.check("clean forward", losses.detach())
            self.sums.append(_WHOLE.own(mb, "all", losses))
        self._reduce_final()
        norm = self.be.live_norm()
        if norm is not None:
            self.check("clean gradient", norm)
            self.be.add(CORRECTION, scale=norm)
        return self._loss()

    def _clean_passes(self) -> None:
        for mb in self.batches:
            self.sums += self.samples.clean(self, mb, [g for g in self.plan.clean if self._runs(g, mb)])

    def _loss(self) -> Tensor:
        """The mean over the batch of each sample's loss where its group's first
        pass took it: at ``w``, or at ``w + e_k`` for a group reusing its move.
        Summed per pass, then together (no 0.0 + tensor launch); a fp16 sum of
        finite losses can overflow: summed in fp32, returned in the losses' dtype."""
        sums = self.sums
        return (sum(sums[1:], sums[0]) / self.total).to(self.loss_dtype)

    def _perturbations(self) -> dict[Group, Perturbation]:
        """Every group's norm (checked for finiteness) and the moves of the perturbed ones."""
        be, plan = self.be, self.plan
        if self.scaler is not None and plan.fresh:  # kept gradients were kept unscaled
            be.unscale([g.slot for g in plan.fresh], _torch_private.inverse_scale(self.scaler))
        if not self.opt.local_perturbation:
            self.dist.average(be, [g.slot for g in plan.clean], False)
        moves = be.perturbations([(plan.source(g), g.rho) for g in plan.groups], self.opt._adaptive())
        for g, move in zip(plan.groups, moves):
            # under a scaler an inf gradient is the scaler's to handle (skip and back off)
            if move.norm is not None and self.scaler is None:
                self.check(f"clean {g.members} gradient", move.norm)
        return dict(zip(plan.groups, moves))

    def _perturbed_pass(self, g: Group, move: Perturbation) -> None:
        self.be.perturb(move)
        with batchnorm.frozen(self.batchnorms, self.opt.bn_stats):
            for mb in self.batches:
                if not self._runs(g, mb):
                    continue
                idx = self.samples.subset(mb, g.members)
                losses = self.call(mb, idx, mb.size if idx is None else idx.numel())
                if mb.size is None:
                    mb.size = losses.shape[0]
                self.backward(g, mb, losses)
                self.check(f"perturbed {g.members}", self._unless_overflowed(losses.detach(), move))
                if g.members in self.plan.reused:  # no clean pass gave these samples' losses
                    self.sums.append(self.samples.own(mb, g.members, losses))
        norm = self.be.live_norm() if self.scaler is None else None
        if norm is not None:
            self.check(f"perturbed {g.members} gradient", norm)

    def _unless_overflowed(self, losses: Tensor, move: Perturbation) -> Tensor:
        """Under a scaler, a perturbed pass after a clean gradient that overflowed
        (the scaled gradient, so its norm, inf: the move was not finite) is the
        scaler's to handle: it backs off and skips, as in plain AMP. Only then
        are the pass's losses not checked; a NaN loss at a finite move is."""
        if self.scaler is None or move.norm is None:
            return losses
        return torch.where(torch.isfinite(move.norm).to(losses.device), losses, 0.0)

    def _reduce_final(self) -> None:
        """Under DDP, average the final gradient: the live rows, and the
        unperturbed groups' rows that finish() adds to them (already averaged
        before the perturbation unless perturbing locally)."""
        local = [g.slot for g in self.plan.unperturbed] if self.opt.local_perturbation else []
        self.dist.average(self.be, local, True)

    def _check_sum(self) -> None:
        """fp16 only: the base step's gradient adds the unperturbed groups' clean
        gradients to the perturbed ones, and two finite fp16 gradients can sum
        past 65504. (A scaler's step finds that inf itself; bf16 and fp32 cannot
        overflow there.)"""
        add = [g.slot for g in self.plan.unperturbed]
        if add and self.scaler is None and any(p.dtype == torch.float16 for p in self.be.params):
            norm = self.be.live_norm(add)
            if norm is not None:
                self.check("final gradient", norm)

    # ---- the base step -------------------------------------------------------------------
    def _finish(self, ok: Tensor | None, stats: Saved) -> None:
        """The base step; with a device verdict ``ok``, everything it changed is
        selected back on the device where ``ok`` is false."""
        add = () if self.plan.corrected else tuple(g.slot for g in self.plan.unperturbed)
        self.be.finish(Ending(add, scaler=self.scaler, ok=ok, max_norm=self.opt.max_grad_norm))
        if self.scaler is not None and _torch_private.scaler_skipped(self.scaler, self.opt.optimizer):
            stats.restore()  # an overflowed fp16 step: the scaler kept weights and state, we keep these
            if self.plan.keep:  # the kept gradients may be the inf ones: the next step computes anew
                for g in self.plan.fresh:  # (reuse_policy="correction" takes no scaler)
                    self.be.discard(g.kept)
        if ok is not None:
            stats.keep_if(ok)
            self.opt._count_skipped(~ok)
