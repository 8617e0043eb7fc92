"""Long-tail losses that return per-sample losses, shape ``(B,)``.

The one-call step ``opt.step(closure, tail_mask)`` splits a batch into head and
tail samples, so its closure must return one loss per sample; every loss here
does, and the mean of its output is the batch loss the base optimizer sees. All
class statistics are buffers, so ``loss.to(device)`` moves them with the model.

With ``n_c`` the training count of class ``c``, ``pi_c = n_c / Σ n`` its prior,
``z`` the logits and ``y`` the target:

=========  ================================================================  ==========================
name       per-sample loss                                                   paper
=========  ================================================================  ==========================
``ce``     ``CE(z, y)``                                                       —
``ldam``   ``w_y · CE(s·(z − m_y·onehot(y)), y)``, ``m_c ∝ n_c^(-1/4)``,       Cao et al., NeurIPS 2019
           ``max m = 0.5``, ``s = 30``; ``w = 1`` before the DRW epoch,
           class-balanced after (effective number, ``beta = 0.9999``)
``la``     ``CE(z + tau·log pi, y)``                                         Menon et al., ICLR 2021
``vs``     ``CE(Δ ⊙ z + tau·log pi, y)``, ``Δ_c = (n_c / n_max)^gamma``      Kini et al., NeurIPS 2021
=========  ================================================================  ==========================

The logit adjustments act in training only: predictions use the plain logits.

LDAM's scale ``s = 30`` assumes bounded logits: the LDAM-DRW recipe pairs it
with a cosine classifier, :class:`NormedLinear` (``sse-sam-fast train`` swaps the
model's last linear layer for one when ``--loss ldam``). The DRW weights are
normalised to sum to the number of classes and multiply each sample's loss;
the batch loss is then ``Σ_i w_{y_i} l_i / B``, where LDAM-DRW's weighted
``cross_entropy`` divides by ``Σ_i w_{y_i}`` instead: the same direction, a
batch-dependent step size in the published code.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LDAM_MAX_MARGIN = 0.5
LDAM_SCALE = 30.0
DRW_BETA = 0.9999


def _counts(class_counts: Sequence[int] | Tensor) -> Tensor:
    counts = torch.as_tensor(class_counts)
    if counts.dim() != 1 or counts.numel() == 0:
        raise ValueError(f"class_counts must be a non-empty 1-D sequence, got shape {tuple(counts.shape)}")
    if counts.dtype.is_floating_point or counts.dtype == torch.bool or (counts < 1).any():
        raise ValueError(f"class_counts must be integer counts >= 1, got {counts.tolist()}")
    return counts.to(torch.float64)


def log_prior(class_counts: Sequence[int] | Tensor) -> Tensor:
    """``log(n_c / Σ n)`` per class, float32."""
    counts = _counts(class_counts)
    return (counts / counts.sum()).log().to(torch.float32)


def class_balanced_weights(class_counts: Sequence[int] | Tensor, beta: float = DRW_BETA) -> Tensor:
    """Class-balanced weights (Cui et al., CVPR 2019): ``(1 − beta) / (1 − beta^n_c)``,
    the inverse effective number of samples, normalised to sum to the number of classes."""
    if not 0 <= beta < 1:
        raise ValueError(f"beta must be in [0, 1), got {beta}")
    counts = _counts(class_counts)
    weights = (1 - beta) / (1 - torch.pow(torch.tensor(beta, dtype=torch.float64), counts))
    return (weights / weights.sum() * counts.numel()).to(torch.float32)


def ldam_margins(class_counts: Sequence[int] | Tensor, max_margin: float = LDAM_MAX_MARGIN) -> Tensor:
    """``m_c = C·n_c^(-1/4)`` with ``C`` chosen so the rarest class gets ``max_margin``."""
    if not max_margin > 0:
        raise ValueError(f"max_margin must be > 0, got {max_margin}")
    margins = _counts(class_counts).pow(-0.25)
    return (margins * (max_margin / margins.max())).to(torch.float32)


class PerSampleLoss(nn.Module):
    """``forward(logits (B, C), target (B,)) -> (B,)``. :meth:`set_epoch` is called
    at the start of every epoch (0-based) for losses that change during training."""

    def set_epoch(self, epoch: int) -> None:
        pass

    def host_state(self) -> tuple:
        """What :meth:`forward` decides on the host (a branch, not a tensor's value).
        A CUDA graph records one branch, so the loop keeps one captured step per
        value (``sse-sam-fast train --capture``)."""
        return ()

    def _check(self, logits: Tensor, target: Tensor, num_classes: int | None = None) -> None:
        if logits.dim() != 2 or target.shape != logits.shape[:1]:
            shapes = f"{tuple(logits.shape)} and {tuple(target.shape)}"
            raise ValueError(f"expected logits (B, C) and targets (B,), got {shapes}")
        if num_classes is not None and logits.shape[1] != num_classes:
            raise ValueError(f"logits have {logits.shape[1]} classes, the loss was built for {num_classes}")


class CrossEntropy(PerSampleLoss):
    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        self._check(logits, target)
        return F.cross_entropy(logits, target, reduction="none")


class LDAMLoss(PerSampleLoss):
    """Label-distribution-aware margin loss with deferred re-weighting (LDAM-DRW,
    Cao et al., NeurIPS 2019): the target logit is lowered by ``m_y`` before
    scaling by ``s``; from epoch ``drw_epoch`` on (0-based; ``None``: never) each
    sample's loss is weighted by its class's :func:`class_balanced_weights`."""

    def __init__(
        self,
        class_counts: Sequence[int] | Tensor,
        *,
        max_margin: float = LDAM_MAX_MARGIN,
        scale: float = LDAM_SCALE,
        drw_epoch: int | None = None,
        beta: float = DRW_BETA,
    ):
        super().__init__()
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        if drw_epoch is not None and (isinstance(drw_epoch, bool) or drw_epoch < 0):
            raise ValueError(f"drw_epoch must be an int >= 0 or None, got {drw_epoch!r}")
        self.register_buffer("margins", ldam_margins(class_counts, max_margin))
        self.register_buffer("drw_weights", class_balanced_weights(class_counts, beta))
        self.scale, self.drw_epoch = float(scale), drw_epoch
        self.reweight = False

    def set_epoch(self, epoch: int) -> None:
        self.reweight = self.drw_epoch is not None and epoch >= self.drw_epoch

    def host_state(self) -> tuple:
        return (self.reweight,)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        self._check(logits, target, self.margins.numel())
        index = target[:, None]
        shifted = logits.scatter(1, index, logits.gather(1, index) - self.margins[index].to(logits.dtype))
        loss = F.cross_entropy(self.scale * shifted, target, reduction="none")
        return loss * self.drw_weights[target].to(loss.dtype) if self.reweight else loss


class LogitAdjustedLoss(PerSampleLoss):
    """Logit-adjusted cross-entropy (Menon et al., ICLR 2021): ``CE(z + tau·log pi, y)``."""

    def __init__(self, class_counts: Sequence[int] | Tensor, *, tau: float = 1.0):
        super().__init__()
        self.register_buffer("offsets", tau * log_prior(class_counts))

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        self._check(logits, target, self.offsets.numel())
        return F.cross_entropy(logits + self.offsets.to(logits.dtype), target, reduction="none")


class VSLoss(PerSampleLoss):
    """Vector-scaling loss (Kini et al., NeurIPS 2021): ``CE(Δ ⊙ z + tau·log pi, y)``
    with the multiplicative ``Δ_c = (n_c / n_max)^gamma`` (1 for the largest class,
    smaller for rarer ones) and the additive logit adjustment ``tau·log pi_c``."""

    def __init__(self, class_counts: Sequence[int] | Tensor, *, gamma: float = 0.2, tau: float = 1.0):
        super().__init__()
        if not gamma >= 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        counts = _counts(class_counts)
        self.register_buffer("scales", (counts / counts.max()).pow(gamma).to(torch.float32))
        self.register_buffer("offsets", tau * log_prior(class_counts))

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        self._check(logits, target, self.scales.numel())
        adjusted = logits * self.scales.to(logits.dtype) + self.offsets.to(logits.dtype)
        return F.cross_entropy(adjusted, target, reduction="none")


# The --loss choices: name -> build(class_counts, drw_epoch, tau, vs_gamma), each
# taking the options it uses; the names and the builders cannot drift apart.
LOSSES: dict[str, Callable[..., PerSampleLoss]] = {
    "ce": lambda counts, drw_epoch, tau, vs_gamma: CrossEntropy(),
    "ldam": lambda counts, drw_epoch, tau, vs_gamma: LDAMLoss(counts, drw_epoch=drw_epoch),
    "la": lambda counts, drw_epoch, tau, vs_gamma: LogitAdjustedLoss(counts, tau=tau),
    "vs": lambda counts, drw_epoch, tau, vs_gamma: VSLoss(counts, gamma=vs_gamma, tau=tau),
}


def build_loss(
    name: str,
    class_counts: Sequence[int] | Tensor,
    *,
    drw_epoch: int | None = None,
    tau: float = 1.0,
    vs_gamma: float = 0.2,
) -> PerSampleLoss:
    """One of :data:`LOSSES` for these training counts. ``drw_epoch`` is LDAM's;
    ``tau`` is shared by ``la`` and ``vs``; ``vs_gamma`` is VS's exponent."""
    if name not in LOSSES:
        raise ValueError(f"loss must be one of {tuple(LOSSES)}, got {name!r}")
    return LOSSES[name](class_counts, drw_epoch, tau, vs_gamma)


class NormedLinear(nn.Module):
    """A cosine classifier: ``z_c = <x / ||x||, w_c / ||w_c||>``, so every logit lies
    in ``[-1, 1]``; LDAM scales these by ``s``."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        bound = 1 / math.sqrt(in_features)
        self.weight = nn.Parameter(torch.empty(in_features, out_features).uniform_(-bound, bound))

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=1) @ F.normalize(self.weight, dim=0)

    def extra_repr(self) -> str:
        return f"in_features={self.weight.shape[0]}, out_features={self.weight.shape[1]}"
