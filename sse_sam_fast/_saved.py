"""A bitwise copy of many tensors, taken back or kept on the device.

A step that may have to be undone (a non-finite verdict decided on the device)
saves what it writes: BatchNorm running statistics, optimizer state. Saved and
selected one tensor at a time, that is two launches per tensor, hundreds per
step on a GPU that is already bound by the host. Saved as one flat buffer per
(device, dtype), it is a handful: ``torch.cat`` to save, one ``torch.where`` to
select, one multi-tensor copy back.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class Saved:
    """The values ``tensors`` hold now, as one flat copy per (device, dtype)."""

    def __init__(self, tensors: Sequence[Tensor]):
        # flat views of the tensors themselves: copied from in one cat, copied
        # back into in one foreach copy, no view made per tensor afterwards
        self.views: dict[tuple, list[Tensor]] = {}
        self.apart: list[tuple[Tensor, Tensor]] = []  # non-contiguous ones (no flat view)
        for t in tensors:
            if t.is_contiguous():
                self.views.setdefault((t.device, t.dtype), []).append(t.view(-1))
            else:
                self.apart.append((t, t.clone()))
        with torch.no_grad():
            self.flat = {k: torch.cat(vs) for k, vs in self.views.items()}

    def _split(self, flat: Tensor, views: list[Tensor]) -> list[Tensor]:
        return list(flat.split([v.numel() for v in views]))

    @torch.no_grad()
    def restore(self) -> None:
        """Every tensor back to its saved bits."""
        for key, vs in self.views.items():
            torch._foreach_copy_(vs, self._split(self.flat[key], vs))
        for t, old in self.apart:
            t.copy_(old)

    @torch.no_grad()
    def keep_if(self, ok: Tensor) -> None:
        """On the device: the new values where ``ok``, else the saved ones (a select,
        so a NaN in the new values cannot leak into the kept ones). Costs a
        temporary flat copy of the new values per group. A group on another device
        than ``ok`` (the CPU step counts of a non-capturable Adam) needs the verdict
        there: that copy synchronises."""
        for key, vs in self.views.items():
            new = torch.cat(vs)
            torch.where(ok.to(new.device), new, self.flat[key], out=new)
            torch._foreach_copy_(vs, self._split(new, vs))
        for t, old in self.apart:
            torch.where(ok.to(t.device), t, old, out=t)
