"""The specification backend: a literal per-parameter loop."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .base import (
    EPS,
    Adaptive,
    Backend,
    Ending,
    Perturbation,
    Radius,
    Slot,
    clip_coefficient,
    local,
    per_group,
)


class ReferenceBackend(Backend):
    """A per-parameter loop in the manner of the published code (clone per
    parameter, ``torch.norm`` of per-parameter norms, ``eps = g·s`` then
    ``p.add_(eps)`` / ``p.sub_(eps)``). Never fast.

    FSDP2's shards (DTensors) are moved in place, shard by shard; each norm is
    the norm of the local per-parameter norms, made global by one all-reduce of
    the squares for all of a call's norms (:meth:`Backend._global`).

    The official methods restore by subtraction, as the published code does.
    Within ``step()`` it keeps a copy of the weights and restores from it, so
    that a step abandoned half-way (an exception, a non-finite value, a skipped
    AMP step) leaves them bit-identical.
    """

    name = "reference"

    def __init__(self, optimizer: torch.optim.Optimizer, params: Sequence[Tensor], sums=None):
        super().__init__(optimizer, params, sums)
        self.slots: dict[Slot, dict[Tensor, Tensor]] = {}
        self._keep = False  # inside step(): restore from a copy
        self._saved: dict[Tensor, Tensor] | None = None
        self._applied: dict[Tensor, Tensor] | None = None  # the eps each parameter was moved by

    def begin(self) -> None:
        self.optimizer.zero_grad()
        self._keep = True

    def adopt(self, copy_weights: bool = False) -> None:
        self._keep = copy_weights

    @torch.no_grad()
    def take(self, slot: Slot) -> None:
        self.slots[slot] = {p: p.grad.clone() for p in self.params if p.grad is not None}
        self.optimizer.zero_grad()

    @torch.no_grad()
    def add(self, slot: Slot, scale: Tensor | None = None) -> None:
        for p, g in self.slots[slot].items():
            g = g if scale is None else g * scale.to(g.device)
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.add_(g)

    @torch.no_grad()
    def accumulate(self, slot: Slot) -> None:
        acc = self.slots.setdefault(slot, {})
        for p in self.params:
            if p.grad is None:
                continue
            if p in acc:
                acc[p] += p.grad
            else:
                acc[p] = p.grad.clone()
        self.optimizer.zero_grad()

    def export(self, slot: Slot) -> list[Tensor | None]:
        grads = self.slots.get(slot, {})
        return [grads[p].clone() if p in grads else None for p in self.params]

    @torch.no_grad()
    def load(self, slot: Slot, values: Sequence[Tensor | None]) -> None:
        pairs = [(p, v) for p, v in zip(self.params, values) if v is not None]
        self.slots[slot] = {p: torch.empty_like(p).copy_(v) for p, v in pairs}

    @torch.no_grad()
    def keep(self, slot: Slot, into: Slot) -> None:
        kept, grads = self.slots.get(into, {}), self.slots[slot]
        self.slots[into] = {p: kept[p].copy_(g) if p in kept else g.clone() for p, g in grads.items()}

    @torch.no_grad()
    def keep_difference(self, into: Slot, minus: Sequence[Slot], norm_of: Sequence[Slot]) -> None:
        def total(slots: Sequence[Slot]) -> dict[Tensor, Tensor]:
            out: dict[Tensor, Tensor] = {}
            for s in slots:
                for p, g in self.slots[s].items():
                    out[p] = g.clone() if p not in out else out[p] + g
            return out

        clean, sub = total(norm_of), total(minus)
        # as live_norm: .float() would drop a complex gradient's imaginary part
        n = torch.norm(torch.stack([torch.norm(g if g.is_complex() else g.float()) for g in clean.values()]))
        diff = {}
        for p in self.params:
            if p.grad is None and p not in sub and p not in clean:
                continue
            d = torch.zeros_like(p) if p.grad is None else p.grad.clone()
            if p in sub:
                d -= sub[p]
            diff[p] = d / (n + EPS).to(d.device)
        self.slots[into] = diff

    @torch.no_grad()
    def unscale(self, slots: Sequence[Slot], inv_scale: Tensor) -> None:
        for slot in slots:
            for g in self.slots[slot].values():
                g.mul_(inv_scale.to(g.device))

    @torch.no_grad()
    def all_reduce(self, slots: Sequence[Slot], live: bool, dist) -> None:
        """Average per parameter, in the order of ``self.params`` on every process;
        a parameter with a gradient on any process gets the average on all
        (zeros stand in for the missing ones), as DDP's reducer gives it."""
        sets = [(self.slots[slot], False) for slot in slots]
        if live:
            sets.append(({p: p.grad for p in self.params if p.grad is not None}, True))
        present = dist.union([[p in grads for p in self.params] for grads, _ in sets])
        for (grads, is_live), now in zip(sets, present):
            for p, there in zip(self.params, now):
                if not there:
                    continue
                if p not in grads:
                    grads[p] = torch.zeros_like(p)
                    if is_live:
                        p.grad = grads[p]
                dist.all_reduce_(grads[p])
                grads[p].div_(dist.world)

    def _zero(self) -> Tensor:
        """The local norm of no gradient, for an all-reduce every process must join."""
        return torch.zeros((), device=local(self.params[0]).device)

    def _unperturbed(self, p: Tensor) -> Tensor:
        return self._saved[p] if self._saved is not None else p

    @torch.no_grad()
    def perturbations(
        self, items: Sequence[tuple[Slot, Radius]], adaptive: Adaptive = False
    ) -> list[Perturbation]:
        groups = self.optimizer.param_groups
        index = {p: j for j, group in enumerate(groups) for p in group["params"]}
        adaptive = per_group(adaptive, len(groups))
        planned = []
        for slot, rho in items:
            grads = self.slots[slot]
            if not grads:  # nothing got a gradient: nothing to perturb
                planned.append((slot, rho, None, None))
                continue
            # T = |w| at the unperturbed weights, as davda54/sam reads p before moving it
            t = {p: local(self._unperturbed(p)).abs() if adaptive[index[p]] else None for p in grads}
            norms = [torch.norm(local(g) if t[p] is None else t[p] * local(g), p=2) for p, g in grads.items()]
            planned.append((slot, rho, t, torch.norm(torch.stack(norms), p=2)))
        norms = iter(self._global([norm for *_, norm in planned if norm is not None]))
        out = []
        for slot, rho, t, norm in planned:
            if norm is None:
                out.append(Perturbation(slot, None, None))
                continue
            norm, rhos = next(norms), per_group(rho, len(groups))
            move = {p: (rhos[index[p]] / (norm + EPS), t[p]) for p in t}
            out.append(Perturbation(slot, norm, move))
        return out

    @torch.no_grad()
    def live_norm(self, plus: Sequence[Slot] = ()) -> Tensor | None:
        grads = []
        for p in self.params:
            g = p.grad
            for slot in plus:
                if p in self.slots[slot]:
                    g = self.slots[slot][p] if g is None else g + self.slots[slot][p]
            if g is not None:
                g = local(g)
                grads.append(torch.norm(g if g.is_complex() else g.float()))  # .float() drops imaginary parts
        if self.sums is not None:  # every process joins the all-reduce, with or without a gradient
            return self._global([torch.norm(torch.stack(grads)) if grads else self._zero()])[0]
        return torch.norm(torch.stack(grads)) if grads else None

    def _move(self, move: Perturbation) -> None:
        if move.scale is None:
            return
        self._applied = {}
        for p, g in self.slots[move.slot].items():
            scale, t = move.scale[p]
            g = local(g)
            eps = g.mul(scale) if t is None else t.pow(2).mul(g).mul(scale)
            local(p).add_(eps)
            self._applied[p] = eps  # kept: an adaptive move cannot be recomputed at w + eps

    def _unmove(self) -> None:
        for p, eps in (self._applied or {}).items():
            local(p).sub_(eps)
        self._applied = None

    @torch.no_grad()
    def perturb(self, move: Perturbation) -> None:
        if self._keep and self._saved is None:
            self._saved = {p: p.detach().clone() for p in self.params}
        # restore first, then perturb: the order of the published code
        self._unmove()
        self._move(move)

    @torch.no_grad()
    def restore(self) -> None:
        if self._saved is not None:  # within step(): the copy (a NaN perturbation cannot be subtracted)
            for p, w in self._saved.items():
                p.copy_(w)
            self._saved = None
            self._applied = None
        else:
            self._unmove()

    @torch.no_grad()
    def finish(self, end: Ending) -> None:
        self.restore()
        for slot in end.add:
            self.add(slot)
        if end.grads is not None:
            kept = self.slots.get(end.grads, {})
            for p in self.params:
                p.grad = kept[p].clone() if p in kept else None
        weights = lambda: [(p, p.detach().clone()) for p in self.params]
        try:
            self.base_step(end, weights)
        finally:
            if not end.keep_grads:
                self.optimizer.zero_grad()
            self._end_step()

    def _clip(self, max_norm: float) -> None:
        """``clip_grad_norm_``'s loop, written out: per-parameter norms, their norm."""
        grads = [local(p.grad) for p in self.params if p.grad is not None]
        if grads or self.sums is not None:  # every process joins the all-reduce
            norms = [torch.norm(g, p=2) for g in grads]
            norm = self._global([torch.norm(torch.stack(norms), p=2) if norms else self._zero()])[0]
            coef = clip_coefficient(norm, max_norm)
            for g in grads:
                g.mul_(coef.reshape(1).to(g.device))  # in fp32 on every device, as the others

    @torch.no_grad()
    def abort(self) -> None:
        self.restore()  # the copy within step(); an official method's move is subtracted
        self._end_step()
        self.optimizer.zero_grad()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)
