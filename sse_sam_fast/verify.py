"""Numerical verification of a backend against the reference.

The same cases serve the test suite, ``sse-sam-fast verify`` and the
benchmarks, so what is verified and what is timed cannot drift apart.

The ground truth is :func:`published_step`: the training loop of the published
code (``forbackward`` in the official SSE-SAM repository), written out with the
official method names and run on the ``reference`` backend. Every other
combination of backend and API is compared with it, parameter by parameter.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import SAM, SSESAM, ImbSAM
from .models import mlp, small_bn_cnn

# (atol, rtol) per parameter dtype, after several steps. The backends differ
# from the reference only in the order of the norm's summation (fp32) and in
# computing norms and scales in fp32 where the reference rounds them to the
# storage dtype (bf16, fp16).
TOLERANCES = {
    torch.float64: (1e-12, 1e-10),
    torch.float32: (2e-6, 1e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (4e-3, 4e-3),
    # Triton's interpreter converts fp32 to bf16 by truncation, not round-to-
    # nearest-even as compiled kernels do: its bias adds up to ~7 bf16 ulps over
    # six steps of the BatchNorm CNN
    "bfloat16-interpreted": (6e-2, 2e-2),
}


def tolerance_key(dtype: torch.dtype, backend: str):
    if dtype == torch.bfloat16 and backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        return "bfloat16-interpreted"
    return dtype


@dataclass
class Diff:
    max_abs: float
    max_rel: float
    n_bad: int
    numel: int
    worst: tuple | None = None
    nonfinite: str = ""

    @property
    def ok(self) -> bool:
        return self.n_bad == 0 and not self.nonfinite

    def __str__(self) -> str:
        s = f"max abs {self.max_abs:.3g}, max rel {self.max_rel:.3g}, {self.n_bad}/{self.numel} differ"
        if self.worst is not None:
            s += f" (worst at {self.worst})"
        return s + (f"; {self.nonfinite}" if self.nonfinite else "")


def compare(actual: list[Tensor], expected: list[Tensor], dtype=None) -> Diff:
    """Compare lists of tensors elementwise under the tolerance of ``dtype`` (a
    key of TOLERANCES; default: the dtype of the first expected tensor)."""
    atol, rtol = TOLERANCES[dtype or expected[0].dtype]
    max_abs = max_rel = 0.0
    n_bad = numel = 0
    worst, worst_err, nonfinite = None, -1.0, []
    for i, (a, e) in enumerate(zip(actual, expected)):
        if a.shape != e.shape:
            raise ValueError(f"tensor {i}: shape {tuple(a.shape)} != {tuple(e.shape)}")
        a, e = a.detach().double().cpu(), e.detach().double().cpu()
        finite_a, finite_e = torch.isfinite(a), torch.isfinite(e)
        if not (finite_a.all() and finite_e.all()):
            n_a, n_e = int((~finite_a).sum()), int((~finite_e).sum())
            nonfinite.append(f"tensor {i}: {n_a} non-finite actual, {n_e} expected")
        err = (a - e).abs()
        bad = ~(err <= atol + rtol * e.abs())
        numel += a.numel()
        if a.numel():
            max_abs = max(max_abs, err.max().item())
            max_rel = max(max_rel, (err / e.abs().clamp_min(1e-12)).max().item())
            n_bad += int(bad.sum())
            excess = (err - atol - rtol * e.abs()).flatten()
            j = int(excess.argmax())
            if excess[j] > worst_err:
                worst_err, worst = excess[j].item(), (i, j)
    return Diff(max_abs, max_rel, n_bad, numel, worst if n_bad else None, "; ".join(nonfinite))


def assert_close(actual: list[Tensor], expected: list[Tensor], dtype=None, what: str = "") -> None:
    d = compare(actual, expected, dtype)
    assert d.ok, f"{what}: {d}"


# ---- cases ----------------------------------------------------------------------
class _WithUnused(nn.Module):
    """Wraps a model with a layer that never gets a gradient."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.unused = nn.Linear(3, 3)

    def forward(self, x):
        return self.inner(x)


@dataclass
class Case:
    """One verification case: a method, a model, a base optimizer and a stream
    of batches with their tail masks."""

    method: str = "ssesam"  # sam | imbsam | ssesam
    model: str = "mlp"  # mlp | bn_cnn
    base: str = "sgd"  # sgd | nesterov | adam | groups
    steps: int = 6
    batch: int = 24
    dtype: torch.dtype = torch.float32
    masks: str = "random"  # random | empty_head | empty_tail | alternate
    frozen: bool = False
    unused: bool = False
    seed: int = 0
    hparams: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        extra = [k for k in ("frozen", "unused") if getattr(self, k)]
        dt = str(self.dtype).replace("torch.", "")
        return "-".join([self.method, self.model, self.base, self.masks, dt, *extra])

    def build(self, backend: str, device: str | torch.device = "cpu"):
        torch.manual_seed(self.seed)
        model = mlp(16, 6, 24) if self.model == "mlp" else small_bn_cnn(1, 6, 4)
        if self.unused:
            model = _WithUnused(model)
        if self.frozen:
            next(model.parameters()).requires_grad_(False)
        model = model.to(device=device, dtype=self.dtype)
        params = list(model.parameters())
        if self.base == "adam":
            base = torch.optim.Adam(params, lr=1e-2, weight_decay=1e-3)
        elif self.base == "groups":
            base = torch.optim.SGD(
                [{"params": params[:2], "lr": 0.2}, {"params": params[2:]}],
                lr=0.05,
                momentum=0.8,
                weight_decay=5e-4,
            )
        else:
            base = torch.optim.SGD(
                params, lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=self.base == "nesterov"
            )
        if self.method == "sam":
            opt = SAM(base, model, self.hparams.get("rho", 0.07), backend=backend)
        elif self.method == "imbsam":
            opt = ImbSAM(base, model, self.hparams.get("rho", 0.06), backend=backend)
        else:
            # the switch falls in the middle of the run: update_rho() runs every 2 steps
            opt = SSESAM(
                base,
                model,
                self.hparams.get("head_rho", 0.05),
                self.hparams.get("tail_rho", 0.11),
                gamma=0.5,
                total_epochs=self.steps // 2,
                backend=backend,
            )
        return model, opt

    def batches(self):
        g = torch.Generator().manual_seed(1000 + self.seed)
        shape = (16,) if self.model == "mlp" else (1, 6, 6)
        for step in range(self.steps):
            x = torch.randn(self.batch, *shape, generator=g).to(self.dtype)
            y = torch.randint(0, 6, (self.batch,), generator=g)
            tail = y >= 4
            if self.masks == "empty_head" or (self.masks == "alternate" and step % 3 == 1):
                tail = torch.ones_like(tail)
            elif self.masks == "empty_tail" or (self.masks == "alternate" and step % 3 == 2):
                tail = torch.zeros_like(tail)
            yield x, y, tail


def _losses(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(model(x).float(), y, reduction="none")


def published_step(opt, model: nn.Module, x: Tensor, y: Tensor, tail: Tensor, method: str) -> None:
    """One step exactly as the published training loop drives the official
    methods (4 forwards and 4 backwards for SSE-SAM)."""
    b = y.shape[0]
    head = ~tail
    if method == "sam":
        _losses(model, x, y).mean().backward()
        opt.first_step()
        _losses(model, x, y).mean().backward()
        opt.second_step()
    elif method == "imbsam":
        loss = _losses(model, x, y)
        (loss[head].sum() / b).backward(retain_graph=True)
        opt.first_step()
        (opt.tail_weight * loss[tail].sum() / b).backward()
        opt.second_step()
        (opt.tail_weight * _losses(model, x, y)[tail].sum() / b).backward()
        opt.third_step()
    else:
        for n_i, members in ((0, head), (1, tail)):
            (_losses(model, x, y)[members].sum() / b).backward()
            opt.compute_and_add_epsilon(n_i)
            (_losses(model, x, y)[members].sum() / b).backward()
            opt.compute_grad_sum_and_restore_p()
        opt.update()


def run(case: Case, backend: str = "reference", api: str = "official", device="cpu") -> list[Tensor]:
    """Train ``case`` with ``backend`` through ``api`` ("official" or "step") on
    ``device``; returns the final trainable parameters, on the CPU."""
    model, opt = case.build(backend, device)
    model.train()
    for step, batch in enumerate(case.batches()):
        x, y, tail = (t.to(device) for t in batch)
        if api == "official":
            published_step(opt, model, x, y, tail, case.method)
        else:
            opt.step(lambda: _losses(model, x, y), tail)
        if case.method == "ssesam" and step % 2 == 1:
            opt.update_rho()
    return [p.detach().cpu().clone() for p in model.parameters() if p.requires_grad]


def default_cases(dtypes=(torch.float32,)) -> list[Case]:
    """The verification matrix: methods × models (with and without BatchNorm)
    × dtypes, plus the edge cases (empty groups, frozen and unused parameters,
    other base optimizers)."""
    cases = [
        Case(method=m, model=model, dtype=dt)
        for m in ("sam", "imbsam", "ssesam")
        for model in ("mlp", "bn_cnn")
        for dt in dtypes
    ]
    cases += [
        Case(method=m, masks=masks)
        for m in ("imbsam", "ssesam")
        for masks in ("empty_head", "empty_tail", "alternate")
    ]
    cases += [
        Case(method="ssesam", base="nesterov", frozen=True, unused=True),
        Case(method="imbsam", base="adam", unused=True),
        Case(method="sam", base="groups", frozen=True),
        Case(method="ssesam", model="bn_cnn", base="adam", masks="alternate"),
    ]
    return cases


@dataclass
class Result:
    case: Case
    api: str
    diff: Diff


def verify(
    backend: str,
    device: str = "cpu",
    steps: int = 6,
    dtypes=(torch.float32, torch.bfloat16),
    apis=("step", "official"),
) -> list[Result]:
    """Run the verification matrix of ``backend`` on ``device`` against the
    published loop on the reference backend (same device)."""
    results = []
    for case in default_cases(tuple(dtypes)):
        case.steps = steps
        expected = run(case, "reference", "official", device)
        key = tolerance_key(case.dtype, backend)
        for api in apis:
            results.append(Result(case, api, compare(run(case, backend, api, device), expected, key)))
    return results


def format_results(results: list[Result]) -> str:
    width = max(len(r.case.name) for r in results)
    lines = [f"{'case':<{width}}  {'api':<8}  {'max abs':>9}  {'max rel':>9}  result"]
    for r in results:
        status = "PASS" if r.diff.ok else f"FAIL ({r.diff})"
        d = r.diff
        lines.append(f"{r.case.name:<{width}}  {r.api:<8}  {d.max_abs:>9.2e}  {d.max_rel:>9.2e}  {status}")
    return "\n".join(lines)
