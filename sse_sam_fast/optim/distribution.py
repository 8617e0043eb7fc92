"""How a step spans processes: one small strategy object the passes ask for
global counts, averaged gradients and the context the model's own
synchronisation is turned off in.

- :class:`Single`: one process; every answer is the local one.
- :class:`DDP`: a ``DistributedDataParallel`` model. The engine averages the
  gradients itself (the model's reducer would average every backward, four
  per SSE-SAM step, and the perturbation needs the clean gradients averaged
  before the norm), so the passes run under ``model.no_sync()``.

- :class:`FSDP2`: a model sharded with ``torch.distributed.fsdp.fully_shard``
  (its parameters are DTensor shards). Every backward reduce-scatters, so the
  gradients arrive averaged and sharded; what the strategy adds is
  :meth:`~Single.sum_squares_`: a norm over the shards of every process is one
  all-reduce of the local sums of squares.

The passes and backends call only what is here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .. import _torch_private
from ..backends.base import is_dtensor


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

    def ready(self) -> None:
        """Refuse a step the model's own settings would make wrong without a sign."""

    # Sums of squares over the shards of every process (None: the parameters are
    # whole on every process, a local norm is the global one). The backends hand
    # it one tensor holding every norm they need at once, so a step costs one
    # collective per call, never one per parameter.
    sum_squares_ = None


class _Processes(Single):
    """What DDP and FSDP2 share: global counts and one verdict over a process group."""

    lockstep = True

    def __init__(self, group, device: torch.device):
        self.group, self._device = group, device
        self.world = torch.distributed.get_world_size(group)

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

    def agree(self, ok: Tensor | None) -> Tensor:
        flag = torch.ones((), device=self._device) if ok is None else ok.to(self._device, torch.float32)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN, group=self.group)
        return flag > 0


class DDP(_Processes):
    """A ``DistributedDataParallel`` model's process group."""

    def __init__(self, model: nn.parallel.DistributedDataParallel):
        super().__init__(model.process_group, next(model.parameters()).device)
        self.model = model

    def no_sync(self):
        return self.model.no_sync()

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


class FSDP2(_Processes):
    """A model sharded with ``fully_shard`` on a one-dimensional device mesh.

    Each backward reduce-scatters and averages the gradients over the mesh
    (FSDP2's default divide factor, the mesh size), so every gradient set is
    averaged the moment it exists: :meth:`average` and :meth:`union` have
    nothing left to do, and the normaliser (global count / world, as under
    DDP) makes that average the mean over the union of the shards. The passes
    run with the model's own synchronisation on: turning it off
    (``set_requires_gradient_sync(False)``) would keep unsharded gradients.
    Norms are global through :meth:`sum_squares_`.
    """

    def __init__(self, model: nn.Module, params: Sequence[Tensor]):
        from torch.distributed.tensor import DTensor, Shard

        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        whole = [n for n, p in trainable if not isinstance(p, DTensor)]
        # and what the base optimizer holds beyond the model (a learnable temperature)
        whole += ["a parameter beyond the model" for p in params if not isinstance(p, DTensor)]
        if whole:
            raise ValueError(
                f"model has DTensor (sharded) parameters and plain ones ({whole[0]!r}): call "
                "torch.distributed.fsdp.fully_shard on the root module too, so that every parameter "
                "is sharded and its gradient averaged over the processes"
            )
        sharded = [p for p in params if isinstance(p, DTensor)]
        meshes = {p.device_mesh for p in sharded}  # equal meshes: fully_shard makes one per call
        mesh = sharded[0].device_mesh
        if (
            len(meshes) > 1
            or mesh.ndim != 1
            or not all(all(isinstance(x, Shard) for x in p.placements) for p in sharded)
        ):
            raise ValueError(
                "model's sharded parameters must lie on one one-dimensional device mesh with Shard "
                "placements (fully_shard(model, mesh=init_device_mesh(..., (world,)))); hybrid "
                "sharding (HSDP, a 2-D mesh) and tensor parallelism are not supported"
            )
        super().__init__(mesh.get_group(), sharded[0].to_local().device)
        self.model = model

    def no_sync(self):
        self.ready()
        return contextlib.nullcontext()

    def ready(self) -> None:
        """Two FSDP2 settings would give a wrong update without an error: with the
        gradient sync off the backwards leave unsharded, unreduced gradients the
        step never sees; without the reshard after backward a perturbed forward
        reuses the weights the clean one gathered and never sees its
        perturbation. Both are read every step, as both can change between steps."""
        for reduce_grads, reshard in _torch_private.fsdp2_sync_flags(self.model):
            if not reduce_grads:
                raise RuntimeError(
                    "model.set_requires_gradient_sync(False) is in effect: every backward of a SAM step must "
                    "reduce-scatter its gradient; turn it on again (for gradient accumulation pass "
                    "opt.step a list of micro-batch closures)"
                )
            if not reshard:
                raise RuntimeError(
                    "model.set_reshard_after_backward(False) is in effect: the perturbed forward would reuse "
                    "the weights all-gathered for the clean one, without the perturbation; turn it on again"
                )

    def average(self, backend, slots, live: bool) -> None:
        """FSDP2 averaged every gradient in its reduce-scatter already."""

    def sum_squares_(self, tensor: Tensor) -> None:
        self.all_reduce_(tensor)


def _is_fsdp2(model: nn.Module) -> bool:
    return any(is_dtensor(p) for p in model.parameters())  # imports nothing for other models


def strategy(model: nn.Module | None, params: Sequence[Tensor]) -> Single:
    """The strategy of ``model``'s step; ``params``: every parameter the optimizer
    holds (FSDP2 checks that each one is sharded)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return DDP(model)
    if model is not None and _is_fsdp2(model):
        return FSDP2(model, params)
    return Single()
