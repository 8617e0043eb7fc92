"""SAM, ImbSAM and SSE-SAM: configurations of the grouped-perturbation engine.

=========  ==============================================  ==========================
method     groups ``(members, c_k, rho_k)``                 paper
=========  ==============================================  ==========================
SAM        ``(all, 1, rho)``                               Foret et al., ICLR 2021
ImbSAM     ``(head, 1, 0)``, ``(tail, tail_weight, rho)``  Zhou et al., ICCV 2023
SSE-SAM    ``(head, 1, rho_H)``, ``(tail, 1, tail_rho)``   arXiv 2412.13715, AAAI 2025
=========  ==============================================  ==========================

SSE-SAM's ``rho_H`` is ``head_rho`` until ``update_rho()`` (called once per
epoch) has counted ``gamma · total_epochs`` epochs, then 0.

Each class also has the official per-call methods of its published code, with
their effects on ``p`` and ``p.grad``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..backends import Slot
from .checks import check_bool, check_count, check_rho, check_schedule, need_keys
from .engine import GroupedSAM
from .plan import Group

_ALL, _HEAD, _TAIL = Group("all", 1.0, 0.0).slot, Group("head", 1.0, 0.0).slot, Group("tail", 1.0, 0.0).slot
# SSE-SAM's official methods keep two sets between calls: the clean gradient of
# the group being perturbed, and the running sum of the perturbed gradients
_CLEAN, _SUM = Slot(8), Slot(9)


def _check_normalization(value) -> str:
    if value not in ("batch", "group"):
        raise ValueError(f"normalization must be 'batch' or 'group', got {value!r:.60}")
    return value


def _cut_epoch(gamma: float, total_epochs: int) -> float | None:
    # the official code switches only for 0 < gamma < 1
    return total_epochs * gamma if 0 < gamma < 1 else None


class SAM(GroupedSAM):
    """Sharpness-Aware Minimization (Foret et al., ICLR 2021).

    ``g = ∇L(w)``, ``e = rho·g/(||g||+1e-16)``, base step with ``∇L(w+e)``,
    ``L = mean_i l_i``. Two conventions, told apart by the first argument:

    - ``SAM(optimizer, model, rho=0.05, **options)`` (an optimizer instance): the
      published SSE-SAM code's. ``first_step()`` after the first backward,
      ``second_step()`` after the second; or one call, ``step(closure)``.
    - ``SAM(params, base_optimizer, rho=0.05, adaptive=False, **kwargs)`` (tensors
      or param-group dicts, and an optimizer class): davda54/sam's. ``kwargs``
      other than this library's options build ``base_optimizer(param_groups,
      **kwargs)`` (``self.base_optimizer``); each param group may carry its own
      ``rho`` and ``adaptive``. ``first_step(zero_grad=False)`` and
      ``second_step(zero_grad=False)`` keep the gradients unless asked, and
      ``step(closure)`` takes davda54's closure (forward and backward, returns
      the loss) after the caller's first backward.

    """

    def __init__(self, optimizer=None, model=None, rho: float = 0.05, adaptive: bool = False, **options):
        if optimizer is None and "params" in options:  # SAM(params=..., base_optimizer=..., ...)
            optimizer = options.pop("params")
        if optimizer is None:
            raise TypeError(
                "SAM() needs an optimizer and a model, SAM(optimizer, model, rho), or davda54/sam's "
                "SAM(params, base_optimizer, rho, **kwargs)"
            )
        self.rho = check_rho("rho", rho)
        # a model second means the optimizer-first convention, whatever came first
        self._davda54 = not isinstance(optimizer, torch.optim.Optimizer) and not isinstance(model, nn.Module)
        if self._davda54:
            if model is None:
                model = options.pop("base_optimizer", None)
            unused = sorted(k for k in _MODEL_OPTIONS if k in options)
            if unused:
                raise TypeError(
                    f"{', '.join(unused)}: options of step(closure, tail_mask) in the SAM(optimizer, model, "
                    "rho) convention; SAM(params, base_optimizer, ...) has no model and davda54's step"
                )
            engine = {k: options.pop(k) for k in _ENGINE_OPTIONS if k in options}
            optimizer = _davda54_base(optimizer, model, self.rho, adaptive, options)
            model, options = None, engine
        super().__init__(optimizer, model, adaptive=adaptive, **options)

    @property
    def base_optimizer(self) -> torch.optim.Optimizer:
        """The base optimizer (davda54/sam's name for it)."""
        return self.optimizer

    def _groups(self):
        return [Group("all", 1.0, self.rho)]

    def _stage_state(self):
        return {"rho": self.rho}

    def _load_stage_state(self, state):
        need_keys("state_dict['stage']", state, ["rho"])
        self.rho = check_rho("rho", state["rho"])

    def _from_davda54(self, state_dict):
        """davda54/sam's ``SAM.state_dict()``: its state holds only ``old_p`` / ``e_w``
        per parameter (its base optimizer's state is not in it), its param groups
        carry ``rho`` and ``adaptive``."""
        groups = state_dict.get("param_groups")
        if not isinstance(groups, list) or not all(isinstance(g, dict) and "rho" in g for g in groups):
            return None
        state = state_dict.get("state", {})
        if not isinstance(state, dict):
            return None
        state = {k: {n: v for n, v in st.items() if n not in ("old_p", "e_w")} for k, st in state.items()}
        base = {"state": {k: st for k, st in state.items() if st}, "param_groups": groups}
        return base, {"rho": self.rho if self._davda54 else groups[0]["rho"]}, {}

    def _check_radii(self, base, stage):
        if self._davda54:
            return  # each group's rho acts
        radii = [g.get("rho") for g in base["param_groups"]]
        if any(r is not None and r != stage["rho"] for r in radii):
            raise ValueError(
                f"state_dict has per-group rho {radii} (saved by SAM(params, base_optimizer, ...)), but "
                f"SAM(optimizer, model, rho) moves every group with one rho ({stage['rho']}): load it "
                "into SAM(params, base_optimizer, ...), or give its groups one rho"
            )

    def _radius(self):
        """``rho``, or in the davda54/sam convention each param group's own."""
        if not self._davda54:
            return self.rho
        return tuple(
            check_rho(f"param_groups[{j}]['rho']", g.get("rho", self.rho))
            for j, g in enumerate(self.param_groups)
        )

    def _adaptive(self):
        if not self._davda54:
            return self.adaptive
        return tuple(
            check_bool(f"param_groups[{j}]['adaptive']", g.get("adaptive", self.adaptive))
            for j, g in enumerate(self.param_groups)
        )

    @torch.no_grad()
    def first_step(self, zero_grad: bool | None = None) -> None:
        """``w += rho·g/(||g||+1e-16)`` with ``g`` in ``p.grad``. Zeroes the grads
        (``zero_grad``'s default; davda54/sam convention: keeps them unless
        ``zero_grad=True``)."""
        # everything checked before the gradient moves
        rho, adaptive, keep = self._radius(), self._adaptive(), not _zeroes(zero_grad, self._davda54)
        self._enter("first_step", None)
        self._backend.take(_ALL)
        self._perturb(_ALL, rho, "first_step", adaptive)
        if keep:
            self._backend.add(_ALL)
            self._backend.show()

    @torch.no_grad()
    def second_step(self, zero_grad: bool | None = None) -> None:
        """Restore ``w``, base step with the perturbed gradient in ``p.grad``.
        Zeroes the grads (davda54/sam convention: keeps them unless ``zero_grad=True``)."""
        keep = not _zeroes(zero_grad, self._davda54)
        self._enter("second_step", "first_step")
        self._finish(keep_grads=keep)

    def step(self, closure=None, tail_mask=None, schedule: str = "exact", scaler=None):
        """See :meth:`GroupedSAM.step`. In the davda54/sam convention, its
        ``step(closure)``: ``first_step(zero_grad=True)``, ``closure()`` (a forward
        and backward at ``w + e``), ``second_step()``; returns the closure's loss.
        If the closure raises, the weights are restored before the error propagates."""
        if not self._davda54:
            return super().step(closure, tail_mask, schedule, scaler)
        if closure is None:  # only torch.distributed.checkpoint's state creation (zero grads, lr=0)
            refusal = ValueError(
                "step() needs a closure in the davda54/sam convention (forward and backward)"
            )
            return self._create_state(refusal)
        if tail_mask is not None or scaler is not None or schedule != "exact":
            raise TypeError("in the davda54/sam convention step() takes only the closure")
        self.first_step(zero_grad=True)
        try:
            with torch.enable_grad():
                loss = closure()
        except BaseException:
            self._open_method = None
            self._backend.abort()
            raise
        self.second_step()
        return loss

    def capture(self, loss_fn, schedule: str = "exact"):
        if self._davda54:
            raise TypeError(
                "capture() needs the SAM(optimizer, model, rho) convention (it runs the model's "
                "BatchNorm policy); this SAM was built as SAM(params, base_optimizer, ...)"
            )
        return super().capture(loss_fn, schedule)


# this library's options in the davda54/sam convention; the rest of **kwargs build the base
_ENGINE_OPTIONS = ("backend", "max_grad_norm")
# options that need a model or the one-call step: refused there rather than ignored
_MODEL_OPTIONS = ("bn_stats", "nonfinite", "local_perturbation", "reuse")


def _zeroes(zero_grad: bool | None, davda54: bool) -> bool:
    if zero_grad is None:
        return not davda54  # the official methods zero; davda54/sam's keep by default
    return check_bool("zero_grad", zero_grad)


def _davda54_base(params, base_optimizer, rho: float, adaptive, kwargs: dict) -> torch.optim.Optimizer:
    """``base_optimizer(param_groups, **kwargs)`` for ``SAM(params, base_optimizer,
    rho, adaptive, **kwargs)``, each group given ``rho`` and ``adaptive`` unless it
    has its own (kept in the base's param groups, so they are saved and schedulable)."""
    if not callable(base_optimizer):
        raise TypeError(
            "SAM(params, base_optimizer, rho=0.05, adaptive=False, **kwargs): base_optimizer must be an "
            f"optimizer class such as torch.optim.SGD, got {type(base_optimizer).__name__}; or pass an "
            "optimizer instance first: SAM(optimizer, model, rho)"
        )
    check_bool("adaptive", adaptive)
    if isinstance(params, torch.Tensor):
        raise TypeError("params must be an iterable of tensors or of param-group dicts, got a Tensor")
    try:
        groups = list(params)
    except TypeError:
        raise TypeError(
            f"params must be an iterable of tensors or of param-group dicts, got {type(params).__name__}"
        ) from None
    if not groups:
        raise ValueError("params is empty: SAM got no parameters")
    dicts = [isinstance(g, dict) for g in groups]
    if any(dicts) and not all(dicts):
        raise TypeError("params must be all tensors or all param-group dicts, not a mix")
    if not dicts[0]:
        groups = [{"params": groups}]
    groups = [dict(g) for g in groups]  # the caller's dicts stay as they were
    for j, g in enumerate(groups):
        g["rho"] = check_rho(f"param_groups[{j}]['rho']", g.get("rho", rho))
        g["adaptive"] = check_bool(f"param_groups[{j}]['adaptive']", g.get("adaptive", adaptive))
    base = base_optimizer(groups, **kwargs)
    if not isinstance(base, torch.optim.Optimizer):
        raise TypeError(f"base_optimizer(...) must build a torch.optim.Optimizer, got {type(base).__name__}")
    if not any(g["params"] for g in base.param_groups):
        raise ValueError("params holds no parameters: every param group is empty")
    # groups added later (add_param_group) get these too, as davda54's do
    base.defaults.setdefault("rho", rho)
    base.defaults.setdefault("adaptive", adaptive)
    return base


class ImbSAM(GroupedSAM):
    """ImbSAM (Zhou et al., ICCV 2023): SAM on the tail classes only.

    ``normalization="batch"`` (default, the ImbSAM repository's training code):
    ``L_H = Σ_H l_i / B``, ``L_T = tail_weight·Σ_T l_i / B``, ``tail_weight = 2``.
    ``normalization="group"`` (the ImbSAM baseline of the SSE-SAM repository,
    ``forbackward`` in ``utils/trainval.py``): each group's mean over its own
    samples, ``L_H = mean_H l_i``, ``L_T = tail_weight·mean_T l_i``, with
    ``tail_weight = 1`` by default as there; an empty group contributes nothing
    (its count is taken as ``max(n, 1)``). Under micro-batch lists the counts are
    over the whole step. Base step with ``∇L_H(w) + ∇L_T(w + e_T)``.

    ``normalization`` and ``tail_weight`` are used by :meth:`step` (and
    :meth:`capture`). The official methods: ``first_step()`` after the head
    backward, ``second_step()`` after the tail backward, ``third_step()`` after the
    perturbed tail backward; they take the gradients the caller computed, so the
    caller's losses set the normalisation and these options do not affect them.

    """

    def __init__(
        self,
        optimizer,
        model,
        rho: float = 0.05,
        *,
        tail_weight: float | None = None,
        normalization: str = "batch",
        **options,
    ):
        self.rho = check_rho("rho", rho)
        self.normalization = _check_normalization(normalization)
        if tail_weight is None:
            tail_weight = 2.0 if normalization == "batch" else 1.0
        self.tail_weight = check_rho("tail_weight", tail_weight)
        super().__init__(optimizer, model, **options)

    def _groups(self):
        per_group = self.normalization == "group"
        return [Group("head", 1.0, 0.0, per_group), Group("tail", self.tail_weight, self.rho, per_group)]

    def _stage_state(self):
        return {"rho": self.rho, "tail_weight": self.tail_weight, "normalization": self.normalization}

    def _load_stage_state(self, state):
        need_keys("state_dict['stage']", state, ["rho", "tail_weight"])
        # all checked before any is assigned: a refused state changes nothing. A
        # state saved before the option existed has the default normalisation.
        rho, tail_weight = check_rho("rho", state["rho"]), check_rho("tail_weight", state["tail_weight"])
        normalization = _check_normalization(state.get("normalization", "batch"))
        self.rho, self.tail_weight, self.normalization = rho, tail_weight, normalization

    @torch.no_grad()
    def first_step(self) -> None:
        """Keep the head gradient in ``p.grad``; zeroes the grads."""
        self._enter("first_step", None)
        self._backend.take(_HEAD)
        self._open_method = "first_step"

    @torch.no_grad()
    def second_step(self) -> None:
        """``w += rho·g_T/(||g_T||+1e-16)`` with ``g_T`` in ``p.grad``; zeroes the grads."""
        self._enter("second_step", "first_step")
        self._backend.take(_TAIL)
        self._perturb(_TAIL, self.rho, "second_step")

    @torch.no_grad()
    def third_step(self) -> None:
        """Restore ``w``; base step with the perturbed tail gradient plus the head one."""
        self._enter("third_step", "second_step")
        self._finish(add=(_HEAD,))


class SSESAM(GroupedSAM):
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
        head_rho = check_rho("head_rho", head_rho)
        tail_rho = check_rho("tail_rho", tail_rho)
        gamma, total_epochs = check_schedule(gamma, total_epochs)
        self.head_rho, self.gamma, self.total_epochs = head_rho, gamma, total_epochs
        self.rho_is = [head_rho, tail_rho]  # current radii, head then tail (the official name)
        self.epoch_count = 0
        self.cut_epoch = _cut_epoch(gamma, total_epochs)
        super().__init__(optimizer, model, **options)

    @property
    def stage(self) -> int:
        return 2 if self.cut_epoch is not None and self.epoch_count >= self.cut_epoch else 1

    def _groups(self):
        return [Group("head", 1.0, self.rho_is[0]), Group("tail", 1.0, self.rho_is[1])]

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
        # head_rho, tail_rho, gamma and total_epochs may be absent (older saves); all
        # present values are checked before any is assigned
        need_keys("state_dict['stage']", state, ["epoch_count", "rho_is"])
        count = check_count("epoch_count", state["epoch_count"], 0)
        rho_is = state["rho_is"]
        if not isinstance(rho_is, (list, tuple)) or len(rho_is) != 2:
            raise ValueError(f"rho_is must be a list of two radii (head, tail), got {rho_is!r:.60}")
        rhos = [check_rho("rho_is[0]", rho_is[0]), check_rho("rho_is[1]", rho_is[1])]
        if "tail_rho" in state:
            check_rho("tail_rho", state["tail_rho"])
        head_rho = check_rho("head_rho", state.get("head_rho", self.head_rho))
        gamma, total = check_schedule(
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
        self._enter("compute_and_add_epsilon", None)
        self._backend.take(_CLEAN)
        self._perturb(_CLEAN, self.rho_is[n_i], "compute_and_add_epsilon")

    @torch.no_grad()
    def compute_grad_sum_and_restore_p(self) -> None:
        """Add ``p.grad`` to the gradient sum and restore ``w``; zeroes the grads."""
        self._enter("compute_grad_sum_and_restore_p", "compute_and_add_epsilon")
        self._open_method = None
        self._backend.accumulate(_SUM)
        self._backend.restore()

    @torch.no_grad()
    def update(self) -> None:
        """Base step with the summed gradient; zeroes the grads."""
        self._enter("update", None)
        if not self._backend.holds(_SUM):
            raise RuntimeError("update() needs compute_grad_sum_and_restore_p() first")
        self._finish(grads=_SUM)


# the engine's keyword options, listed in every method's docstring (help(SSESAM) shows them)
_OPTIONS = """
    Keyword options of every method (:class:`~.engine.GroupedSAM` describes each):
    ``backend``, ``bn_stats``, ``nonfinite``, ``local_perturbation``,
    ``adaptive``, ``max_grad_norm``, ``reuse``; a misspelt one is refused
    naming the closest.
    """
for _method in (SAM, ImbSAM, SSESAM):
    _method.__doc__ = _method.__doc__.rstrip() + "\n" + _OPTIONS
