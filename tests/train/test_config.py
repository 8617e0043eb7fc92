"""Configuration: the defaults of each data set and method, and checks that name the bad option."""

from __future__ import annotations

import dataclasses
import re

import pytest

from sse_sam_fast.train.config import OptionError, TrainConfig, resolve, resolve_groups
from tests.train.short_runs import DIGITS

CIFAR100 = [int(500 * 100 ** (-c / 99)) for c in range(100)]


def test_published_defaults_on_cifar():
    cfg = resolve(TrainConfig(dataset="cifar100-lt", device="cpu"))
    assert (cfg.model, cfg.epochs, cfg.batch_size) == ("resnet32", 200, 64)
    assert (cfg.lr, cfg.momentum, cfg.weight_decay, cfg.imb_factor) == (0.01, 0.9, 1e-3, 100.0)
    assert (cfg.head_rho, cfg.tail_rho, cfg.gamma) == (0.05, 0.1, 0.7)
    assert resolve_groups(cfg, CIFAR100).eta == 100
    assert (resolve_groups(cfg, CIFAR100).many_thr, resolve_groups(cfg, CIFAR100).few_thr) == (100, 20)
    imbsam = resolve_groups(resolve(dataclasses.replace(cfg, opt="imbsam")), CIFAR100)
    assert (imbsam.rho, imbsam.eta) == (0.05, 20)
    ldam = resolve(dataclasses.replace(cfg, loss="ldam"))
    assert ldam.drw_epoch == 160  # LDAM-DRW: the last 40 of 200 epochs re-weighted


def test_digits_defaults_are_the_original_ones():
    cfg = resolve_groups(resolve(TrainConfig(device="cpu")), DIGITS)
    assert (cfg.model, cfg.epochs, cfg.batch_size, cfg.lr, cfg.weight_decay) == ("mlp", 30, 64, 0.05, 5e-4)
    assert (cfg.imb_factor, cfg.eta, cfg.hidden, cfg.threads) == (10.0, 40.0, 128, 1)
    assert (cfg.many_thr, cfg.few_thr) == (54, 25)
    assert resolve(TrainConfig(model="resnet32", dataset="cifar10-lt")).threads is None


def test_profile_defaults_for_cifar10_lt():
    counts = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    cfg = resolve_groups(resolve(TrainConfig(dataset="cifar10-lt", device="cpu")), counts)
    assert (cfg.many_thr, cfg.few_thr, cfg.eta) == (1000, 200, 1000)
    imbsam = resolve_groups(resolve(TrainConfig(dataset="cifar10-lt", opt="imbsam", device="cpu")), counts)
    assert imbsam.eta == 200


@pytest.mark.parametrize(
    "changes, option",
    [
        ({"dataset": "imagenet-lt"}, "--dataset"),
        ({"opt": "adam"}, "--opt"),
        ({"loss": "focal"}, "--loss"),
        ({"model": "vit"}, "--model"),
        ({"backend": "cuda"}, "--backend"),
        ({"schedule": "fast"}, "--schedule"),
        ({"num_classes": 5}, "--num-classes"),  # digits has 10
        ({"dataset": "synthetic-lt", "num_classes": 1}, "--num-classes"),
        ({"model": "resnet32"}, "--model"),  # digits are feature vectors
        ({"imb_factor": 0.5}, "--imb-factor"),
        ({"gamma": 1.5}, "--gamma"),
        ({"drw_epoch": 3}, "--drw-epoch"),  # the loss is ce
        ({"loss": "ldam", "drw_epoch": 31}, "--drw-epoch"),  # beyond --epochs 30
    ],
)
def test_resolve_names_the_bad_option(changes, option):
    with pytest.raises(OptionError) as exc:
        resolve(TrainConfig(**changes))
    assert exc.value.option == option


@pytest.mark.parametrize(
    "changes, option, words",
    [
        ({"many_thr": 200.0}, "--many-thr", "Many group (n > 200) is empty"),
        ({"few_thr": 5.0}, "--few-thr", "Few group (n < 5) is empty"),
        ({"many_thr": 30.0, "few_thr": 50.0}, "--few-thr", "exceeds the many threshold"),
        ({"many_thr": 40.0, "few_thr": 39.0}, "--many-thr/--few-thr", "Medium group"),
        ({"eta": 5.0}, "--eta", "no class a tail class"),
        ({"eta": 1000.0}, "--eta", "every class a tail class"),
    ],
)
def test_groups_that_would_be_empty_are_errors(changes, option, words):
    with pytest.raises(OptionError, match=re.escape(words)) as exc:
        resolve_groups(resolve(TrainConfig(device="cpu", **changes)), DIGITS)
    assert exc.value.option == option
