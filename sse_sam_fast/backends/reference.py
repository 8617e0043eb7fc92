"""The specification backend: a literal per-parameter loop."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .base import EPS, Backend, Perturbation, Slot, base_step, guarded_step


class ReferenceBackend(Backend):
    """A per-parameter loop in the manner of the published code (clone per
    parameter, ``torch.norm`` of per-parameter norms, ``eps = g·s`` then
    ``p.add_(eps)`` / ``p.sub_(eps)``). Never fast.

    The official methods restore by subtraction, as the published code does.
    Within ``step()`` it keeps a copy of the weights and restores from it, so
    that a step abandoned half-way (an exception, a non-finite value, a skipped
    AMP step) leaves them bit-identical.
    """

    name = "reference"

    def __init__(self, optimizer: torch.optim.Optimizer, params: Sequence[Tensor]):
        super().__init__(optimizer, params)
        self.slots: dict[Slot, dict[Tensor, Tensor]] = {}
        self._keep = False  # inside step(): restore from a copy
        self._saved: dict[Tensor, Tensor] | None = None
        self._applied: Perturbation | None = None

    def begin(self) -> None:
        self.optimizer.zero_grad()
        self._keep = True

    def adopt(self) -> None:
        self._keep = False

    @torch.no_grad()
    def take(self, slot: Slot) -> None:
        self.slots[slot] = {p: p.grad.clone() for p in self.params if p.grad is not None}
        self.optimizer.zero_grad()

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

    @torch.no_grad()
    def unscale(self, slots: Sequence[Slot], inv_scale: Tensor) -> None:
        for slot in slots:
            for g in self.slots[slot].values():
                g.mul_(inv_scale.to(g.device))

    @torch.no_grad()
    def all_reduce(self, slots: Sequence[Slot], live: bool, group) -> None:
        world = torch.distributed.get_world_size(group)
        tensors = [g for slot in slots for g in self.slots[slot].values()]
        if live:
            tensors += [p.grad for p in self.params if p.grad is not None]
        for t in tensors:
            torch.distributed.all_reduce(t, group=group)
            t.div_(world)

    @torch.no_grad()
    def perturbations(self, items: Sequence[tuple[Slot, float]]) -> list[Perturbation]:
        out = []
        for slot, rho in items:
            grads = list(self.slots[slot].values())
            if not grads:  # nothing got a gradient: nothing to perturb
                out.append(Perturbation(slot, None, None))
                continue
            norm = torch.norm(torch.stack([torch.norm(g, p=2) for g in grads]), p=2)
            out.append(Perturbation(slot, norm, rho / (norm + EPS)))
        return out

    @torch.no_grad()
    def live_norm(self) -> Tensor | None:
        grads = [torch.norm(p.grad.float()) for p in self.params if p.grad is not None]
        return torch.norm(torch.stack(grads)) if grads else None

    def _move(self, move: Perturbation, sign: int) -> None:
        if move.scale is None:
            return
        for p, g in self.slots[move.slot].items():
            eps = g.mul(move.scale)
            if sign > 0:
                p.add_(eps)
            else:
                p.sub_(eps)

    @torch.no_grad()
    def perturb(self, move: Perturbation) -> None:
        if self._keep and self._saved is None:
            self._saved = {p: p.detach().clone() for p in self.params}
        # restore first, then perturb: the order of the published code
        if self._applied is not None:
            self._move(self._applied, -1)
        self._move(move, 1)
        self._applied = move

    @torch.no_grad()
    def restore(self) -> None:
        if self._saved is not None:  # within step(): the copy (a NaN perturbation cannot be subtracted)
            for p, w in self._saved.items():
                p.copy_(w)
            self._saved = None
        elif self._applied is not None:
            self._move(self._applied, -1)
        self._applied = None

    @torch.no_grad()
    def finish(
        self, add: Sequence[Slot] = (), grads: Slot | None = None, scaler=None, ok: Tensor | None = None
    ) -> None:
        self.restore()
        for slot in add:
            for p, g in self.slots[slot].items():
                if p.grad is None:
                    p.grad = g.clone()
                else:
                    p.grad.add_(g)
        if grads is not None:
            kept = self.slots.get(grads, {})
            for p in self.params:
                p.grad = kept[p].clone() if p in kept else None
        try:
            if ok is None:
                base_step(self.optimizer, scaler)
            else:
                weights = [(p, p.detach().clone()) for p in self.params]
                guarded_step(self.optimizer, self.params, ok, weights)
        finally:
            self.optimizer.zero_grad()
            self.slots.clear()

    @torch.no_grad()
    def abort(self) -> None:
        self.restore()  # the copy within step(); an official method's move is subtracted
        self.slots.clear()
        self.optimizer.zero_grad()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)
