"""The flat buffers of the torch backend, with the Triton kernels of
``sse_sam_fast.kernels``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import _torch_private
from .base import Adaptive, Ending, Perturbation, Radius, Slot, clip_coefficient
from .flat import TorchBackend, _either


def interpreting() -> bool:
    """Whether Triton runs kernels through its interpreter (on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class TritonBackend(TorchBackend):
    """The torch backend's buffers with the Triton kernels: the norms of several
    gradient sets in one launch per bucket, perturbation, restore and the
    head-to-tail switch in one pass each, and the scale
    ``rho / (||g|| + 1e-16)`` computed inside the kernels from device sums of
    squares. When the base optimizer is ``torch.optim.SGD`` the last restore,
    the gradient sum and the SGD update are one pass too; its momentum buffers
    are then views into a flat buffer, shared with ``optimizer.state``.
    Computes in fp32 whatever the storage dtype.
    """

    name = "triton"

    def __init__(self, optimizer, params, sums=None):
        from .. import kernels  # Triton is imported only when this backend is asked for

        self._k = kernels
        # checked before the parameters move into flat buffers: a refusal changes nothing
        supported = (torch.float32, torch.bfloat16, torch.float16)
        unsupported = sorted({str(p.dtype) for p in params if p.dtype not in supported})
        if unsupported:
            raise ValueError(
                f"backend='triton' computes on float32, bfloat16 and float16 parameters, got "
                f"{', '.join(unsupported)}; use backend='torch' for them"
            )
        super().__init__(optimizer, params, sums)
        if any(b.w.device.type != "cuda" for b in self.buckets) and not interpreting():
            raise ValueError(
                "backend='triton' needs CUDA parameters (or TRITON_INTERPRET=1 to run the kernels "
                "through Triton's interpreter on the CPU); use backend='torch' or 'auto'"
            )

    # ---- hyperparameters in device memory (for CUDA graphs) --------------------------
    _hyper: dict[int, Tensor] | None = None  # id(param group) -> [lr, momentum, dampening, wd]

    def hyperparameters_on_device(self) -> None:
        """From now on the fused SGD kernel reads each param group's hyperparameters
        from device memory, refreshed by :meth:`load_hyperparameters`."""
        if self._hyper is None:
            self._hyper = {}
        self.load_hyperparameters()

    def load_hyperparameters(self) -> None:
        """Copy the param groups' current values to device memory (four small
        fills per group, no host synchronisation)."""
        dev = self.buckets[0].w.device
        # only the groups of now: a state loaded into the optimizer replaced the dicts
        self._hyper = {id(g): self._hyper[id(g)] for g in self.optimizer.param_groups if id(g) in self._hyper}
        for group in self.optimizer.param_groups:
            t = self._hyper.get(id(group))
            if t is None:
                t = self._hyper[id(group)] = torch.zeros(4, dtype=torch.float32, device=dev)
            for i, key in enumerate(("lr", "momentum", "dampening", "weight_decay")):
                t[i].fill_(float(group[key]))

    def _hyper_of(self, group: dict) -> Tensor | None:
        if self._hyper is None:
            return None
        if id(group) not in self._hyper:  # a group added since
            self.load_hyperparameters()
        return self._hyper[id(group)]

    def _index_views(self) -> None:
        # a new layout (or a grown gradient buffer): the launchers check their
        # arguments on its first launch, and trust it after (host time per step)
        self._validated: set[str] = set()
        super()._index_views()

    def _check_once(self, kernel: str) -> bool:
        first = kernel not in self._validated
        self._validated.add(kernel)
        return first

    def _flatten(self, rows: int) -> None:
        super()._flatten(rows)
        self._momentum: list[Tensor | None] = [None] * len(self.buckets)
        self._momentum_views: dict[int, Tensor] = {}
        self._sgd: _SGDLayout | None = None
        self._bucket_of = {id(p): i for i, b in enumerate(self.buckets) for p in b.params}

    @torch.no_grad()
    def _sumsq(self, rows: Sequence[int], adaptive: Adaptive = False, plus: int | None = None) -> Tensor:
        """``||G[row]||²`` of every listed row over all buckets (ASAM ranges as
        ``||w·G||²``; with ``plus``, of ``G[row] + G[plus]``): one launch per bucket
        and range, summed on the first bucket's device."""
        dev = self.buckets[0].w.device
        sumsq = None
        for b, runs in zip(self.buckets, self._runs(0.0, adaptive)):
            for (_, a), start, end in runs:
                w = self._base(b) if a else None
                part = self._k.grouped_sumsq(b.g, rows, w=w, plus=plus, start=start, end=end).to(dev)
                sumsq = part if sumsq is None else sumsq + part
        if self.sums is not None:  # FSDP2: over every process's shards, one all-reduce for all rows
            self.sums(sumsq)
        return sumsq

    @torch.no_grad()
    def live_norm(self, plus: Sequence[Slot] = ()) -> Tensor:
        if len(plus) != 1:
            return super().live_norm(plus)
        self._valid_live()
        return self._sumsq([self.live], plus=self.slots[plus[0]][0]).sqrt()[0]  # one read of each row

    @torch.no_grad()
    def perturbations(
        self, items: Sequence[tuple[Slot, Radius]], adaptive: Adaptive = False
    ) -> list[Perturbation]:
        """A scale is ``(sumsq, runs)``, ``runs`` per bucket ``(rho, adaptive, start,
        end)``: the kernels compute ``rho / (sqrt(sumsq) + 1e-16)``."""
        if not items:
            return []
        sumsq = self._sumsq([self.slots[slot][0] for slot, _ in items], adaptive)
        norms = sumsq.sqrt()
        out = []
        for i, (slot, rho) in enumerate(items):
            runs = [
                [(r, a, start, end) for (r, a), start, end in bucket] for bucket in self._runs(rho, adaptive)
            ]
            out.append(Perturbation(slot, norms[i], (sumsq[i : i + 1], runs)))
        return out

    @torch.no_grad()
    def perturb(self, move: Perturbation) -> None:
        sumsq, runs = move.scale
        row = self.slots[move.slot][0]
        check = self._check_once("perturb")
        for b, bucket_runs in zip(self.buckets, runs):
            s = sumsq.to(b.w.device)
            for rho, adaptive, start, end in bucket_runs:
                self._k.perturb_(
                    b.w, b.w0, b.g, (row, s, rho), not self._saved, check,
                    adaptive=adaptive, start=start, end=end,
                )  # fmt: skip
            b.push()
        self._saved = True

    @torch.no_grad()
    def finish(self, end: Ending) -> None:
        self._valid_live()
        first = None
        if end.scaler is None and not (end.keep_grads and (end.add or end.max_norm is not None)):
            # kept gradients must be the ones the step used: the kernel stores no sum
            first = self._fusable_sgd(end.add, end.grads, end.ok)
        self.fused_last = first is not None
        if first is None:
            super().finish(end)
            return
        if self._hyper is not None and not _capturing():
            self.load_hyperparameters()  # an eager step reads the values of now
        extra = [self.slots[slot][0] for slot in end.add]
        clip = None
        if end.max_norm is not None:
            norm = self._sumsq([self.live], plus=extra[0] if extra else None).sqrt()
            clip = clip_coefficient(norm, end.max_norm)
        groups, runs = self.optimizer.param_groups, self._sgd_layout().runs
        ok = end.ok
        check = self._check_once(f"restore_sgd {first} {ok is None} {self._hyper is None} {clip is None}")
        try:
            for i, b in enumerate(self.buckets):
                for j, lo, hi in runs[i]:
                    group = groups[j]
                    momentum = group["momentum"]
                    self._k.restore_sgd_(
                        b.w, b.g, self.live, b.w0 if self._saved else None, extra,
                        self._momentum_buffer(i) if momentum else None,
                        group["lr"], momentum, group["dampening"], group["weight_decay"],
                        group["nesterov"], first, lo, hi, None if ok is None else ok.to(b.w.device),
                        self._hyper_of(group), check, clip=None if clip is None else clip.to(b.w.device),
                    )  # fmt: skip
            self._saved = False
            _torch_private.mark_stepped(self.optimizer)
        finally:
            self._reset(end.keep_grads)

    def _fusable_sgd(self, add: Sequence[Slot], grads: Slot | None, ok: Tensor | None) -> bool | None:
        """None if the fused SGD update cannot reproduce ``optimizer.step()``
        here; else whether it is the momentum buffers' first step."""
        if grads is not None or len(add) > 1 or not _torch_private.plain_sgd(self.optimizer):
            return None
        if self._sharded:  # the kernel writes the mirrors, and the momentum would be ours, not DTensors
            return None
        seen = self.seen
        for slot in add:
            seen = _either(seen, self.slots[slot][1])
        if not all(seen):  # a parameter without a gradient must be skipped, as step() does
            return None
        layout = self._sgd_layout()
        # a step taken back on the device cannot create state: the generic path
        # decides a guarded first step on the host
        return _torch_private.sgd_momentum_buffers(
            self.optimizer, layout.with_momentum, layout.momentum_views, start=ok is None
        )

    def _sgd_layout(self) -> _SGDLayout:
        """What the fused update needs of the param groups, made again only when
        a group's parameters or whether it uses momentum changed (per step it
        was a walk over every parameter)."""
        groups = self.optimizer.param_groups
        key = tuple((tuple(map(id, g["params"])), g["momentum"] != 0) for g in groups)
        if self._sgd is None or self._sgd.key != key:
            index = {id(p): j for j, g in enumerate(groups) for p in g["params"]}
            with_momentum = [p for p in self.params if groups[index[id(p)]]["momentum"] != 0]
            self._sgd = _SGDLayout(
                key,
                [b.runs(index) for b in self.buckets],
                with_momentum,
                [self._momentum_view(p) for p in with_momentum],
            )
        return self._sgd

    def _momentum_buffer(self, i: int) -> Tensor:
        """Bucket ``i``'s flat momentum buffer and its per-parameter views."""
        if self._momentum[i] is None:
            b = self.buckets[i]
            flat = self._momentum[i] = torch.zeros_like(b.w)
            for p, off in zip(b.params, b.offsets):
                self._momentum_views[id(p)] = flat[off : off + p.numel()].view_as(p)
        return self._momentum[i]

    def _momentum_view(self, p: Tensor) -> Tensor:
        self._momentum_buffer(self._bucket_of[id(p)])
        return self._momentum_views[id(p)]


@dataclass
class _SGDLayout:
    """The fused SGD update's view of the param groups (:meth:`TritonBackend._sgd_layout`)."""

    key: tuple  # per param group: its parameters' ids, and whether it uses momentum
    runs: list[list[tuple[int, int, int]]]  # per bucket: (param group index, start, end)
    with_momentum: list[Tensor]  # the parameters whose group uses momentum ...
    momentum_views: list[Tensor]  # ... and their views of the flat momentum buffers
