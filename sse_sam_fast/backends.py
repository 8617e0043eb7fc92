"""Backends: where the gradients of a grouped-perturbation step live and how
the step's buffer operations run.

The optimizer (``optim.py``) drives one schedule for every method and every
backend through these primitives:

``begin``        start a one-call step: discard stray gradients, check the layout
``adopt``        start an official method: take ``p.grad`` as the user left it
``take(k)``      slot ``k`` := live gradients; live gradients := none
``accumulate(k)``slot ``k`` += live gradients (``:=`` if ``k`` is empty); live := none
``add_to_live(k)`` live gradients += slot ``k``
``scales``       ``rho / (||G_k|| + 1e-16)`` for several slots, kept on the device
``shift``        ``w += s_a·G_a − s_b·G_b`` (perturb, restore, or both at once)
``finish``       restore ``w``, add slots to the live gradients, step the base optimizer

"Live" gradients are what autograd writes: ``p.grad``. A parameter that got no
gradient in a pass is absent from that pass, and one absent from every pass of
the final gradient is skipped by the base optimizer, as with ``p.grad = None``.

Restore contract (every backend): restoring subtracts the same ``s·g`` that the
perturbation added, as the published code does, so ``w`` comes back to within
one rounding of its old value rather than bit-exactly (no copy of ``w`` is kept).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
from torch import Tensor

EPS = 1e-16  # added to every gradient norm, as in the published code
ALIGN_BYTES = 128  # segment alignment inside a flat buffer (apex uses the same)


def _either(a: list[bool], b: list[bool]) -> list[bool]:
    """Presence of a gradient in the sum of two gradient sets, parameter by parameter."""
    return [x or y for x, y in zip(a, b)]


def _base_step(optimizer: torch.optim.Optimizer, scaler) -> None:
    """The base optimizer's own step; under AMP through the scaler, which unscales
    the gradients and skips the step if any is inf or NaN."""
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)


class ReferenceBackend:
    """The specification: a literal per-parameter loop in the manner of the
    published code (clone per parameter, ``torch.norm`` of per-parameter norms,
    ``eps = g·s`` then ``p.add_(eps)`` / ``p.sub_(eps)``). Never fast.

    The official methods restore by subtraction, as the published code does.
    Within ``step()`` it keeps a copy of the weights and restores from it at the
    end, so that a step abandoned half-way (an exception, a non-finite value, a
    skipped AMP step) leaves them bit-identical.
    """

    name = "reference"

    def __init__(self, optimizer: torch.optim.Optimizer, params: Sequence[Tensor]):
        self.optimizer = optimizer
        self.params = list(params)
        self.slots: dict[str, dict[Tensor, Tensor]] = {}
        self._keep = False
        self._saved: dict[Tensor, Tensor] | None = None

    @property
    def pending(self) -> bool:
        return bool(self.slots)

    def begin(self) -> None:
        self.optimizer.zero_grad()
        self._keep = True

    def adopt(self) -> None:
        self._keep = False

    @torch.no_grad()
    def take(self, slot: str) -> None:
        self.slots[slot] = {p: p.grad.clone() for p in self.params if p.grad is not None}
        self.optimizer.zero_grad()

    @torch.no_grad()
    def accumulate(self, slot: str) -> None:
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
    def add_to_live(self, slot: str) -> None:
        for p, g in self.slots[slot].items():
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.add_(g)

    @torch.no_grad()
    def unscale(self, slots: Sequence[str], inv_scale: Tensor) -> None:
        for slot in slots:
            for g in self.slots[slot].values():
                g.mul_(inv_scale.to(g.device))

    @torch.no_grad()
    def all_reduce(self, slots: Sequence[str], live: bool, group) -> None:
        world = torch.distributed.get_world_size(group)
        tensors = [g for slot in slots for g in self.slots[slot].values()]
        if live:
            tensors += [p.grad for p in self.params if p.grad is not None]
        for t in tensors:
            torch.distributed.all_reduce(t, group=group)
            t.div_(world)

    @torch.no_grad()
    def scales(self, items: Sequence[tuple[str, float]]):
        """``(scales, norms)``: ``rho / (||G||+1e-16)`` and ``||G||`` per slot (None: no gradient)."""
        out, norms = [], []
        for slot, rho in items:
            grads = list(self.slots[slot].values())
            if not grads:  # nothing got a gradient: nothing to perturb
                out.append(None)
                norms.append(None)
                continue
            norm = torch.norm(torch.stack([torch.norm(g, p=2) for g in grads]), p=2)
            norms.append(norm)
            out.append(rho / (norm + EPS))
        return out, norms

    @torch.no_grad()
    def live_norm(self) -> Tensor | None:
        grads = [torch.norm(p.grad.float()) for p in self.params if p.grad is not None]
        return torch.norm(torch.stack(grads)) if grads else None

    @torch.no_grad()
    def shift(self, add=None, sub=None) -> None:
        if add is not None and self._keep and self._saved is None:
            self._saved = {p: p.detach().clone() for p in self.params}
        # restore first, then perturb: the order of the published code
        for pair, sign in ((sub, -1), (add, 1)):
            if pair is None or pair[1] is None:
                continue
            slot, scale = pair
            for p, g in self.slots[slot].items():
                eps = g.mul(scale)
                if sign > 0:
                    p.add_(eps)
                else:
                    p.sub_(eps)
        if add is None and sub is not None:
            self._saved = None

    @torch.no_grad()
    def finish(self, restore=None, add: Sequence[str] = (), grads: str | None = None, scaler=None) -> None:
        if self._saved is not None:  # within step(): the copy (a NaN perturbation cannot be subtracted)
            self._put_back()
        else:
            self.shift(sub=restore)
        for slot in add:
            self.add_to_live(slot)
        if grads is not None:
            kept = self.slots.get(grads, {})
            for p in self.params:
                p.grad = kept[p].clone() if p in kept else None
        try:
            _base_step(self.optimizer, scaler)
        finally:
            self.optimizer.zero_grad()
            self.slots.clear()

    def _put_back(self) -> None:
        for p, w in self._saved.items():
            p.copy_(w)
        self._saved = None

    @torch.no_grad()
    def abort(self) -> None:
        if self._saved is not None:
            self._put_back()
        self.slots.clear()
        self.optimizer.zero_grad()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)


class _Bucket:
    """The parameters of one (device, dtype): weights in one flat buffer ``w``,
    gradient sets as the rows of one 2-D buffer ``g`` (a kernel reaches every
    set of a bucket from a single pointer)."""

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
        self.w0 = torch.zeros_like(self.w)  # the weights before the step's first perturbation
        with torch.no_grad():
            for p, off in zip(params, self.offsets):
                view = self.w[off : off + p.numel()].view_as(p)
                view.copy_(p.data)
                p.data = view

    def views(self, row: int) -> list[Tensor]:
        return [self.g[row, off : off + p.numel()].view_as(p) for p, off in zip(self.params, self.offsets)]


class TorchBackend:
    """Flat buffers, one per (device, dtype), with each ``p.data`` and ``p.grad``
    a view into them: a phase is a few torch ops on whole buffers, and norms stay
    device tensors (no host synchronisation).

    Gradient sets are rows of a per-bucket 2-D buffer. Handing the live
    gradients to a slot only relabels a row and points ``p.grad`` at another
    (zeroed) row, so no gradient is ever copied between passes. Rows that are
    neither live nor in a slot are kept zero.

    Restore contract: exact copy. The first perturbation of a step saves
    ``w0 = w``; later ones compute ``w = w0 + s·g``; restoring is ``w = w0``, so
    the weights come back bit-identical (the published code subtracts, which
    returns them within a rounding). This moves no more data than subtracting.
    """

    name = "torch"

    def __init__(self, optimizer: torch.optim.Optimizer, params: Sequence[Tensor], rows: int):
        self.optimizer = optimizer
        self.params = list(params)
        self.rows = rows
        self.slots: dict[str, tuple[int, list[bool]]] = {}
        self._saved = False  # whether w0 holds the weights of an unfinished perturbation
        self._flatten()
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
    def _flatten(self) -> None:
        by_key: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
        for p in self.params:
            by_key.setdefault((p.device, p.dtype), []).append(p)
        self.buckets = [_Bucket(ps, self.rows) for ps in by_key.values()]
        index = {id(p): i for i, p in enumerate(self.params)}
        # row -> views ordered as self.params
        self._views = []
        for r in range(self.rows):
            views: list[Tensor | None] = [None] * len(self.params)
            for b in self.buckets:
                for p, v in zip(b.params, b.views(r)):
                    views[index[id(p)]] = v
            self._views.append(views)
        self._ptrs = [p.data_ptr() for p in self.params]
        self.live = 0
        self.seen = [False] * len(self.params)
        self._bind(self.live)

    def _check_layout(self) -> None:
        """Parameters re-bound behind our back (``model.to(...)``, assigning
        ``.data``) would otherwise be trained as detached copies."""
        if all(p.data_ptr() == ptr for p, ptr in zip(self.params, self._ptrs)):
            return
        if self.slots:
            raise RuntimeError(
                "model parameters were re-bound (e.g. model.to() or p.data = ...) in the middle "
                "of a SAM step; finish or restart the step first"
            )
        # the gradients of a backward the user already ran (official methods) move along
        old = [
            None if g is None or (g is v and not seen) else g
            for g, v, seen in zip((p.grad for p in self.params), self._views[self.live], self.seen)
        ]
        self._flatten()
        with torch.no_grad():
            for i, (g, v) in enumerate(zip(old, self._views[self.live])):
                if g is not None:
                    v.copy_(g)
                    self.seen[i] = True

    def _bind(self, row: int) -> None:
        for p, v in zip(self.params, self._views[row]):
            if p.grad is not v:
                p.grad = v

    def _free_row(self) -> int:
        used = {self.live} | {r for r, _ in self.slots.values()}
        return next(r for r in range(self.rows) if r not in used)

    def _rows_op(self, fn) -> None:
        for b in self.buckets:
            fn(b)

    # ---- primitives -------------------------------------------------------------
    @property
    def pending(self) -> bool:
        return bool(self.slots)

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
    def adopt(self) -> None:
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

    @torch.no_grad()
    def take(self, slot: str) -> None:
        if slot in self.slots:  # a slot re-taken: its old row is free again
            row, _ = self.slots.pop(slot)
            self._rows_op(lambda b: b.g[row].zero_())
        self.slots[slot] = (self.live, self.seen)
        self.live = self._free_row()
        self.seen = [False] * len(self.params)
        self._bind(self.live)

    @torch.no_grad()
    def accumulate(self, slot: str) -> None:
        if slot not in self.slots:
            self.take(slot)
            return
        row, seen = self.slots[slot]
        live = self.live
        self._rows_op(lambda b: (b.g[row].add_(b.g[live]), b.g[live].zero_()))
        self.slots[slot] = (row, _either(seen, self.seen))
        self.seen = [False] * len(self.params)

    @torch.no_grad()
    def add_to_live(self, slot: str) -> None:
        row, seen = self.slots[slot]
        live = self.live
        self._rows_op(lambda b: b.g[live].add_(b.g[row]))
        self.seen = _either(self.seen, seen)

    @torch.no_grad()
    def unscale(self, slots: Sequence[str], inv_scale: Tensor) -> None:
        for slot in slots:
            row = self.slots[slot][0]
            self._rows_op(lambda b: b.g[row].mul_(inv_scale.to(b.g.device)))

    @torch.no_grad()
    def all_reduce(self, slots: Sequence[str], live: bool, group) -> None:
        """Average gradient rows over the process group: one collective per row and bucket."""
        world = torch.distributed.get_world_size(group)
        rows = [self.slots[slot][0] for slot in slots] + ([self.live] if live else [])
        for b in self.buckets:
            for r in rows:
                torch.distributed.all_reduce(b.g[r], group=group)
                b.g[r].div_(world)

    @torch.no_grad()
    def _norms(self, rows: Sequence[int]) -> list[Tensor]:
        """L2 norms of gradient rows over all buckets (fp32 or wider), on the first bucket's device."""
        dev = self.buckets[0].w.device
        out = []
        for r in rows:
            # fp32 accumulation: bf16/fp16 sums lose the small gradients of the tail
            parts = [
                torch.linalg.vector_norm(b.g[r], dtype=torch.promote_types(b.g.dtype, torch.float32)).to(dev)
                for b in self.buckets
            ]
            out.append(parts[0] if len(parts) == 1 else torch.linalg.vector_norm(torch.stack(parts)))
        return out

    @torch.no_grad()
    def scales(self, items: Sequence[tuple[str, float]]):
        """``(scales, norms)``: ``rho / (||G||+1e-16)`` and ``||G||`` per slot, device tensors."""
        norms = self._norms([self.slots[slot][0] for slot, _ in items])
        return [rho / (n + EPS) for (_, rho), n in zip(items, norms)], norms

    @torch.no_grad()
    def live_norm(self) -> Tensor:
        return self._norms([self.live])[0]

    @torch.no_grad()
    def shift(self, add=None, sub=None) -> None:
        """``w = w0 + s·G[add]`` (saving ``w0 = w`` first if this is the step's first
        perturbation); with ``add`` None, ``w = w0``. ``sub`` needs no arithmetic:
        the snapshot already is the unperturbed point."""
        if add is None:
            if sub is not None:
                self._restore()
            return
        slot, scale = add
        row = self.slots[slot][0]
        for b in self.buckets:
            s = scale.to(b.w.device)
            if self._saved:
                torch.addcmul(b.w0, b.g[row], s, out=b.w)
            else:
                b.w0.copy_(b.w)
                b.w.addcmul_(b.g[row], s)
        self._saved = True

    def _restore(self) -> None:
        if self._saved:
            for b in self.buckets:
                b.w.copy_(b.w0)
            self._saved = False

    @torch.no_grad()
    def finish(self, restore=None, add: Sequence[str] = (), grads: str | None = None, scaler=None) -> None:
        """Restore ``w`` (``restore``: the last perturbation, or None), add the slots
        ``add`` to the live gradients, and step the base optimizer on them (or on
        slot ``grads``; through ``scaler.step`` under AMP). Leaves every gradient
        zero and every slot empty."""
        if restore is not None:
            self._restore()
        for slot in add:
            self.add_to_live(slot)
        if grads is not None:
            row, seen = self.slots.pop(grads)
            self.live, self.seen = row, seen
            self._bind(row)
        absent = [p for p, s in zip(self.params, self.seen) if not s]
        for p in absent:
            p.grad = None
        try:
            _base_step(self.optimizer, scaler)
        finally:
            self._reset()

    def _reset(self) -> None:
        self.slots.clear()
        self._rows_op(lambda b: b.g.zero_())
        self.seen = [False] * len(self.params)
        self._bind(self.live)

    @torch.no_grad()
    def abort(self) -> None:
        """Abandon the step: weights back to the snapshot, gradients zero."""
        self._restore()
        self._reset()

    @torch.no_grad()
    def zero_grad(self, set_to_none: bool = True) -> None:
        # set_to_none cannot apply: p.grad must stay a view into the flat buffer
        live = self.live
        self._rows_op(lambda b: b.g[live].zero_())
        self.seen = [False] * len(self.params)
        self._bind(live)


class TritonBackend(TorchBackend):
    """The torch backend's buffers with the Triton kernels of ``kernels/``: the
    norms of several gradient sets in one launch per bucket, perturbation,
    restore and the head-to-tail switch in one pass each, and the scale
    ``rho / (||g|| + 1e-16)`` computed inside the kernels from device sums of
    squares. When the base optimizer is ``torch.optim.SGD`` the last restore,
    the gradient sum and the SGD update are one pass too; its momentum buffers
    are then views into a flat buffer, shared with ``optimizer.state``.
    Computes in fp32 whatever the storage dtype.
    """

    name = "triton"

    def __init__(self, optimizer, params, rows: int):
        import kernels  # Triton is imported only when this backend is asked for

        self._k = kernels
        super().__init__(optimizer, params, rows)
        if any(b.w.device.type != "cuda" for b in self.buckets) and not _interpreting():
            raise ValueError(
                "backend='triton' needs CUDA parameters (or TRITON_INTERPRET=1 to run the kernels "
                "through Triton's interpreter on the CPU); use backend='torch' or 'auto'"
            )

    def _flatten(self) -> None:
        super()._flatten()
        self._momentum: list[Tensor | None] = [None] * len(self.buckets)
        self._momentum_views: dict[int, Tensor] = {}
        self._bucket_of = {id(p): i for i, b in enumerate(self.buckets) for p in b.params}

    @torch.no_grad()
    def scales(self, items):
        """``(scales, norms)``; a scale is ``(sumsq, rho)``: the kernels compute
        ``rho / (sqrt(sumsq) + 1e-16)`` on the device."""
        if not items:
            return [], []
        rows = [self.slots[slot][0] for slot, _ in items]
        dev = self.buckets[0].w.device
        sumsq = None
        for b in self.buckets:
            part = self._k.grouped_sumsq(b.g, rows).to(dev)
            sumsq = part if sumsq is None else sumsq + part
        return [(sumsq[i : i + 1], rho) for i, (_, rho) in enumerate(items)], list(sumsq.sqrt())

    def _term(self, pair, b: _Bucket):
        slot, (sumsq, rho) = pair
        return self.slots[slot][0], sumsq.to(b.w.device), rho

    @torch.no_grad()
    def shift(self, add=None, sub=None) -> None:
        if add is None:
            if sub is not None:
                self._restore()
            return
        for b in self.buckets:
            self._k.perturb_(b.w, b.w0, b.g, self._term(add, b), save=not self._saved)
        self._saved = True

    @torch.no_grad()
    def finish(self, restore=None, add: Sequence[str] = (), grads: str | None = None, scaler=None) -> None:
        first = None if scaler is not None else self._fusable_sgd(add, grads)
        if first is None:
            super().finish(restore, add, grads, scaler)
            return
        extra = [self.slots[slot][0] for slot in add]
        from_w0 = restore is not None and self._saved
        group_of = self._group_of()
        try:
            for i, b in enumerate(self.buckets):
                for group, start, end in self._group_runs(b, group_of):
                    momentum = group["momentum"]
                    self._k.restore_sgd_(
                        b.w, b.g, self.live, b.w0 if from_w0 else None, extra,
                        self._momentum_buffer(i) if momentum else None,
                        group["lr"], momentum, group["dampening"], group["weight_decay"],
                        group["nesterov"], first, start, end,
                    )  # fmt: skip
            self._saved = False
            # the base optimizer's step() did not run: tell an attached LR scheduler it did
            self.optimizer._opt_called = True
        finally:
            self._reset()

    def _fusable_sgd(self, add, grads) -> bool | None:
        """None if the fused SGD update cannot reproduce ``optimizer.step()``
        here; else whether it is the momentum buffers' first step."""
        opt = self.optimizer
        if type(opt) is not torch.optim.SGD or grads is not None or len(add) > 1:
            return None
        from torch.optim import optimizer as hooks

        if (
            opt._optimizer_step_pre_hooks
            or opt._optimizer_step_post_hooks
            or hooks._global_optimizer_pre_hooks
            or hooks._global_optimizer_post_hooks
        ):
            return None
        seen = self.seen
        for slot in add:
            seen = _either(seen, self.slots[slot][1])
        if not all(seen):  # a parameter without a gradient must be skipped, as step() does
            return None
        keys = ("lr", "momentum", "dampening", "weight_decay")
        if any(g.get("maximize") or any(isinstance(g[k], Tensor) for k in keys) for g in opt.param_groups):
            return None
        group_of = self._group_of()
        with_momentum = [p for p in self.params if group_of[id(p)]["momentum"] != 0]
        states = [opt.state.get(p, {}).get("momentum_buffer") for p in with_momentum]
        if all(s is None for s in states):
            # a first step, or optimizer.state emptied since (a state_dict saved before
            # any step was loaded): (re)register the views the kernel is about to fill
            for p in with_momentum:
                opt.state[p]["momentum_buffer"] = self._momentum_view(p)
            return True
        if any(s is None for s in states):
            return None
        for p, s in zip(with_momentum, states):
            view = self._momentum_view(p)
            if s is not view:  # loaded from a state_dict, or made by a plain step(): adopt it
                view.copy_(s)
                opt.state[p]["momentum_buffer"] = view
        return False

    def _group_of(self) -> dict[int, dict]:
        return {id(p): g for g in self.optimizer.param_groups for p in g["params"]}

    @staticmethod
    def _group_runs(b: _Bucket, group_of: dict[int, dict]):
        """Maximal runs of consecutive parameters of ``b`` in one param group, as
        ``(group, start, end)`` element ranges (padding included)."""
        runs = []
        for j, p in enumerate(b.params):
            g = group_of[id(p)]
            end = b.offsets[j + 1] if j + 1 < len(b.params) else b.numel
            if runs and runs[-1][0] is g:
                runs[-1][2] = end
            else:
                runs.append([g, b.offsets[j], end])
        return runs

    def _momentum_buffer(self, i: int) -> Tensor:
        """Bucket ``i``'s flat momentum buffer and its per-parameter views
        (_fusable_sgd puts the views into ``optimizer.state``)."""
        if self._momentum[i] is None:
            b = self.buckets[i]
            flat = self._momentum[i] = torch.zeros_like(b.w)
            for p, off in zip(b.params, b.offsets):
                self._momentum_views[id(p)] = flat[off : off + p.numel()].view_as(p)
        return self._momentum[i]

    def _momentum_view(self, p: Tensor) -> Tensor:
        self._momentum_buffer(self._bucket_of[id(p)])
        return self._momentum_views[id(p)]


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> bool:
    # find_spec, not import: importing triton fixes whether kernels are
    # interpreted, and TRITON_INTERPRET may still be set after this check
    import importlib.util

    return importlib.util.find_spec("triton") is not None


BACKENDS = ("auto", "triton", "torch", "reference")


def resolve_backend(name: str, params: Sequence[Tensor]) -> str:
    """``auto``: ``triton`` when the parameters are on CUDA and Triton imports, else ``torch``."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name == "auto":
        on_cuda = all(p.device.type == "cuda" for p in params)
        return "triton" if on_cuda and triton_available() else "torch"
    if name == "triton" and not triton_available():
        raise ValueError("backend='triton' needs Triton: pip install 'sse_sam_fast[triton]' (or use 'torch')")
    return name


def make_backend(name: str, optimizer, params, rows: int):
    name = resolve_backend(name, params)
    if name == "reference":
        return ReferenceBackend(optimizer, params)
    if name == "triton":
        return TritonBackend(optimizer, params, rows)
    return TorchBackend(optimizer, params, rows)
