"""The flat-buffer backend: every parameter and gradient a view into one
contiguous buffer per (device, dtype), each phase a few torch ops on whole
buffers."""

from __future__ import annotations

import weakref
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
    per_group,
    uniform,
)

ALIGN_BYTES = 128  # segment alignment inside a flat buffer (apex uses the same)


def _either(a: list[bool], b: list[bool]) -> list[bool]:
    """Presence of a gradient in the sum of two gradient sets, parameter by parameter."""
    return [x or y for x, y in zip(a, b)]


def _acc(dtype: torch.dtype) -> torch.dtype:
    # fp32 accumulation: bf16/fp16 sums lose the small gradients of the tail
    return torch.promote_types(dtype, torch.float32)


class Bucket:
    """The parameters of one (device, dtype): weights in one flat buffer ``w``,
    gradient sets as the rows of one 2-D buffer ``g`` (a kernel reaches every
    set of a bucket from a single pointer), and the snapshot ``w0`` of the
    weights before the step's first perturbation."""

    def __init__(self, params: list[Tensor], rows: int):
        p0 = params[0]
        align = max(1, ALIGN_BYTES // p0.element_size())
        self.offsets, total = [], 0
        for p in params:
            self.offsets.append(total)
            total += -(-p.numel() // align) * align
        self.params = params
        self.numel = total
        # zero padding: it never changes a norm and never moves
        self.w = torch.zeros(total, dtype=p0.dtype, device=p0.device)
        self.g = torch.zeros(rows, total, dtype=p0.dtype, device=p0.device)
        self.w0 = torch.zeros_like(self.w)
        with torch.no_grad():
            for p, off in zip(params, self.offsets):
                view = self.w[off : off + p.numel()].view_as(p)
                view.copy_(p.data)
                p.data = view

    def grow(self) -> None:
        """One more gradient row; the others keep their contents."""
        g = torch.zeros(self.g.shape[0] + 1, self.numel, dtype=self.g.dtype, device=self.g.device)
        g[:-1].copy_(self.g)
        self.g = g

    def views(self, row: int) -> list[Tensor]:
        return [self.g[row, off : off + p.numel()].view_as(p) for p, off in zip(self.params, self.offsets)]

    def runs(self, key_of: dict[int, object]) -> list[tuple[object, int, int]]:
        """Maximal runs of consecutive parameters with equal ``key_of[id(p)]``, as
        ``(key, start, end)`` element ranges that cover the bucket, padding included."""
        runs: list[list] = []
        for j, p in enumerate(self.params):
            key = key_of[id(p)]
            end = self.offsets[j + 1] if j + 1 < len(self.params) else self.numel
            if runs and runs[-1][0] == key:
                runs[-1][2] = end
            else:
                runs.append([key, self.offsets[j], end])
        return [tuple(r) for r in runs]


class TorchBackend(Backend):
    """Flat buffers, one per (device, dtype), with each ``p.data`` and ``p.grad``
    a view into them: a phase is a few torch ops on whole buffers, and norms stay
    device tensors (no host synchronisation).

    Gradient sets are rows of a per-bucket 2-D buffer, added on demand. Handing
    the live gradients to a slot only relabels a row and points ``p.grad`` at
    another (zeroed) row, so no gradient is ever copied between passes. Rows
    that are neither live nor in a slot are kept zero.

    Restore: exact copy from the snapshot ``w0`` (see :mod:`.base`). This moves
    no more data than subtracting.
    """

    name = "torch"
    fused_last = False  # whether the last finish() fused the base step into a kernel (triton)

    def __init__(self, optimizer: torch.optim.Optimizer, params: Sequence[Tensor]):
        super().__init__(optimizer, params)
        self.slots: dict[Slot, tuple[int, list[bool]]] = {}  # slot -> (row, which params have a gradient)
        self._saved = False  # whether w0 holds the weights of an applied perturbation
        self._flatten(rows=2)
        self._hooks: dict[int, object] = {}
        self._hook_new()

    def _hook_new(self) -> None:
        """Autograd writes into our views in place, so a zero gradient and "no
        gradient" look alike; a hook per parameter tells them apart, at the cost
        of one Python call per parameter per backward pass. Frozen parameters
        cannot carry one: they get it when a step finds them unfrozen."""
        if len(self._hooks) == len(self.params):
            return
        ref = weakref.ref(self)

        def make_hook(i: int):
            def hook(_: Tensor) -> None:
                backend = ref()
                if backend is not None:
                    backend.seen[i] = True

            return hook

        for i, p in enumerate(self.params):
            if i not in self._hooks and p.requires_grad:
                self._hooks[i] = p.register_post_accumulate_grad_hook(make_hook(i))

    def __del__(self):
        for h in getattr(self, "_hooks", {}).values():
            h.remove()

    # ---- layout -----------------------------------------------------------------
    def _flatten(self, rows: int) -> None:
        by_key: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
        for p in self.params:
            by_key.setdefault((p.device, p.dtype), []).append(p)
        self.buckets = [Bucket(ps, rows) for ps in by_key.values()]
        self._ptrs = [p.data_ptr() for p in self.params]
        self.live = 0
        self.seen = [False] * len(self.params)
        self._index_views()

    @property
    def rows(self) -> int:
        return self.buckets[0].g.shape[0]

    def _index_views(self) -> None:
        """``self._views[row]``: the gradient views of a row, ordered as ``self.params``."""
        index = {id(p): i for i, p in enumerate(self.params)}
        self._views = []
        for r in range(self.rows):
            views: list[Tensor | None] = [None] * len(self.params)
            for b in self.buckets:
                for p, v in zip(b.params, b.views(r)):
                    views[index[id(p)]] = v
            self._views.append(views)
        self._bind(self.live)

    def _check_layout(self) -> None:
        """Parameters re-bound behind our back (``model.to(...)``, assigning
        ``.data``) would otherwise be trained as detached copies."""
        if all(p.data_ptr() == ptr for p, ptr in zip(self.params, self._ptrs)):
            return
        if self.slots:
            self._abandon()
            raise RuntimeError(
                "model parameters were re-bound (e.g. model.to() or p.data = ...) in the middle "
                "of a SAM step; the step was abandoned and the weights restored: run the backward "
                "again and start the step anew"
            )
        self._relayout()

    def _relayout(self) -> None:
        """New flat buffers for the parameters as they are now; the gradients of a
        backward the user already ran (official methods) move along."""
        old = [
            None if g is None or (g is v and not seen) else g
            for g, v, seen in zip((p.grad for p in self.params), self._views[self.live], self.seen)
        ]
        old += [p.grad for p in self.params[len(old) :]]  # parameters added since
        self._flatten(self.rows)
        with torch.no_grad():
            for i, (g, v) in enumerate(zip(old, self._views[self.live])):
                if g is not None:
                    v.copy_(g)
                    self.seen[i] = True

    @torch.no_grad()
    def _abandon(self) -> None:
        """Undo a perturbation that re-bound parameters carried away: they get the
        unperturbed weights (converted as ``copy_`` does); then a fresh layout."""
        self.restore()
        for b in self.buckets:
            for p, off in zip(b.params, b.offsets):
                if p.data_ptr() != b.w[off:].data_ptr():
                    p.data.copy_(b.w[off : off + p.numel()].view_as(p))
        self.slots.clear()
        for p in self.params:
            p.grad = None
        self._flatten(self.rows)

    def extend(self, params: Sequence[Tensor]) -> None:
        super().extend(params)
        self._relayout()
        self._hook_new()

    def _bind(self, row: int) -> None:
        for p, v in zip(self.params, self._views[row]):
            if p.grad is not v:
                p.grad = v

    def _free_row(self) -> int:
        used = {self.live} | {r for r, _ in self.slots.values()}
        free = [r for r in range(self.rows) if r not in used]
        if free:
            return free[0]
        # a method keeping more sets than any step before: once, between passes
        for b in self.buckets:
            b.grow()
        self._index_views()
        return self.rows - 1

    def _rows_op(self, fn) -> None:
        for b in self.buckets:
            fn(b)

    # ---- starting -----------------------------------------------------------------
    @torch.no_grad()
    def begin(self) -> None:
        self._check_layout()
        self._hook_new()
        if self.slots:
            raise RuntimeError("a SAM step started with the official methods is still open")
        dirty = any(self.seen) or any(p.grad is not v for p, v in zip(self.params, self._views[self.live]))
        if dirty:
            live = self.live
            self._rows_op(lambda b: b.g[live].zero_())
            self.seen = [False] * len(self.params)
            self._bind(live)

    @torch.no_grad()
    def adopt(self, copy_weights: bool = False) -> None:
        self._check_layout()
        self._hook_new()
        for i, (p, v) in enumerate(zip(self.params, self._views[self.live])):
            g = p.grad
            if g is v:
                continue
            if g is None:
                v.zero_()
                self.seen[i] = False
            else:
                v.copy_(g)
                self.seen[i] = True
            p.grad = v

    # ---- gradient sets ---------------------------------------------------------------
    @torch.no_grad()
    def take(self, slot: Slot) -> None:
        if slot in self.slots:  # a slot re-taken: its old row is free again
            row, _ = self.slots.pop(slot)
            self._rows_op(lambda b: b.g[row].zero_())
        row = self._free_row()
        self.slots[slot] = (self.live, self.seen)
        self.live = row
        self.seen = [False] * len(self.params)
        self._bind(self.live)

    @torch.no_grad()
    def accumulate(self, slot: Slot) -> None:
        if slot not in self.slots:
            self.take(slot)
            return
        row, seen = self.slots[slot]
        live = self.live
        self._rows_op(lambda b: (b.g[row].add_(b.g[live]), b.g[live].zero_()))
        self.slots[slot] = (row, _either(seen, self.seen))
        self.seen = [False] * len(self.params)

    @torch.no_grad()
    def add(self, slot: Slot) -> None:
        row, seen = self.slots[slot]
        live = self.live
        self._rows_op(lambda b: b.g[live].add_(b.g[row]))
        self.seen = _either(self.seen, seen)

    @torch.no_grad()
    def unscale(self, slots: Sequence[Slot], inv_scale: Tensor) -> None:
        for slot in slots:
            row = self.slots[slot][0]
            self._rows_op(lambda b: b.g[row].mul_(inv_scale.to(b.g.device)))

    @torch.no_grad()
    def all_reduce(self, slots: Sequence[Slot], live: bool, group) -> None:
        """Average gradient rows over the process group: one collective per row and bucket."""
        world = torch.distributed.get_world_size(group)
        rows = [self.slots[slot][0] for slot in slots] + ([self.live] if live else [])
        for b in self.buckets:
            for r in rows:
                torch.distributed.all_reduce(b.g[r], group=group)
                b.g[r].div_(world)

    # ---- norms and moves -------------------------------------------------------------
    def _runs(self, rho: Radius, adaptive: Adaptive) -> list[list[tuple[tuple[float, bool], int, int]]]:
        """Per bucket, ranges of one ``(rho, adaptive)``: the whole bucket when every
        param group has the same (no per-parameter work on the host), else runs."""
        if uniform(rho) and uniform(adaptive):
            key = (per_group(rho, 1)[0], per_group(adaptive, 1)[0])
            return [[(key, 0, b.numel)] for b in self.buckets]
        groups = self.optimizer.param_groups
        keys = list(zip(per_group(rho, len(groups)), per_group(adaptive, len(groups))))
        key_of = {id(p): keys[j] for j, group in enumerate(groups) for p in group["params"]}
        return [b.runs(key_of) for b in self.buckets]

    def _base(self, b: Bucket) -> Tensor:
        """The unperturbed weights (ASAM's ``T = |w|``)."""
        return b.w0 if self._saved else b.w

    @torch.no_grad()
    def _norms(self, rows: Sequence[int], runs=None, plus: Sequence[int] = ()) -> list[Tensor]:
        """L2 norms of gradient rows over all buckets (fp32 or wider), on the first
        bucket's device; with ``runs``, the adaptive ranges count as ``|w|·g``;
        with ``plus``, of each row plus those rows (summed in the storage dtype,
        as the base step will see them)."""
        dev = self.buckets[0].w.device
        out = []
        for r in rows:
            parts = []
            for i, b in enumerate(self.buckets):
                if runs is None:
                    x = b.g[r]
                    for q in plus:  # row by row: a list index would copy it from the host
                        x = x + b.g[q]
                    parts.append(torch.linalg.vector_norm(x, dtype=_acc(b.g.dtype)).to(dev))
                    continue
                for (_, adaptive), start, end in runs[i]:
                    x = b.g[r, start:end].to(_acc(b.g.dtype))
                    if adaptive:
                        x = x * self._base(b)[start:end]
                    parts.append(torch.linalg.vector_norm(x).to(dev))
            out.append(parts[0] if len(parts) == 1 else torch.linalg.vector_norm(torch.stack(parts)))
        return out

    @torch.no_grad()
    def perturbations(
        self, items: Sequence[tuple[Slot, Radius]], adaptive: Adaptive = False
    ) -> list[Perturbation]:
        """A scale is, per bucket, ``(s, adaptive, start, end)`` ranges, ``s = rho / (n + 1e-16)``."""
        out = []
        for slot, rho in items:
            runs = self._runs(rho, adaptive)
            plain = all(not a for bucket in runs for (_, a), _, _ in bucket)
            n = self._norms([self.slots[slot][0]], None if plain else runs)[0]
            scale = [[(r / (n + EPS), a, start, end) for (r, a), start, end in bucket] for bucket in runs]
            out.append(Perturbation(slot, n, scale))
        return out

    @torch.no_grad()
    def live_norm(self, plus: Sequence[Slot] = ()) -> Tensor:
        return self._norms([self.live], plus=[self.slots[slot][0] for slot in plus])[0]

    @torch.no_grad()
    def perturb(self, move: Perturbation) -> None:
        """``w = w0 + s·G[slot]`` (ASAM: ``s·w0²·G[slot]``), saving ``w0 = w`` first
        if this is the step's first perturbation: the previous move needs no
        arithmetic to undo."""
        row = self.slots[move.slot][0]
        for b, runs in zip(self.buckets, move.scale):
            if not self._saved:
                b.w0.copy_(b.w)
            for s, adaptive, start, end in runs:
                w0, g, s = b.w0[start:end], b.g[row, start:end], s.to(b.w.device)
                if not adaptive:
                    torch.addcmul(w0, g, s, out=b.w[start:end])
                    continue
                base = w0.to(_acc(g.dtype))  # w0 itself in fp32: no copy
                d = base.square().mul_(g)
                if base is w0:
                    torch.addcmul(w0, d, s, out=b.w[start:end])
                else:
                    b.w[start:end].copy_(torch.addcmul(base, d, s))
        self._saved = True

    @torch.no_grad()
    def restore(self) -> None:
        if self._saved:
            for b in self.buckets:
                b.w.copy_(b.w0)
            self._saved = False

    # ---- ending --------------------------------------------------------------------------
    def _final_gradient(self, add: Sequence[Slot], grads: Slot | None) -> None:
        """Live gradients := the base step's gradient; absent parameters get ``p.grad = None``."""
        for slot in add:
            self.add(slot)
        if grads is not None:
            row, seen = self.slots.pop(grads)
            self.live, self.seen = row, seen
            self._bind(row)
        for p, s in zip(self.params, self.seen):
            if not s:
                p.grad = None

    @torch.no_grad()
    def _clip(self, max_norm: float) -> None:
        """Scale the live rows as ``clip_grad_norm_`` scales the gradients."""
        coef = clip_coefficient(self.live_norm(), max_norm)
        live = self.live
        # a one-element factor multiplies in fp32 on every device (a 0-dim CUDA one
        # would be rounded to an fp16 gradient's dtype first), as the fused kernel does
        self._rows_op(lambda b: b.g[live].mul_(coef.reshape(1).to(b.g.device)))

    @torch.no_grad()
    def finish(self, end: Ending) -> None:
        if end.ok is not None and not self._saved:
            self._rows_op(lambda b: b.w0.copy_(b.w))  # the weights a skipped step falls back to
        self.restore()
        self._final_gradient(end.add, end.grads)
        try:
            weights = lambda: [(b.w, b.w0) for b in self.buckets]
            self.base_step(end, weights)
        finally:
            self._reset(end.keep_grads)

    def _reset(self, keep_grads: bool = False) -> None:
        """Empty every slot and zero every row; ``keep_grads``: but the live one,
        whose gradient stays in ``p.grad`` as after a plain ``optimizer.step()``."""
        self.slots.clear()
        if keep_grads:
            for b in self.buckets:
                for r in range(b.g.shape[0]):
                    if r != self.live:
                        b.g[r].zero_()
            return
        self._rows_op(lambda b: b.g.zero_())
        self.seen = [False] * len(self.params)
        self._bind(self.live)

    @torch.no_grad()
    def abort(self) -> None:
        self.restore()
        self._reset()

    @torch.no_grad()
    def zero_grad(self, set_to_none: bool = True) -> None:
        # p.grad must stay a view into the flat buffer, so it is zeroed in place
        # either way; set_to_none=False keeps torch's meaning all the same: a
        # parameter that had a gradient still has one (zero), and the base step
        # decays it and moves its momentum, where set_to_none=True skips it
        live = self.live
        self._rows_op(lambda b: b.g[live].zero_())
        if set_to_none:
            self.seen = [False] * len(self.params)
        self._bind(live)
