"""A run directory's state on disk: ``checkpoint.pt``, the RNG states, atomic writes, resume.

``checkpoint.pt`` holds the model, the optimizer (``opt.state_dict()``, the
SSE-SAM stage included), the LR schedule, every RNG state and the history: a run
resumed from it ends with the same weights as one that never stopped (bitwise on
the CPU). Only tensors and plain containers, so it loads with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import __version__
from .config import (
    ADDED_FIELDS,
    FIELDS,
    METHOD_OPTIONS,
    RUNTIME_FIELDS,
    OptionError,
    TrainConfig,
    for_method,
    option_name,
)

CHECKPOINT = "checkpoint.pt"
RESULTS = "results.json"
CHECKPOINT_FORMAT = "sse_sam_fast.train/1"


def rng_state(data_gen: torch.Generator, device: torch.device) -> dict:
    """Every random state a run draws from, as tensors and plain values."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else [],
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "gauss": float(np_state[4]),
        },
        "data": data_gen.get_state(),
    }


def _checked_rng_state(state) -> dict:
    """The states of ``rng_state``'s dict in the form their setters take, each
    tried on a scratch generator first: a damaged entry is a ``ValueError``
    naming it, raised before any random state changes."""
    if not isinstance(state, dict):
        raise ValueError(f"the RNG states are damaged: a {type(state).__name__}, not a dict")
    missing = sorted({"torch", "cuda", "python", "numpy", "data"} - set(state))
    if missing:
        raise ValueError(f"the RNG states are damaged: no {', '.join(missing)} entry")
    out = {}
    key = "torch"
    try:
        for key in ("torch", "data"):
            torch.Generator().set_state(state[key])  # the CPU generators share one layout
            out[key] = state[key]
        key = "cuda"
        cuda = state["cuda"]
        if not isinstance(cuda, (list, tuple)) or not all(isinstance(t, torch.Tensor) for t in cuda):
            raise TypeError(f"expected a list of tensors, got {type(cuda).__name__}")
        out[key] = list(cuda)
        key = "python"
        version, internal, gauss = state["python"]
        out[key] = (version, tuple(internal), gauss)
        random.Random().setstate(out[key])
        key = "numpy"
        np_state = state["numpy"]
        out[key] = (
            "MT19937",
            np_state["key"].numpy().astype(np.uint32),
            int(np_state["pos"]),
            int(np_state["has_gauss"]),
            float(np_state["gauss"]),
        )
        np.random.RandomState().set_state(out[key])
    except Exception as exc:  # any damage: a wrong type, length, or value
        raise ValueError(f"the RNG state rng[{key!r}] is damaged ({type(exc).__name__}: {exc})") from None
    return out


def set_rng_state(state: dict, data_gen: torch.Generator, device: torch.device) -> None:
    """Set every random state ``rng_state`` saved; all are checked before any is set."""
    state = _checked_rng_state(state)
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    data_gen.set_state(state["data"])


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    # a run killed while saving keeps the previous epoch's file
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_checkpoint(run_dir: Path, **state) -> None:
    """Write ``run_dir/checkpoint.pt`` atomically: ``state`` (config, class_counts,
    epoch, model, optimizer, scheduler, rng, history, elapsed, sessions) tagged
    with this format and version."""
    state = {"format": CHECKPOINT_FORMAT, "version": __version__, **state}
    atomic_write(run_dir / CHECKPOINT, lambda p: torch.save(state, p))


def load_checkpoint(run_dir: str | Path) -> dict:
    """The checkpoint of ``run_dir``, loaded with ``weights_only=True`` and checked."""
    path = Path(run_dir) / CHECKPOINT
    if not Path(run_dir).is_dir():
        raise OptionError("--resume", f"{run_dir} is not a directory (expected a run's --out directory)")
    if not path.is_file():
        raise OptionError("--resume", f"no {CHECKPOINT} in {run_dir}: nothing to resume")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, bad pickle, unsafe global: all mean "not a checkpoint"
        raise OptionError(
            "--resume", f"{path} is not a readable checkpoint ({type(exc).__name__}: {exc})"
        ) from None
    keys = {"format", "config", "epoch", "model", "optimizer", "scheduler", "rng", "history", "class_counts"}
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT or not keys <= set(ckpt):
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise OptionError("--resume", f"{path} is not a {CHECKPOINT_FORMAT} checkpoint (found {found!r})")
    config = ckpt["config"]
    # a checkpoint written before a field was added lacks it: it takes the default
    if not isinstance(config, dict) or not set(FIELDS) - set(ADDED_FIELDS) <= set(config) <= set(FIELDS):
        raise OptionError("--resume", f"{path} holds a configuration this version cannot read")
    ckpt["config"] = {**ADDED_FIELDS, **config}
    return ckpt


def restore(
    ckpt: dict,
    model: nn.Module,
    optimizer,
    scheduler,
    data_gen: torch.Generator,
    device: torch.device,
) -> None:
    """Load the saved model, optimizer, schedule and RNG states into a run built
    from the checkpoint's configuration."""
    try:
        _checked_rng_state(ckpt["rng"])  # before anything is loaded
    except ValueError as exc:
        raise OptionError("--resume", f"{exc}; the checkpoint cannot be resumed") from None
    try:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"], data_gen, device)
    except (KeyError, RuntimeError, ValueError, TypeError) as exc:
        raise OptionError("--resume", f"the checkpoint does not fit its configuration: {exc}") from None


def config_for_resume(ckpt: dict, given: dict) -> TrainConfig:
    """The saved configuration with the command line's runtime options applied;
    any other option given must equal the saved value."""
    # a run saved before its method's unread options were refused may hold any value there
    cfg = for_method(TrainConfig(**ckpt["config"]), ckpt["config"]["opt"])
    for field, value in given.items():
        if value is None or field not in FIELDS:
            continue
        saved = getattr(cfg, field)
        if field in RUNTIME_FIELDS:
            setattr(cfg, field, value)
        elif value != saved:
            raise OptionError(
                option_name(field),
                f"--resume continues the saved run, which has {option_name(field)} {saved}; "
                f"got {value} (start a new run to change it)",
            )
    return cfg


def first_difference(requested: TrainConfig, saved: dict) -> str | None:
    """The first field whose requested value differs from the saved run's, if any.
    Not compared: the runtime fields, fields left to a default that comes from the
    data (``None``: deterministic), and options the method does not read."""
    for field in FIELDS:
        value = getattr(requested, field)
        if field in RUNTIME_FIELDS or value is None:
            continue
        if requested.opt not in METHOD_OPTIONS.get(field, (requested.opt,)):
            continue
        if saved.get(field) != value:
            return field
    return None


def saved_config(out: Path) -> dict:
    """The configuration of the finished run in ``out`` (see :func:`run_status`), with
    the fields added since it was written at their defaults."""
    return {**ADDED_FIELDS, **json.loads((out / RESULTS).read_text())["config"]}


def run_status(out: Path) -> str | None:
    """``None`` (no run), ``"finished"`` or ``"unfinished"`` for a run directory."""
    if not (out / CHECKPOINT).exists():
        return None
    try:
        return "finished" if json.loads((out / RESULTS).read_text())["finished"] else "unfinished"
    except (OSError, ValueError, KeyError, TypeError):
        return "unfinished"


def check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise OptionError("--out", f"{out} is a file; --out names a directory for the run's outputs")
    if run_status(out) == "unfinished" and not overwrite:
        raise OptionError(
            "--out",
            f"{out} holds an unfinished run: continue it with --resume {out}, "
            "or pass --overwrite to start over",
        )
