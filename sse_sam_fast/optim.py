"""SAM, ImbSAM and SSE-SAM as configurations of one grouped-perturbation step.

A step splits the batch's per-sample losses ``l_i`` into groups (all samples;
or head and tail by a tail mask). Group ``k`` has the loss
``L_k = c_k · Σ_{i∈k} l_i / B`` and a radius ``rho_k``; its gradient enters the
update at ``w + e_k`` with ``e_k = rho_k · g_k / (||g_k|| + 1e-16)``,
``g_k = ∇L_k(w)``, or at ``w`` itself when ``rho_k = 0``. The base optimizer
then steps from the restored ``w`` with ``Σ_k ∇L_k(w + e_k)``.

=========  ==============================================  ==========================
method     groups ``(members, c_k, rho_k)``                 paper
=========  ==============================================  ==========================
SAM        ``(all, 1, rho)``                               Foret et al., ICLR 2021
ImbSAM     ``(head, 1, 0)``, ``(tail, tail_weight, rho)``  Zhou et al., ICCV 2023
SSE-SAM    ``(head, 1, rho_H)``, ``(tail, 1, tail_rho)``   arXiv 2412.13715, AAAI 2025
=========  ==============================================  ==========================

SSE-SAM's ``rho_H`` is ``head_rho`` until ``update_rho()`` (called once per
epoch) has counted ``gamma · total_epochs`` epochs, then 0.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import warnings
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .backends import BACKENDS, make_backend

SCHEDULES = ("exact", "split", "auto")  # the values of step(schedule=...)


class _Group(NamedTuple):
    members: str  # "all" | "head" | "tail"; also the name of its gradient slot
    weight: float
    rho: float


def _check_rho(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float >= 0, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite float >= 0, got {value}")
    return float(value)


def _check_losses(losses, batch: int | None = None) -> Tensor:
    if not isinstance(losses, Tensor):
        raise TypeError(f"closure must return a tensor of per-sample losses, got {type(losses).__name__}")
    if losses.dim() != 1:
        raise ValueError(
            f"closure must return per-sample losses of shape (B,), got shape {tuple(losses.shape)}; "
            "use reduction='none'"
        )
    if batch is not None and losses.shape[0] != batch:
        raise ValueError(f"closure returned {losses.shape[0]} losses, expected {batch} (the same batch)")
    if losses.shape[0] == 0 and batch is None:
        raise ValueError("closure returned an empty batch of losses")
    if not losses.requires_grad:
        raise ValueError("closure returned losses that do not require grad (was it run under no_grad?)")
    return losses


def _check_schedule(gamma, total_epochs) -> tuple[float, int]:
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 <= gamma <= 1:
        raise ValueError(f"gamma must be a float in [0, 1], got {gamma!r}")
    if isinstance(total_epochs, bool) or not isinstance(total_epochs, int) or total_epochs < 1:
        raise ValueError(f"total_epochs must be an int >= 1, got {total_epochs!r}")
    return float(gamma), total_epochs


def _cut_epoch(gamma: float, total_epochs: int) -> float | None:
    # the official code switches only for 0 < gamma < 1
    return total_epochs * gamma if 0 < gamma < 1 else None


def _micro_batches(closure, tail_mask) -> tuple[list, list]:
    """A closure and a mask, or equal-length lists of them (gradient accumulation)."""
    if isinstance(closure, (list, tuple)):
        closures = list(closure)
        if not closures:
            raise ValueError("closure: an empty list of micro-batch closures")
        if tail_mask is None:
            masks = [None] * len(closures)
        elif isinstance(tail_mask, (list, tuple)) and len(tail_mask) == len(closures):
            masks = list(tail_mask)
        else:
            raise ValueError("tail_mask must be a list with one mask per micro-batch closure")
    else:
        if isinstance(tail_mask, (list, tuple)):
            raise ValueError("tail_mask is a list but closure is not: pass one closure per micro-batch")
        closures, masks = [closure], [tail_mask]
    for c in closures:
        if not callable(c):
            raise TypeError("step() needs a closure that returns the per-sample losses of the batch")
    return closures, masks


def _takes_index(closure) -> bool:
    try:
        params = inspect.signature(closure).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return any(p.kind in positional or p.kind == inspect.Parameter.VAR_POSITIONAL for p in params)


def _check_mask(tail_mask, losses: Tensor | None = None) -> Tensor:
    if not isinstance(tail_mask, Tensor) or tail_mask.dtype != torch.bool:
        raise TypeError(f"tail_mask must be a bool tensor of shape (B,), got {tail_mask!r:.80}")
    if losses is None:
        if tail_mask.dim() != 1 or tail_mask.numel() == 0:
            raise ValueError(f"tail_mask must have shape (B,) with B >= 1, got {tuple(tail_mask.shape)}")
        return tail_mask
    if tail_mask.shape != losses.shape:
        raise ValueError(
            f"tail_mask must have shape {tuple(losses.shape)} (one flag per sample), "
            f"got {tuple(tail_mask.shape)}"
        )
    if tail_mask.device != losses.device:
        raise ValueError(f"tail_mask is on {tail_mask.device}, the losses on {losses.device}")
    return tail_mask


class _GroupedSAM(torch.optim.Optimizer):
    """The engine shared by :class:`SAM`, :class:`ImbSAM` and :class:`SSESAM`.

    It wraps a base optimizer holding the model's parameters. ``param_groups``
    and ``state`` are the base optimizer's own objects, so LR schedulers attached
    to either work.

    Keyword-only options of every method:

    - ``backend``: ``"auto"`` | ``"triton"`` | ``"torch"`` | ``"reference"``.
    - ``bn_stats``: ``"clean"`` (default): in :meth:`step` only the forwards at
      the unperturbed weights update BatchNorm running statistics; ``"all"``:
      every forward does, as in the published code.
    - ``nonfinite``: ``"skip"`` (default): a NaN or inf in the loss or gradient of
      any pass of :meth:`step` skips the step, leaves weights and optimizer state
      bit-identical, counts it in ``nonfinite_steps`` and warns naming the pass;
      ``"raise"``: raises ``FloatingPointError`` instead (weights restored first).
      Reading the verdict is one host synchronisation per step.
    - ``local_perturbation`` (DistributedDataParallel models): ``False`` (default)
      perturbs with the gradient averaged over all processes, so N processes on N
      shards follow one process on the whole batch; ``True`` perturbs each replica
      with its own gradient and averages only the final one (the m-sharpness
      variant: fewer collectives).
    """

    _rows = 3  # gradient sets a step keeps at once (live + two slots)

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module,
        *,
        backend: str = "auto",
        bn_stats: str = "clean",
        nonfinite: str = "skip",
        local_perturbation: bool = False,
    ):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, _GroupedSAM):
            raise TypeError("optimizer must be a base optimizer such as SGD, not a SAM wrapper")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if bn_stats not in ("clean", "all"):
            raise ValueError(f"bn_stats must be 'clean' or 'all', got {bn_stats!r}")
        if nonfinite not in ("skip", "raise"):
            raise ValueError(f"nonfinite must be 'skip' or 'raise', got {nonfinite!r}")
        if not isinstance(local_perturbation, bool):
            raise TypeError(f"local_perturbation must be a bool, got {local_perturbation!r}")
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError("model has no parameters that require grad")
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in held]
        if missing:
            raise ValueError(
                f"model has {len(missing)} trainable parameters that the optimizer does not hold "
                f"(first: {missing[0]!r}); build the base optimizer from model.parameters()"
            )
        # every parameter the base optimizer holds, frozen ones too: one unfrozen later
        # must have its gradient zeroed and perturbed like the others
        params = [p for p in model.parameters() if id(p) in held]
        super().__init__(optimizer.param_groups, optimizer.defaults)
        self.optimizer = optimizer
        self.model = model
        self.bn_stats, self.nonfinite, self.local_perturbation = bn_stats, nonfinite, local_perturbation
        self.nonfinite_steps = 0
        self._ddp = model if isinstance(model, nn.parallel.DistributedDataParallel) else None
        # found once, like the parameters: their training flags are read at each step
        self._batchnorms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self._backend = make_backend(backend, optimizer, params, self._rows)
        self._pending: tuple | None = None  # the perturbation an official method left applied

    # param_groups and state are the base optimizer's, read through each time: its
    # load_state_dict() replaces both objects, and a scheduler attached to this
    # wrapper must keep changing the learning rates the base optimizer uses.
    # (Optimizer.__init__ assigns them before the base is known; those go aside.)
    @property
    def param_groups(self) -> list[dict]:
        base = self.__dict__.get("optimizer")
        return base.param_groups if base is not None else self.__dict__["_init_param_groups"]

    @param_groups.setter
    def param_groups(self, value) -> None:
        self.__dict__["_init_param_groups"] = value

    @property
    def state(self):
        base = self.__dict__.get("optimizer")
        return base.state if base is not None else self.__dict__["_init_state"]

    @state.setter
    def state(self, value) -> None:
        self.__dict__["_init_state"] = value

    @property
    def backend(self) -> str:
        return self._backend.name

    # ---- the configuration each method supplies --------------------------------
    def _groups(self) -> list[_Group]:
        raise NotImplementedError

    def _stage_state(self) -> dict:
        raise NotImplementedError

    def _load_stage_state(self, state: dict) -> None:
        raise NotImplementedError

    # ---- one call per step --------------------------------------------------------
    def step(
        self,
        closure: Callable[..., Tensor] | Sequence[Callable[..., Tensor]] | None = None,
        tail_mask: Tensor | Sequence[Tensor] | None = None,
        schedule: str = "exact",
        scaler: torch.amp.GradScaler | None = None,
    ) -> Tensor:
        """One update computed with the cheapest schedule of ``schedule``.

        ``closure()`` recomputes the forward pass on the current batch and returns
        the per-sample losses, shape ``(B,)``; ``tail_mask`` (bool, shape ``(B,)``)
        marks the tail samples (SAM ignores it). Returns the mean loss at the
        unperturbed weights, detached.

        ``schedule="exact"``: one forward at ``w`` feeds the backward pass of every
        group (``retain_graph``); a group with ``rho = 0`` gets no perturbed pass
        and an empty group no pass at all. Every pass sees the whole batch, so
        BatchNorm in training mode gives the published gradients.

        ``schedule="split"``: every pass of a group runs on that group's samples
        only: ``closure(idx)`` must return the losses of the samples ``idx`` (a
        long tensor of batch indices). The same update as ``exact`` for models
        whose per-sample losses do not depend on other samples; with BatchNorm
        in training mode the batch statistics change, so it is a variant, not
        the published update. ``"auto"`` picks ``split`` when the closure takes
        an index and no BatchNorm layer of the model is in training mode.

        Gradient accumulation: lists of closures and tail masks, one per
        micro-batch, make one step over their union: every pass runs over all
        micro-batches, so the perturbation direction uses the accumulated
        gradient (for a model without BatchNorm, the update of one big batch).

        Mixed precision: with ``scaler`` (a ``torch.amp.GradScaler``) every
        backward is scaled, norms are taken of unscaled gradients, and the base
        optimizer steps through ``scaler.step``, which skips a step with an inf
        or NaN (weights bit-identical); call ``scaler.update()`` after ``step``.

        Deciding which passes run reads the tail counts on the host: one
        synchronisation per step, before the first backward.
        """
        if self._pending is not None:
            raise RuntimeError(f"step() called while {self._pending[0]} was left open; finish it first")
        closures, masks = _micro_batches(closure, tail_mask)
        if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
            raise TypeError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
        groups = self._groups()
        split = self._split(schedule, closures[0], groups)
        sync = self._ddp.no_sync() if self._ddp is not None else contextlib.nullcontext()
        with sync:  # the engine averages gradients itself (see _sync_gradients)
            return self._step(closures, masks, groups, split, scaler)

    def _step(self, closures, masks, groups, split, scaler) -> Tensor:
        be = self._backend
        ddp = self._ddp
        n_mb = len(closures)
        self._skipped = False
        if scaler is not None and not scaler.is_enabled():
            scaler = None

        def call(k: int, idx, n: int) -> Tensor:
            with torch.enable_grad():
                return _check_losses(closures[k]() if idx is None else closures[k](idx), n)

        # ---- sizes: which passes run (one host sync for all micro-batches) ----------
        masked = any(g.members != "all" for g in groups)
        clean: list[Tensor | None] = [None] * n_mb
        if split:
            masks = [_check_mask(m) for m in masks]
        else:
            for k in range(n_mb):
                clean[k] = call(k, None, None)
            if masked:
                masks = [_check_mask(m, clean[k]) for k, m in enumerate(masks)]
        batches = [m.shape[0] for m in masks] if split else [c.shape[0] for c in clean]
        batch = sum(batches)
        counts = {"all": list(batches)}
        if masked:
            tails = torch.stack([m.sum() for m in masks]).tolist()
            counts["tail"] = tails
            counts["head"] = [b - t for b, t in zip(batches, tails)]
        totals = {k: sum(v) for k, v in counts.items()}
        if ddp is not None:
            # every process must run the same passes and collectives: decide by the global counts
            t = torch.tensor([totals[k] for k in sorted(totals)], dtype=torch.float64)
            t = t.to(next(self.model.parameters()).device)
            torch.distributed.all_reduce(t, group=ddp.process_group)
            totals = dict(zip(sorted(totals), t.tolist()))
        active = [g for g in groups if totals[g.members] > 0]
        index = None
        if split:
            index = [{"head": torch.nonzero(~m).flatten(), "tail": torch.nonzero(m).flatten()} for m in masks]

        def runs(g: _Group, k: int) -> bool:
            # a micro-batch without samples of the group skips its pass, but under DDP
            # the forwards must match across processes (buffer broadcasts)
            return counts[g.members][k] > 0 or ddp is not None

        def backward(g: _Group, k: int, losses: Tensor, retain: bool = False) -> None:
            with torch.enable_grad():  # step() may run under no_grad, as torch.optim's do
                # d L_k / d l_i = c_k / B for the samples of group k, 0 for the others
                w = torch.full_like(losses, g.weight / batch, requires_grad=False)
                if not split and g.members != "all":
                    m = masks[k]
                    w = torch.where(m if g.members == "tail" else ~m, w, 0.0)
                out = torch.dot(losses, w)
                (out if scaler is None else scaler.scale(out)).backward(retain_graph=retain)

        checks: list[tuple[str, Tensor]] = []  # (pass name, device bool: finite)
        be.begin()
        try:
            # ---- clean passes at w: one shared forward per micro-batch (exact) ------
            loss_sum = 0.0
            for k in range(n_mb):
                mine = [g for g in active if runs(g, k)]
                if split:
                    for g in mine:
                        losses = call(k, index[k][g.members], index[k][g.members].numel())
                        backward(g, k, losses)
                        be.accumulate(g.members)
                        loss_sum = loss_sum + losses.detach().sum()
                        checks.append((f"clean {g.members}", torch.isfinite(losses.detach().sum())))
                else:
                    losses = clean[k]
                    for i, g in enumerate(mine):
                        backward(g, k, losses, retain=i + 1 < len(mine))
                        be.accumulate(g.members)
                    loss_sum = loss_sum + losses.detach().sum()
                    checks.append(("clean forward", torch.isfinite(losses.detach().sum())))
                    clean[k] = None  # frees the graph of an unused group's micro-batch
            loss = loss_sum / batch
            perturbed = [g for g in active if g.rho > 0]
            if scaler is not None and perturbed:
                be.unscale([g.members for g in perturbed], scaler._scale.double().reciprocal().float())
            if ddp is not None and not self.local_perturbation:
                be.all_reduce([g.members for g in active], False, ddp.process_group)
            scales, norms = be.scales([(g.members, g.rho) for g in active])
            for g, n in zip(active, norms):
                if n is not None:
                    checks.append((f"clean {g.members} gradient", torch.isfinite(n)))
            # ---- perturbed passes: group by group, over every micro-batch -----------
            prev = None
            for g, scale in zip(active, scales):
                if g.rho == 0:
                    continue
                be.shift(add=(g.members, scale), sub=prev)
                prev = (g.members, scale)
                with self._bn_frozen():
                    for k in range(n_mb):
                        if runs(g, k):
                            idx = index[k][g.members] if split else None
                            losses = call(k, idx, batches[k] if idx is None else idx.numel())
                            backward(g, k, losses)
                            checks.append((f"perturbed {g.members}", torch.isfinite(losses.detach().sum())))
                norm = be.live_norm() if scaler is None else None
                if norm is not None:
                    checks.append((f"perturbed {g.members} gradient", torch.isfinite(norm)))
            if ddp is not None:
                # the final gradient: the live rows, and the unperturbed groups' rows that
                # finish() adds to them (already averaged above unless perturbing locally)
                local_rows = [g.members for g in active if g.rho == 0] if self.local_perturbation else []
                be.all_reduce(local_rows, True, ddp.process_group)
            if scaler is None:
                self._verdict(checks)
        except BaseException:
            be.abort()  # weights back to w, bit-identical; gradients zero
            raise
        if self._skipped:
            return loss
        be.finish(restore=prev, add=[g.members for g in active if g.rho == 0], scaler=scaler)
        return loss

    def _verdict(self, checks: list[tuple[str, Tensor]]) -> None:
        """Read every finiteness flag of the step at once (the step's one late
        host synchronisation); on a failure abandon the step per ``nonfinite``."""
        self._skipped = False
        if not checks:
            return
        flags = torch.stack([c.to(checks[0][1].device) for _, c in checks]).tolist()
        if all(flags):
            return
        first = checks[flags.index(False)][0]
        self._backend.abort()
        if self.nonfinite == "raise":
            raise FloatingPointError(f"non-finite value in the {first} pass; the step was not applied")
        self.nonfinite_steps += 1
        self._skipped = True
        # a fixed text, so the default filter shows it once per call site; the
        # count lives in nonfinite_steps. stacklevel 5: _verdict, _step, step,
        # torch.optim's step wrapper, then the caller
        warnings.warn(
            f"{type(self).__name__}: non-finite value in the {first} pass; step skipped, weights unchanged "
            "(see nonfinite_steps)",
            RuntimeWarning,
            stacklevel=5,
        )

    @contextlib.contextmanager
    def _bn_frozen(self):
        """With ``bn_stats="clean"``, BatchNorm running statistics are put back
        after the forwards at perturbed weights."""
        if self.bn_stats == "all":
            yield
            return
        saved = [
            (buf, buf.clone())
            for m in self._batchnorms
            if m.training and m.track_running_stats
            for buf in (m.running_mean, m.running_var, m.num_batches_tracked)
            if buf is not None
        ]
        try:
            yield
        finally:
            with torch.no_grad():
                for buf, old in saved:
                    buf.copy_(old)

    def _split(self, schedule: str, closure, groups: list[_Group]) -> bool:
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be 'exact', 'split' or 'auto', got {schedule!r}")
        if schedule == "exact" or all(g.members == "all" for g in groups):
            return False  # one group covering the batch: split and exact are the same
        takes_index = _takes_index(closure)
        if schedule == "split":
            if not takes_index:
                raise TypeError("schedule='split' needs a closure that takes sample indices: closure(idx)")
            return True
        return takes_index and not any(m.training for m in self._batchnorms)

    # ---- official-method helpers --------------------------------------------------
    def _open(self, method: str, expected: str | None) -> None:
        have = None if self._pending is None else self._pending[0]
        if have != expected:
            after = f"after {expected}()" if expected else "first"
            raise RuntimeError(f"{method}() must come {after}; the last open step was {have}()")

    def _perturb(self, slot: str, rho: float, method: str) -> None:
        (scale,), _ = self._backend.scales([(slot, rho)])
        self._backend.shift(add=(slot, scale))
        self._pending = (method, slot, scale)

    def _restore(self) -> tuple:
        _, slot, scale = self._pending
        self._pending = None
        return slot, scale

    # ---- optimizer manners --------------------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients. With the flat-buffer backends ``p.grad`` is a view
        into a gradient buffer and is zeroed in place, whatever ``set_to_none``."""
        self._backend.zero_grad(set_to_none)

    def state_dict(self) -> dict:
        return {
            "base": self.optimizer.state_dict(),
            "stage": self._stage_state(),
            "nonfinite_steps": self.nonfinite_steps,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        if "base" not in state_dict and "param_groups" in state_dict:
            # a base optimizer's own state_dict, as saved by scripts for the published code
            self.optimizer.load_state_dict(state_dict)
            return
        if not {"base", "stage"} <= set(state_dict) <= {"base", "stage", "nonfinite_steps"}:
            raise ValueError(
                f"state_dict must have keys 'base', 'stage' (and 'nonfinite_steps'), got {sorted(state_dict)}"
            )
        before = self._stage_state()
        self._load_stage_state(state_dict["stage"])  # validates everything before assigning
        try:
            self.optimizer.load_state_dict(state_dict["base"])
        except BaseException:
            self._load_stage_state(before)  # all or nothing
            raise
        self.nonfinite_steps = int(state_dict.get("nonfinite_steps", 0))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._stage_state().items())
        base = "\n    ".join(repr(self.optimizer).splitlines())
        return f"{type(self).__name__}({args}, backend={self.backend!r},\n  optimizer={base})"


class SAM(_GroupedSAM):
    """Sharpness-Aware Minimization (Foret et al., ICLR 2021).

    ``g = ∇L(w)``, ``e = rho·g/(||g||+1e-16)``, base step with ``∇L(w+e)``,
    ``L = mean_i l_i``. Drop-in for the published ``SAM(optimizer, model, rho)``:
    ``first_step()`` after the first backward, ``second_step()`` after the second.
    """

    _rows = 2

    def __init__(self, optimizer, model, rho: float = 0.05, **options):
        self.rho = _check_rho("rho", rho)
        super().__init__(optimizer, model, **options)

    def _groups(self):
        return [_Group("all", 1.0, self.rho)]

    def _stage_state(self):
        return {"rho": self.rho}

    def _load_stage_state(self, state):
        self.rho = _check_rho("rho", state["rho"])

    @torch.no_grad()
    def first_step(self) -> None:
        """``w += rho·g/(||g||+1e-16)`` with ``g`` in ``p.grad``; zeroes the grads."""
        self._open("first_step", None)
        self._backend.adopt()
        self._backend.take("all")
        self._perturb("all", self.rho, "first_step")

    @torch.no_grad()
    def second_step(self) -> None:
        """Restore ``w``, base step with the perturbed gradient in ``p.grad``; zeroes the grads."""
        self._open("second_step", "first_step")
        self._backend.adopt()
        self._backend.finish(restore=self._restore())


class ImbSAM(_GroupedSAM):
    """ImbSAM (Zhou et al., ICCV 2023): SAM on the tail classes only.

    ``L_H = Σ_H l_i / B``, ``L_T = tail_weight·Σ_T l_i / B`` (``tail_weight = 2``
    in the official training code, used by :meth:`step`); base step with
    ``∇L_H(w) + ∇L_T(w + e_T)``. Official methods: ``first_step()`` after the head
    backward, ``second_step()`` after the tail backward, ``third_step()`` after the
    perturbed tail backward.
    """

    def __init__(self, optimizer, model, rho: float = 0.05, *, tail_weight: float = 2.0, **options):
        self.rho = _check_rho("rho", rho)
        self.tail_weight = _check_rho("tail_weight", tail_weight)
        super().__init__(optimizer, model, **options)

    def _groups(self):
        return [_Group("head", 1.0, 0.0), _Group("tail", self.tail_weight, self.rho)]

    def _stage_state(self):
        return {"rho": self.rho, "tail_weight": self.tail_weight}

    def _load_stage_state(self, state):
        self.rho = _check_rho("rho", state["rho"])
        self.tail_weight = _check_rho("tail_weight", state["tail_weight"])

    @torch.no_grad()
    def first_step(self) -> None:
        """Keep the head gradient in ``p.grad``; zeroes the grads."""
        self._open("first_step", None)
        self._backend.adopt()
        self._backend.take("head")
        self._pending = ("first_step",)

    @torch.no_grad()
    def second_step(self) -> None:
        """``w += rho·g_T/(||g_T||+1e-16)`` with ``g_T`` in ``p.grad``; zeroes the grads."""
        self._open("second_step", "first_step")
        self._backend.adopt()
        self._backend.take("tail")
        self._perturb("tail", self.rho, "second_step")

    @torch.no_grad()
    def third_step(self) -> None:
        """Restore ``w``; base step with the perturbed tail gradient plus the head one."""
        self._open("third_step", "second_step")
        self._backend.adopt()
        self._backend.finish(restore=self._restore(), add=["head"])


class SSESAM(_GroupedSAM):
    """SSE-SAM: Stage-wise SAM for head and tail ("SSE-SAM: Balancing Head and
    Tail Classes Gradually through Stage-Wise SAM", AAAI 2025, arXiv 2412.13715).

    ``L_H = Σ_H l_i / B``, ``L_T = Σ_T l_i / B``; base step with
    ``∇L_H(w + e_H) + ∇L_T(w + e_T)``, ``e_k = rho_k·g_k/(||g_k||+1e-16)``,
    ``rho_T = tail_rho``, ``rho_H = head_rho`` until ``epoch_count >= gamma ·
    total_epochs`` and 0 after (stage 2, ImbSAM-like). ``gamma = 0`` (or 1) keeps
    ``head_rho`` for the whole run, as in the official code.

    Official methods, per step: for the head then the tail group,
    ``compute_and_add_epsilon(n_i)`` (0 head, 1 tail) after the clean backward and
    ``compute_grad_sum_and_restore_p()`` after the perturbed one; then
    ``update()``. Call ``update_rho()`` once at the end of every epoch.
    """

    def __init__(
        self,
        optimizer,
        model,
        head_rho: float,
        tail_rho: float,
        gamma: float = 0,
        total_epochs: int = 200,
        **options,
    ):
        head_rho = _check_rho("head_rho", head_rho)
        tail_rho = _check_rho("tail_rho", tail_rho)
        gamma, total_epochs = _check_schedule(gamma, total_epochs)
        self.head_rho, self.gamma, self.total_epochs = head_rho, gamma, total_epochs
        self.rho_is = [head_rho, tail_rho]  # current radii, head then tail (the official name)
        self.epoch_count = 0
        self.cut_epoch = _cut_epoch(gamma, total_epochs)
        super().__init__(optimizer, model, **options)

    @property
    def stage(self) -> int:
        return 2 if self.cut_epoch is not None and self.epoch_count >= self.cut_epoch else 1

    def _groups(self):
        return [_Group("head", 1.0, self.rho_is[0]), _Group("tail", 1.0, self.rho_is[1])]

    def _stage_state(self):
        return {
            "head_rho": self.head_rho,
            "tail_rho": self.rho_is[1],
            "gamma": self.gamma,
            "total_epochs": self.total_epochs,
            "epoch_count": self.epoch_count,
            "rho_is": list(self.rho_is),
        }

    def _load_stage_state(self, state):
        count = state["epoch_count"]
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"state_dict epoch_count must be an int >= 0, got {count!r}")
        rhos = [_check_rho("rho_is[0]", state["rho_is"][0]), _check_rho("rho_is[1]", state["rho_is"][1])]
        head_rho = _check_rho("head_rho", state.get("head_rho", self.head_rho))
        gamma, total = _check_schedule(
            state.get("gamma", self.gamma), state.get("total_epochs", self.total_epochs)
        )
        self.epoch_count, self.rho_is, self.head_rho = count, rhos, head_rho
        self.gamma, self.total_epochs, self.cut_epoch = gamma, total, _cut_epoch(gamma, total)

    def update_rho(self) -> None:
        """Count one finished epoch; enter stage 2 (``rho_H = 0``) at ``gamma·total_epochs``."""
        self.epoch_count += 1
        if self.cut_epoch is not None and self.epoch_count >= self.cut_epoch:
            self.rho_is[0] = 0.0

    @torch.no_grad()
    def compute_and_add_epsilon(self, n_i: int) -> None:
        """``w += rho_i·g/(||g||+1e-16)`` with ``g`` in ``p.grad`` (``n_i``: 0 head,
        1 tail); zeroes the grads."""
        if n_i not in (0, 1):
            raise ValueError(f"n_i must be 0 (head) or 1 (tail), got {n_i!r}")
        self._open("compute_and_add_epsilon", None)
        self._backend.adopt()
        self._backend.take("clean")
        self._perturb("clean", self.rho_is[n_i], "compute_and_add_epsilon")

    @torch.no_grad()
    def compute_grad_sum_and_restore_p(self) -> None:
        """Add ``p.grad`` to the gradient sum and restore ``w``; zeroes the grads."""
        self._open("compute_grad_sum_and_restore_p", "compute_and_add_epsilon")
        self._backend.adopt()
        self._backend.accumulate("sum")
        self._backend.shift(sub=self._restore())

    @torch.no_grad()
    def update(self) -> None:
        """Base step with the summed gradient; zeroes the grads."""
        self._open("update", None)
        if "sum" not in self._backend.slots:
            raise RuntimeError("update() needs compute_grad_sum_and_restore_p() first")
        self._backend.finish(grads="sum")
