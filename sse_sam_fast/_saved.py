"""A bitwise copy of many tensors, taken back or kept on the device.

A step that may have to be undone (a non-finite verdict decided on the device)
saves what it writes: BatchNorm running statistics, optimizer state. Saved and
selected one tensor at a time, that is two launches per tensor, hundreds per
step on a GPU that is already bound by the host. Saved as one flat buffer per
(device, dtype), it is a handful: ``torch.cat`` to save, one ``torch.where`` to
select, one multi-tensor copy back.

One :class:`Saved` serves step after step. Its flat views of the tensors and its
copies are made once and reused while the tensors are the same objects over the
same memory: checking their addresses costs far less host time than making a
view of each, and the views cost more than the copies they serve (BENCHMARKS.md,
"Host-time measurements behind the code").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def _where(t: Tensor) -> tuple[int, int]:
    return t.data_ptr(), t.nbytes


class Saved:
    """The values ``tensors`` hold at the last :meth:`save`, as one flat copy per
    (device, dtype)."""

    def __init__(self, tensors: Sequence[Tensor] = ()):
        self.layouts = 0  # how many layouts were made (a new one for new tensors)
        self._of: tuple[Tensor, ...] | None = None  # held: no id and no address is reused meanwhile
        self._where: list[tuple[int, int]] = []
        self.save(tensors)

    def _layout(self, tensors: tuple[Tensor, ...]) -> None:
        # flat views of the tensors themselves: copied from in one cat, copied
        # back into in one multi-tensor copy
        self.views: dict[tuple, list[Tensor]] = {}
        self.apart: list[tuple[Tensor, Tensor]] = []  # non-contiguous ones (no flat view)
        for t in tensors:
            if t.is_contiguous():
                self.views.setdefault((t.device, t.dtype), []).append(t.view(-1))
            else:
                self.apart.append((t, torch.empty_like(t)))
        self.flat: dict[tuple, Tensor] = {}
        self.parts: dict[tuple, list[Tensor]] = {}  # views of the copy, one per tensor
        for (device, dtype), vs in self.views.items():
            sizes = [v.numel() for v in vs]
            self.flat[device, dtype] = torch.empty(sum(sizes), dtype=dtype, device=device)
            self.parts[device, dtype] = list(self.flat[device, dtype].split(sizes))
        self._of, self._where = tensors, [_where(t) for t in tensors]
        self.layouts += 1

    def current(self, tensors: tuple[Tensor, ...]) -> bool:
        """Whether the layout still fits ``tensors``: the same objects, over the same
        memory (``p.data = ...`` keeps the object and moves the memory)."""
        return (
            self._of is not None
            and len(tensors) == len(self._of)
            and all(a is b for a, b in zip(tensors, self._of))
            and [_where(t) for t in tensors] == self._where
        )

    def follow(self, tensors: Sequence[Tensor]) -> int:
        """Make the layout fit ``tensors`` (a new one if they changed); returns its
        number, which names these tensors at these addresses for good."""
        tensors = tuple(tensors)
        if not self.current(tensors):
            self._layout(tensors)
        return self.layouts

    @torch.no_grad()
    def save(self, tensors: Sequence[Tensor]) -> None:
        """Copy the values ``tensors`` hold now."""
        self.follow(tensors)
        for key, vs in self.views.items():
            torch.cat(vs, out=self.flat[key])
        for t, old in self.apart:
            old.copy_(t)

    def buffers(self) -> list[Tensor]:
        """The copies themselves (a CUDA graph that writes them must keep them alive)."""
        return list(self.flat.values()) + [old for _, old in self.apart]

    @torch.no_grad()
    def restore(self) -> None:
        """Every tensor back to its saved bits."""
        for key, vs in self.views.items():
            torch._foreach_copy_(vs, self.parts[key])
        for t, old in self.apart:
            t.copy_(old)

    @torch.no_grad()
    def keep_if(self, ok: Tensor) -> None:
        """On the device: the new values where ``ok``, else the saved ones (a select,
        so a NaN in the new values cannot leak into the kept ones). The result is
        also the saved copy from then on. Costs a temporary flat copy of the new
        values per group. A group on another device than ``ok`` (the CPU step
        counts of a non-capturable Adam) needs the verdict there: that copy
        synchronises."""
        for key, vs in self.views.items():
            flat = self.flat[key]
            torch.where(ok.to(flat.device), torch.cat(vs), flat, out=flat)
            torch._foreach_copy_(vs, self.parts[key])
        for t, old in self.apart:
            torch.where(ok.to(t.device), t, old, out=t)
            old.copy_(t)
