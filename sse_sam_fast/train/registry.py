"""The names the application accepts, one registry per concept.

The command line's ``choices``, the checks of :func:`sse_sam_fast.train.config.resolve`
and the builders all read these, so a name registered once is accepted everywhere
(the command line once offered fewer models than training accepted):

============  =====================  ===========================================================
registry      options                maps a name to
============  =====================  ===========================================================
METHODS       ``--opt``,             ``build(base, model, cfg)``: the wrapper around the base
              ``--methods``          SGD, ``None`` for plain SGD
MODELS        ``--model``            a constructor: ``mlp(in_features, num_classes, hidden)``,
                                     ``cnn1d(in_features, num_classes)`` (1-D signals),
                                     an image model of :data:`IMAGE_MODELS` ``(num_classes)``
DATASETS      ``--dataset``          a loader (:data:`sse_sam_fast.train.data.DATASETS`)
LOSSES        ``--loss``             a builder (:data:`sse_sam_fast.train.losses.LOSSES`)
BACKENDS      ``--backend``          the engine's (:data:`sse_sam_fast.backends.BACKENDS`)
SCHEDULES     ``--schedule``         the engine's (:data:`sse_sam_fast.optim.SCHEDULES`)
============  =====================  ===========================================================
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .. import SAM, SSESAM, ImbSAM
from ..backends import BACKENDS
from ..optim import REUSE_POLICIES, SCHEDULES
from .data import DATASETS, IMAGE_DATASETS, SIGNAL_DATASETS
from .losses import LOSSES
from .models import MODELS as IMAGE_MODELS
from .models import cnn1d, mlp

__all__ = [
    "BACKENDS",
    "DATASETS",
    "IMAGE_DATASETS",
    "IMAGE_MODELS",
    "LOSSES",
    "METHODS",
    "MODELS",
    "REUSE_POLICIES",
    "SCHEDULES",
    "SIGNAL_DATASETS",
]


def _options(cfg) -> dict:
    """The keyword options every method takes, from the configuration."""
    return {
        "backend": cfg.backend,
        "adaptive": cfg.adaptive,
        "max_grad_norm": cfg.max_grad_norm,
        "reuse": cfg.reuse,
        "reuse_policy": cfg.reuse_policy,
    }


METHODS: dict[str, Callable[..., object]] = {
    "sgd": lambda base, model, cfg: None,
    "sam": lambda base, model, cfg: SAM(base, model, cfg.rho, **_options(cfg)),
    "imbsam": lambda base, model, cfg: ImbSAM(
        base, model, cfg.rho, normalization=cfg.imbsam_normalization, **_options(cfg)
    ),
    "ssesam": lambda base, model, cfg: SSESAM(
        base, model, cfg.head_rho, cfg.tail_rho, cfg.gamma, cfg.epochs, **_options(cfg)
    ),
}

MODELS: dict[str, Callable[..., nn.Module]] = {"mlp": mlp, "cnn1d": cnn1d, **IMAGE_MODELS}
