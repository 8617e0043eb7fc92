"""The registries: the command line offers exactly what the application accepts, and the
optimizers stay importable without the application."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from sse_sam_fast.backends import BACKENDS
from sse_sam_fast.cli import build_parser
from sse_sam_fast.optim import SCHEDULES
from sse_sam_fast.train import registry
from sse_sam_fast.train.config import TrainConfig, resolve

ROOT = Path(__file__).resolve().parents[2]


def _choices(command: str, dest: str) -> tuple:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    return tuple(next(a for a in sub._actions if a.dest == dest).choices)


@pytest.mark.parametrize("command", ["train", "compare"])
def test_cli_choices_are_the_registries(command):
    assert _choices(command, "dataset") == tuple(registry.DATASETS)
    assert _choices(command, "model") == tuple(registry.MODELS)
    assert _choices(command, "loss") == tuple(registry.LOSSES)
    assert _choices(command, "backend") == BACKENDS == registry.BACKENDS
    assert _choices(command, "schedule") == SCHEDULES == registry.SCHEDULES
    method = "opt" if command == "train" else "methods"
    assert _choices(command, method) == tuple(registry.METHODS)


def test_verify_and_bench_choices_are_the_registries():
    assert _choices("verify", "backend") == BACKENDS
    assert _choices("bench", "models") == tuple(registry.IMAGE_MODELS)
    assert set(registry.MODELS) == {"mlp", "cnn1d", *registry.IMAGE_MODELS}


@pytest.mark.parametrize("model", ["resnet32-gn", "vit", "resnet34"])
def test_every_image_model_is_offered_and_accepted(model):
    # the command line once lacked resnet32-gn and vit, which training accepted
    args = build_parser().parse_args(["train", "--model", model, "--dataset", "cifar10-lt"])
    assert args.model == model
    assert resolve(TrainConfig(model=model, dataset="cifar10-lt", device="cpu")).model == model


def test_every_method_builds_its_optimizer():
    import torch

    from sse_sam_fast import SAM, SSESAM, ImbSAM

    cfg = resolve(TrainConfig(device="cpu"))
    expected = {"sgd": type(None), "sam": SAM, "imbsam": ImbSAM, "ssesam": SSESAM}
    assert set(registry.METHODS) == set(expected)
    for name, build in registry.METHODS.items():
        model = torch.nn.Linear(4, 3)
        base = torch.optim.SGD(model.parameters(), lr=0.1)
        assert type(build(base, model, cfg)) is expected[name]


def _run(code: str) -> None:
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_the_optimizers_do_not_import_the_application():
    _run(
        "import sse_sam_fast, sys; from sse_sam_fast import SSESAM; "
        "import sse_sam_fast.optim, sse_sam_fast.backends; "
        "assert not any(m.startswith('sse_sam_fast.train') for m in sys.modules), "
        "sorted(m for m in sys.modules if m.startswith('sse_sam_fast.train'))"
    )


def test_the_application_imports_its_heavy_parts_only_when_used():
    # verify and bench take the models; the command line its registries: neither pulls in the
    # loop, scikit-learn, mnist1d or matplotlib (not tqdm: torch.hub imports it with torch)
    _run(
        "import sys; import sse_sam_fast.train, sse_sam_fast.train.models, sse_sam_fast.cli; "
        "heavy = ('sklearn', 'mnist1d', 'matplotlib', 'sse_sam_fast.train.loop', "
        "'sse_sam_fast.train.compare'); "
        "found = [m for m in sys.modules if m.startswith(heavy)]; assert not found, found"
    )
