"""The flat-buffer backend: every parameter and gradient a view into one
contiguous buffer per (device, dtype), each phase a few torch ops on whole
buffers."""

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
    is_dtensor,
    local,
    per_group,
    uniform,
)

ALIGN_BYTES = 128  # segment alignment inside a flat buffer (apex uses the same)


def owned(p: Tensor) -> bool:
    """Whether the flat backends can re-bind ``p.data`` into their buffers: a plain
    tensor, not a subclass whose storage another system owns (a DTensor shard)."""
    return type(p.data) is torch.Tensor


def usable(p: Tensor) -> bool:
    """Whether the flat backends can take ``p``: re-bound (:func:`owned`) or, for
    FSDP2's DTensor shards, mirrored (:class:`Bucket`)."""
    return owned(p) or is_dtensor(p)


def _either(a: list[bool], b: list[bool]) -> list[bool]:
    """Presence of a gradient in the sum of two gradient sets, parameter by parameter."""
    return [x or y for x, y in zip(a, b)]


def _magnitude(w: Tensor) -> Tensor:
    """ASAM's ``T = |w|``. For real weights ``w`` itself serves: ``T g`` only enters
    a norm, and ``w²`` is ``|w|²`` bit for bit; a complex ``w²`` is not."""
    return w.abs() if w.is_complex() else w


def _acc(dtype: torch.dtype) -> torch.dtype:
    # fp32 accumulation: bf16/fp16 sums lose the small gradients of the tail
    return torch.promote_types(dtype, torch.float32)


class Bucket:
    """The parameters of one (device, dtype): weights in one flat buffer ``w``,
    gradient sets as the rows of one 2-D buffer ``g`` (a kernel reaches every
    set of a bucket from a single pointer), and the snapshot ``w0`` of the
    weights before the step's first perturbation.

    FSDP2's shards (DTensors) are not re-bound: FSDP2 owns their storage and
    all-gathers from it. For them ``w`` is a mirror of this process's shards
    (``shards``), read in by :meth:`pull` when a step starts and written out by
    :meth:`push` after every move, one multi-tensor copy each; rows, norms and
    moves are the same code on the local parts."""

    def __init__(self, params: list[Tensor], rows: int):
        p0 = params[0]
        self.shards = [local(p) for p in params] if is_dtensor(p0) else None
        parts = self.shards or [p.data for p in params]
        align = max(1, ALIGN_BYTES // p0.element_size())
        self.offsets, total = [], 0
        for t in parts:
            self.offsets.append(total)
            total += -(-t.numel() // align) * align
        self.params = params
        self.shapes = [t.shape for t in parts]
        self.numel = total
        # zero padding: it never changes a norm and never moves
        self.w = torch.zeros(total, dtype=p0.dtype, device=parts[0].device)
        self.g = torch.zeros(rows, total, dtype=p0.dtype, device=parts[0].device)
        self.w0 = torch.zeros_like(self.w)
        self._w = self._views(self.w)
        with torch.no_grad():
            if self.shards is not None:
                self.pull()
                return
            for p, view in zip(params, self._w):
                view.copy_(p.data)
                p.data = view

    def _views(self, flat: Tensor) -> list[Tensor]:
        return [flat[off : off + n.numel()].view(n) for n, off in zip(self.shapes, self.offsets)]

    def pull(self) -> None:
        """``w`` := the shards (FSDP2), which the base step moved behind the mirror."""
        if self.shards is not None:
            torch._foreach_copy_(self._w, self.shards)

    def push(self) -> None:
        """The shards := ``w`` (FSDP2), after a move of the mirror."""
        if self.shards is not None:
            torch._foreach_copy_(self.shards, self._w)

    def pairs(self) -> list[tuple[Tensor, Tensor]]:
        """``(weights, weights before the step)`` covering the bucket, for a step
        taken back on the device (:func:`~.base.guarded_step`)."""
        if self.shards is None:
            return [(self.w, self.w0)]
        return list(zip(self.shards, self._views(self.w0)))

    def grow(self) -> None:
        """One more gradient row; the others keep their contents."""
        g = torch.zeros(self.g.shape[0] + 1, self.numel, dtype=self.g.dtype, device=self.g.device)
        g[:-1].copy_(self.g)
        self.g = g

    def views(self, row: int) -> list[Tensor]:
        return self._views(self.g[row])

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
    """Flat buffers, one per (device, dtype): each ``p.data`` is a view into the
    bucket's weight buffer, so perturbing and restoring are a few torch ops on
    whole buffers, and norms stay device tensors (no host synchronisation).

    Gradients belong to autograd: ``p.grad`` is whatever the backward left, and
    ``None`` means "no gradient", as in ``torch.optim``. Between passes the
    backend moves them into gradient sets kept as rows of a per-bucket 2-D
    buffer (one multi-tensor copy or add per (device, dtype), :meth:`_gather`)
    and sets ``p.grad`` back to None. A row in use is zero wherever its
    parameters have no gradient (and in the padding), so a whole-row norm is
    the norm of the set; a free row may hold anything. Handing the live
    gradients to a slot only relabels a row.

    The base step sees ``p.grad`` as views of the final row (None for a
    parameter without a gradient); afterwards ``p.grad`` is None again, as
    after ``optimizer.zero_grad()``, unless the caller keeps it (davda54's
    ``zero_grad=False``): then the views stay bound and a later backward
    accumulates into them in place.

    Restore: exact copy from the snapshot ``w0`` (see :mod:`.base`). This moves
    no more data than subtracting.
    """

    name = "torch"
    fused_last = False  # whether the last finish() fused the base step into a kernel (triton)

    def __init__(self, optimizer: torch.optim.Optimizer, params: Sequence[Tensor], sums=None):
        foreign = [type(p.data).__name__ for p in params if not usable(p)]
        if foreign:
            raise ValueError(
                f"backend={self.name!r} keeps parameters in its own flat buffers and cannot take "
                f"parameters whose storage another system owns (a {foreign[0]}); "
                "use backend='reference' (or 'auto')"
            )
        super().__init__(optimizer, params, sums)
        self.slots: dict[Slot, tuple[int, list[bool]]] = {}  # slot -> (row, which params have a gradient)
        self._saved = False  # whether w0 holds the weights of an applied perturbation
        self._bound = False  # whether p.grad are views of the live row (kept gradients)
        self._bound_to: list[Tensor | None] = []  # ... and what p.grad was set to (DTensors over them)
        self._flatten(rows=2)

    # ---- layout -----------------------------------------------------------------
    def _flatten(self, rows: int) -> None:
        by_key: dict[tuple[torch.device, torch.dtype, bool], list[Tensor]] = {}
        for p in self.params:
            by_key.setdefault((p.device, p.dtype, is_dtensor(p)), []).append(p)
        self.buckets = [Bucket(ps, rows) for ps in by_key.values()]
        self._sharded = any(b.shards is not None for b in self.buckets)  # FSDP2: mirrored buckets
        self._ptrs = self._pointers()
        self.live = 0
        self.seen = [False] * len(self.params)  # which parameters have a gradient in the live row
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

    def _pointers(self) -> list[int]:
        """Where the parameters' storage is (FSDP2: the shards' storage)."""
        if not self._sharded:
            return [p.data_ptr() for p in self.params]
        return [local(p).data_ptr() for p in self.params]

    def _as_grad(self, i: int, v: Tensor) -> Tensor:
        """What ``p.grad`` of parameter ``i`` is set to for the view ``v`` of a row:
        for a DTensor shard, a DTensor over the view (the base optimizer's
        arithmetic mixes no plain tensor with its parameters)."""
        p = self.params[i]
        if not self._sharded or not is_dtensor(p):
            return v
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(
            v, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
        )

    def _pull(self) -> None:
        """FSDP2: the mirrors := the shards, as the last base step left them."""
        if self._sharded:
            for b in self.buckets:
                b.pull()

    def _check_layout(self) -> None:
        """Parameters re-bound behind our back (``model.to(...)``, assigning
        ``.data``; FSDP2 re-allocating its shards at its lazy initialisation)
        would otherwise be trained as detached copies."""
        if self._sharded:
            if self._pointers() == self._ptrs:
                return
        elif all(p.data_ptr() == ptr for p, ptr in zip(self.params, self._ptrs)):
            return
        if self.holding:
            self._abandon()
            raise RuntimeError(
                "model parameters were re-bound (e.g. model.to() or p.data = ...) in the middle "
                "of a SAM step; the step was abandoned and the weights restored: run the backward "
                "again and start the step anew"
            )
        self._relayout()

    @torch.no_grad()
    def _relayout(self) -> None:
        """New flat buffers for the parameters as they are now; the gradients of a
        backward the user already ran (official methods) move along, converted
        as ``copy_`` converts."""
        views, n = self._views[self.live], len(self._views[self.live])

        bound = self._bound_to if self._sharded else views

        def current(i: int, p: Tensor) -> Tensor | None:
            g = p.grad
            if i >= n:  # a parameter added since
                return local(g)
            if self._bound:
                return views[i].clone() if g is bound[i] else local(g)
            if not self.seen[i]:
                return local(g)
            return views[i].clone() if g is None else views[i] + local(g)

        old = [current(i, p) for i, p in enumerate(self.params)]
        self._unbind()
        self._reflatten()
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
            for p, t, w in zip(b.params, b.shards or b.params, b._views(b.w)):
                now = local(p) if b.shards is not None else p.data
                if now.data_ptr() != (t if b.shards is not None else w).data_ptr():
                    now.copy_(w)
        self._end_step()
        self._unbind()
        self._reflatten()

    def _reflatten(self) -> None:
        """New buffers; the lasting slots move along (zeros for parameters added since)."""
        kept = {slot: self.export(slot) for slot in self.slots}
        kept = {slot: v + [None] * (len(self.params) - len(v)) for slot, v in kept.items()}
        self.slots = {}
        self._flatten(self.rows)
        for slot, values in kept.items():
            self.load(slot, values)

    def extend(self, params: Sequence[Tensor]) -> None:
        super().extend(params)
        self._relayout()

    # ---- state kept across steps ------------------------------------------------------
    def export(self, slot: Slot) -> list[Tensor | None]:
        if slot not in self.slots:
            return [None] * len(self.params)
        row, seen = self.slots[slot]
        return [
            self._as_grad(i, v.clone()) if s else None for i, (v, s) in enumerate(zip(self._views[row], seen))
        ]

    @torch.no_grad()
    def load(self, slot: Slot, values: Sequence[Tensor | None]) -> None:
        self.slots.pop(slot, None)
        row = self._free_row()
        self._rows_op(lambda b: b.g[row].zero_())
        for v, x in zip(self._views[row], values):
            if x is not None:
                v.copy_(local(x))
        self.slots[slot] = (row, [x is not None for x in values])

    def _kept_row(self, into: Slot) -> int:
        """The row of the lasting slot ``into``: the one it holds, so that a graph
        reading it stays valid from step to step, else a free one."""
        return self.slots[into][0] if into in self.slots else self._free_row()

    @torch.no_grad()
    def keep(self, slot: Slot, into: Slot) -> None:
        row, seen = self.slots[slot]
        dst = self._kept_row(into)
        self._rows_op(lambda b: b.g[dst].copy_(b.g[row]))
        self.slots[into] = (dst, list(seen))

    # ---- autograd's gradients and the rows ------------------------------------------
    @torch.no_grad()
    def _gather(self, row: int | None = None, seen: list[bool] | None = None) -> None:
        """Move ``p.grad`` into ``row`` (default the live row), whose presence list
        ``seen`` it updates: added where the row holds gradients, copied where it
        holds none (and the parameters without a gradient zeroed, so the row is a
        valid set); ``p.grad`` := None, or the row's view while the live row is
        bound (:meth:`_bind`). One multi-tensor operation, none when no parameter
        has a new gradient."""
        live = row is None or row == self.live
        row, seen = (self.live, self.seen) if live else (row, seen)
        views = self._views[row]
        grads = [p.grad for p in self.params]
        if live and self._bound:
            # the views are p.grad: autograd accumulated into them in place, and a
            # tensor that replaced one (p.grad = g) is the whole gradient
            bound = self._bound_to if self._sharded else views
            moved = [(i, g) for i, (v, g) in enumerate(zip(bound, grads)) if g is not None and g is not v]
            dropped = [i for i, (g, s) in enumerate(zip(grads, seen)) if s and g is None]
            if moved:
                torch._foreach_copy_([views[i] for i, _ in moved], [local(g) for _, g in moved])
                for i, _ in moved:
                    seen[i] = True
                    self.params[i].grad = self._bound_to[i] = self._as_grad(i, views[i])
            if dropped:  # set to None by the caller: no gradient any more
                torch._foreach_zero_([views[i] for i in dropped])
                for i in dropped:
                    seen[i] = False
            return
        present = [i for i, g in enumerate(grads) if g is not None]
        if not present:
            return
        if self._sharded:
            grads = [local(g) for g in grads]
        fresh = not any(seen)  # the row holds no set: it may hold a freed set's values
        try:
            if fresh:
                torch._foreach_copy_([views[i] for i in present], [grads[i] for i in present])
            else:
                torch._foreach_add_([views[i] for i in present], [grads[i] for i in present])
        except RuntimeError:
            sparse = [i for i in present if grads[i].layout != torch.strided]
            if sparse:  # looked for only here: a check per step would cost host time
                raise ValueError(
                    f"parameter {sparse[0]} of the optimizer got a {grads[sparse[0]].layout} gradient; the "
                    "SAM family perturbs along dense gradients (nn.Embedding(sparse=False))"
                ) from None
            raise
        if fresh:  # where no gradient came, what the row held is stale
            absent = [views[i] for i, g in enumerate(grads) if g is None]
            if absent:
                torch._foreach_zero_(absent)
        for i in present:
            seen[i] = True
            self.params[i].grad = None

    def _valid_live(self) -> None:
        """Make the live row a valid set before whole-row operations read it: a row
        without any gradient may hold a freed set's values."""
        self._gather()
        if not any(self.seen):
            live = self.live
            self._rows_op(lambda b: b.g[live].zero_())

    def _bind(self) -> None:
        """``p.grad`` := the live row's views (None where no gradient), for the
        base step and for gradients kept after it."""
        for i, (p, v, s) in enumerate(zip(self.params, self._views[self.live], self.seen)):
            p.grad = self._as_grad(i, v) if s else None
        self._bound_to = [p.grad for p in self.params]  # what p.grad is while bound
        self._bound = True

    def show(self) -> None:
        self._valid_live()
        self._bind()

    def _unbind(self) -> None:
        for p in self.params:
            p.grad = None
        self._bound = False

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
        if self.holding:
            raise RuntimeError("a SAM step started with the official methods is still open")
        self._pull()
        self._unbind()  # stray gradients are not part of the step
        self.seen = [False] * len(self.params)

    @torch.no_grad()
    def adopt(self, copy_weights: bool = False) -> None:
        self._check_layout()
        self._pull()
        self._gather()

    # ---- gradient sets ---------------------------------------------------------------
    @torch.no_grad()
    def take(self, slot: Slot) -> None:
        self._gather()
        if self._bound:  # the live row becomes the slot's
            self._unbind()
        self.slots.pop(slot, None)  # a slot re-taken: its old row is free again
        self.slots[slot] = (self.live, self.seen)
        self.live = self._free_row()
        self.seen = [False] * len(self.params)

    @torch.no_grad()
    def accumulate(self, slot: Slot) -> None:
        if slot not in self.slots:
            self.take(slot)
            return
        row, seen = self.slots[slot]
        if self._bound or any(self.seen):  # gradients gathered into the live row join too
            self._gather()
            self._unbind()
            live = self.live
            self._rows_op(lambda b: b.g[row].add_(b.g[live]))
            self.slots[slot] = (row, _either(seen, self.seen))
            self.seen = [False] * len(self.params)
        else:
            self._gather(row, seen)

    @torch.no_grad()
    def add(self, slot: Slot, scale: Tensor | None = None) -> None:
        self._gather()
        row, seen = self.slots[slot]
        live, empty = self.live, not any(self.seen)  # an empty live row may hold anything
        if scale is None and empty:
            self._rows_op(lambda b: b.g[live].copy_(b.g[row]))
        elif scale is None:
            self._rows_op(lambda b: b.g[live].add_(b.g[row]))
        else:
            if empty:
                self._rows_op(lambda b: b.g[live].zero_())
            self._rows_op(lambda b: b.g[live].addcmul_(b.g[row], scale.to(b.g.device)))
        self.seen = _either(self.seen, seen)

    @torch.no_grad()
    def keep_difference(self, into: Slot, minus: Sequence[Slot], norm_of: Sequence[Slot]) -> None:
        self._valid_live()
        rows = [self.slots[s][0] for s in norm_of]
        n = self._norms(rows[:1], plus=rows[1:])[0] + EPS
        dst = self._kept_row(into)
        live, sub = self.live, [self.slots[s][0] for s in minus]

        def difference(b: Bucket) -> None:
            d = b.g[dst]
            d.copy_(b.g[live])
            for r in sub:
                d.sub_(b.g[r])
            d.div_(n.to(d.device))

        self._rows_op(difference)
        seen = self.seen
        for s in (*minus, *norm_of):
            seen = _either(seen, self.slots[s][1])
        self.slots[into] = (dst, list(seen))

    @torch.no_grad()
    def unscale(self, slots: Sequence[Slot], inv_scale: Tensor) -> None:
        for slot in slots:
            row = self.slots[slot][0]
            self._rows_op(lambda b: b.g[row].mul_(inv_scale.to(b.g.device)))

    @torch.no_grad()
    def all_reduce(self, slots: Sequence[Slot], live: bool, dist) -> None:
        """Average gradient rows over ``dist``'s processes: one collective per row
        and bucket. A parameter has a gradient where any process gave it one, as
        DDP's reducer decides (:meth:`~sse_sam_fast.optim.distribution.DDP.union`)."""
        if live:
            self._valid_live()
        sets = [self.slots[slot] for slot in slots] + ([(self.live, self.seen)] if live else [])
        for b in self.buckets:
            for r, _ in sets:
                dist.all_reduce_(b.g[r])
                b.g[r].div_(dist.world)
        for (_, seen), now in zip(sets, dist.union([seen for _, seen in sets])):
            seen[:] = now

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
    def _norms(
        self, rows: Sequence[int], runs=None, plus: Sequence[int] = (), globally: bool = True
    ) -> list[Tensor]:
        """L2 norms of gradient rows over all buckets (fp32 or wider), on the first
        bucket's device; with ``runs``, the adaptive ranges count as ``|w|·g``;
        with ``plus``, of each row plus those rows (summed in the storage dtype,
        as the base step will see them). ``globally=False``: over this process's
        shards only (FSDP2), for a caller that makes several norms global at once."""
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
                        x = x * _magnitude(self._base(b)[start:end])
                    parts.append(torch.linalg.vector_norm(x).to(dev))
            out.append(parts[0] if len(parts) == 1 else torch.linalg.vector_norm(torch.stack(parts)))
        return self._global(out) if globally else out

    @torch.no_grad()
    def perturbations(
        self, items: Sequence[tuple[Slot, Radius]], adaptive: Adaptive = False
    ) -> list[Perturbation]:
        """A scale is, per bucket, ``(s, adaptive, start, end)`` ranges, ``s = rho / (n + 1e-16)``."""
        planned = []
        for slot, rho in items:
            runs = self._runs(rho, adaptive)
            plain = all(not a for bucket in runs for (_, a), _, _ in bucket)
            n = self._norms([self.slots[slot][0]], None if plain else runs, globally=False)[0]
            planned.append((slot, runs, n))
        norms = self._global([n for *_, n in planned])  # FSDP2: one all-reduce for every group
        out = []
        for (slot, runs, _), n in zip(planned, norms):
            scale = [[(r / (n + EPS), a, start, end) for (r, a), start, end in bucket] for bucket in runs]
            out.append(Perturbation(slot, n, scale))
        return out

    @torch.no_grad()
    def live_norm(self, plus: Sequence[Slot] = ()) -> Tensor:
        self._valid_live()
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
                d = _magnitude(base).square()
                d = d.mul_(g) if d.dtype == g.dtype else d * g  # complex g: |w|² is real
                if base is w0:
                    torch.addcmul(w0, d, s, out=b.w[start:end])
                else:
                    b.w[start:end].copy_(torch.addcmul(base, d, s))
            b.push()
        self._saved = True

    @torch.no_grad()
    def restore(self) -> None:
        if self._saved:
            for b in self.buckets:
                b.w.copy_(b.w0)
                b.push()
            self._saved = False

    # ---- ending --------------------------------------------------------------------------
    def _final_gradient(self, add: Sequence[Slot], grads: Slot | None) -> None:
        """The live row := the base step's gradient, bound to ``p.grad`` (None where
        no parameter of it has a gradient)."""
        for slot in add:
            self.add(slot)
        if grads is not None:
            self._gather()
            row, seen = self.slots.pop(grads)
            self.live, self.seen = row, seen
        self._valid_live()
        self._bind()

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
            weights = lambda: [pair for b in self.buckets for pair in b.pairs()]
            self.base_step(end, weights)
        finally:
            self._reset(end.keep_grads)

    def _reset(self, keep_grads: bool = False) -> None:
        """Empty the step's slots (their rows are free: nothing is zeroed); ``keep_grads``:
        the live row stays bound to ``p.grad``, as after a plain ``optimizer.step()``."""
        self._end_step()
        if keep_grads:
            if not self._bound:  # the fused update read the row without binding it
                self._bind()
            return
        self._unbind()
        self.seen = [False] * len(self.params)

    @torch.no_grad()
    def abort(self) -> None:
        self.restore()
        self._reset()

    @torch.no_grad()
    def zero_grad(self, set_to_none: bool = True) -> None:
        """As ``optimizer.zero_grad``: ``set_to_none=False`` keeps a parameter that
        had a gradient in the next base step (weight decay, momentum) with a zero
        gradient; its ``p.grad`` is then a zeroed view of the live row."""
        if set_to_none:
            self._unbind()
            self.seen = [False] * len(self.params)
            return
        self._gather()
        live = self.live
        self._rows_op(lambda b: b.g[live].zero_())
        self._bind()
