"""The training loop behind ``sse-sam-fast train`` and ``sse-sam-fast compare``.

:func:`train` runs one configuration (:class:`TrainConfig`) to the end, writing
into its output directory after every epoch:

``checkpoint.pt``  model, optimizer (``opt.state_dict()``, the SSE-SAM stage
                   included), LR schedule, every RNG state and the history: a
                   run resumed from it ends with the same weights as one that
                   never stopped (bitwise on the CPU). Only tensors and plain
                   containers, so it loads with ``torch.load(weights_only=True)``.
``results.json``   configuration, class counts and groups, per-epoch metrics,
                   final per-class and group accuracies, wall time, versions
                   (``"finished": false`` until the last epoch).
``results.png``    per-class accuracy against training-class frequency, and
                   accuracy by group over the epochs (at the end of the run).

:func:`compare` runs several methods over several seeds and tabulates mean ±
std of Many / Medium / Few / All and head / tail accuracy.

Defaults depend on the data set (:data:`DATASET_DEFAULTS`, :func:`default_eta`);
the CIFAR ones are the published SSE-SAM / ImbSAM settings.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import platform
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from itertools import product
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from . import SAM, SSESAM, ImbSAM, __version__, tail_mask
from .data import DATASETS, LongTailData, load_dataset
from .losses import LOSSES, NormedLinear, build_loss
from .metrics import (
    CIFAR100_THRESHOLDS,
    REPORTED,
    class_ranges,
    frequency_groups,
    group_accuracy,
    head_tail_groups,
    mean_std,
    per_class_accuracy,
    profile_thresholds,
)
from .models import MODELS, mlp

OPTIMIZERS = ("sgd", "sam", "imbsam", "ssesam")
MODEL_NAMES = ("mlp", *MODELS)
BACKENDS = ("auto", "torch", "triton", "reference")
SCHEDULES = ("exact", "split", "auto")

CHECKPOINT = "checkpoint.pt"
RESULTS = "results.json"
PLOT = "results.png"
CHECKPOINT_FORMAT = "sse_sam_fast.train/1"
EVAL_BATCH = 1000

# Small data sets: the settings of the original `train` (about 0.3 s of training for
# digits on one CPU thread). CIFAR: the published SSE-SAM / ImbSAM recipe.
_SMALL = {"model": "mlp", "epochs": 30, "batch_size": 64, "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}
_CIFAR = {
    "model": "resnet32",
    "epochs": 200,
    "batch_size": 64,
    "lr": 0.01,
    "momentum": 0.9,
    "weight_decay": 1e-3,
    "imb_factor": 100.0,
}
DATASET_DEFAULTS = {
    "digits-lt": {**_SMALL, "imb_factor": 10.0},
    "synthetic-lt": {**_SMALL, "imb_factor": 100.0, "num_classes": 10},
    "cifar10-lt": _CIFAR,
    "cifar100-lt": _CIFAR,
}
DRW_FRACTION = 0.8  # LDAM-DRW re-weights the last 40 of 200 epochs


class OptionError(ValueError):
    """A bad value of a command-line option; ``option`` names it (``--eta``)."""

    def __init__(self, option: str, message: str):
        super().__init__(message)
        self.option = option


@dataclass
class TrainConfig:
    """Everything that decides a run, named as the ``train`` options are
    (``--head-rho`` is ``head_rho``). ``None`` means the data set's or method's
    default, filled in by :func:`resolve`; the saved configuration is resolved."""

    dataset: str = "digits-lt"
    data_dir: str = "data"
    num_classes: int | None = None
    imb_factor: float | None = None
    model: str | None = None
    hidden: int = 128
    loss: str = "ce"
    drw_epoch: int | None = None
    tau: float = 1.0
    vs_gamma: float = 0.2
    opt: str = "ssesam"
    rho: float = 0.05
    head_rho: float = 0.05
    tail_rho: float = 0.1
    gamma: float = 0.7
    eta: float | None = None
    many_thr: float | None = None
    few_thr: float | None = None
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    momentum: float | None = None
    weight_decay: float | None = None
    seed: int = 0
    backend: str = "auto"
    schedule: str = "exact"
    device: str | None = None
    threads: int | None = None


FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig))
# may differ when a run is resumed (the data moved, another machine); the rest may not
RUNTIME_FIELDS = ("data_dir", "backend", "device", "threads")


def option_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_eta(dataset: str, opt: str, class_counts: Sequence[int]) -> float:
    """Tail classes have fewer than ``eta`` training samples.

    CIFAR-100-LT: 100 (SSE-SAM; also used to report SGD and SAM) and 20 (ImbSAM),
    the published values. digits-LT: 40 for every method (the original default:
    classes 5-9 of 10). Other profiles: where those sit on CIFAR-100-LT's, i.e. the
    Many threshold (the Few threshold for ImbSAM) of :func:`profile_thresholds`.
    """
    if dataset == "digits-lt":
        return 40.0
    if dataset == "cifar100-lt":
        return 20.0 if opt == "imbsam" else 100.0
    many, few = profile_thresholds(class_counts)
    return few if opt == "imbsam" else many


def resolve(cfg: TrainConfig) -> TrainConfig:
    """Fill in the defaults that do not need the data and check the combination."""
    if cfg.dataset not in DATASETS:
        raise OptionError("--dataset", f"unknown data set {cfg.dataset!r}; choose from {', '.join(DATASETS)}")
    for field, names in (
        ("opt", OPTIMIZERS),
        ("loss", LOSSES),
        ("backend", BACKENDS),
        ("schedule", SCHEDULES),
    ):
        if getattr(cfg, field) not in names:
            raise OptionError(
                option_name(field), f"unknown name {getattr(cfg, field)!r}; choose from {', '.join(names)}"
            )
    if cfg.model is not None and cfg.model not in MODEL_NAMES:
        raise OptionError("--model", f"unknown model {cfg.model!r}; choose from {', '.join(MODEL_NAMES)}")
    if cfg.num_classes is not None and cfg.dataset != "synthetic-lt":
        raise OptionError(
            "--num-classes", f"applies to synthetic-lt only ({cfg.dataset} has a fixed number of classes)"
        )
    if cfg.num_classes is not None and cfg.num_classes < 2:
        raise OptionError("--num-classes", f"a long tail needs at least 2 classes, got {cfg.num_classes}")
    if cfg.imb_factor is not None and not (math.isfinite(cfg.imb_factor) and cfg.imb_factor >= 1):
        raise OptionError(
            "--imb-factor", f"must be >= 1 (largest / smallest class size), got {cfg.imb_factor}"
        )
    if not 0 <= cfg.gamma <= 1:
        raise OptionError("--gamma", f"expected a number in [0, 1], got {cfg.gamma}")
    filled = {k: v for k, v in DATASET_DEFAULTS[cfg.dataset].items() if getattr(cfg, k) is None}
    cfg = dataclasses.replace(cfg, **filled)
    if cfg.model != "mlp" and cfg.dataset not in ("cifar10-lt", "cifar100-lt"):
        raise OptionError(
            "--model",
            f"{cfg.model} needs 3x32x32 images (cifar10-lt, cifar100-lt); {cfg.dataset} has feature "
            "vectors: use --model mlp",
        )
    if cfg.drw_epoch is not None and cfg.loss != "ldam":
        raise OptionError("--drw-epoch", f"applies to --loss ldam only (the loss is {cfg.loss})")
    if cfg.loss == "ldam" and cfg.drw_epoch is None:
        cfg.drw_epoch = int(DRW_FRACTION * cfg.epochs)
    if cfg.drw_epoch is not None and not 0 <= cfg.drw_epoch <= cfg.epochs:
        raise OptionError("--drw-epoch", f"must lie in [0, --epochs={cfg.epochs}], got {cfg.drw_epoch}")
    if cfg.device is None:
        cfg.device = default_device()
    if cfg.threads is None and cfg.model == "mlp":
        cfg.threads = 1  # the MLP is too small for more; on a busy machine they stall in OpenMP barriers
    return cfg


def resolve_groups(cfg: TrainConfig, class_counts: Sequence[int]) -> TrainConfig:
    """Fill in ``eta`` and the Many / Few thresholds from the training counts and
    check that none of the five groups is empty."""
    counts = list(class_counts)
    span = f"training counts {min(counts)}..{max(counts)}"
    many, few = CIFAR100_THRESHOLDS if cfg.dataset == "cifar100-lt" else profile_thresholds(counts)
    cfg = dataclasses.replace(
        cfg,
        many_thr=many if cfg.many_thr is None else cfg.many_thr,
        few_thr=few if cfg.few_thr is None else cfg.few_thr,
        eta=default_eta(cfg.dataset, cfg.opt, counts) if cfg.eta is None else cfg.eta,
    )
    if cfg.few_thr > cfg.many_thr:
        raise OptionError(
            "--few-thr", f"{cfg.few_thr:g} exceeds the many threshold {cfg.many_thr:g} (--many-thr)"
        )
    groups = frequency_groups(counts, cfg.many_thr, cfg.few_thr)
    where = {"many": "--many-thr", "few": "--few-thr", "medium": "--many-thr/--few-thr"}
    rule = {
        "many": f"n > {cfg.many_thr:g}",
        "few": f"n < {cfg.few_thr:g}",
        "medium": f"{cfg.few_thr:g} <= n <= {cfg.many_thr:g}",
    }
    for name, classes in groups.items():
        if not classes:
            raise OptionError(
                where[name],
                f"the {name.capitalize()} group ({rule[name]}) is empty for {cfg.dataset} ({span}); "
                "choose thresholds that leave every group a class",
            )
    ht = head_tail_groups(counts, cfg.eta)
    if not ht["head"] or not ht["tail"]:
        raise OptionError(
            "--eta",
            f"eta={cfg.eta:g} makes {'no' if not ht['tail'] else 'every'} class a tail class ({span}); "
            f"choose eta in ({min(counts)}, {max(counts)}]",
        )
    return cfg


# ---- building blocks ----------------------------------------------------------------------------


def load_data(cfg: TrainConfig, download: bool = False) -> LongTailData:
    try:
        return load_dataset(
            cfg.dataset,
            cfg.imb_factor,
            seed=cfg.seed,
            num_classes=cfg.num_classes,
            data_dir=cfg.data_dir,
            download=download,
        )
    except FileNotFoundError as exc:
        raise OptionError("--data-dir", str(exc)) from None
    except ValueError as exc:
        option = "--imb-factor" if "imb_factor" in str(exc) else "--data-dir"
        raise OptionError(option, str(exc)) from None
    except ImportError as exc:
        if download:
            raise OptionError("--download", str(exc)) from None
        raise


def build_model(cfg: TrainConfig, data: LongTailData) -> nn.Module:
    """``mlp`` (images are flattened) or a CIFAR ResNet; with ``--loss ldam`` the last
    linear layer becomes a cosine classifier (:class:`~sse_sam_fast.losses.NormedLinear`)."""
    if cfg.model == "mlp":
        features = math.prod(data.x_train.shape[1:])
        model = mlp(features, data.num_classes, cfg.hidden)
        if data.x_train.dim() > 2:
            model = nn.Sequential(nn.Flatten(), model)
    else:
        model = MODELS[cfg.model](num_classes=data.num_classes)
    if cfg.loss == "ldam":
        name, last = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, NormedLinear(last.in_features, last.out_features))
    return model


def build_optimizer(cfg: TrainConfig, model: nn.Module):
    """``(base SGD, wrapper or None for plain SGD)``."""
    base = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    try:
        if cfg.opt == "sgd":
            return base, None
        if cfg.opt == "sam":
            return base, SAM(base, model, cfg.rho, backend=cfg.backend)
        if cfg.opt == "imbsam":
            return base, ImbSAM(base, model, cfg.rho, backend=cfg.backend)
        return base, SSESAM(
            base, model, cfg.head_rho, cfg.tail_rho, cfg.gamma, cfg.epochs, backend=cfg.backend
        )
    except ValueError as exc:
        if "backend" in str(exc):
            raise OptionError("--backend", str(exc)) from None
        raise


def step_kwargs(opt, schedule: str) -> dict:
    """``{"schedule": schedule}`` when ``opt.step`` takes it; ``{}`` for ``exact``
    when it does not (exact is then the only schedule)."""
    if opt is not None and "schedule" in inspect.signature(opt.step).parameters:
        return {"schedule": schedule}
    if schedule != "exact" and opt is not None:
        raise OptionError(
            "--schedule",
            f"{schedule!r} needs step(schedule=...), which this version of sse_sam_fast "
            f"({__version__}) lacks; only 'exact' is available",
        )
    return {}


@torch.no_grad()
def evaluate(model: nn.Module, data: LongTailData) -> Tensor:
    """Per-class test accuracy (float64, CPU), with the model in eval mode."""
    was_training = model.training
    model.eval()
    n = len(data.y_test)
    preds = [model(data.test_inputs(i, i + EVAL_BATCH)).argmax(1) for i in range(0, n, EVAL_BATCH)]
    model.train(was_training)
    return per_class_accuracy(torch.cat(preds), data.y_test, data.num_classes)


def describe(model: nn.Module) -> str:
    params = sum(p.numel() for p in model.parameters())
    head = [m for m in model.modules() if isinstance(m, (nn.Linear, NormedLinear))][-1]
    name = type(model).__name__ if not isinstance(model, nn.Sequential) else "MLP"
    return f"{name} ({params / 1e6:.2f}M parameters, {type(head).__name__} classifier)"


# ---- checkpoints --------------------------------------------------------------------------------


def _rng_state(data_gen: torch.Generator, device: torch.device) -> dict:
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


def _set_rng_state(state: dict, data_gen: torch.Generator, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            np_state["key"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["gauss"],
        )
    )
    data_gen.set_state(state["data"])


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    # a run killed while saving keeps the previous epoch's file
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


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
    if not isinstance(ckpt["config"], dict) or set(ckpt["config"]) != set(FIELDS):
        raise OptionError("--resume", f"{path} holds a configuration this version cannot read")
    return ckpt


def config_for_resume(ckpt: dict, given: dict) -> TrainConfig:
    """The saved configuration with the command line's runtime options applied;
    any other option given must equal the saved value."""
    cfg = TrainConfig(**ckpt["config"])
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


# ---- one run ------------------------------------------------------------------------------------


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # the bar is a nicety: train without it
        return None
    return tqdm(total=total, desc=desc, file=sys.stderr, leave=False, unit="batch", dynamic_ncols=True)


def _machine(device: torch.device) -> dict:
    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }


def _versions() -> dict:
    return {"sse_sam_fast": __version__, "torch": torch.__version__, "python": platform.python_version()}


def _json_float(x: float) -> float | None:
    return None if math.isnan(x) else round(x, 6)


def train(
    cfg: TrainConfig,
    out: str | Path,
    *,
    resume: dict | None = None,
    stop_after: int | None = None,
    download: bool = False,
    quiet: bool = False,
    plot: bool = True,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """Train ``cfg`` into ``out`` (or continue the checkpoint ``resume`` there);
    returns the results written to ``results.json``. ``stop_after=k`` stops once
    epoch ``k`` is saved, as if the run had been killed. Bad options raise
    :class:`OptionError`."""
    out = Path(out)
    threads = torch.get_num_threads()
    try:
        cfg = resolve(cfg)
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        return _train(cfg, out, resume, stop_after, download, quiet, plot, overwrite, log)
    finally:
        torch.set_num_threads(threads)  # train() may be called in-process (compare, tests, notebooks)


def _train(cfg, out, resume, stop_after, download, quiet, plot, overwrite, log) -> dict:
    session_start = time.perf_counter()
    try:
        device = torch.device(cfg.device)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as exc:  # unknown or unavailable device
        raise OptionError("--device", f"cannot use {cfg.device!r}: {exc}") from None
    if resume is None:
        if run_status(out) == "finished":
            log(f"note: replacing the finished run in {out}")
        check_out(out, overwrite)
    data = load_data(cfg, download)
    counts = data.class_counts
    if resume is not None and resume["class_counts"] != counts:
        raise OptionError(
            "--data-dir",
            "the data differ from the saved run's (class counts changed); point at the same files",
        )
    cfg = resolve_groups(cfg, counts)
    groups = {
        **frequency_groups(counts, cfg.many_thr, cfg.few_thr),
        **head_tail_groups(counts, cfg.eta),
    }

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    model = build_model(cfg, data).to(device)
    base, opt = build_optimizer(cfg, model)
    kwargs = step_kwargs(opt, cfg.schedule)
    # per-epoch cosine decay on the base optimizer: the wrapper shares its param_groups
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(base, T_max=cfg.epochs)
    loss_fn = build_loss(cfg.loss, counts, drw_epoch=cfg.drw_epoch, tau=cfg.tau, vs_gamma=cfg.vs_gamma)
    loss_fn = loss_fn.to(device)
    data.to(device)
    tails = torch.tensor(groups["tail"], device=device)
    data_gen = torch.Generator().manual_seed(cfg.seed)  # shuffling and augmentation

    try:  # only now: a run that fails its checks leaves no directory behind
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OptionError("--out", f"cannot create {out}: {exc}") from None

    history: list[dict] = []
    start_epoch, elapsed, sessions = 0, 0.0, 1
    if resume is not None:
        try:
            model.load_state_dict(resume["model"])
            (opt or base).load_state_dict(resume["optimizer"])
            schedule.load_state_dict(resume["scheduler"])
            _set_rng_state(resume["rng"], data_gen, device)
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            raise OptionError("--resume", f"the checkpoint does not fit its configuration: {exc}") from None
        history = list(resume["history"])
        start_epoch = int(resume["epoch"])
        elapsed = float(resume.get("elapsed", 0.0))
        sessions = int(resume.get("sessions", 1)) + (start_epoch < cfg.epochs)  # re-evaluating is no session

    def step_fn(x: Tensor, y: Tensor) -> Tensor:
        if opt is None:
            base.zero_grad()
            loss = loss_fn(model(x), y).mean()
            loss.backward()
            base.step()
            return loss.detach()

        def closure(idx: Tensor | None = None) -> Tensor:
            # the split schedule asks for the losses of a subset of the batch
            return loss_fn(model(x), y) if idx is None else loss_fn(model(x[idx]), y[idx])

        return opt.step(closure, tail_mask(y, tails), **kwargs)

    n_train = len(data.y_train)
    log(
        f"data: {cfg.dataset} imb_factor={cfg.imb_factor:g}, {n_train} train / {len(data.y_test)} test "
        f"(balanced), {data.num_classes} classes; train counts "
        + (str(counts) if len(counts) <= 20 else f"{counts[0]} down to {counts[-1]}")
    )
    log(
        f"groups: many (n > {cfg.many_thr:g}): {class_ranges(groups['many'])}; medium: "
        f"{class_ranges(groups['medium'])}; few (n < {cfg.few_thr:g}): {class_ranges(groups['few'])}"
    )
    log(
        f"tail classes (count < eta={cfg.eta:g}): {class_ranges(groups['tail'])}; "
        f"head classes: {class_ranges(groups['head'])}"
    )
    opt_name = (
        "SGD" if opt is None else f"{type(opt).__name__} (backend {opt.backend}, schedule {cfg.schedule})"
    )
    loss_name = cfg.loss + (f" (DRW from epoch {cfg.drw_epoch + 1})" if cfg.loss == "ldam" else "")
    log(f"model: {cfg.model}, {describe(model)}; loss: {loss_name}; optimizer: {opt_name}; device: {device}")
    if resume is not None:
        log(f"resuming {out} after epoch {start_epoch} of {cfg.epochs}")

    def write_results(final: dict | None) -> dict:
        results = {
            "finished": final is not None,
            "config": asdict(cfg),
            "versions": _versions(),
            "machine": _machine(device),
            "data": {
                "train_counts": counts,
                "test_counts": torch.bincount(data.y_test, minlength=data.num_classes).tolist(),
                "groups": groups,
                "thresholds": {"many": cfg.many_thr, "few": cfg.few_thr, "eta": cfg.eta},
            },
            "epochs": history,
            "final": final,
            "wall_time_s": round(elapsed, 4),
            "sessions": sessions,
        }
        _atomic_write(out / RESULTS, lambda p: p.write_text(json.dumps(results, indent=1) + "\n"))
        return results

    show_bar = not quiet and sys.stderr.isatty()
    batches = math.ceil(n_train / cfg.batch_size)
    per_class = None
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        stage = opt.stage if isinstance(opt, SSESAM) else None
        lr = base.param_groups[0]["lr"]
        skipped_before = getattr(opt, "nonfinite_steps", 0)
        loss_fn.set_epoch(epoch)
        model.train()
        bar = _progress(batches, f"epoch {epoch + 1}/{cfg.epochs}", show_bar)
        total = torch.zeros((), device=device)
        for idx in torch.randperm(n_train, generator=data_gen).split(cfg.batch_size):
            idx = idx.to(device)
            y = data.y_train[idx]
            total += step_fn(data.train_inputs(idx, data_gen), y) * len(y)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        if isinstance(opt, SSESAM):
            opt.update_rho()
        schedule.step()
        per_class = evaluate(model, data)  # its .cpu() waits for the device: the epoch time is real
        seconds = time.perf_counter() - t0
        elapsed += seconds
        acc = group_accuracy(per_class, {k: groups[k] for k in REPORTED[1:]})
        loss = float(total) / n_train
        # steps the optimizer skipped for a NaN / inf (their losses still count in the mean)
        skipped = getattr(opt, "nonfinite_steps", 0) - skipped_before
        history.append(
            {
                "epoch": epoch + 1,
                "loss": round(loss, 6),
                "lr": lr,
                "stage": stage,
                "skipped_steps": skipped,
                "acc": {k: _json_float(v) for k, v in acc.items()},
                "time_s": round(seconds, 4),
            }
        )
        if not quiet:
            log(
                f"epoch {epoch + 1:3d}/{cfg.epochs}  loss {loss:.4f}  lr {lr:.3g}  "
                f"test acc {acc['all']:.4f}  "
                f"many {acc['many']:.3f}  medium {acc['medium']:.3f}  few {acc['few']:.3f}  "
                f"head {acc['head']:.3f}  tail {acc['tail']:.3f}  {seconds:.1f}s"
                + (f"  stage {stage}" if stage is not None else "")
                + (f"  ({skipped} steps skipped: non-finite)" if skipped else "")
            )
        state = {
            "format": CHECKPOINT_FORMAT,
            "version": __version__,
            "config": asdict(cfg),
            "class_counts": counts,
            "epoch": epoch + 1,
            "model": model.state_dict(),
            "optimizer": (opt or base).state_dict(),
            "scheduler": schedule.state_dict(),
            "rng": _rng_state(data_gen, device),
            "history": history,
            "elapsed": elapsed,
            "sessions": sessions,
        }
        _atomic_write(out / CHECKPOINT, lambda p: torch.save(state, p))
        if epoch + 1 < cfg.epochs:
            results = write_results(None)
            if stop_after is not None and epoch + 1 >= stop_after:
                log(f"stopped after epoch {epoch + 1} of {cfg.epochs}; continue with --resume {out}")
                return results

    if per_class is None:  # resumed a finished run: nothing trained, evaluate what was saved
        per_class = evaluate(model, data)
    acc = group_accuracy(per_class, {k: groups[k] for k in REPORTED[1:]})
    final = {
        "epoch": cfg.epochs,
        "acc": {k: _json_float(v) for k, v in acc.items()},
        "per_class": [_json_float(float(a)) for a in per_class],
    }
    results = write_results(final)
    if plot:
        _try(lambda: plot_run(out / PLOT, results), log)
    _print_table(results, log)
    log(
        f"wall time {elapsed:.2f} s for {cfg.epochs} epoch{'s' if cfg.epochs > 1 else ''} "
        "(training and evaluation"
        + (f", {sessions} sessions" if sessions > 1 else "")
        + f"); session total {time.perf_counter() - session_start:.2f} s; outputs in {out}"
    )
    return results


def _try(fn: Callable[[], None], log: Callable[[str], None]) -> None:
    try:
        fn()
    except ImportError as exc:
        log(f"note: no plot ({exc}); pip install 'sse_sam_fast[cli]'")


def _print_table(results: dict, log: Callable[[str], None]) -> None:
    cfg, data, final = results["config"], results["data"], results["final"]
    counts, groups = data["train_counts"], data["groups"]
    rules = {
        "all": "",
        "many": f"n > {cfg['many_thr']:g}",
        "medium": f"{cfg['few_thr']:g} <= n <= {cfg['many_thr']:g}",
        "few": f"n < {cfg['few_thr']:g}",
        "head": f"n >= eta {cfg['eta']:g}",
        "tail": f"n < eta {cfg['eta']:g}",
    }
    n_test = sum(data["test_counts"])
    log(f"final test accuracy after {final['epoch']} epochs ({n_test} test samples, balanced):")
    log(f"{'group':<8}{'accuracy':>9}  {'classes':>7}  training samples per class")
    for name in REPORTED:
        classes = list(range(len(counts))) if name == "all" else groups[name]
        sizes = [counts[c] for c in classes]
        acc = final["acc"][name]
        shown = "n/a" if acc is None else f"{100 * acc:.2f}%"
        span = f"{min(sizes)}-{max(sizes)}"
        rule = f"{rules[name]}: " if rules[name] else ""
        log(f"{name:<8}{shown:>9}  {len(classes):>7}  {rule}{span}")


# ---- plots --------------------------------------------------------------------------------------


def _figure(size: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)  # Agg, without pyplot's global state
    return fig


def plot_run(path: Path, results: dict) -> None:
    """Per-class accuracy against training count; group accuracy over epochs."""
    cfg, data, final = results["config"], results["data"], results["final"]
    counts = data["train_counts"]
    from matplotlib.ticker import ScalarFormatter

    fig = _figure((11, 4.2))
    left, right = fig.subplots(1, 2)
    colors = {"many": "tab:blue", "medium": "tab:orange", "few": "tab:red"}
    for name, color in colors.items():
        cls = data["groups"][name]
        acc = [100 * (final["per_class"][c] if final["per_class"][c] is not None else math.nan) for c in cls]
        left.scatter([counts[c] for c in cls], acc, color=color, label=f"{name} ({len(cls)})", s=22)
    if len(counts) <= 20:
        for c, n in enumerate(counts):
            if final["per_class"][c] is not None:
                left.annotate(
                    str(c),
                    (n, 100 * final["per_class"][c]),
                    fontsize=7,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
    left.axvline(cfg["eta"], color="gray", linestyle=":", label=f"eta = {cfg['eta']:g}")
    left.set_xscale("log")
    left.xaxis.set_major_formatter(ScalarFormatter())
    left.set_ylim(-3, 103)
    left.set_xlabel("training samples of the class")
    left.set_ylabel("test accuracy (%)")
    left.set_title("per-class accuracy after the last epoch")
    left.legend(fontsize=8)
    epochs = [h["epoch"] for h in results["epochs"]]
    for name, style in (("all", "k-"), ("head", "b-"), ("tail", "r-"), ("many", "b:"), ("few", "r:")):
        values = [100 * h["acc"][name] if h["acc"][name] is not None else math.nan for h in results["epochs"]]
        right.plot(epochs, values, style, label=name, linewidth=1.2)
    right.set_ylim(-3, 103)
    right.set_xlabel("epoch")
    right.set_ylabel("test accuracy (%)")
    right.set_title(f"{cfg['opt']} on {cfg['dataset']} (seed {cfg['seed']})")
    right.legend(fontsize=8)
    fig.savefig(path, dpi=110)


def plot_compare(path: Path, summary: dict, columns: Sequence[str], title: str = "") -> None:
    fig = _figure((9, 4))
    ax = fig.subplots()
    methods = list(summary)
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(columns))]
        means = [100 * summary[method][c][0] for c in columns]
        stds = [100 * summary[method][c][1] for c in columns]
        # points, not bars: the axis does not start at 0, and bars would exaggerate the gaps
        ax.errorbar(xs, means, yerr=stds, fmt="o", capsize=3, markersize=5, label=method)
    ax.set_xticks(range(len(columns)), [c.capitalize() for c in columns])
    ax.grid(axis="y", alpha=0.3)
    low = min(100 * (summary[m][c][0] - summary[m][c][1]) for m in methods for c in columns)
    ax.set_ylim(max(0.0, 10 * math.floor(low / 10 - 0.5)), 100)
    ax.set_ylabel("test accuracy (%), mean ± std")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, ncol=len(methods), loc="upper center", bbox_to_anchor=(0.5, -0.08))
    fig.savefig(path, dpi=110)


# ---- compare ------------------------------------------------------------------------------------

COMPARE_COLUMNS = ("many", "medium", "few", "all", "head", "tail")


def _matches(requested: TrainConfig, saved: dict) -> str | None:
    """The first field whose requested value differs from the saved run's, if any
    (defaults that come from the data are deterministic and not compared)."""
    for field in FIELDS:
        value = getattr(requested, field)
        if field in RUNTIME_FIELDS or value is None:
            continue
        if saved.get(field) != value:
            return field
    return None


def compare(
    base: TrainConfig,
    out: str | Path,
    *,
    seeds: int = 5,
    methods: Sequence[str] = OPTIMIZERS,
    download: bool = False,
    plot: bool = True,
    quiet: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """Train every method in ``methods`` with seeds ``0 .. seeds-1`` (runs in
    ``out/<method>-seed<k>``) and tabulate mean ± std accuracy by group.

    Each method trains with its own ``eta`` unless ``base.eta`` is set; the head and
    tail columns all use one ``eta`` (``base.eta``, else SSE-SAM's default for the
    data set) so that they describe the same classes. A finished run with the same
    configuration is reused, an unfinished one resumed. ``quiet`` drops the line
    per run.
    """
    out = Path(out)
    device = torch.device(resolve(base).device)
    if out.exists() and not out.is_dir():
        raise OptionError("--out", f"{out} is a file; --out names a directory for the comparison")
    for method in methods:
        if method not in OPTIMIZERS:
            raise OptionError("--methods", f"unknown method {method!r}; choose from {', '.join(OPTIMIZERS)}")
    start = time.perf_counter()
    runs, reused = [], 0
    jobs = list(product(methods, range(seeds)))
    for i, (method, seed) in enumerate(jobs, 1):
        cfg = resolve(dataclasses.replace(base, opt=method, seed=seed))
        run_dir = out / f"{method}-seed{seed}"
        status, note = run_status(run_dir), ""
        ckpt = None
        if status is not None:
            saved = json.loads((run_dir / RESULTS).read_text())["config"] if status == "finished" else None
            if saved is None:
                ckpt = load_checkpoint(run_dir)
                saved = ckpt["config"]
            differs = _matches(cfg, saved)
            if differs is not None:
                raise OptionError(
                    "--out",
                    f"{run_dir} holds a run with {option_name(differs)} {saved.get(differs)} "
                    f"(this comparison: {getattr(cfg, differs)}); choose another --out",
                )
        if status == "finished":
            results, note = json.loads((run_dir / RESULTS).read_text()), " (reused)"
            reused += 1
        else:
            if ckpt is not None:
                cfg, note = config_for_resume(ckpt, asdict(cfg)), " (resumed)"
            results = train(
                cfg, run_dir, resume=ckpt, download=download, quiet=True, plot=False, log=lambda _: None
            )
        acc = results["final"]["acc"]
        runs.append({"method": method, "seed": seed, "results": results})
        if quiet:
            continue
        log(
            f"[{i}/{len(jobs)}] {method:<7} seed {seed}: all {100 * acc['all']:.2f}  many "
            f"{100 * acc['many']:.2f}  medium {100 * acc['medium']:.2f}  few {100 * acc['few']:.2f}  "
            f"({results['wall_time_s']:.1f} s){note}"
        )

    first = runs[0]["results"]
    counts = first["data"]["train_counts"]
    eta = base.eta if base.eta is not None else default_eta(base.dataset, "ssesam", counts)
    ht = head_tail_groups(counts, eta)
    table: dict[str, dict[str, list[float]]] = {m: {c: [] for c in COMPARE_COLUMNS} for m in methods}
    for run in runs:
        res = run["results"]
        acc = dict(res["final"]["acc"])
        acc.update(group_accuracy([math.nan if a is None else a for a in res["final"]["per_class"]], ht))
        run["acc"] = {c: acc[c] for c in COMPARE_COLUMNS}
        for c in COMPARE_COLUMNS:
            table[run["method"]][c].append(acc[c])
    summary = {m: {c: mean_std(v) for c, v in cols.items()} for m, cols in table.items()}
    times = {m: mean_std(r["results"]["wall_time_s"] for r in runs if r["method"] == m) for m in methods}
    wall = time.perf_counter() - start

    cfg0 = first["config"]
    groups = first["data"]["groups"]
    lines = [
        f"{cfg0['dataset']} (imbalance {cfg0['imb_factor']:g}, {cfg0['model']}, loss {cfg0['loss']}, "
        f"{cfg0['epochs']} epochs), seeds 0-{seeds - 1}: test accuracy (%), mean ± std over seeds.",
        f"Many n > {cfg0['many_thr']:g} (classes {class_ranges(groups['many'])}), "
        f"Few n < {cfg0['few_thr']:g} "
        f"(classes {class_ranges(groups['few'])}); head/tail at eta = {eta:g} for every method "
        f"(tail classes {class_ranges(ht['tail'])}).",
        "",
        "| method | " + " | ".join(c.capitalize() for c in COMPARE_COLUMNS) + " | train time / run (s) |",
        "|---|" + "---:|" * (len(COMPARE_COLUMNS) + 1),
    ]
    for m in methods:
        cells = [f"{100 * summary[m][c][0]:.2f} ± {100 * summary[m][c][1]:.2f}" for c in COMPARE_COLUMNS]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {times[m][0]:.2f} ± {times[m][1]:.2f} |")
    machine = _machine(device)
    where = f"{machine['gpu']}" if machine["gpu"] else f"CPU ({machine['cpus']} cores)"
    lines += [
        "",
        f"{len(runs)} runs ({reused} reused from {out}) in {wall:.1f} s on {where}, "
        f"torch {torch.__version__}, sse_sam_fast {__version__}.",
    ]
    text = "\n".join(lines)
    log("")
    log(text)

    report = {
        "config": asdict(base),
        "methods": list(methods),
        "seeds": list(range(seeds)),
        "eta": eta,
        "runs": [{"method": r["method"], "seed": r["seed"], "acc": r["acc"]} for r in runs],
        "summary": {m: {c: list(v) for c, v in s.items()} for m, s in summary.items()},
        "train_time_s": {m: list(v) for m, v in times.items()},
        "wall_time_s": round(wall, 3),
        "versions": _versions(),
        "machine": machine,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text(text + "\n")
    (out / "compare.json").write_text(json.dumps(report, indent=1) + "\n")
    if plot:
        title = (
            f"{cfg0['dataset']}, {cfg0['model']}, {cfg0['epochs']} epochs, {seeds} seeds; "
            f"head/tail at eta = {eta:g}"
        )
        _try(lambda: plot_compare(out / "compare.png", summary, COMPARE_COLUMNS, title), log)
    log(f"wrote {out / 'compare.md'}, compare.json" + (", compare.png" if plot else ""))
    return report
