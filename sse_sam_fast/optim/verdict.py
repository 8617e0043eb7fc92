"""Whether a step was finite, and what happens when it was not: one object.

Each pass leaves values that are finite exactly when the pass was: a norm, or a
loss vector's minimum and maximum (one ``aminmax``; a NaN propagates into both
and an infinity is one of them; not the sum: fp16 losses that are each finite
can sum past 65504). One ``isfinite`` over all of them makes one device bool.

- host verdict (a CPU, the reference backend, ``nonfinite="raise"``, a
  GradScaler, the split schedule): the bool is read once after the passes; a
  non-finite step is abandoned before the base step, and warned about or
  raised per ``nonfinite``.
- device verdict (sync-free steps of the flat backends on CUDA): the bool goes
  to the base step, which takes effect only where it is true (inside torch's
  fused optimizers through their ``found_inf`` argument, inside the fused SGD
  kernel, or by device-side selects), and the skipped steps are counted on
  the device.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor


class Verdict:
    """The finiteness of one step's passes."""

    def __init__(self, on_device: bool):
        self.on_device = on_device
        self.checks: list[tuple[str, tuple[Tensor, ...]]] = []  # (pass name, values finite iff it was)

    def check(self, name: str, value: Tensor) -> None:
        """Remember what decides whether ``value`` is finite: a scalar itself, a
        vector its minimum and maximum."""
        if value.dim() == 0:
            self.checks.append((name, (value,)))
        elif value.numel():
            self.checks.append((name, tuple(torch.aminmax(value))))

    def ok(self) -> Tensor | None:
        """Whether every pass was finite, as one device bool (None: nothing checked)."""
        return self._flags().all() if self.checks else None

    def _flags(self) -> Tensor:
        dev = self.checks[0][1][0].device
        # cat promotes (fp16 extremes, fp32 norms) without rounding a finite value to inf
        return torch.isfinite(torch.cat([v.reshape(1).to(dev) for _, vs in self.checks for v in vs]))

    def first_failure(self) -> str:
        """The name of the first pass with a non-finite value (reads on the host)."""
        names = [name for name, vs in self.checks for _ in vs]
        flags = self._flags().tolist() if self.checks else []
        return names[flags.index(False)] if False in flags else "another process's"

    def settle(self, opt, ok: Tensor, abandon: Callable[[], None], scaler=None) -> bool:
        """Host verdict: read ``ok`` (the step's late synchronisation); on a failure
        ``abandon()`` the step, let a ``scaler`` back off, and skip (counted and
        warned) or raise per ``opt.nonfinite``. Returns whether it was skipped."""
        if ok.item():
            return False
        first = self.first_failure()
        abandon()
        if scaler is not None:
            report_inf_to_scaler(scaler, opt.optimizer, opt._backend.params[0])
        if opt.nonfinite == "raise":
            raise FloatingPointError(f"non-finite value in the {first} pass; the step was not applied")
        opt._count_skipped(1)
        # a fixed text, so the default filter shows it once per call site; the count lives
        # in nonfinite_steps. stacklevel 5: settle, StepRun.run, step, torch.optim's step
        # wrapper, then the caller
        warnings.warn(
            f"{type(opt).__name__}: non-finite value in the {first} pass; step skipped, weights unchanged "
            "(see nonfinite_steps)",
            RuntimeWarning,
            stacklevel=5,
        )
        return True


def report_inf_to_scaler(scaler, optimizer: torch.optim.Optimizer, p: Tensor) -> None:
    """One policy with and without a scaler: a non-finite loss must make the scaler
    back off as an inf gradient does. Stepping it on a gradient holding an inf
    records exactly that (public calls only); the step is skipped."""
    kept = p.grad
    p.grad = torch.full_like(p, float("inf"))
    try:
        scaler.step(optimizer)
    finally:
        p.grad = kept
