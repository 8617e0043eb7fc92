"""``train`` under torchrun: one data-parallel job spread over the processes.

``torchrun --nproc_per_node N -m sse_sam_fast train ...`` starts N copies of the
command with ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` set; :func:`session`
joins them into one process group (NCCL on CUDA, each process on
``cuda:LOCAL_RANK``; gloo on a CPU) and the model is wrapped in
``DistributedDataParallel``, or sharded with FSDP2's ``fully_shard`` (``--fsdp``).

How the job is split, and why:

- ``--batch-size`` is the **global** batch: the loop draws the same permutation
  as a one-process run (every process seeds the same generator) and process
  ``r`` takes samples ``r, r + N, r + 2N, ...`` of each global batch. The
  optimizer averages the gradients over the processes with every loss divided
  by the global sample count, so N processes step like one process on the whole
  batch (for models without BatchNorm in training mode, whose statistics stay
  per process) and a run matches the one-process run up to rounding. This is the
  interleaving of ``DistributedSampler`` applied per global batch, without its
  padding: a short last batch gives shards of unequal size, which the optimizer
  weighs by their samples, instead of repeating samples.
- Every process draws the augmentation of the whole global batch and keeps its
  shard, so the data generator advances alike everywhere and rank 0's saved
  state resumes every process.
- Only rank 0 logs, shows the progress bar and writes files. Metrics are global:
  the summed training loss and the per-class test hits and counts are
  all-reduced; each process evaluates its own contiguous part of the test set,
  so every test sample counts once.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .config import OptionError

# what torchrun (and any launcher of torch.distributed's env:// protocol) sets
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class World:
    """This process's place in the job. ``strategy`` is None for a one-process
    run, ``"ddp"`` or ``"fsdp"`` under torchrun (one process included)."""

    rank: int = 0
    size: int = 1
    strategy: str | None = None
    backend: str | None = None  # the process group's: "gloo" or "nccl"

    @property
    def main(self) -> bool:
        return self.rank == 0

    def summary(self) -> dict:
        """What ``results.json`` and the checkpoint record of the job's layout."""
        return {"world_size": self.size, "strategy": self.strategy, "backend": self.backend}

    def all_sum_(self, tensor: Tensor) -> Tensor:
        if self.strategy is not None:
            dist.all_reduce(tensor)
        return tensor

    def barrier(self) -> None:
        if self.strategy is not None:
            dist.barrier()

    def shard(self, idx: Tensor) -> Tensor:
        """This process's samples of a global batch ``idx``."""
        return idx[self.rank :: self.size]


SINGLE = World()


def launched() -> bool:
    """Whether a launcher started this process as one of a job (torchrun's variables are set)."""
    return all(v in os.environ for v in _LAUNCH_VARS)


def is_main_process() -> bool:
    """Rank 0, or a process no launcher started; readable before any process group exists."""
    return int(os.environ.get("RANK", "0")) == 0


def process_device(name: str) -> torch.device:
    """``--device`` for this process: under torchrun, ``cuda`` means ``cuda:LOCAL_RANK``."""
    device = torch.device(name)
    if not launched() or device.type != "cuda":
        return device
    local = int(os.environ["LOCAL_RANK"])
    if device.index is not None and int(os.environ["WORLD_SIZE"]) > 1:
        raise OptionError(
            "--device",
            f"under torchrun each process uses cuda:LOCAL_RANK (here cuda:{local}); pass --device cuda, "
            f"not {name} (CUDA_VISIBLE_DEVICES chooses the GPUs)",
        )
    return torch.device("cuda", local)


@contextlib.contextmanager
def session(device: torch.device, fsdp: bool = False) -> Iterator[World]:
    """The job this process belongs to, for the duration of a run.

    Under torchrun the process group is created here and destroyed on the way
    out; a process group that already exists (a caller's, the tests') is used
    and left alone. Without either, the run is one process and ``--fsdp`` is
    refused: there is nothing to shard over."""
    strategy = "fsdp" if fsdp else "ddp"
    if dist.is_available() and dist.is_initialized():
        yield World(dist.get_rank(), dist.get_world_size(), strategy, dist.get_backend())
        return
    if not launched():
        if fsdp:
            raise OptionError(
                "--fsdp",
                "shards the model over the processes of a torchrun job; launch with "
                "torchrun --nproc_per_node N -m sse_sam_fast train --fsdp ...",
            )
        yield SINGLE
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend)
    try:
        yield World(dist.get_rank(), dist.get_world_size(), strategy, backend)
        # the processes leave together: rank 0 still writes when the others are done, and
        # once rank 1 of a 2-process test aborted at exit ("terminate called without an
        # active exception") after tearing its group down while rank 0, which hosts the
        # store, was still at work
        dist.barrier()
    finally:
        dist.destroy_process_group()


# ---- checks, before anything runs ---------------------------------------------------------------


def check_job(batch_size: int, capture: bool | None, world: World, reuse: int = 1) -> None:
    """The options a job over several processes cannot honour, refused on every process alike."""
    if world.strategy is None:
        return
    if reuse > 1 and world.strategy == "fsdp":
        raise OptionError(
            "--reuse",
            f"{reuse} is not supported with --fsdp yet: the kept values would be local shards, which "
            "the checkpoint does not carry; use DDP (no --fsdp) or --reuse 1",
        )
    if batch_size % world.size:
        raise OptionError(
            "--batch-size",
            f"{batch_size} is the global batch and does not divide among {world.size} processes; "
            f"choose a multiple of {world.size}",
        )
    if capture:
        raise OptionError(
            "--capture",
            "is not supported under torchrun: the optimizer averages gradients with collectives whose "
            "decisions are taken on the host, which a CUDA graph cannot hold (use --no-capture)",
        )


def check_resume(ckpt: dict, world: World) -> None:
    """A checkpoint resumes with the number of processes that wrote it: the global
    batch would divide differently and the saved state (data generator, sharded
    optimizer) belongs to that layout."""
    saved = int(ckpt.get("world_size", 1))
    if saved != world.size:

        def processes(n: int) -> str:
            return f"{n} process" + ("es" if n > 1 else "")

        how = f"torchrun --nproc_per_node {saved}" if saved > 1 else "one process, without torchrun"
        raise OptionError(
            "--resume",
            f"the checkpoint was written by {processes(saved)} and this run has {processes(world.size)}; "
            f"resume it with {how}",
        )
    # FSDP2 saves the optimizer state by parameter name, DDP and one process by number
    sharded = ckpt.get("strategy") == "fsdp"
    if sharded != (world.strategy == "fsdp"):
        raise OptionError(
            "--fsdp",
            f"the checkpoint was written {'with' if sharded else 'without'} --fsdp; resume it "
            f"{'with' if sharded else 'without'} --fsdp",
        )


# ---- the model ----------------------------------------------------------------------------------


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The units FSDP2 shards one at a time: the residual or transformer blocks of
    the image models, the convolutions of cnn1d, else each layer with parameters.
    Finer units gather fewer parameters at once; the update is the same."""
    for name in ("layers", "blocks", "convs"):
        seq = getattr(model, name, None)
        if isinstance(seq, nn.Sequential):
            return [m for m in seq if any(True for _ in m.parameters())]
    return [m for m in model.modules() if m is not model and any(True for _ in m.parameters(recurse=False))]


def wrap(model: nn.Module, world: World, device: torch.device) -> nn.Module:
    """The model the steps run through: ``DistributedDataParallel`` (every process
    holds the weights; the optimizer averages the gradients itself) or FSDP2
    shards, per block and at the root, as torch's FSDP2 guide does."""
    if world.strategy == "ddp":
        return nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None
        )
    if world.strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in _blocks(model):
            fully_shard(block)
        fully_shard(model)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def class_name(module: nn.Module) -> str:
    """The module's own class name: ``fully_shard`` swaps ``Linear`` for ``FSDPLinear``."""
    name = type(module).__name__
    sharded = type(module).__module__.startswith("torch.distributed.fsdp")
    return name[4:] if sharded and name.startswith("FSDP") else name


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # the whole state gathered on rank 0's CPU: one checkpoint.pt, as a one-process run writes
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def model_state(model: nn.Module, world: World) -> dict:
    """The model's full state dict (on every process under DDP, on rank 0 under
    FSDP2, where gathering it is a collective every process joins)."""
    if world.strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(model, options=_full_options())
    return unwrap(model).state_dict()


def optimizer_state(model: nn.Module, base: torch.optim.Optimizer, opt, world: World) -> dict:
    """``(opt or base).state_dict()``; under FSDP2 the base optimizer's state is
    gathered to full tensors keyed by parameter name (torch.distributed.checkpoint's
    layout), with the method's own entries (stage, counters) beside it."""
    own = (opt or base).state_dict()
    if world.strategy != "fsdp":
        return own
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    full = get_optimizer_state_dict(model, base, options=_full_options())
    return {**{k: v for k, v in own.items() if k not in ("state", "param_groups")}, **full}


def load_model_state(model: nn.Module, state: dict, world: World) -> None:
    if world.strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
        return
    unwrap(model).load_state_dict(state)


def load_optimizer_state(model: nn.Module, base, opt, state: dict, world: World) -> None:
    if world.strategy != "fsdp":
        (opt or base).load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    base_keys = ("state", "param_groups")
    set_optimizer_state_dict(
        model, base, {k: state[k] for k in base_keys}, options=StateDictOptions(full_state_dict=True)
    )
    if opt is not None:
        # the base state is in place; the wrapper checks and loads its own entries beside it
        opt.load_state_dict({**base.state_dict(), **{k: v for k, v in state.items() if k not in base_keys}})


# ---- metrics ------------------------------------------------------------------------------------


@torch.no_grad()
def class_hits(forward, data, num_classes: int, world: World, batch: int) -> tuple[Tensor, Tensor]:
    """``(hits, seen)`` per class over the whole test set, float64 on the test
    data's device, summed over the processes. Process ``r`` predicts the ``r``-th
    contiguous part; every process runs as many forwards (FSDP2's forward is a
    collective), the last ones possibly on no sample."""
    n = len(data.y_test)
    part = math.ceil(n / world.size)
    start, stop = min(world.rank * part, n), min((world.rank + 1) * part, n)
    device = data.y_test.device
    hits = torch.zeros(num_classes, dtype=torch.float64, device=device)
    seen = torch.zeros(num_classes, dtype=torch.float64, device=device)
    for lo in range(start, start + max(part, 1), batch):
        lo, hi = min(lo, stop), min(lo + batch, stop)
        target = data.y_test[lo:hi]
        right = (forward(data.test_inputs(lo, hi)).argmax(1) == target).to(torch.float64)
        hits.index_add_(0, target, right)
        seen.index_add_(0, target, torch.ones_like(right))
    world.all_sum_(hits)
    world.all_sum_(seen)
    return hits, seen


# ---- checkpoints --------------------------------------------------------------------------------


class _Held:
    """``state_dict`` / ``load_state_dict`` of one part of the run, the way the
    checkpoint code reads and writes a module or an optimizer."""

    def __init__(self, get, put):
        self.state_dict, self.load_state_dict = get, put


def checkpointed(model: nn.Module, base: torch.optim.Optimizer, opt, world: World) -> tuple[_Held, _Held]:
    """The model and the optimizer as the checkpoint sees them: full state dicts
    whatever the wrapping, so a checkpoint has one layout for every strategy."""
    return (
        _Held(lambda: model_state(model, world), lambda sd: load_model_state(model, sd, world)),
        _Held(
            lambda: optimizer_state(model, base, opt, world),
            lambda sd: load_optimizer_state(model, base, opt, sd, world),
        ),
    )
