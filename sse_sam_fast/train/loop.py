"""The training loop behind ``sse-sam-fast train``.

:func:`train` runs one configuration (:class:`~sse_sam_fast.train.config.TrainConfig`)
to the end, writing into its output directory after every epoch:

``checkpoint.pt``  model, optimizer, LR schedule, every RNG state and the history
                   (:mod:`sse_sam_fast.train.checkpoint`): a resumed run ends with
                   the weights of one that never stopped.
``results.json``   configuration, class counts and groups, per-epoch metrics,
                   final per-class and group accuracies, wall time, versions,
                   whether this session's steps went through ``opt.capture``
                   (see :func:`capture_choice`); ``"finished": false`` until the
                   last epoch.
``results.png``    per-class accuracy against training-class frequency, and
                   accuracy by group over the epochs (at the end of the run).
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from .. import SSESAM, tail_mask
from .checkpoint import (
    RESULTS,
    atomic_write,
    check_out,
    first_difference,
    restore,
    rng_state,
    run_status,
    save_checkpoint,
    saved_config,
)
from .config import OptionError, TrainConfig, option_name, resolve, resolve_groups
from .data import LongTailData, load_dataset
from .distributed import (
    SINGLE,
    World,
    check_job,
    check_resume,
    checkpointed,
    class_hits,
    class_name,
    process_device,
    session,
    unwrap,
    wrap,
)
from .losses import NormedLinear, PerSampleLoss, build_loss
from .metrics import (
    REPORTED,
    class_ranges,
    frequency_groups,
    group_accuracy,
    head_tail_groups,
    per_class_accuracy,
)
from .registry import METHODS, MODELS
from .report import PLOT, json_float, machine, plot_run, print_table, try_plot, versions

EVAL_BATCH = 1000
BAR_LOSS_S = 0.5  # seconds between the progress bar's readings of the running loss


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
    """``mlp`` (images are flattened), ``cnn1d`` (1-D signals) or an image model; with
    ``--loss ldam`` the last linear layer becomes a cosine classifier
    (:class:`~sse_sam_fast.train.losses.NormedLinear`)."""
    if cfg.model == "mlp":
        features = math.prod(data.x_train.shape[1:])
        model = MODELS["mlp"](features, data.num_classes, cfg.hidden)
        if data.x_train.dim() > 2:
            model = nn.Sequential(nn.Flatten(), model)
    elif cfg.model == "cnn1d":
        model = MODELS["cnn1d"](data.x_train.shape[1], data.num_classes)
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
        return base, METHODS[cfg.opt](base, model, cfg)
    except ValueError as exc:
        if "backend" in str(exc):
            raise OptionError("--backend", str(exc)) from None
        raise


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
    model = unwrap(model)
    params = sum(p.numel() for p in model.parameters())
    head = [m for m in model.modules() if isinstance(m, (nn.Linear, NormedLinear))][-1]
    name = class_name(model) if not isinstance(model, nn.Sequential) else "MLP"
    return f"{name} ({params / 1e6:.2f}M parameters, {class_name(head)} classifier)"


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # the bar is a nicety: train without it
        return None
    return tqdm(total=total, desc=desc, file=sys.stderr, leave=False, unit="batch", dynamic_ncols=True)


# ---- one run ------------------------------------------------------------------------------------


@dataclass
class _Run:
    """A run in progress: what :func:`_prepare` builds and every epoch advances."""

    cfg: TrainConfig  # resolved, groups included
    out: Path
    device: torch.device
    data: LongTailData
    counts: list[int]
    groups: dict[str, list[int]]
    model: nn.Module
    base: torch.optim.Optimizer
    opt: object | None  # the sse_sam_fast wrapper; None for plain SGD
    schedule: torch.optim.lr_scheduler.LRScheduler
    loss_fn: PerSampleLoss
    tails: Tensor
    data_gen: torch.Generator  # shuffling and augmentation
    capture: bool = False  # steps go through opt.capture (see capture_choice)
    capture_why: str = ""
    world: World = SINGLE  # the processes of a torchrun job (sse_sam_fast.train.distributed)
    graphed: bool | None = None  # whether the last captured step replayed a CUDA graph
    graphed_steps: int = 0  # ... and how many of this epoch's did
    history: list[dict] = field(default_factory=list)
    start_epoch: int = 0
    elapsed: float = 0.0
    sessions: int = 1


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
    fsdp: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """Train ``cfg`` into ``out`` (or continue the checkpoint ``resume`` there);
    returns the results written to ``results.json``. ``stop_after=k`` stops once
    epoch ``k`` is saved, as if the run had been killed. Bad options raise
    :class:`~sse_sam_fast.train.config.OptionError`. Under torchrun the run is one
    data-parallel job (``fsdp``: FSDP2 shards rather than DDP replicas), and only
    rank 0 logs and writes (:mod:`sse_sam_fast.train.distributed`)."""
    out = Path(out)
    threads = torch.get_num_threads()
    try:
        cfg = resolve(cfg)
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        return _train(cfg, out, resume, stop_after, download, quiet, plot, overwrite, fsdp, log)
    finally:
        torch.set_num_threads(threads)  # train() may be called in-process (compare, tests, notebooks)


def _train(cfg, out, resume, stop_after, download, quiet, plot, overwrite, fsdp, log) -> dict:
    session_start = time.perf_counter()
    with session(_device(cfg), fsdp) as world:
        if not world.main:
            log = _silent
        return _train_in(
            cfg, out, resume, stop_after, download, quiet, plot, overwrite, log, world, session_start
        )


def _silent(_: str) -> None:
    """The log of every process but rank 0: one job prints one log."""


def _train_in(
    cfg, out, resume, stop_after, download, quiet, plot, overwrite, log, world, session_start
) -> dict:
    run = _prepare(cfg, out, resume, download, overwrite, log, world)
    step = _step_function(run)
    _log_setup(run, resume is not None, log)
    show_bar = not quiet and sys.stderr.isatty() and world.main
    per_class = None
    for epoch in range(run.start_epoch, run.cfg.epochs):
        per_class = _epoch(run, epoch, step, show_bar, quiet, log)
        _save(run, epoch + 1)
        if epoch + 1 < run.cfg.epochs:
            results = _write_results(run, None)
            if stop_after is not None and epoch + 1 >= stop_after:
                log(f"stopped after epoch {epoch + 1} of {run.cfg.epochs}; continue with --resume {out}")
                return results
    return _finish(run, per_class, plot, log, session_start)


def _device(cfg: TrainConfig) -> torch.device:
    try:
        device = process_device(cfg.device)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as exc:  # unknown or unavailable device
        raise OptionError("--device", f"cannot use {cfg.device!r}: {exc}") from None
    return device


def _prepare(cfg, out, resume, download, overwrite, log, world: World = SINGLE) -> _Run:
    """Check the options that need the data, build everything, create ``out`` and
    restore ``resume`` into it; nothing is written before the checks pass."""
    device = _device(cfg)
    check_job(cfg.batch_size, cfg.capture, world, cfg.reuse)
    if resume is not None:
        check_resume(resume, world)
    if resume is None:
        if run_status(out) == "finished":
            _check_finished(cfg, out, overwrite)
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
    model = wrap(build_model(cfg, data).to(device), world, device)
    base, opt = build_optimizer(cfg, model)
    # per-epoch cosine decay on the base optimizer: the wrapper shares its param_groups
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(base, T_max=cfg.epochs)
    loss_fn = build_loss(cfg.loss, counts, drw_epoch=cfg.drw_epoch, tau=cfg.tau, vs_gamma=cfg.vs_gamma)
    loss_fn = loss_fn.to(device)
    data.to(device)
    tails = torch.tensor(groups["tail"], device=device)
    data_gen = torch.Generator().manual_seed(cfg.seed)
    run = _Run(cfg, out, device, data, counts, groups, model, base, opt, schedule, loss_fn, tails, data_gen)
    run.world = world
    run.capture, run.capture_why = capture_choice(cfg, opt, device, world)

    # every process has passed its checks before rank 0 creates anything
    world.barrier()
    try:  # only now: a run that fails its checks leaves no directory behind
        if world.main:
            out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OptionError("--out", f"cannot create {out}: {exc}") from None
    if resume is not None:
        restore(resume, *checkpointed(model, base, opt, world), schedule, data_gen, device)
        run.history = list(resume["history"])
        run.start_epoch = int(resume["epoch"])
        run.elapsed = float(resume.get("elapsed", 0.0))
        # re-evaluating a finished run is no session
        run.sessions = int(resume.get("sessions", 1)) + (run.start_epoch < cfg.epochs)
    return run


def _check_finished(cfg: TrainConfig, out: Path, overwrite: bool) -> None:
    """A finished run of another configuration is a result: replacing it takes
    ``--overwrite``. The same configuration trains again into its directory."""
    if overwrite:
        return
    try:
        saved = saved_config(out)
    except (OSError, ValueError, KeyError, TypeError):
        held = "a finished run whose configuration cannot be read"
    else:
        field = first_difference(cfg, saved)
        if field is None:
            return
        name = option_name(field)
        held = f"a finished run with {name} {saved.get(field)} (this run: {name} {getattr(cfg, field)})"
    raise OptionError("--out", f"{out} holds {held}; pass --overwrite to replace it, or choose another --out")


def capture_choice(cfg: TrainConfig, opt, device: torch.device, world: World = SINGLE) -> tuple[bool, str]:
    """Whether the loop drives ``opt`` through ``opt.capture(loss_fn)`` rather than
    ``opt.step(closure, mask)``, and why. ``--capture`` / ``--no-capture`` decide;
    by default (``cfg.capture is None``) it is on where the step is graphed as a
    whole: a SAM method on CUDA with the triton backend, the exact schedule and a
    plain SGD base (the CLI builds one), in one process. Elsewhere ``opt.capture``
    would run the same step eagerly, which gains nothing; under torchrun an explicit
    ``--capture`` is refused (:func:`~sse_sam_fast.train.distributed.check_job`)."""
    if cfg.capture is not None:
        return cfg.capture, "--capture" if cfg.capture else "--no-capture"
    reasons = [
        (opt is None, "auto: --opt sgd has no SAM step"),
        (world.strategy is not None, "auto: steps over several processes (torchrun) are not captured"),
        (device.type != "cuda", f"auto: CUDA graphs need a CUDA device, not {device.type}"),
        (cfg.schedule != "exact", f"auto: only the exact schedule is captured, not {cfg.schedule}"),
        (opt is not None and opt.backend != "triton", f"auto: the backend is {getattr(opt, 'backend', '')}"),
        (type(getattr(opt, "optimizer", None)) is not torch.optim.SGD, "auto: the base is not SGD"),
    ]
    why = next((why for bad, why in reasons if bad), None)
    return (False, why) if why else (True, "auto: CUDA, triton backend, exact schedule, plain SGD")


def _step_function(run: _Run) -> Callable[[Tensor, Tensor], Tensor]:
    """One optimizer step on a batch; returns the mean loss, a device tensor."""
    model, base, opt, loss_fn, tails = run.model, run.base, run.opt, run.loss_fn, run.tails
    schedule = run.cfg.schedule
    if run.capture:
        return _captured_step_function(run)

    def step(x: Tensor, y: Tensor, batch: int | None = None) -> Tensor:
        """``batch``: under torchrun, the global batch's size, of which ``x`` is a shard."""
        if opt is None:
            base.zero_grad()
            if batch is None:
                loss = loss_fn(model(x), y).mean()
                loss.backward()
            else:
                # DDP and FSDP2 average the processes' gradients: scaled so, the shards' losses
                # sum to the global batch's mean even where the last batch splits unevenly
                losses = loss_fn(model(x), y)
                (losses.sum() * (run.world.size / batch)).backward()
                loss = losses.mean()
            base.step()
            return loss.detach()

        def closure(idx: Tensor | None = None) -> Tensor:
            # the split schedule asks for the losses of a subset of the batch
            return loss_fn(model(x), y) if idx is None else loss_fn(model(x[idx]), y[idx])

        return opt.step(closure, tail_mask(y, tails), schedule=schedule)

    return step


def _captured_step_function(run: _Run) -> Callable[[Tensor, Tensor], Tensor]:
    """The step of :func:`_step_function` through ``opt.capture``: the same update
    (bitwise on a CPU, where it runs eagerly), one CUDA graph per input shape and
    stage on a GPU. A graph records the branches the loss takes on the host, so
    there is one captured step per :meth:`~PerSampleLoss.host_state` (LDAM-DRW
    before and after its switch)."""
    model, opt, loss_fn, tails = run.model, run.opt, run.loss_fn, run.tails
    captured: dict[tuple, object] = {}

    def losses(x: Tensor, y: Tensor) -> Tensor:
        return loss_fn(model(x), y)

    def step(x: Tensor, y: Tensor) -> Tensor:
        key = loss_fn.host_state()
        if key not in captured:
            captured[key] = opt.capture(losses)
        loss = captured[key](x, y, tail_mask=tail_mask(y, tails))
        run.graphed = captured[key].graphed
        run.graphed_steps += run.graphed
        return loss

    return step


def _log_setup(run: _Run, resuming: bool, log: Callable[[str], None]) -> None:
    cfg, data, counts, groups, opt = run.cfg, run.data, run.counts, run.groups, run.opt
    log(
        f"data: {cfg.dataset} imb_factor={cfg.imb_factor:g}, {len(data.y_train)} train / "
        f"{len(data.y_test)} test (balanced), {data.num_classes} classes; train counts "
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
    log(
        f"model: {cfg.model}, {describe(run.model)}; loss: {loss_name}; optimizer: {opt_name}; "
        f"device: {run.device}"
    )
    if run.world.strategy is not None:
        w = run.world
        log(
            f"processes: {w.size} ({w.strategy.upper()}, {w.backend}); global batch {cfg.batch_size}, "
            f"{cfg.batch_size // w.size} per process; only rank 0 logs and writes"
        )
    if opt is not None:
        log(f"captured step: {'on' if run.capture else 'off'} ({run.capture_why})")
    if resuming:
        log(f"resuming {run.out} after epoch {run.start_epoch} of {cfg.epochs}")


def _epoch(run: _Run, epoch: int, step, show_bar: bool, quiet: bool, log: Callable[[str], None]) -> Tensor:
    """Train epoch ``epoch`` (0-based), evaluate, and add it to the history and the
    log; returns the per-class test accuracy."""
    cfg, opt = run.cfg, run.opt
    t0 = time.perf_counter()
    stage = opt.stage if isinstance(opt, SSESAM) else None
    lr = run.base.param_groups[0]["lr"]
    skipped_before = getattr(opt, "nonfinite_steps", 0)
    run.loss_fn.set_epoch(epoch)
    run.model.train()
    run.graphed_steps = 0
    total = _train_batches(run, epoch, step, show_bar)
    steps = math.ceil(len(run.data.y_train) / cfg.batch_size)
    if isinstance(opt, SSESAM):
        opt.update_rho()
    run.schedule.step()
    per_class = _evaluate(run)  # its .cpu() waits for the device: the epoch time is real
    loss = float(run.world.all_sum_(total)) / len(run.data.y_train)
    seconds = time.perf_counter() - t0
    run.elapsed += seconds
    acc = group_accuracy(per_class, {k: run.groups[k] for k in REPORTED[1:]})
    # steps the optimizer skipped for a NaN / inf (their losses still count in the mean)
    skipped = getattr(opt, "nonfinite_steps", 0) - skipped_before
    run.history.append(
        {
            "epoch": epoch + 1,
            "loss": round(loss, 6),
            "lr": lr,
            "stage": stage,
            "skipped_steps": skipped,
            # steps that replayed a CUDA graph (None: --no-capture); a fact of the session
            "graphed_steps": run.graphed_steps if run.capture else None,
            "acc": {k: json_float(v) for k, v in acc.items()},
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
            + (f"  graphed {run.graphed_steps}/{steps}" if run.capture else "")
        )
    return per_class


def _train_batches(run: _Run, epoch: int, step, show_bar: bool) -> Tensor:
    """One pass over the shuffled training set; returns the summed loss of this
    process's samples (a device tensor: reading it every batch would stall the
    device). Under torchrun each process steps on its shard of every global batch
    (:mod:`sse_sam_fast.train.distributed`)."""
    data, n_train, world = run.data, len(run.data.y_train), run.world
    bar = _progress(math.ceil(n_train / run.cfg.batch_size), f"epoch {epoch + 1}/{run.cfg.epochs}", show_bar)
    total = torch.zeros((), device=run.device)
    seen, shown = 0, -math.inf
    for idx in torch.randperm(n_train, generator=run.data_gen).split(run.cfg.batch_size):
        idx = idx.to(run.device)
        x, world_batch = data.train_inputs(idx, run.data_gen), idx
        if world.size > 1:
            # the whole batch's augmentation is drawn, so the generator advances alike everywhere
            x, idx = world.shard(x), world.shard(idx)
        y = data.y_train[idx]
        loss = step(x, y) if world.size == 1 else step(x, y, len(world_batch))
        if len(y):  # a shard of a short last batch may be empty: its loss is NaN, the mean of nothing
            total += loss * len(y)
        seen += len(y)
        if bar is not None:
            # reading the loss waits for the device: at most every BAR_LOSS_S, and only for a bar
            if time.monotonic() - shown >= BAR_LOSS_S:
                bar.set_postfix_str(f"loss {float(total) / seen:.4f}", refresh=False)
                shown = time.monotonic()
            bar.update(1)
    if bar is not None:
        bar.close()
    return total


def _evaluate(run: _Run) -> Tensor:
    """Per-class test accuracy (float64, CPU); under torchrun over the whole test
    set, each sample predicted by one process."""
    if run.world.strategy is None:
        return evaluate(run.model, run.data)
    model = run.model
    was_training = model.training
    model.eval()
    try:
        # DDP's module itself: its wrapper would synchronise buffers at every forward
        forward = unwrap(model)
        hits, seen = class_hits(forward, run.data, run.data.num_classes, run.world, EVAL_BATCH)
    finally:
        model.train(was_training)
    return (hits / seen).cpu()  # 0 / 0 = NaN: no test sample, no accuracy


def _save(run: _Run, epochs_done: int) -> None:
    # under FSDP2 gathering the state is a collective: every process takes part, rank 0 writes
    model_held, opt_held = checkpointed(run.model, run.base, run.opt, run.world)
    model_state, opt_state = model_held.state_dict(), opt_held.state_dict()
    if not run.world.main:
        return
    save_checkpoint(
        run.out,
        config=asdict(run.cfg),
        class_counts=run.counts,
        epoch=epochs_done,
        world_size=run.world.size,
        strategy=run.world.strategy,
        model=model_state,
        optimizer=opt_state,
        scheduler=run.schedule.state_dict(),
        rng=rng_state(run.data_gen, run.device),
        history=run.history,
        elapsed=run.elapsed,
        sessions=run.sessions,
    )


def _write_results(run: _Run, final: dict | None) -> dict:
    cfg, data = run.cfg, run.data
    results = {
        "finished": final is not None,
        "config": asdict(cfg),
        "versions": versions(),
        "machine": machine(run.device),
        "data": {
            "train_counts": run.counts,
            "test_counts": torch.bincount(data.y_test, minlength=data.num_classes).tolist(),
            "groups": run.groups,
            "thresholds": {"many": cfg.many_thr, "few": cfg.few_thr, "eta": cfg.eta},
        },
        "epochs": run.history,
        "final": final,
        "wall_time_s": round(run.elapsed, 4),
        "sessions": run.sessions,
        # the processes of the job (1: no torchrun); the strategy and process group backend
        "world_size": run.world.size,
        "distributed": run.world.summary() if run.world.strategy else None,
        # this session's choice; graphed: whether its last step replayed a CUDA graph
        "capture": {
            "option": {None: "auto", True: "on", False: "off"}[cfg.capture],
            "on": run.capture,
            "why": run.capture_why,
            "graphed": run.graphed,
        },
    }
    if run.world.main:
        atomic_write(run.out / RESULTS, lambda p: p.write_text(json.dumps(results, indent=1) + "\n"))
    return results


def _finish(run: _Run, per_class: Tensor | None, plot: bool, log, session_start: float) -> dict:
    """Write the final results, the plot and the table after the last epoch."""
    if per_class is None:  # resumed a finished run: nothing trained, evaluate what was saved
        per_class = _evaluate(run)
    acc = group_accuracy(per_class, {k: run.groups[k] for k in REPORTED[1:]})
    final = {
        "epoch": run.cfg.epochs,
        "acc": {k: json_float(v) for k, v in acc.items()},
        "per_class": [json_float(float(a)) for a in per_class],
    }
    results = _write_results(run, final)
    if plot and run.world.main:
        try_plot(lambda: plot_run(run.out / PLOT, results), log)
    print_table(results, log)
    epochs, sessions = run.cfg.epochs, run.sessions
    if run.capture and run.graphed is not None:
        last = run.history[-1]["graphed_steps"]
        steps = math.ceil(len(run.data.y_train) / run.cfg.batch_size)
        log(
            f"captured step: the last step {'replayed a CUDA graph' if run.graphed else 'ran eagerly'}; "
            f"{last} of the last epoch's {steps} steps replayed one"
        )
    log(
        f"wall time {run.elapsed:.2f} s for {epochs} epoch{'s' if epochs > 1 else ''} "
        "(training and evaluation"
        + (f", {sessions} sessions" if sessions > 1 else "")
        + f"); session total {time.perf_counter() - session_start:.2f} s; outputs in {run.out}"
    )
    return results
