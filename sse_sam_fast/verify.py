"""Numerical verification of a backend against the published code.

The same cases serve the test suite, ``sse-sam-fast verify`` and the
benchmarks, so what is verified and what is timed cannot drift apart.

The ground truth is :func:`run_published`: each case trained by the published
per-parameter code as transcribed in :mod:`sse_sam_fast.published`, which
imports nothing from the engine, its backends or the kernels. Every backend of
this library is compared with it, parameter by parameter, through every API:
``opt.step``, ``opt.capture``, and the official methods driven by the
published training loop.

Public names: :class:`Case`, :func:`default_cases`, :func:`run`,
:func:`run_published`, :func:`published_step`, :func:`criterion` and
:func:`per_sample_losses` (the cases' loss), the tolerance table
``TOLERANCES`` with :func:`tolerance_key`, :func:`compare` /
:func:`assert_close` (the one comparison the tests, the benchmarks and the
``verify`` command use), :func:`verify` and :func:`format_results`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import SAM, SSESAM, ImbSAM, published
from .train.models import mlp, small_bn_cnn

_LIBRARY = {"sam": SAM, "imbsam": ImbSAM, "ssesam": SSESAM}
_PUBLISHED = {"sam": published.SAM, "imbsam": published.ImbSAM, "ssesam": published.SSESAM}

# One table of tolerances: (atol, rtol) per use and dtype of the compared tensor.
#   "step": a backend's parameters after several optimizer steps against the
#     published code (verify, the parity tests). Like the reference backend, the
#     transcription computes per parameter in the storage dtype and restores by
#     subtraction; the flat backends differ only in the order of the norm's summation
#     (fp32), in computing norms and scales in fp32 where the published code rounds
#     them to the storage dtype (bf16, fp16), and in restoring by copy.
#   "step-interpreted": Triton's interpreter converts fp32 to bf16 by truncation,
#     not round-to-nearest-even as compiled kernels do: its bias adds up to ~7 bf16
#     ulps over six steps of the BatchNorm CNN.
#   "kernel": one Triton kernel call against plain torch (tests/kernels/test_kernels.py).
#     The low-precision rows cover torch.optim.SGD rounding its temporaries to the
#     parameter dtype while the kernels keep them in fp32, and atol the cancellation
#     in the momentum buffer (values near 0 built from larger operands). The bf16
#     row also absorbs the interpreter's truncation, up to one more ulp per store.
TOLERANCES: dict[tuple[str, torch.dtype], tuple[float, float]] = {
    ("step", torch.float64): (1e-12, 1e-10),
    ("step", torch.float32): (2e-6, 1e-5),
    ("step", torch.bfloat16): (2e-2, 2e-2),
    ("step", torch.float16): (4e-3, 4e-3),
    ("step-interpreted", torch.bfloat16): (6e-2, 2e-2),
    ("kernel", torch.float32): (1e-5, 1e-5),
    ("kernel", torch.bfloat16): (1.6e-2, 1.6e-2),
    ("kernel", torch.float16): (2e-3, 2e-3),
}


def tolerance_key(dtype: torch.dtype, backend: str) -> tuple[str, torch.dtype]:
    """The TOLERANCES key for ``backend``'s parameters of ``dtype`` after several steps."""
    if dtype == torch.bfloat16 and backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        return ("step-interpreted", dtype)
    return ("step", dtype)


def _resolve_key(key, expected_dtype: torch.dtype) -> tuple[str, torch.dtype]:
    if key is None:
        return ("step", expected_dtype)
    if isinstance(key, torch.dtype):
        return ("step", key)
    if isinstance(key, str):
        return (key, expected_dtype)
    return key


@dataclass
class Diff:
    """The outcome of :func:`compare`: how many finite elements differ beyond the
    tolerance and where the worst one is, with NaN and inf reported apart (any
    non-finite value fails)."""

    max_abs: float
    max_rel: float
    n_bad: int
    numel: int
    worst: str | None = None
    nonfinite: str = ""
    tolerance: str = ""
    atol: float = 0.0
    rtol: float = 0.0

    @property
    def ok(self) -> bool:
        return self.n_bad == 0 and not self.nonfinite

    def __str__(self) -> str:
        s = f"max abs {self.max_abs:.3g}, max rel {self.max_rel:.3g}, {self.n_bad}/{self.numel} differ"
        if self.tolerance:
            s += f" beyond {self.tolerance}"
        if self.worst is not None:
            s += f" (worst at {self.worst})"
        return s + (f"; {self.nonfinite}" if self.nonfinite else "")


def _where(i: int, shape: torch.Size, flat: int, single: bool) -> str:
    index = tuple(int(k) for k in torch.unravel_index(torch.tensor(flat), shape)) if len(shape) else ()
    at = f"index {index[0] if len(index) == 1 else index}"
    return at if single else f"tensor {i} {at}"


def compare(actual: Tensor | Sequence[Tensor], expected: Tensor | Sequence[Tensor], key=None) -> Diff:
    """Compare tensors (or lists of tensors) elementwise: ``|a - e| <= atol + rtol·|e|``
    with ``(atol, rtol) = TOLERANCES[key]``. ``key``: a ``(use, dtype)`` key of
    TOLERANCES; a dtype alone means the ``"step"`` row of that dtype, a use alone
    (``"kernel"``) that use's row for the dtype of the first expected tensor; None:
    the ``"step"`` row of that dtype. Any NaN or inf, in either, fails."""
    single = isinstance(expected, Tensor)
    if single:
        actual, expected = [actual], [expected]
    if len(actual) != len(expected):
        raise ValueError(f"{len(actual)} tensors to compare with {len(expected)}")
    key = _resolve_key(key, expected[0].dtype if len(expected) else torch.float32)
    atol, rtol = TOLERANCES[key]
    max_abs = max_rel = 0.0
    n_bad = numel = 0
    worst, worst_excess, nonfinite = None, -1.0, []
    for i, (a, e) in enumerate(zip(actual, expected)):
        if a.shape != e.shape:
            raise ValueError(f"tensor {i}: shape {tuple(a.shape)} != {tuple(e.shape)}")
        shape = a.shape
        a, e = a.detach().double().cpu().reshape(-1), e.detach().double().cpu().reshape(-1)
        numel += a.numel()
        for label, test in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
            in_a, in_e = test(a), test(e)
            if in_a.any() or in_e.any():
                first = int((in_a | in_e).nonzero()[0])
                nonfinite.append(
                    f"{label}: {int(in_a.sum())} actual, {int(in_e.sum())} expected, "
                    f"{int((in_a != in_e).sum())} at different places (first at "
                    f"{_where(i, shape, first, single)}: actual {a[first].item()}, "
                    f"expected {e[first].item()})"
                )
        finite = torch.isfinite(a) & torch.isfinite(e)
        if not finite.any():
            continue
        a, e = a[finite], e[finite]
        positions = finite.nonzero().reshape(-1)
        err = (a - e).abs()
        excess = err - (atol + rtol * e.abs())
        max_abs = max(max_abs, err.max().item())
        max_rel = max(max_rel, (err / e.abs().clamp_min(1e-12)).max().item())
        n_bad += int((excess > 0).sum())
        j = int(excess.argmax())
        if excess[j] > 0 and excess[j].item() > worst_excess:
            worst_excess = excess[j].item()
            worst = (
                f"{_where(i, shape, int(positions[j]), single)}: actual {a[j].item()!r}, "
                f"expected {e[j].item()!r}, |diff| {err[j].item():.3g}"
            )
    tolerance = f"atol={atol}, rtol={rtol} {key}"
    return Diff(max_abs, max_rel, n_bad, numel, worst, "; ".join(nonfinite), tolerance, atol, rtol)


def assert_close(
    actual: Tensor | Sequence[Tensor], expected: Tensor | Sequence[Tensor], key=None, what: str = ""
) -> None:
    """Assert :func:`compare` finds no difference; the message counts the elements
    beyond tolerance, locates the worst and reports NaN / inf apart."""
    d = compare(actual, expected, key)
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
    base: str = "sgd"  # sgd | nesterov | adam | adam-graph | groups
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
        if self.hparams.get("normalization", "batch") != "batch":
            extra.append(f"{self.hparams['normalization']}-norm")
        if self.hparams.get("adaptive"):
            extra.append("asam")
        if self.hparams.get("max_grad_norm") is not None:
            extra.append(f"clip{self.hparams['max_grad_norm']}")
        dt = str(self.dtype).replace("torch.", "")
        return "-".join([self.method, self.model, self.base, self.masks, dt, *extra])

    def parts(self, device: str | torch.device = "cpu") -> tuple[nn.Module, torch.optim.Optimizer]:
        """The model and the base optimizer, the same for every run of this case."""
        torch.manual_seed(self.seed)
        model = mlp(16, 6, 24) if self.model == "mlp" else small_bn_cnn(1, 6, 4)
        if self.unused:
            model = _WithUnused(model)
        if self.frozen:
            next(model.parameters()).requires_grad_(False)
        model = model.to(device=device, dtype=self.dtype)
        params = list(model.parameters())
        if self.base in ("adam", "adam-graph"):
            # adam-graph: on CUDA built for capture (a device lr, capturable), which
            # opt.capture graphs; elsewhere the same update as adam
            graph = self.base == "adam-graph" and torch.device(device).type == "cuda"
            lr = torch.tensor(1e-2, device=device) if graph else 1e-2
            base = torch.optim.Adam(params, lr=lr, weight_decay=1e-3, capturable=graph)
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
        return model, base

    @property
    def normalization(self) -> str:
        return self.hparams.get("normalization", "batch")

    def _wrap(self, classes: dict, base, model, **extra):
        """``classes[method](base, model, radii..., **options)``: this library's
        classes or the published ones, with the same hyperparameters."""
        h = self.hparams.get
        # the options every method takes: ASAM and gradient clipping
        extra.update({k: self.hparams[k] for k in ("adaptive", "max_grad_norm") if k in self.hparams})
        if self.method == "sam":
            radii = (h("rho", 0.07),)
        elif self.method == "imbsam":
            radii = (h("rho", 0.06),)
        else:
            # the switch falls in the middle of the run: update_rho() runs every 2 steps
            radii = (h("head_rho", 0.05), h("tail_rho", 0.11))
            extra.update(gamma=0.5, total_epochs=self.steps // 2)
        return classes[self.method](base, model, *radii, **extra)

    def build(self, backend: str, device: str | torch.device = "cpu"):
        """The model and this library's optimizer on ``backend``."""
        model, base = self.parts(device)
        extra = {"normalization": self.normalization} if self.method == "imbsam" else {}
        return model, self._wrap(_LIBRARY, base, model, backend=backend, **extra)

    def build_published(self, device: str | torch.device = "cpu"):
        """The model and the published optimizer (:mod:`sse_sam_fast.published`)."""
        model, base = self.parts(device)
        return model, self._wrap(_PUBLISHED, base, model)

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


def criterion(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy per sample, in fp32 whatever the model's dtype: the
    published loops' ``lossFunc``."""
    return F.cross_entropy(logits.float(), targets, reduction="none")


def per_sample_losses(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """:func:`criterion` of ``model(x)``: the closure ``opt.step`` takes."""
    return criterion(model(x), y)


def published_step(opt, model: nn.Module, x: Tensor, y: Tensor, tail: Tensor, method: str) -> None:
    """One step of the published training loop (:func:`published.forbackward`,
    4 forwards and 4 backwards for SSE-SAM) driving ``opt``'s official methods:
    how a script written for the published code uses this library."""
    imbsam = {}
    if method == "imbsam":
        imbsam = {"tail_weight": opt.tail_weight, "normalization": opt.normalization}
    published.forbackward(method, opt, model, criterion, x, y, tail, **imbsam)


def _train(case: Case, model: nn.Module, opt, step, device) -> list[Tensor]:
    for i, (x, y, tail) in enumerate(case.batches()):
        step(*(t.to(device) for t in (x, y, tail)))
        if case.method == "ssesam" and i % 2 == 1:
            opt.update_rho()
    return [p.detach().cpu().clone() for p in model.parameters() if p.requires_grad]


def fp32_precision(fn):
    """``fn`` run with TF32 off for CUDA matmuls and cuDNN convolutions (torch's
    default turns it on for cuDNN): results compared at fp32 tolerances, with
    each other or with a CPU run, must be computed in fp32. TF32 rounds inputs
    to 10 mantissa bits, so two runs one ulp apart can differ by 1e-4."""

    @functools.wraps(fn)
    def pinned(*args, **kwargs):
        saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            return fn(*args, **kwargs)
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved

    return pinned


@fp32_precision
def run(case: Case, backend: str = "reference", api: str = "official", device="cpu") -> list[Tensor]:
    """Train ``case`` with this library's ``backend`` through ``api`` on ``device``:
    ``"official"`` (the published loop driving the official methods), ``"step"``
    (``opt.step(closure, tail_mask)``) or ``"capture"`` (``opt.capture``, CUDA
    graphs where they apply). Returns the final trainable parameters, on the CPU."""
    model, opt = case.build(backend, device)
    model.train()
    if api == "official":
        step = lambda x, y, tail: published_step(opt, model, x, y, tail, case.method)  # noqa: E731
    elif api == "capture":
        captured = opt.capture(lambda x, y: per_sample_losses(model, x, y))
        step = lambda x, y, tail: captured(x, y, tail_mask=tail)  # noqa: E731
    elif api == "step":
        step = lambda x, y, tail: opt.step(lambda: per_sample_losses(model, x, y), tail)  # noqa: E731
    else:
        raise ValueError(f"api must be 'official', 'step' or 'capture', got {api!r}")
    return _train(case, model, opt, step, device)


def run_published(case: Case, device="cpu") -> list[Tensor]:
    """The ground truth: ``case`` trained by the published code, transcribed in
    :mod:`sse_sam_fast.published` (independent of the engine, its backends and
    kernels). ImbSAM's tail weight is the published one: 2 in ImbSAM's code,
    1 in the SSE-SAM repository's per-group baseline."""
    model, opt = case.build_published(device)
    model.train()
    imbsam = {}
    if case.method == "imbsam":
        tail_weight = 2.0 if case.normalization == "batch" else 1.0
        imbsam = {"tail_weight": tail_weight, "normalization": case.normalization}
    step = lambda x, y, tail: published.forbackward(case.method, opt, model, criterion, x, y, tail, **imbsam)  # noqa: E731
    return _train(case, model, opt, step, device)


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
        Case(method="sam", model="bn_cnn", base="adam-graph"),  # graphed by --capture on CUDA
        Case(method="imbsam", masks="alternate", hparams={"normalization": "group"}),
        Case(method="imbsam", model="bn_cnn", hparams={"normalization": "group"}),
    ]
    # ASAM (adaptive=True) and gradient clipping on every method; the radius is
    # raised for ASAM, whose move |w|²g/||w g|| is smaller than SAM's at these weights,
    # and the clipping norm is below the gradients' so that every step clips
    cases += [
        Case(method=m, hparams={"adaptive": True, "rho": 0.5, "head_rho": 0.4, "tail_rho": 0.8})
        for m in ("sam", "imbsam", "ssesam")
    ]
    cases += [
        Case(method="ssesam", model="bn_cnn", base="adam", masks="alternate", hparams={"adaptive": True}),
        Case(method="sam", base="groups", frozen=True, hparams={"adaptive": True}),
        *(
            Case(method=m, base="nesterov", hparams={"max_grad_norm": 0.1})
            for m in ("sam", "imbsam", "ssesam")
        ),
        Case(
            method="ssesam",
            model="bn_cnn",
            masks="alternate",
            hparams={"max_grad_norm": 0.1, "adaptive": True},
        ),
        Case(method="imbsam", base="adam", hparams={"max_grad_norm": 0.1, "normalization": "group"}),
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
    published code (:func:`run_published`, same device)."""
    results = []
    for case in default_cases(tuple(dtypes)):
        case.steps = steps
        expected = run_published(case, device)
        key = tolerance_key(case.dtype, backend)
        for api in apis:
            results.append(Result(case, api, compare(run(case, backend, api, device), expected, key)))
    return results


def format_results(results: list[Result]) -> str:
    """One row per case and API: the largest differences, the tolerance they
    were held to (``atol``, ``rtol`` of TOLERANCES) and the verdict."""
    width = max(len(r.case.name) for r in results)
    head = f"{'case':<{width}}  {'api':<8}  {'max abs':>9}  {'max rel':>9}  {'atol':>7}  {'rtol':>7}  result"
    lines = [head]
    for r in results:
        d = r.diff
        status = "PASS" if d.ok else f"FAIL ({d})"
        lines.append(
            f"{r.case.name:<{width}}  {r.api:<8}  {d.max_abs:>9.2e}  {d.max_rel:>9.2e}  "
            f"{d.atol:>7g}  {d.rtol:>7g}  {status}"
        )
    return "\n".join(lines)
