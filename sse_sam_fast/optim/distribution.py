"""How a step spans processes: one small strategy object the passes ask for
global counts, averaged gradients and the context the model's own
synchronisation is turned off in.

- :class:`Single`: one process; every answer is the local one.
- :class:`DDP`: a ``DistributedDataParallel`` model. The engine averages the
  gradients itself (the model's reducer would average every backward, four
  per SSE-SAM step, and the perturbation needs the clean gradients averaged
  before the norm), so the passes run under ``model.no_sync()``.

A strategy for sharded parameters (FSDP2) adds global sums of squares to the
same object; the passes and backends call only what is here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import Tensor, nn


class Single:
    """One process: global values are the local ones."""

    world = 1
    lockstep = False  # whether every process must run the same passes and collectives

    def no_sync(self):
        return contextlib.nullcontext()

    def totals(self, counts: Sequence[int]) -> Sequence[int | float]:
        """Sample counts summed over the processes."""
        return counts

    def normaliser(self, n: int | Tensor) -> int | Tensor:
        """A group's normaliser ``max(n, 1)``, from the global count ``n``: the loss
        of each process is divided so that the averaged gradient is the mean over
        the group's samples of every process."""
        return n.clamp_min(1).float() if isinstance(n, Tensor) else max(n, 1)

    def average(self, backend, slots, live: bool) -> None:
        """Average the gradient sets ``slots`` (and the live gradients) over the processes."""

    def all_reduce_(self, tensor: Tensor) -> None:
        """Sum ``tensor`` over the processes, in place."""

    def union(self, present: Sequence[list[bool]]) -> Sequence[list[bool]]:
        """Per gradient set, whether each parameter has a gradient on any process."""
        return present

    def agree(self, ok: Tensor | None) -> Tensor | None:
        """The step's finiteness verdict, false on every process where it is false
        on any (a NaN loss on one shard must not step one replica only)."""
        return ok


class DDP(Single):
    """A ``DistributedDataParallel`` model's process group."""

    lockstep = True

    def __init__(self, model: nn.parallel.DistributedDataParallel):
        self.model, self.group = model, model.process_group
        self.world = torch.distributed.get_world_size(self.group)
        self._device = next(model.parameters()).device

    def no_sync(self):
        return self.model.no_sync()

    def all_reduce_(self, tensor: Tensor) -> None:
        torch.distributed.all_reduce(tensor, group=self.group)

    def totals(self, counts: Sequence[int]) -> list[float]:
        t = torch.tensor(counts, dtype=torch.float64, device=self._device)
        self.all_reduce_(t)
        return t.tolist()

    def normaliser(self, n: int | Tensor) -> Tensor:
        n = torch.as_tensor(n, dtype=torch.float32, device=self._device)
        self.all_reduce_(n)
        return n.clamp_min(1) / self.world

    def average(self, backend, slots, live: bool) -> None:
        backend.all_reduce(slots, live, self)

    def union(self, present: Sequence[list[bool]]) -> Sequence[list[bool]]:
        """With ``find_unused_parameters`` a parameter may get a gradient on one
        process only; DDP's reducer then gives it the averaged gradient on every
        process, so all of them step it. Without it every process has the same
        parameters with gradients, and no flags travel."""
        if not self.model.find_unused_parameters or not present:
            return present
        n = len(present[0])
        flags = torch.tensor([s for seen in present for s in seen], dtype=torch.float32, device=self._device)
        self.all_reduce_(flags)
        union = (flags > 0).tolist()
        return [union[i * n : (i + 1) * n] for i in range(len(present))]

    def agree(self, ok: Tensor | None) -> Tensor:
        flag = torch.ones((), device=self._device) if ok is None else ok.to(self._device, torch.float32)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN, group=self.group)
        return flag > 0


def strategy(model: nn.Module | None) -> Single:
    """The strategy of ``model``'s step."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return DDP(model)
    return Single()
