"""The published per-parameter code, transcribed: the oracle ``verify`` trusts.

Each class and loop below is a plain per-parameter loop written from the
published algorithms and their authors' training code, not from this library:
the module imports only torch and the standard library, so a mistake in the
engine, its backends or its kernels cannot also sit in the ground truth.

- SAM (Foret et al., "Sharpness-Aware Minimization for Efficiently Improving
  Generalization", ICLR 2021): ``e = rho·g/(||g|| + EPS)``, gradient at
  ``w + e``, restore, base step. :class:`SAM` is the class of the ImbSAM and
  SSE-SAM repositories (restore by subtracting ``e``); :class:`Davda54SAM` is
  davda54/sam (param groups with their own ``rho`` and ``adaptive``, restore by
  copying the old weights), with ASAM (Kwon et al., ICML 2021):
  ``e = rho·T²g/(||T g|| + EPS)``, ``T = |w|``.
- ImbSAM (Zhou et al., "ImbSAM: A Closer Look at Sharpness-Aware Minimization
  in Class-Imbalanced Recognition", ICCV 2023), cool-xuan/Imbalanced_SAM:
  :class:`ImbSAM` and :func:`imbsam_step` (its ``forbackward``): head loss
  ``Σ_H l_i / B``, tail loss ``2·Σ_T l_i / B``; the head gradient at ``w``
  plus the tail gradient at ``w + e_T``, ``e_T`` from the tail gradient alone.
  ``normalization="group"`` is the ImbSAM baseline of the SSE-SAM repository:
  each group's loss over its own count, tail weight 1.
- SSE-SAM (Lyu et al., "SSE-SAM: Balancing Head and Tail Classes Gradually
  through Stage-Wise SAM", AAAI 2025, arXiv 2412.13715), Zemdalk/SSE-SAM:
  :class:`SSESAM` (``compute_and_add_epsilon``, ``compute_grad_sum_and_restore_p``,
  ``update``, ``update_rho``) and :func:`ssesam_step` (its ``forbackward``:
  four forwards and four backwards per step, in both stages).

Where the published code fails, the oracle does what this library defines
(DESIGN.md section 1); these are its only departures from the published code:

1. A pass in which no parameter has a gradient: the published norm,
   ``torch.stack([])``, raises; here nothing is perturbed.
2. An empty head or tail group. Normalised by ``B`` the published loops already
   give a zero gradient and ``e = 0·rho/(0 + EPS) = 0``, so nothing changes;
   normalised by the group's own count (``normalization="group"``) they divide
   by zero and every weight becomes NaN; here the count is ``max(n, 1)``.
3. ``gamma`` outside ``(0, 1)``: the published ``SSESAM`` never defines its epoch
   counter and ``update_rho`` raises; here it counts and never switches.
4. A parameter without a gradient (frozen, or unused by the forward): the
   published ``update`` clones ``None`` and raises; here its ``p.grad`` stays
   ``None``, so the base optimizer leaves it alone, as it would without SAM.
   Restores undo every move, also of a parameter that got no gradient in the
   perturbed pass.
5. ``EPS = 1e-16`` in :class:`Davda54SAM` too, the library's contract (davda54
   writes ``1e-12``: a relative difference of ``1e-12/||g||``).

Two options the published classes lack, as this library offers them:
``adaptive`` (ASAM as davda54 computes it, ``T`` at the weights the move starts
from) and ``max_grad_norm`` (``torch.nn.utils.clip_grad_norm_`` over the
parameters with a gradient, on the final gradient, just before the base step).

Not modelled: the library's ``bn_stats="clean"``. Every forward here updates
BatchNorm running statistics, as the published code's do (``bn_stats="all"``).
``verify`` compares trainable parameters, which in training mode depend on the
batch statistics only, not on the running ones.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch
from torch import Tensor, nn

EPS = 1e-16  # added to every gradient norm (DESIGN.md section 1)

# criterion(logits, targets) -> per-sample losses: the published ``lossFunc``
Criterion = Callable[[Tensor, Tensor], Tensor]


class _PerParameter:
    """What the published classes share: ``optimizer``, ``model``, a per-parameter
    ``state``; the ascent ``w += e`` from ``p.grad``, its undoing, the base step."""

    def __init__(
        self, optimizer: torch.optim.Optimizer, model: nn.Module, adaptive=False, max_grad_norm=None
    ):
        self.optimizer, self.model = optimizer, model
        self.adaptive, self.max_grad_norm = adaptive, max_grad_norm
        self.state: defaultdict = defaultdict(dict)

    def _with_grad(self) -> list[Tensor]:
        return [p for p in self.model.parameters() if p.grad is not None]

    @torch.no_grad()
    def _ascend(self, rho: float) -> None:
        """``e = rho·g/(||g|| + EPS)`` (ASAM: ``rho·|w|²g/(||w·g|| + EPS)``) with
        the global norm of the per-parameter norms; ``w += e``; zero the grads."""
        params = self._with_grad()
        if params:  # the published code raises on an empty stack (departure 1)
            norms = [torch.norm(p.abs() * p.grad if self.adaptive else p.grad, p=2) for p in params]
            scale = rho / (torch.norm(torch.stack(norms), p=2) + EPS)
            for p in params:
                eps = p.grad * scale
                if self.adaptive:
                    eps = p.abs().pow(2) * eps
                p.add_(eps)
                self.state[p]["eps"] = eps
        self.optimizer.zero_grad()

    @torch.no_grad()
    def _descend(self) -> None:
        """Restore ``w`` by subtracting each move, as the published code does."""
        for p in self.model.parameters():
            eps = self.state[p].pop("eps", None)
            if eps is not None:
                p.sub_(eps)

    def _base_step(self) -> None:
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self._with_grad(), self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad()


class SAM(_PerParameter):
    """SAM as the ImbSAM and SSE-SAM repositories write it: ``first_step()``
    after the backward at ``w``, ``second_step()`` after the one at ``w + e``."""

    def __init__(self, optimizer, model, rho=0.05, *, adaptive=False, max_grad_norm=None):
        super().__init__(optimizer, model, adaptive, max_grad_norm)
        self.rho = rho

    def first_step(self) -> None:
        self._ascend(self.rho)

    @torch.no_grad()
    def second_step(self) -> None:
        self._descend()
        self._base_step()


class ImbSAM(_PerParameter):
    """ImbSAM's class: ``first_step()`` keeps the head gradient, ``second_step()``
    perturbs with the tail gradient, ``third_step()`` restores and steps with
    the perturbed tail gradient plus the head gradient."""

    def __init__(self, optimizer, model, rho=0.05, *, adaptive=False, max_grad_norm=None):
        super().__init__(optimizer, model, adaptive, max_grad_norm)
        self.rho = rho

    @torch.no_grad()
    def first_step(self) -> None:
        for p in self._with_grad():
            self.state[p]["grad_normal"] = p.grad.clone()
        self.optimizer.zero_grad()

    def second_step(self) -> None:
        self._ascend(self.rho)

    @torch.no_grad()
    def third_step(self) -> None:
        self._descend()
        for p in self.model.parameters():
            head = self.state[p].pop("grad_normal", None)
            if head is not None:
                p.grad = head if p.grad is None else p.grad.add_(head)
        self._base_step()


class SSESAM(_PerParameter):
    """SSE-SAM's class. Per step and group (0 head, 1 tail):
    ``compute_and_add_epsilon(n_i)`` after the clean backward,
    ``compute_grad_sum_and_restore_p()`` after the perturbed one; then
    ``update()``. ``update_rho()`` once per epoch: ``rho_is[0] = 0`` from
    ``epoch_count >= gamma·total_epochs`` on, for ``0 < gamma < 1``."""

    def __init__(
        self,
        optimizer,
        model,
        head_rho,
        tail_rho,
        gamma=0,
        total_epochs=200,
        *,
        adaptive=False,
        max_grad_norm=None,
    ):
        super().__init__(optimizer, model, adaptive, max_grad_norm)
        self.rho_is = [head_rho, tail_rho]
        self.epoch_count = 0
        self.cut_epoch = total_epochs * gamma if 0 < gamma < 1 else None  # departure 3

    def compute_and_add_epsilon(self, n_i: int) -> None:
        self._ascend(self.rho_is[n_i])

    @torch.no_grad()
    def compute_grad_sum_and_restore_p(self) -> None:
        for p in self._with_grad():
            total = self.state[p].get("grad_sum")
            self.state[p]["grad_sum"] = p.grad.clone() if total is None else total.add_(p.grad)
        self._descend()
        self.optimizer.zero_grad()

    @torch.no_grad()
    def update(self) -> None:
        for p in self.model.parameters():
            p.grad = self.state[p].get("grad_sum")  # None: left alone (departure 4)
        self._base_step()
        self.state.clear()

    def update_rho(self) -> None:
        self.epoch_count += 1
        if self.cut_epoch is not None and self.epoch_count >= self.cut_epoch:
            self.rho_is[0] = 0


class Davda54SAM(torch.optim.Optimizer):
    """davda54/sam: ``SAM(params, base_optimizer, rho, adaptive, **kwargs)``; one
    global norm over every parameter with a gradient (``|w|·g`` in adaptive
    groups), each param group's own ``rho``; the old weights copied back before
    the base step. ``step(closure)``: ``first_step(zero_grad=True)``, the
    closure (forward and backward at ``w + e``), ``second_step()``."""

    def __init__(self, params, base_optimizer, rho=0.05, adaptive=False, **kwargs):
        super().__init__(params, dict(rho=rho, adaptive=adaptive, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)

    @torch.no_grad()
    def first_step(self, zero_grad=False) -> None:
        pairs = [(g, p) for g in self.param_groups for p in g["params"] if p.grad is not None]
        if pairs:
            t = lambda g, p: p.abs() if g["adaptive"] else 1.0  # noqa: E731
            norm = torch.norm(torch.stack([(t(g, p) * p.grad).norm(p=2) for g, p in pairs]), p=2)
            for g, p in pairs:
                self.state[p]["old_p"] = p.detach().clone()
                p.add_(t(g, p) ** 2 * p.grad * (g["rho"] / (norm + EPS)))
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad=False) -> None:
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is not None and "old_p" in self.state[p]:
                    p.copy_(self.state[p]["old_p"])
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def step(self, closure=None):
        if closure is None:
            raise ValueError("davda54/sam's step needs a closure (forward and backward)")
        self.first_step(zero_grad=True)
        with torch.enable_grad():
            loss = closure()
        self.second_step()
        return loss


# ---- the training loops (``forbackward`` of the published repositories) ------------
# Each receives the per-sample losses of the first forward at w, as the published
# train_model computes them before calling forbackward.


def sam_step(optimizer, model: nn.Module, criterion: Criterion, images: Tensor, targets: Tensor) -> Tensor:
    """SAM: two forwards and two backwards, ``L = mean_i l_i``."""
    loss = criterion(model(images), targets).mean()
    loss.backward()
    optimizer.first_step()
    criterion(model(images), targets).mean().backward()
    optimizer.second_step()
    return loss.detach()


def imbsam_step(
    optimizer,
    model: nn.Module,
    criterion: Criterion,
    images: Tensor,
    targets: Tensor,
    tail_mask: Tensor,
    tail_weight: float = 2.0,
    normalization: str = "batch",
) -> Tensor:
    """ImbSAM: the forward at ``w`` serves the head and the tail backward
    (``retain_graph``), one more forward and backward of the tail at ``w + e``:
    two forwards, three backwards. ``normalization``: ``"batch"`` divides each
    group's sum by ``B`` (ImbSAM's code), ``"group"`` by the group's own count,
    ``max(n, 1)`` (the SSE-SAM repository's baseline; departure 2)."""
    head = ~tail_mask
    if normalization == "group":
        n_head, n_tail = max(int(head.sum()), 1), max(int(tail_mask.sum()), 1)
    else:
        n_head = n_tail = targets.shape[0]
    loss = criterion(model(images), targets)
    head_loss = loss[head].sum() / n_head
    head_loss.backward(retain_graph=True)
    optimizer.first_step()
    tail_loss = loss[tail_mask].sum() / n_tail * tail_weight
    tail_loss.backward()
    optimizer.second_step()
    logits = model(images)
    (criterion(logits[tail_mask], targets[tail_mask]).sum() / n_tail * tail_weight).backward()
    optimizer.third_step()
    return (head_loss + tail_loss).detach()


def ssesam_step(
    optimizer, model: nn.Module, criterion: Criterion, images: Tensor, targets: Tensor, tail_mask: Tensor
) -> Tensor:
    """SSE-SAM: for the head, then the tail, a backward at ``w`` and one at
    ``w + e_i``, each from its own forward (the first forward's losses serve the
    head's clean backward): four forwards and four backwards, in stage 2 too
    (``rho_H = 0`` makes ``e_H = 0``). ``L_i = Σ_{j∈i} l_j / B``."""
    b = targets.shape[0]
    head = ~tail_mask
    head_loss = criterion(model(images), targets)[head].sum() / b
    head_loss.backward(retain_graph=True)
    optimizer.compute_and_add_epsilon(0)
    logits = model(images)
    (criterion(logits[head], targets[head]).sum() / b).backward(retain_graph=True)
    optimizer.compute_grad_sum_and_restore_p()
    logits = model(images)
    tail_loss = criterion(logits[tail_mask], targets[tail_mask]).sum() / b
    tail_loss.backward(retain_graph=True)
    optimizer.compute_and_add_epsilon(1)
    logits = model(images)
    (criterion(logits[tail_mask], targets[tail_mask]).sum() / b).backward(retain_graph=True)
    optimizer.compute_grad_sum_and_restore_p()
    optimizer.update()
    return (head_loss + tail_loss).detach()


def forbackward(
    method: str,
    optimizer,
    model: nn.Module,
    criterion: Criterion,
    images: Tensor,
    targets: Tensor,
    tail_mask: Tensor | None = None,
    **imbsam,
) -> Tensor:
    """One training step of ``method`` (``"sam"``, ``"imbsam"``, ``"ssesam"``) as
    the published loop drives ``optimizer`` (any object with the published
    methods: these classes, or this library's); ``imbsam``: ``tail_weight`` and
    ``normalization`` of :func:`imbsam_step`. Returns the loss at ``w``."""
    if method == "sam":
        return sam_step(optimizer, model, criterion, images, targets)
    if method == "imbsam":
        return imbsam_step(optimizer, model, criterion, images, targets, tail_mask, **imbsam)
    if method == "ssesam":
        return ssesam_step(optimizer, model, criterion, images, targets, tail_mask)
    raise ValueError(f"method must be 'sam', 'imbsam' or 'ssesam', got {method!r}")
