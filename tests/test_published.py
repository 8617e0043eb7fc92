"""The oracle (sse_sam_fast.published): independent of the engine, true to the
maths of DESIGN.md section 1 on its own, and able to tell a wrong update."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sse_sam_fast import published
from sse_sam_fast import verify as verify_mod
from sse_sam_fast.verify import Case, compare, run, run_published

SOURCE = Path(published.__file__)


def ce(logits, targets):
    return F.cross_entropy(logits, targets, reduction="none")


def test_imports_only_torch_and_the_standard_library():
    roots = set()
    for node in ast.walk(ast.parse(SOURCE.read_text())):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"relative import of {node.module!r}: the oracle must not see the engine"
            roots.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
    allowed = {"torch", "__future__"} | set(sys.stdlib_module_names)
    assert roots and roots <= allowed, f"imports beyond torch and the standard library: {roots - allowed}"


def test_loads_as_a_lone_file_without_the_package():
    # importing it as sse_sam_fast.published runs the package __init__ (the engine);
    # loaded from its path alone, nothing of sse_sam_fast may come in
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('oracle', {str(SOURCE)!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "assert module.SSESAM and module.forbackward\n"
        "print(sorted(m for m in sys.modules if m.startswith('sse_sam_fast')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# one step on w ↦ l_i(w) = (w·x_i - t_i)²/2, a scalar weight: g = Σ_i (w·x_i - t_i)·x_i / B,
# ||g|| = |g|; the update written straight from DESIGN.md section 1
X = torch.tensor([[1.0], [-2.0], [0.5], [3.0], [-1.5]], dtype=torch.float64)
T = torch.tensor([0.3, 1.0, -0.7, 2.0, 0.1], dtype=torch.float64)
TAIL = torch.tensor([False, True, False, True, False])
W0, LR, B = 0.8, 0.1, 5


def _grad(w: float, members: torch.Tensor, weight: float = 1.0) -> float:
    x = X[members, 0]
    return weight * float(((w * x - T[members]) * x).sum()) / B


def _expected(w: float, groups) -> float:
    """``w - lr·Σ_k ∇L_k(w + e_k)``, ``e_k = rho_k·g_k/(|g_k| + 1e-16)``."""
    total = 0.0
    for members, weight, rho in groups:
        g = _grad(w, members, weight)
        total += _grad(w + rho * g / (abs(g) + 1e-16), members, weight)
    return w - LR * total


def _scalar_run(method: str, steps: int, radii: tuple) -> list[float]:
    model = nn.Linear(1, 1, bias=False).double()
    with torch.no_grad():
        model.weight.fill_(W0)
    base = torch.optim.SGD(model.parameters(), lr=LR)
    classes = {"sam": published.SAM, "imbsam": published.ImbSAM, "ssesam": published.SSESAM}
    stages = {"gamma": 0.5, "total_epochs": 2} if method == "ssesam" else {}
    opt = classes[method](base, model, *radii, **stages)
    squared = lambda out, t: 0.5 * (out[:, 0] - t) ** 2  # noqa: E731
    weights = []
    for _ in range(steps):
        published.forbackward(method, opt, model, squared, X, T, TAIL)
        weights.append(model.weight.item())
        if method == "ssesam":
            opt.update_rho()  # total_epochs=2, gamma=0.5: stage 2 from the second step
    return weights


ALL, HEAD = torch.ones(B, dtype=torch.bool), ~TAIL


@pytest.mark.parametrize(
    "method,radii,stages",
    [
        ("sam", (0.3,), [[(ALL, 1.0, 0.3)]] * 2),
        ("imbsam", (0.3,), [[(HEAD, 1.0, 0.0), (TAIL, 2.0, 0.3)]] * 2),
        ("ssesam", (0.2, 0.4), [[(HEAD, 1.0, 0.2), (TAIL, 1.0, 0.4)], [(HEAD, 1.0, 0.0), (TAIL, 1.0, 0.4)]]),
    ],
)
def test_one_step_is_the_formula(method, radii, stages):
    got = _scalar_run(method, len(stages), radii)
    w = W0
    for step, groups in enumerate(stages):
        w = _expected(w, groups)
        assert got[step] == pytest.approx(w, rel=1e-12, abs=1e-14), f"step {step}"
    assert got[0] != pytest.approx(_expected(W0, [(ALL, 1.0, 0.0)]))  # the radius moved it


@pytest.mark.parametrize("method,forwards,backwards", [("sam", 2, 2), ("imbsam", 2, 3), ("ssesam", 4, 4)])
def test_the_published_loops_count_of_passes(method, forwards, backwards):
    case = Case(method=method, steps=4)
    model, opt = case.build_published()
    counts = {"forward": 0, "backward": 0}

    def count(module, args, out):
        counts["forward"] += 1
        out.register_hook(lambda grad: counts.__setitem__("backward", counts["backward"] + 1))

    model.register_forward_hook(count)
    for step, (x, y, tail) in enumerate(case.batches()):
        published.forbackward(method, opt, model, verify_mod.criterion, x, y, tail)
        # in stage 2 too (from the third step): the published code perturbs the head by 0
        assert counts == {"forward": forwards, "backward": backwards}, f"step {step}"
        counts.update(forward=0, backward=0)
        if method == "ssesam" and step % 2 == 1:
            opt.update_rho()
    assert method != "ssesam" or opt.rho_is[0] == 0


class _HalfUsed(nn.Module):
    def __init__(self):
        super().__init__()
        self.used, self.unused = nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x):
        return self.used(x)


def test_where_the_published_code_fails_the_library_is_followed():
    torch.manual_seed(0)
    model = _HalfUsed()
    unused = model.unused.weight.detach().clone()
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    opt = published.SSESAM(base, model, 0.05, 0.1, gamma=0)
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    for tail in (torch.zeros(6, dtype=torch.bool), torch.ones(6, dtype=torch.bool)):  # empty groups
        published.ssesam_step(opt, model, ce, x, y, tail)
        opt.update_rho()  # gamma = 0: counts, never switches
    assert opt.rho_is == [0.05, 0.1] and opt.epoch_count == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.equal(model.unused.weight, unused)  # no gradient: no decay, no momentum

    model = nn.Linear(4, 3)
    imb = published.ImbSAM(torch.optim.SGD(model.parameters(), lr=0.1), model, 0.05)
    no_tail = torch.zeros(6, dtype=torch.bool)
    published.imbsam_step(imb, model, ce, x, y, no_tail, 1.0, "group")
    assert torch.isfinite(model.weight).all()  # an empty tail over its own count: 0/max(0, 1)


@pytest.mark.parametrize("method,wrong", [("sam", "rho"), ("imbsam", "rho"), ("ssesam", "tail_rho")])
def test_the_oracle_tells_a_wrong_radius(method, wrong):
    case = Case(method=method, steps=3)
    ours = run(case, "torch", "step")
    assert compare(ours, run_published(case)).ok
    right = {"sam": 0.07, "imbsam": 0.06, "ssesam": 0.11}[method]
    off = Case(method=method, steps=3, hparams={wrong: right * 1.001})
    assert not compare(ours, run_published(off)).ok


def test_verify_compares_with_the_oracle(monkeypatch):
    """A fault put into the oracle alone (no stage switch) fails exactly the
    SSE-SAM rows: the library is no longer its own ground truth."""
    cases = lambda dtypes: [Case(method="ssesam"), Case(method="sam")]  # noqa: E731
    monkeypatch.setattr(verify_mod, "default_cases", cases)
    assert all(r.diff.ok for r in verify_mod.verify("reference", steps=4, dtypes=(torch.float32,)))
    monkeypatch.setattr(published.SSESAM, "update_rho", lambda self: None)
    results = verify_mod.verify("reference", steps=4, dtypes=(torch.float32,))
    assert [(r.case.method, r.api, r.diff.ok) for r in results] == [
        ("ssesam", "step", False),
        ("ssesam", "official", False),
        ("sam", "step", True),
        ("sam", "official", True),
    ]
