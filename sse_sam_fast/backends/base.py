"""The interface every backend implements, written down once.

A grouped-perturbation step (``sse_sam_fast.optim``) needs a place to keep
several gradient sets between passes and a handful of operations on them. The
engine names a set by an opaque :data:`Slot`; the backend decides where it
lives (a dict of per-parameter clones, or a row of a flat buffer) and how many
rows it needs. "Live" gradients are what autograd writes: ``p.grad``, where ``None`` means
no gradient, as in ``torch.optim``; no backend hooks into autograd.

A parameter that got no gradient in a pass is absent from that pass; one
absent from every pass of the final gradient is skipped by the base optimizer,
as with ``p.grad = None``.

Restore contract. ``perturb`` moves the weights to ``w + e``; the backend
remembers the applied move, so ``perturb`` again (head to tail) and
``restore`` need no argument:

- ``reference``, official methods: restoring subtracts the same ``e`` the
  perturbation added, as the published code does (``w`` comes back within a
  rounding).
- ``reference`` inside :meth:`step`, and the flat backends always: the first
  perturbation of a step saves ``w0 = w``; a later one computes ``w = w0 + e``
  and restoring is the exact copy ``w = w0``. A step abandoned half-way (an
  exception, a non-finite value) therefore leaves the weights bit-identical.
"""

from __future__ import annotations

import abc
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, NewType, Union

import torch
from torch import Tensor

from .. import _torch_private
from .._constants import EPS
from .._saved import Saved

__all__ = ["EPS", "Backend", "Ending", "Perturbation", "Radius", "Slot"]

Slot = NewType("Slot", int)
"""A gradient set kept between passes; backends use it only as a key."""

Radius = Union[float, tuple[float, ...]]
"""A perturbation radius: one for every parameter, or one per param group of
the base optimizer, in the order of ``optimizer.param_groups`` (the davda54/sam
convention lets each group carry its own ``rho``)."""

Adaptive = Union[bool, tuple[bool, ...]]
"""ASAM (Kwon et al., ICML 2021) on or off: for all parameters, or per param
group. Adaptive parameters are moved by ``rho · T² g / ||T g||`` with
``T = |w|`` (``w`` unperturbed), and enter the norm as ``T g``."""


def is_dtensor(t) -> bool:
    """Whether ``t`` is a DTensor (an FSDP2 shard, or its gradient). Where torch's
    DTensor module was never imported no tensor can be one: asking costs no import."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def local(t: Tensor | None) -> Tensor | None:
    """This process's shard of a DTensor (sharing its storage: writes reach the
    DTensor); any other tensor itself. Taken without autograd: with it, the
    shard is a custom Function's output view, which refuses in-place writes."""
    if not is_dtensor(t):
        return t
    with torch.no_grad():
        return t.to_local()


def per_group(value, n_groups: int) -> tuple:
    """A :data:`Radius` or :data:`Adaptive` as one value per param group."""
    return value if isinstance(value, tuple) else (value,) * n_groups


def uniform(value) -> bool:
    """Whether a :data:`Radius` or :data:`Adaptive` is the same for every group."""
    return not isinstance(value, tuple) or len(set(value)) <= 1


def clip_coefficient(norm: Tensor, max_norm: float) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_``'s factor, clamped at 1, on the device."""
    return (max_norm / (norm.float() + 1e-6)).clamp(max=1.0)


@dataclass(frozen=True)
class Ending:
    """How a step ends (:meth:`Backend.finish`): the slots ``add`` join the live
    gradients, or slot ``grads`` replaces them; the sum is clipped to the global
    norm ``max_norm`` as ``torch.nn.utils.clip_grad_norm_`` clips (on the device;
    under AMP after ``scaler.unscale_``); the base optimizer steps on it, through
    ``scaler.step`` under AMP. With ``ok`` (a device bool) the step takes effect
    only where ``ok`` is true: weights and optimizer state are otherwise left
    bit-identical, decided on the device. ``keep_grads``: the gradient the step
    used stays in ``p.grad`` (davda54's ``zero_grad=False``)."""

    add: tuple[Slot, ...] = ()
    grads: Slot | None = None
    scaler: object = None
    ok: Tensor | None = None
    max_norm: float | None = None
    keep_grads: bool = False


@dataclass(frozen=True)
class Perturbation:
    """A planned move ``e = rho · G[slot] / (||G[slot]|| + 1e-16)`` (ASAM:
    ``rho · T² G / (||T G|| + 1e-16)``).

    ``norm`` is ``||G[slot]||`` (``||T G[slot]||``) as a device tensor (None where
    no parameter of the slot got a gradient); ``scale`` is the backend's own
    representation of the move and means nothing to the engine.
    """

    slot: Slot
    norm: Tensor | None
    scale: object


class Backend(abc.ABC):
    """Where the gradients of a step live and how its buffer operations run."""

    name: ClassVar[str]

    def __init__(self, optimizer: torch.optim.Optimizer, params: Sequence[Tensor], sums=None):
        if sums is None and any(is_dtensor(p) for p in params):
            raise ValueError(
                "the optimizer holds DTensor (sharded) parameters, whose norms need the other processes' "
                "shards: pass the model sharded with torch.distributed.fsdp.fully_shard as model"
            )
        self.optimizer = optimizer
        self.params = list(params)
        # FSDP2: sums a tensor of local sums of squares over the processes holding
        # the other shards, in place; None: every parameter is whole here
        self.sums = sums
        self.slots: dict[Slot, object] = {}  # what a slot holds is the backend's own business
        self.lasting: set[Slot] = set()  # slots kept from one step to the next (see export)
        self._state_copy = Saved()  # the optimizer state a guarded step may take back

    def extend(self, params: Sequence[Tensor]) -> None:
        """Parameters the base optimizer holds from now on (``add_param_group``)."""
        if self.holding:
            self.abort()  # the weights may be perturbed: a refused step must not leave them so
            raise RuntimeError(
                "parameters were added to the optimizer in the middle of a SAM step; the step was "
                "abandoned and the weights restored: run the backward again and start the step anew"
            )
        self.params.extend(params)

    # ---- starting -------------------------------------------------------------------
    @abc.abstractmethod
    def begin(self) -> None:
        """Start a one-call step: discard stray gradients, check the layout."""

    @abc.abstractmethod
    def adopt(self, copy_weights: bool = False) -> None:
        """Start an official method: take ``p.grad`` as the user left it.
        ``copy_weights``: the restore copies the weights back, as davda54/sam's
        does, where the published SSE-SAM code subtracts (matters only to
        ``reference``; the flat backends always copy)."""

    # ---- gradient sets ---------------------------------------------------------------
    @property
    def holding(self) -> bool:
        """Whether a slot of the step holds a gradient (a step is in progress)."""
        return any(slot not in self.lasting for slot in self.slots)

    def _end_step(self) -> None:
        """Empty the step's slots; the lasting ones stay."""
        self.slots = {slot: v for slot, v in self.slots.items() if slot in self.lasting}

    # ---- state kept across steps ------------------------------------------------------
    # A method may keep a gradient set from one step to the next (a perturbation it
    # reuses): it names the slot in ``lasting``; ``finish`` and ``abort`` then leave
    # it, and ``export``/``load`` carry it through ``state_dict``.
    @abc.abstractmethod
    def export(self, slot: Slot) -> list[Tensor | None]:
        """The set in ``slot``, one tensor per parameter (None: no gradient), copies."""

    @abc.abstractmethod
    def load(self, slot: Slot, values: Sequence[Tensor | None]) -> None:
        """``slot`` := ``values`` (as :meth:`export` gives them), converted as ``copy_`` does."""

    @abc.abstractmethod
    def keep(self, slot: Slot, into: Slot) -> None:
        """``into`` := a copy of ``slot`` (a lasting slot: a gradient kept for later
        steps); ``slot`` is unchanged. The copy's storage is reused from step to
        step, so a captured step reading ``into`` stays valid."""

    @abc.abstractmethod
    def keep_difference(self, into: Slot, minus: Sequence[Slot], norm_of: Sequence[Slot]) -> None:
        """``into := (live − Σ minus) / (||Σ norm_of|| + 1e-16)`` (a lasting slot): the
        SAM gradient's difference to the clean one, relative to the clean norm."""

    def discard(self, slot: Slot) -> None:
        """Empty ``slot``."""
        self.slots.pop(slot, None)

    def holds(self, slot: Slot) -> bool:
        """Whether ``slot`` holds a gradient."""
        return slot in self.slots

    @abc.abstractmethod
    def take(self, slot: Slot) -> None:
        """``slot := live``; live gradients := none."""

    @abc.abstractmethod
    def add(self, slot: Slot, scale: Tensor | None = None) -> None:
        """``live += slot`` (``live += scale · slot``, ``scale`` a device scalar);
        the slot keeps its gradient."""

    @abc.abstractmethod
    def accumulate(self, slot: Slot) -> None:
        """``slot += live`` (``:=`` if the slot is empty); live gradients := none."""

    def show(self) -> None:
        """``p.grad`` := the live gradients, for a caller that reads them between
        passes (davda54's ``first_step(zero_grad=False)``). The flat backends keep
        them in a row until then; the reference keeps them in ``p.grad``."""
        return None

    @abc.abstractmethod
    def unscale(self, slots: Sequence[Slot], inv_scale: Tensor) -> None:
        """Multiply the gradients of ``slots`` by a device scalar (AMP's ``1/scale``)."""

    @abc.abstractmethod
    def all_reduce(self, slots: Sequence[Slot], live: bool, dist) -> None:
        """Average ``slots`` (and the live gradients if ``live``) over the processes of
        ``dist`` (:mod:`sse_sam_fast.optim.distribution`); a parameter has a gradient
        afterwards where any process gave it one."""

    # ---- norms and moves ---------------------------------------------------------------
    def _global(self, norms: list[Tensor]) -> list[Tensor]:
        """The norms over every process's shards from the local ones (FSDP2): one
        all-reduce of their squares for all of them, whatever the number of
        parameters; the local norms where the parameters are whole."""
        if self.sums is None or not norms:
            return norms
        sumsq = torch.stack(norms).square()
        self.sums(sumsq)
        return list(sumsq.sqrt().unbind())

    @abc.abstractmethod
    def perturbations(
        self, items: Sequence[tuple[Slot, Radius]], adaptive: Adaptive = False
    ) -> list[Perturbation]:
        """One :class:`Perturbation` per ``(slot, rho)``, norms kept on the device.
        ``T = |w|`` is read from the unperturbed weights."""

    @abc.abstractmethod
    def live_norm(self, plus: Sequence[Slot] = ()) -> Tensor | None:
        """``||live gradients||`` (``||live + Σ plus||``, the sum not stored) as a
        device tensor (None: no gradient at all)."""

    @abc.abstractmethod
    def perturb(self, move: Perturbation) -> None:
        """Undo the applied move, if any, and apply ``move``."""

    @abc.abstractmethod
    def restore(self) -> None:
        """Undo the applied move, if any."""

    # ---- ending --------------------------------------------------------------------------
    @abc.abstractmethod
    def finish(self, end: Ending) -> None:
        """Restore ``w`` and step the base optimizer as ``end`` says. Leaves every
        slot empty and every gradient zero (``end.keep_grads``: the gradient the
        base step used stays in ``p.grad``), also when the base step raises."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Abandon the step: weights back to ``w``, gradients zero, slots empty."""

    @abc.abstractmethod
    def zero_grad(self, set_to_none: bool = True) -> None:
        """The optimizer's ``zero_grad``."""

    def _clip(self, max_norm: float) -> None:
        """Clip the live gradients to the global norm ``max_norm``, as
        ``torch.nn.utils.clip_grad_norm_`` does, without a host synchronisation."""
        raise NotImplementedError

    def base_step(self, end: Ending, weights=lambda: []) -> None:
        """The base optimizer's own step on the live gradients, as ``end`` says:
        under AMP through the scaler, which unscales the gradients and skips the
        step if any is inf or NaN; :meth:`_clip` first clips the unscaled
        gradients (``scaler.unscale_`` is public and remembered by
        ``scaler.step``); with ``end.ok``, through torch's own skip where the
        optimizer has one (fused SGD, Adam, AdamW: ``found_inf``), else through
        :func:`guarded_step` with the ``weights()`` pairs."""
        optimizer = self.optimizer
        if end.max_norm is not None:
            if end.scaler is not None:
                end.scaler.unscale_(optimizer)
            self._clip(end.max_norm)
        if end.ok is not None:
            if _torch_private.skips_on_found_inf(optimizer) and all(
                p in optimizer.state for p in self.params if p.grad is not None
            ):  # the optimizer skips inside its kernel: nothing to copy (a first step creates state)
                _torch_private.step_unless(optimizer, (~end.ok).float())
            else:
                guarded_step(optimizer, self.params, end.ok, weights(), self._state_copy)
        elif end.scaler is None:
            optimizer.step()
        else:
            end.scaler.step(optimizer)


def _state_of(optimizer: torch.optim.Optimizer, params: Sequence[Tensor]) -> dict[int, dict]:
    return {id(p): dict(optimizer.state[p]) for p in params if p in optimizer.state}


@torch.no_grad()
def guarded_step(
    optimizer: torch.optim.Optimizer,
    params: Sequence[Tensor],
    ok: Tensor,
    weights: Sequence[tuple[Tensor, Tensor]],
    saved: Saved,
) -> None:
    """``optimizer.step()``, taken back on the device where ``ok`` is false.

    ``weights``: ``(w, w_before)`` pairs covering the parameters. The optimizer
    state is copied into ``saved`` before the step and selected after it. A step that creates
    state (the first one) or replaces a state tensor cannot be taken back on the
    device: that step reads ``ok`` on the host instead.
    """
    before = _state_of(optimizer, params)
    # FSDP2: the state is DTensors; their local shards are what a flat copy can hold
    saved.save([local(t) for st in before.values() for t in st.values() if isinstance(t, Tensor)])
    optimizer.step()
    after = _state_of(optimizer, params)
    same = after.keys() == before.keys() and all(
        after[i].keys() == st.keys()
        and all(after[i][k] is v or (not isinstance(v, Tensor) and v == after[i][k]) for k, v in st.items())
        for i, st in before.items()
    )
    if not same and not ok.item():
        for p in params:  # the host knows: put everything back as it was
            if id(p) in before:
                optimizer.state[p] = before[id(p)]
            else:
                optimizer.state.pop(p, None)
        saved.restore()
        for w, w_before in weights:
            w.copy_(w_before)
        return
    if same:
        saved.keep_if(ok)
        for w, w_before in weights:
            torch.where(ok.to(w.device), w, w_before, out=w)
