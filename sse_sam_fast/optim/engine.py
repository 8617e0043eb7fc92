"""The grouped-perturbation engine shared by SAM, ImbSAM and SSE-SAM.

A step splits the batch's per-sample losses ``l_i`` into groups (all samples;
or head and tail by a tail mask). Group ``k`` has the loss
``L_k = c_k · Σ_{i∈k} l_i / B`` and a radius ``rho_k``; its gradient enters the
update at ``w + e_k`` with ``e_k = rho_k · g_k / (||g_k|| + 1e-16)``,
``g_k = ∇L_k(w)``, or at ``w`` itself when ``rho_k = 0``. The base optimizer
then steps from the restored ``w`` with ``Σ_k ∇L_k(w + e_k)``.

The engine validates, builds a :class:`~.plan.StepPlan` and hands it to a
:class:`~.passes.StepRun`; the backend (``sse_sam_fast.backends``) owns the
buffers. The methods (:mod:`.methods`) supply the groups, the stage state and
the official per-call methods.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from .. import _torch_private
from .._saved import Saved
from ..backends import BACKENDS, Ending, Perturbation, Radius, Slot, make_backend
from ..backends.base import local
from . import batchnorm, distribution
from .capture import CapturedStep
from .checks import (
    check_base_state,
    check_bool,
    check_count,
    check_rho,
    micro_batches,
    need_keys,
    takes_index,
)
from .passes import StepRun
from .plan import CORRECTION, KEPT, REUSE_POLICIES, SCHEDULES, Group, StepPlan


class GroupedSAM(torch.optim.Optimizer):
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
      any pass of :meth:`step` skips the step, leaves weights, optimizer state and
      BatchNorm statistics bit-identical and counts it in ``nonfinite_steps``.
      On a CPU, and with the reference backend, the verdict is read on the host
      and a warning names the pass; with the flat backends on CUDA it stays on
      the device (the step is taken back by device-side selects, no warning per
      step; reading ``nonfinite_steps`` reads the count). ``"raise"``: raises
      ``FloatingPointError`` instead (weights restored first); it reads the
      verdict on the host, one synchronisation per step.
    - ``local_perturbation`` (DistributedDataParallel models): ``False`` (default)
      perturbs with the gradient averaged over all processes, so N processes on N
      shards follow one process on the whole batch; ``True`` perturbs each replica
      with its own gradient and averages only the final one (the m-sharpness
      variant: fewer collectives).
    - ``adaptive``: ASAM (Kwon et al., ICML 2021): every perturbation is
      ``e = rho · T² g / (||T g|| + 1e-16)`` with ``T = |w|`` at the unperturbed
      weights, as davda54/sam computes it, instead of ``rho · g / (||g|| + 1e-16)``.
    - ``max_grad_norm``: clip the gradient the base optimizer steps with (the sum
      of the groups' gradients) to this global norm, as
      ``torch.nn.utils.clip_grad_norm_`` does, on the device (under AMP after
      unscaling). Applies to :meth:`step`, :meth:`capture` and the official
      methods' last call; do not clip between the official calls yourself, that
      would clip a part of the final gradient.
    - ``reuse``: an integer ``K >= 1`` (default 1: every step computes its
      perturbations). With ``K > 1`` a :meth:`step` (and :meth:`capture`) keeps
      each perturbed group's clean gradient and the next ``K - 1`` steps move
      that group along it (``e_k = rho_k · g_kept / ||g_kept||`` with the
      current radius; ASAM with the current ``|w|``) instead of computing a new
      one: they skip the group's clean pass. A group with ``rho = 0`` has its
      clean pass at every step. A group without a kept gradient (the first
      step, a radius that was 0, a step skipped by a GradScaler) computes one.
      The kept gradients are in :meth:`state_dict`. A step that keeps
      gradients reads its non-finite verdict on the host, so only finite ones
      are kept. Steps that reuse return the mean loss at the weights the batch
      was evaluated at (``w + e_k`` for a reused group's samples).
    - ``reuse_policy`` (with ``reuse > 1``): what the steps between reuse.
      ``"perturbation"`` (default): each group's kept clean gradient, as above.
      ``"correction"``: the step that computes keeps
      ``d = (g_SAM - g) / ||g||``, its final gradient's difference to the clean
      gradient ``g = Σ_k ∇L_k(w)``; the steps between run one clean pass of
      all groups together (a forward and a backward over the batch, the cost
      of an SGD step) and step with ``g + ||g|| · d``. A change of the groups'
      radii (SSE-SAM's stage 2, a scheduler) computes ``d`` anew. Not with
      ``local_perturbation`` or a GradScaler.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module,
        *,
        backend: str = "auto",
        bn_stats: str = "clean",
        nonfinite: str = "skip",
        local_perturbation: bool = False,
        adaptive: bool = False,
        max_grad_norm: float | None = None,
        reuse: int = 1,
        reuse_policy: str = "perturbation",
        **unknown,
    ):
        if unknown:
            raise TypeError(self._unknown_options(unknown))
        params = self._check_init(optimizer, model, backend, bn_stats, nonfinite, local_perturbation)
        check_bool("adaptive", adaptive)
        if max_grad_norm is not None:
            max_grad_norm = check_rho("max_grad_norm", max_grad_norm)
            if max_grad_norm == 0:
                raise ValueError("max_grad_norm must be > 0 (None: no clipping), got 0")
        reuse = check_count("reuse", reuse, 1)
        if reuse_policy not in REUSE_POLICIES:
            raise ValueError(f"reuse_policy must be one of {REUSE_POLICIES}, got {reuse_policy!r:.40}")
        if reuse_policy == "correction" and local_perturbation:
            raise ValueError(
                "reuse_policy='correction' keeps the difference of the averaged gradients; "
                "local_perturbation=True perturbs each replica with its own: use one or the other"
            )
        super().__init__(optimizer.param_groups, optimizer.defaults)
        self.optimizer = optimizer
        self.model = model
        self.bn_stats, self.nonfinite, self.local_perturbation = bn_stats, nonfinite, local_perturbation
        self.adaptive, self.max_grad_norm, self.reuse = adaptive, max_grad_norm, reuse
        self.reuse_policy = reuse_policy
        self._kept_age = 0  # steps since the kept gradients were computed (reuse > 1)
        self._kept_groups: tuple | None = None  # the groups a kept correction was computed with
        self._skipped_host = 0  # steps skipped for non-finite values, decided on the host
        self._skipped_device: Tensor | None = None  # ... and on the device (sync-free steps)
        self._force_sync_free: bool | None = None  # tests: the device verdict on any device
        self._dist = distribution.strategy(model, params)  # global counts, averages, sums of squares
        if local_perturbation and isinstance(self._dist, distribution.FSDP2):
            raise ValueError(
                "local_perturbation=True cannot be honoured under FSDP2: every backward reduce-scatters, "
                "so no process ever holds its own gradient to perturb with; use local_perturbation=False"
            )
        self._backend = make_backend(backend, optimizer, params, sums=self._dist.sum_squares_)
        if reuse > 1 and isinstance(self._dist, distribution.FSDP2):
            raise ValueError(
                f"reuse={reuse} is not supported under FSDP2 yet: the kept values would be local shards, "
                "which state_dict and torch.distributed.checkpoint do not carry; use reuse=1"
            )
        if reuse > 1:
            self._backend.lasting.update(KEPT.values() if reuse_policy == "perturbation" else [CORRECTION])
        self._params_signature: tuple | None = None  # the param lists the backend has seen
        self._open_method: str | None = None  # the official method that left a perturbation applied
        self._stats = Saved()  # the BatchNorm statistics a step may have to take back

    # SAM(params, base_optimizer_cls, ...): the davda54/sam convention, without a model
    _davda54 = False

    def _unknown_options(self, unknown: dict) -> str:
        """A typo's message: the option, the closest accepted ones first, then all."""
        accepted = []
        kinds = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        for cls in type(self).__mro__:
            init = cls.__dict__.get("__init__")
            if init is None or not issubclass(cls, GroupedSAM):
                continue
            for p in inspect.signature(init).parameters.values():
                if p.kind in kinds and p.name not in ("self", "optimizer", "model", *accepted):
                    accepted.append(p.name)
        name = sorted(unknown)[0]
        close = difflib.get_close_matches(name, accepted, n=3, cutoff=0.5)
        hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
        return (
            f"{type(self).__name__}() got an unknown option {name!r}; {hint}"
            f"accepted: {', '.join(close + [a for a in accepted if a not in close])}"
        )

    def _check_init(self, optimizer, model, backend, bn_stats, nonfinite, local_perturbation) -> list[Tensor]:
        """Validate the options; returns every parameter of ``model`` the base
        optimizer holds, frozen ones too: one unfrozen later must have its
        gradient zeroed and perturbed like the others."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, GroupedSAM):
            raise TypeError("optimizer must be a base optimizer such as SGD, not a SAM wrapper")
        if not isinstance(model, nn.Module) and not (model is None and self._davda54):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if bn_stats not in ("clean", "all"):
            raise ValueError(f"bn_stats must be 'clean' or 'all', got {bn_stats!r}")
        if nonfinite not in ("skip", "raise"):
            raise ValueError(f"nonfinite must be 'skip' or 'raise', got {nonfinite!r}")
        check_bool("local_perturbation", local_perturbation)
        if model is None and self._davda54:
            return self._beyond(optimizer, [])
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError("model has no parameters that require grad")
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in held]
        if missing:
            raise ValueError(
                f"model has {len(missing)} trainable parameters that the optimizer does not hold "
                f"(first: {missing[0]!r}); build the base optimizer from model.parameters()"
            )
        sparse = [
            f"{name}.weight" if name else "weight"
            for name, m in model.named_modules()
            if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse and m.weight.requires_grad
        ]
        if sparse:
            raise ValueError(
                f"{sparse[0]} gets sparse gradients (nn.Embedding/EmbeddingBag with sparse=True); the SAM "
                "family perturbs along the dense gradient and its norm: build the layer with sparse=False"
            )
        ours = [p for p in model.parameters() if id(p) in held]
        return ours + self._beyond(optimizer, ours)

    @staticmethod
    def _beyond(optimizer: torch.optim.Optimizer, known: Sequence[Tensor]) -> list[Tensor]:
        """The parameters the base optimizer holds beyond ``known`` (a learnable loss
        temperature, a head added with ``add_param_group``): they take part in the
        step like the model's own."""
        seen = {id(p) for p in known}
        extra = []
        for g in optimizer.param_groups:
            for p in g["params"]:
                if id(p) not in seen:
                    seen.add(id(p))
                    extra.append(p)
        return extra

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
    def _batchnorms(self) -> list[nn.Module]:
        """The model's BatchNorm layers, found at every step: a layer swapped in
        after construction (``convert_sync_batchnorm``) keeps the BatchNorm policy
        (a walk over the modules costs microseconds; ``capture`` walks them too)."""
        if self.model is None:
            return []
        return batchnorm.find_layers(self.model, _torch_private.NORM_LAYERS)

    @property
    def backend(self) -> str:
        return self._backend.name

    @property
    def nonfinite_steps(self) -> int:
        """Steps skipped for a non-finite value. Sync-free steps count on the
        device; reading this property reads that count (one synchronisation)."""
        if self._skipped_device is not None:
            self._skipped_host += int(self._skipped_device.item())
            self._skipped_device.zero_()
        return self._skipped_host

    @nonfinite_steps.setter
    def nonfinite_steps(self, value: int) -> None:
        self._skipped_host = int(value)
        if self._skipped_device is not None:
            self._skipped_device.zero_()

    def _count_skipped(self, n: int | Tensor) -> None:
        if isinstance(n, Tensor):
            if self._skipped_device is None:
                self._skipped_device = torch.zeros((), dtype=torch.int64, device=n.device)
            self._skipped_device += n
        else:
            self._skipped_host += n

    def _sync_free(self) -> bool:
        """Whether steps leave the verdict on the device: the flat backends on CUDA,
        where a host synchronisation stalls the launch queue."""
        if self._force_sync_free is not None:
            return self._force_sync_free
        return self._backend.name != "reference" and self._backend.params[0].device.type == "cuda"

    def _track_params(self) -> None:
        """Parameters added to the base optimizer since the last step join the
        backend; one taken out of it is refused (it would still be perturbed).
        Each step compares the parameters' identities (microseconds; the backend
        holds them, so no id is reused); only a change costs more."""
        signature = tuple(tuple(map(id, g["params"])) for g in self.optimizer.param_groups)
        if signature == self._params_signature:
            return
        held = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        gone = sum(id(p) not in held for p in self._backend.params)
        if gone:
            raise RuntimeError(
                f"{gone} parameters were taken out of the base optimizer after {type(self).__name__} was "
                "built; the SAM step would still perturb them: build a new optimizer and wrapper"
            )
        new = self._beyond(self.optimizer, self._backend.params)
        if new:
            self._backend.extend(new)
        self._params_signature = signature

    # ---- the configuration each method supplies --------------------------------
    def _groups(self) -> list[Group]:
        raise NotImplementedError

    def _stage_state(self) -> dict:
        raise NotImplementedError

    def _load_stage_state(self, state: dict) -> None:
        raise NotImplementedError

    def _adaptive(self) -> bool | tuple[bool, ...]:
        """ASAM on or off, for all parameters or per param group."""
        return self.adaptive

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

        Host synchronisations: none with the flat backends on CUDA (an empty
        group then runs its passes with a zero gradient instead of being
        skipped; ``split``, a ``scaler`` and ``nonfinite="raise"`` still read on
        the host). Elsewhere the tail counts are read once before the first
        backward, and the non-finite verdict once after the last.
        """
        if self._open_method is not None:
            raise RuntimeError(f"step() called while {self._open_method} was left open; finish it first")
        if self._backend.holding:
            raise RuntimeError("a SAM step started with the official methods is still open")
        if closure is None and tail_mask is None:
            return self._create_state(
                TypeError(
                    "step() needs a closure that returns the per-sample losses of the batch (without one "
                    "it only accepts zero gradients at lr=0, how torch.distributed.checkpoint creates "
                    "optimizer state)"
                )
            )
        closures, masks = micro_batches(closure, tail_mask)
        self._track_params()
        if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
            raise TypeError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
        if scaler is not None and not scaler.is_enabled():
            scaler = None
        if scaler is not None and self.reuse > 1 and self.reuse_policy == "correction":
            raise ValueError(
                "scaler: reuse_policy='correction' does not take a GradScaler; use bf16 autocast, "
                "or reuse_policy='perturbation'"
            )
        return self._step(closures, masks, schedule, scaler)

    def _step(self, closures, masks, schedule: str, scaler, advance: bool = True) -> Tensor:
        """The step of checked arguments; ``advance``: count it for ``reuse``
        (a captured step's replay counts itself, :meth:`_advance`)."""
        groups = tuple(self._groups())
        plan = StepPlan(groups, self._split(schedule, closures[0], groups), **self._reuse_plan(groups))
        with self._dist.no_sync():  # the engine averages gradients itself (see distribution)
            loss = StepRun(self, plan, closures, masks, scaler).run()
        if advance:
            self._advance(bool(plan.reused) or plan.corrected)
        return loss

    def _reuse_plan(self, groups: Sequence[Group]) -> dict:
        """``reuse > 1``: the next step's reuse fields of :class:`StepPlan`. Policy
        "perturbation": which perturbed groups move by their kept gradient (none
        every ``reuse``-th step) and whether the step keeps the others' clean
        gradients; a group no longer perturbed drops its own. Policy
        "correction": whether the step adds the kept correction, or computes and
        keeps one; a correction computed with other radii is dropped."""
        if self.reuse == 1:
            return {}
        due = self._kept_age >= self.reuse
        perturbed = [g for g in groups if g.rho > 0]
        if self.reuse_policy == "correction":
            if tuple(groups) != self._kept_groups:  # computed with other radii
                self._backend.discard(CORRECTION)
            if not perturbed:
                return {}
            corrected = not due and self._backend.holds(CORRECTION)
            return {"corrected": True} if corrected else {"keep": "correction"}
        for g in groups:
            if g.rho == 0:
                self._backend.discard(g.kept)
        reused = frozenset(g.members for g in perturbed if not due and self._backend.holds(g.kept))
        keep = "perturbations" if any(g.members not in reused for g in perturbed) else ""
        return {"reused": reused, "keep": keep}

    def _advance(self, reused: bool) -> None:
        """Count a step for ``reuse``: the kept values are one step older, or new."""
        if self.reuse > 1:
            self._kept_age = self._kept_age + 1 if reused else 1

    @torch.no_grad()
    def _create_state(self, refusal: Exception) -> None:
        """``step()`` without a closure, accepted in one form only: every gradient
        zero at a zero learning rate, which cannot move a weight. That is how
        ``torch.distributed.checkpoint`` makes an optimizer create its state
        before saving or loading it (``get_optimizer_state_dict`` /
        ``set_optimizer_state_dict`` on a fresh optimizer); the base optimizer
        steps on those zeros. Any other call without a closure is a mistake that
        would take a step without the perturbation: ``refusal`` is raised."""
        groups = self.optimizer.param_groups
        grads = [p.grad for g in groups for p in g["params"] if p.requires_grad]
        zero_lr = all(float(g.get("lr", 0.0)) == 0.0 for g in groups)
        if not zero_lr or any(g is None for g in grads) or any(bool(local(g).any()) for g in grads):
            raise refusal
        self.optimizer.step()

    def capture(self, loss_fn: Callable[..., Tensor], schedule: str = "exact") -> CapturedStep:
        """A step function replayed as one CUDA graph per input shape and stage::

            captured = opt.capture(loss_fn)       # loss_fn(*inputs) -> per-sample losses (B,)
            for x, y in loader:
                loss = captured(x, y, tail_mask=mask)   # a device tensor, no host synchronisation

        Each call gives the update of ``opt.step(lambda: loss_fn(*inputs),
        tail_mask, schedule)``. A graph is captured after a short eager warm-up
        per input shapes and dtypes, stage and parameter layout, checked once
        against the eager step, and then replayed (``captured.graphed``). The
        base optimizers captured: a plain ``torch.optim.SGD`` on the triton
        backend, whose hyperparameters the fused kernel reads from device memory
        at every replay; a ``torch.optim.Adam``/``AdamW`` built with
        ``capturable=True`` and a tensor ``lr`` (schedulers fill it in place), on
        either flat backend. Where a graph cannot give the same update (a CPU;
        another base optimizer; DDP; ``nonfinite="raise"``; dropout; a failed
        check) the call runs the same step eagerly, with a one-time warning on
        CUDA saying why.
        """
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be 'exact', 'split' or 'auto', got {schedule!r}")
        return CapturedStep(self, loss_fn, schedule)

    def _split(self, schedule: str, closure, groups: Sequence[Group]) -> bool:
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be 'exact', 'split' or 'auto', got {schedule!r}")
        if schedule == "exact" or all(g.members == "all" for g in groups):
            return False  # one group covering the batch: split and exact are the same
        if schedule == "split":
            if not takes_index(closure):
                raise TypeError("schedule='split' needs a closure that takes sample indices: closure(idx)")
            return True
        # InstanceNorm is per sample: only BatchNorm in training mode couples the samples
        coupled = [m for m in self._batchnorms if isinstance(m, _torch_private.BATCH_NORMS)]
        return takes_index(closure) and not any(m.training for m in coupled)

    # ---- official-method helpers --------------------------------------------------
    def _enter(self, method: str, after: str | None) -> None:
        """Check the call order of the official methods; take ``p.grad`` as left."""
        if self.reuse > 1:
            raise RuntimeError(
                f"{method}(): reuse={self.reuse} applies to step() and capture(), which compute the clean "
                "gradients themselves; the official methods take the caller's: build it with reuse=1"
            )
        if self._open_method != after:
            where = f"after {after}()" if after else "first"
            raise RuntimeError(f"{method}() must come {where}; the last open step was {self._open_method}()")
        self._dist.ready()  # FSDP2: settings that would make the step wrong without a sign
        try:
            self._track_params()
            self._backend.adopt(copy_weights=self._davda54)  # davda54/sam restores a copy
        except BaseException:
            self._open_method = None  # the backend abandoned the step: a new one can start
            raise

    def _perturb(self, slot: Slot, rho: Radius, method: str, adaptive=None) -> None:
        """Move the weights along the gradient held in ``slot``; ``method`` stays open."""
        adaptive = self._adaptive() if adaptive is None else adaptive
        move: Perturbation = self._backend.perturbations([(slot, rho)], adaptive)[0]
        self._backend.perturb(move)
        self._open_method = method

    def _finish(self, **kwargs) -> None:
        """The last official call's base step (clipped per ``max_grad_norm``). A
        scheduler attached to this wrapper counts it as the optimizer's step."""
        self._open_method = None
        self._backend.finish(Ending(max_norm=self.max_grad_norm, **kwargs))
        _torch_private.mark_stepped(self)

    # ---- optimizer manners --------------------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients. With the flat-buffer backends ``p.grad`` is a view
        into a gradient buffer and is zeroed in place either way; as in torch,
        ``set_to_none=False`` keeps a parameter that had a gradient in the next
        base step (weight decay, momentum) even if no backward reaches it."""
        self._backend.zero_grad(set_to_none)

    def state_dict(self) -> dict:
        """The base optimizer's ``state_dict`` (torch's layout: ``state`` and
        ``param_groups``, which LR tooling and ``torch.distributed.checkpoint``
        read) with this method's entries beside them: ``stage``,
        ``nonfinite_steps`` and, for a method that keeps gradient sets from step
        to step, ``kept``."""
        sd = self.optimizer.state_dict()
        sd.update(stage=self._stage_state(), nonfinite_steps=self.nonfinite_steps)
        if sd["param_groups"]:
            # torch.distributed.checkpoint keeps only ``state`` and ``param_groups``
            # (get_optimizer_state_dict rebuilds the dict from those two): a copy of
            # the method's entries rides in the first param group, where it survives
            sd["param_groups"][0][self._OWN] = {
                "stage": self._stage_state(),
                "nonfinite_steps": sd["nonfinite_steps"],
            }
        if self._backend.lasting:
            be = self._backend
            self._reuse_plan(self._groups())  # drops what the current radii make stale
            sd["kept"] = {int(slot): be.export(slot) for slot in sorted(be.lasting) if be.holds(slot)}
            sd["kept_age"] = self._kept_age
        return sd

    _KEYS = ("state", "param_groups", "stage", "nonfinite_steps", "kept", "kept_age")
    _OWN = "sse_sam_fast"  # the first param group's copy of stage and nonfinite_steps (see state_dict)

    def load_state_dict(self, state_dict: dict) -> None:
        """Load what :meth:`state_dict` saved, or the layout before it (``base``
        holding the base optimizer's), or a davda54/sam ``SAM.state_dict()``
        (its ``old_p`` / ``e_w`` entries are dropped). Everything is checked
        first (the keys, ``nonfinite_steps``, the stage, the base state's param
        groups against the base optimizer), and a refused state changes nothing."""
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        base, stage, extra = self._split_state(self._own_entries(state_dict))
        stage_keys = list(self._stage_state())
        need_keys("state_dict['stage']", stage, [])
        unknown = sorted(map(str, set(stage) - set(stage_keys)))
        if unknown:
            raise ValueError(
                f"state_dict['stage'] has keys {unknown} that a {type(self).__name__} stage does not "
                f"have ({', '.join(stage_keys)}): saved from another method?"
            )
        nonfinite_steps = check_count("nonfinite_steps", extra.get("nonfinite_steps", 0), 0)
        kept = self._check_kept(extra.get("kept", {}))
        kept_age = check_count("kept_age", extra.get("kept_age", 0), 0)
        check_base_state(base, self.optimizer)
        self._check_radii(base, stage)
        before = self._stage_state()
        self._load_stage_state(stage)  # checks every value before assigning any
        # torch's load_state_dict replaces state and param_groups by new objects
        # at its end; holding the old ones undoes a failure past its own checks
        old = {"state": self.optimizer.state, "param_groups": self.optimizer.param_groups}
        try:
            self.optimizer.load_state_dict(base)
        except BaseException:
            self._load_stage_state(before)
            self.optimizer.__dict__.update(old)
            raise
        for slot in self._backend.lasting:  # what the state kept, nothing else
            self._backend.discard(slot)
        for slot, values in kept.items():
            if slot in self._backend.lasting:  # reuse=1 has no use for them
                self._backend.load(Slot(slot), values)
        self._kept_groups = tuple(self._groups())  # saved without the stale ones (state_dict)
        self._kept_age = kept_age
        self.nonfinite_steps = nonfinite_steps

    def _own_entries(self, state_dict: dict) -> dict:
        """``state_dict`` without the first param group's copy of the method's
        entries (:meth:`state_dict`), which fill in ``stage`` and
        ``nonfinite_steps`` where the top level lacks them: what
        ``set_optimizer_state_dict`` hands over after a trip through
        torch.distributed.checkpoint."""
        groups = state_dict.get("param_groups")
        if not isinstance(groups, list) or not groups or not isinstance(groups[0], dict):
            return state_dict
        if self._OWN not in groups[0]:
            return state_dict
        own = groups[0][self._OWN]
        need_keys(f"state_dict['param_groups'][0][{self._OWN!r}]", own, ["stage", "nonfinite_steps"])
        first = {k: v for k, v in groups[0].items() if k != self._OWN}
        out = {**state_dict, "param_groups": [first, *groups[1:]]}
        if "stage" not in out and "base" not in out:
            out.update(stage=own["stage"], nonfinite_steps=own["nonfinite_steps"])
        return out

    def _split_state(self, state_dict: dict) -> tuple[dict, dict, dict]:
        """``(base state_dict, stage, the rest)`` of any layout :meth:`load_state_dict` takes."""
        if "base" in state_dict:  # the layout before torch's (still in old checkpoints)
            unknown = sorted(map(str, set(state_dict) - {"base", "stage", "nonfinite_steps"}))
            if unknown:
                raise ValueError(f"state_dict has unknown keys {unknown}; known: {', '.join(self._KEYS)}")
            need_keys("state_dict", state_dict, ["stage"])
            return state_dict["base"], state_dict["stage"], state_dict
        if "stage" not in state_dict:
            davda54 = self._from_davda54(state_dict)
            if davda54 is not None:
                return davda54
            stage_keys = ", ".join(self._stage_state())
            hint = ""
            if "param_groups" in state_dict:
                # what scripts for the published code save: loading it would restart the stage
                hint = (
                    "; this is a base optimizer's own state_dict, which has no stage: resume from "
                    "opt.state_dict(), or load it with opt.optimizer.load_state_dict() to start "
                    "the stage over"
                )
            raise ValueError(
                f"state_dict lacks 'stage': {type(self).__name__}.state_dict() has the base optimizer's "
                f"'state' and 'param_groups', 'stage' ({stage_keys}) and 'nonfinite_steps'{hint}"
            )
        unknown = sorted(map(str, set(state_dict) - set(self._KEYS)))
        if unknown:
            raise ValueError(f"state_dict has unknown keys {unknown}; known: {', '.join(self._KEYS)}")
        base = {k: state_dict[k] for k in ("state", "param_groups") if k in state_dict}
        return base, state_dict["stage"], state_dict

    def _from_davda54(self, state_dict: dict) -> tuple[dict, dict, dict] | None:
        """A davda54/sam ``SAM.state_dict()`` as ``(base, stage, rest)``, or None."""
        return None

    def _check_radii(self, base: dict, stage: dict) -> None:
        """Refuse per-group values the loaded state carries and this form ignores."""

    def _check_kept(self, kept) -> dict[int, list]:
        """``kept`` of a state_dict: per lasting slot, one tensor or None per parameter."""
        if not isinstance(kept, dict):
            raise ValueError(f"state_dict['kept'] must be a dict, got {type(kept).__name__}")
        n = len(self._backend.params)
        keepable = {int(s) for s in (*self._backend.lasting, *KEPT.values(), CORRECTION)}
        foreign = sorted(map(str, set(kept) - keepable))
        if foreign:
            name = type(self).__name__
            raise ValueError(f"state_dict['kept'] has slots {foreign}, which {name} does not keep")
        for slot, values in kept.items():
            if not isinstance(values, (list, tuple)) or len(values) != n:
                raise ValueError(f"state_dict['kept'][{slot!r}] must hold one entry per parameter ({n})")
            for p, v in zip(self._backend.params, values):
                if v is not None and (not isinstance(v, Tensor) or v.shape != p.shape):
                    raise ValueError(f"state_dict['kept'][{slot!r}] has a value shaped unlike its parameter")
        return kept

    def __repr__(self) -> str:
        reuse = (self.reuse, self.reuse_policy) if self.reuse > 1 else (None, None)
        options = {"adaptive": self.adaptive, "max_grad_norm": self.max_grad_norm}
        options.update(reuse=reuse[0], reuse_policy=reuse[1])
        shown = {**self._stage_state(), **{k: v for k, v in options.items() if v}}
        args = ", ".join(f"{k}={v!r}" for k, v in shown.items())
        base = "\n    ".join(repr(self.optimizer).splitlines())
        return f"{type(self).__name__}({args}, backend={self.backend!r},\n  optimizer={base})"
