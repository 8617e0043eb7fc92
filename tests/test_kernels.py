"""Triton kernels (kernels/) against plain torch.

On CPU the kernels run under Triton's interpreter (conftest.py sets
TRITON_INTERPRET=1 before triton is first imported).  The ``cuda``
variants repeat every comparison on the GPU; run them with
``TRITON_INTERPRET=0 pytest -m cuda tests/test_kernels.py`` to test the compiled
kernels rather than the interpreter.
"""

import math

import pytest
import torch

pytest.importorskip("triton")

from kernels import grouped_sumsq, restore_sgd_, shift_  # noqa: E402

SIZES = (0, 1, 7, 97, 4097, 98432)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# (atol, rtol) per dtype of the compared tensor.  The low-precision entries cover
# torch.optim.SGD rounding its temporaries to the parameter dtype while the
# kernels keep them in fp32, and atol the cancellation in the momentum buffer (values
# near 0 built from larger operands).  The bf16 entry also absorbs a quirk of
# Triton's interpreter: its fp32 -> bf16 conversion truncates where compiled
# Triton (and torch) round to nearest even, up to one more ulp per store.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}

EPS = 1e-16  # added to the norm, DESIGN.md section 1
ALIGN_BYTES = 128

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
        ],
    ),
]


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


def assert_close(actual, expected, name, dtype=None):
    """Compare with TOLERANCES[dtype]; report the count of bad elements, the worst
    one, and NaN / inf disagreements separately."""
    dtype = expected.dtype if dtype is None else dtype
    atol, rtol = TOLERANCES[dtype]
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().cpu().double().reshape(-1)
    e = expected.detach().cpu().double().reshape(-1)
    problems = []
    for label, test in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        mismatch = test(a) != test(e)
        if mismatch.any():
            first = int(mismatch.nonzero()[0])
            problems.append(
                f"{label} differs at {int(mismatch.sum())} elements (first index {first}: "
                f"actual {a[first].item()}, expected {e[first].item()})"
            )
    finite = torch.isfinite(a) & torch.isfinite(e)
    err = torch.where(finite, (a - e).abs(), torch.zeros_like(a))
    excess = err - (atol + rtol * e.abs())
    bad = finite & (excess > 0)
    if bad.any():
        worst = int(torch.where(bad, excess, torch.full_like(excess, -math.inf)).argmax())
        problems.append(
            f"{int(bad.sum())} of {a.numel()} elements differ beyond atol={atol}, "
            f"rtol={rtol}; worst index {worst}: actual {a[worst].item()!r}, "
            f"expected {e[worst].item()!r}, |diff| {err[worst].item():.3g}"
        )
    assert not problems, f"{name} ({dtype}): " + "; ".join(problems)


def dtype_id(dtype):
    return str(dtype).replace("torch.", "")


def make(shape, dtype, device, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=gen)).to(dtype=dtype, device=device)


def sumsq_ref(row):
    return row.float().pow(2).sum()


def scale_ref(sumsq, rho):
    return rho / (sumsq.sqrt() + EPS)


def rho_for(n):
    # The step ``rho * g / ||g||`` shrinks like 1/sqrt(n); scaling rho keeps it
    # far above the bf16 rounding of w, where a wrong kernel would be visible.
    return 0.3 * math.sqrt(max(n, 1))


# grouped_sumsq


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("n", SIZES)
def test_grouped_sumsq_matches_torch(n, dtype, device):
    g = make((3, n), dtype, device, seed=n)
    rows = [2, 0]
    out = grouped_sumsq(g, rows)
    assert out.dtype == torch.float32 and out.shape == (2,) and out.device == g.device
    expected = torch.stack([sumsq_ref(g[r]) for r in rows])
    assert_close(out, expected, "sumsq")
    # Deterministic: fixed partial slots, no atomics.
    assert torch.equal(grouped_sumsq(g, rows), out)


def test_grouped_sumsq_any_rows(device):
    g = make((6, 300), torch.float32, device, seed=1)
    rows = [5, 1, 1, 0, 3, 2]  # repeats, unsorted, more than one launch's worth
    expected = torch.stack([sumsq_ref(g[r]) for r in rows])
    assert_close(grouped_sumsq(g, rows), expected, "sumsq")
    assert grouped_sumsq(g, []).shape == (0,)


def test_grouped_sumsq_many_slots(device):
    # More blocks than partial slots: each slot then loops over several blocks.
    n = 300 * 1024 + 5
    g = make((1, n), torch.bfloat16, device, seed=2)
    out = grouped_sumsq(g, [0])
    assert_close(out, sumsq_ref(g[0]).reshape(1), "sumsq")
    assert torch.equal(grouped_sumsq(g, [0]), out)


# shift_


@pytest.mark.parametrize("mode", ["perturb", "restore", "switch"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("n", SIZES)
def test_shift_matches_torch(n, dtype, mode, device):
    w = make(n, dtype, device, seed=10 + n)
    g = make((3, n), dtype, device, seed=20 + n)
    sums = grouped_sumsq(g, [0, 1])
    rho_a, rho_b = rho_for(n), 0.5 * rho_for(n)
    add = (0, sums[0], rho_a) if mode in ("perturb", "switch") else None
    sub = (1, sums[1], rho_b) if mode in ("restore", "switch") else None

    expected = w.float()
    if add is not None:
        expected = expected + scale_ref(sums[0], rho_a) * g[0].float()
    if sub is not None:
        expected = expected - scale_ref(sums[1], rho_b) * g[1].float()
    g_before = g.clone()
    assert shift_(w, g, add=add, sub=sub) is w
    assert_close(w, expected.to(dtype), f"w after {mode}")
    assert torch.equal(g, g_before)


def test_shift_zero_gradient_is_a_no_op(device):
    # An empty head or tail group has a zero gradient: no step, never NaN.
    w = make(97, torch.bfloat16, device, seed=3)
    g = torch.zeros((2, 97), dtype=torch.bfloat16, device=device)
    w_before = w.clone()
    sums = grouped_sumsq(g, [0, 1])
    shift_(w, g, add=(0, sums[0], 0.05), sub=(1, sums[1].reshape(1), 0.1))
    assert torch.equal(w, w_before)


# restore_sgd_


def _sgd_step_pair(n, dtype, device, hp, use_sub, use_extra, steps=2):
    """Run restore_sgd_ and (fp32 restore, torch.optim.SGD) side by side."""
    w = make(n, dtype, device, seed=30 + n)
    p = w.clone()
    has_momentum = hp["momentum"] != 0
    buf = torch.zeros_like(w) if has_momentum else None
    opt = torch.optim.SGD([p], **hp)
    grad_row, tail_row, head_row = 2, 1, 0
    for step in range(steps):
        # Gradients an order of magnitude below the weights, as in training.
        g = make((3, n), dtype, device, seed=40 + 7 * step + n, scale=0.1)
        sums = grouped_sumsq(g, [tail_row])
        rho = rho_for(n)
        sub = (tail_row, sums[0], rho) if use_sub else None
        extra = [head_row] if use_extra else []

        with torch.no_grad():
            # Both sides start each step from the kernel's state: in bf16 the
            # one-ulp differences of a step would otherwise carry over in
            # absolute terms to a smaller weight after the next restore.
            p.copy_(w)
            if has_momentum and step > 0:
                opt.state[p]["momentum_buffer"].copy_(buf)
            if use_sub:
                p_restored = p.float() - scale_ref(sums[0], rho) * g[tail_row].float()
                p.copy_(p_restored.to(dtype))
            grad = g[grad_row].float() + (g[head_row].float() if use_extra else 0.0)
            p.grad = grad.to(dtype)
        opt.step()

        restore_sgd_(w, g, grad_row, sub, extra, buf, first_step=step == 0, **hp)
        label = f"step {step}"
        assert_close(w, p, f"w, {label}")
        assert_close(g[grad_row], p.grad, f"summed gradient, {label}")
        if has_momentum:
            assert_close(buf, opt.state[p]["momentum_buffer"], f"momentum buffer, {label}")


@pytest.mark.parametrize("nesterov", [False, True], ids=["heavy_ball", "nesterov"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("n", SIZES)
def test_restore_sgd_matches_torch_sgd(n, dtype, nesterov, device):
    # torch.optim.SGD refuses nesterov with dampening, so dampening is tested
    # on the heavy-ball path.
    hp = dict(lr=0.05, momentum=0.9, dampening=0.0 if nesterov else 0.1, weight_decay=1e-3, nesterov=nesterov)
    _sgd_step_pair(n, dtype, device, hp, use_sub=True, use_extra=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_restore_sgd_plain_sgd_without_restore(dtype, device):
    hp = dict(lr=0.05, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False)
    _sgd_step_pair(4097, dtype, device, hp, use_sub=False, use_extra=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=dtype_id)
def test_restore_sgd_fused_equals_unfused(dtype, device):
    # The fused kernel rounds the restored w and the summed gradient where the
    # unfused sequence stores them, so the two agree bit for bit.  (bf16 is left
    # out: torch's bf16 add rounds to nearest even, the interpreter truncates.)
    n = 4097
    hp = dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-3, nesterov=False)
    w = make(n, dtype, device, seed=70)
    g = make((3, n), dtype, device, seed=71, scale=0.1)
    buf = make(n, dtype, device, seed=72, scale=0.1)
    w_unfused, g_unfused, buf_unfused = w.clone(), g.clone(), buf.clone()
    sums = grouped_sumsq(g, [1])
    sub = (1, sums[0], rho_for(n))

    restore_sgd_(w, g, 2, sub, [0], buf, first_step=False, **hp)
    shift_(w_unfused, g_unfused, sub=sub)
    g_unfused[2] += g_unfused[0]
    restore_sgd_(w_unfused, g_unfused, 2, None, [], buf_unfused, first_step=False, **hp)
    assert torch.equal(w, w_unfused)
    assert torch.equal(buf, buf_unfused)
    assert torch.equal(g, g_unfused)


def test_restore_sgd_only_touches_its_range(device):
    n, start, end = 4097, 1024, 3000
    w = make(n, torch.float32, device, seed=50)
    g = make((2, n), torch.float32, device, seed=51)
    buf = make(n, torch.float32, device, seed=52)
    w0, g0, buf0 = w.clone(), g.clone(), buf.clone()
    sums = grouped_sumsq(g, [1])
    restore_sgd_(
        w,
        g,
        0,
        (1, sums[0], 0.1),
        [1],
        buf,
        lr=0.1,
        momentum=0.9,
        dampening=0.0,
        weight_decay=1e-2,
        nesterov=True,
        first_step=False,
        start=start,
        end=end,
    )
    outside = torch.ones(n, dtype=torch.bool, device=device)
    outside[start:end] = False
    for name, after, before in (("w", w, w0), ("g[0]", g[0], g0[0]), ("buf", buf, buf0)):
        assert torch.equal(after[outside], before[outside]), f"{name} changed outside range"
        assert not torch.equal(after[start:end], before[start:end]), f"{name} not updated"
    assert torch.equal(g[1], g0[1])


# A bucket as the optimizer builds it


def _bucket_layout(sizes, dtype):
    """Offsets of 128-byte aligned segments, and the bucket length."""
    align = ALIGN_BYTES // torch.empty((), dtype=dtype).element_size()
    offsets, cursor = [], 0
    for size in sizes:
        offsets.append(cursor)
        cursor += -(-size // align) * align
    return offsets, cursor


def _pack(tensors, offsets, n, dtype, device):
    flat = torch.zeros(n, dtype=dtype, device=device)
    for t, off in zip(tensors, offsets):
        flat[off : off + t.numel()] = t
    return flat


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_many_tiny_tensors_plus_one_large(dtype, device):
    sizes = [1 + i % 7 for i in range(50)] + [4097]
    offsets, n = _bucket_layout(sizes, dtype)
    padding = torch.ones(n, dtype=torch.bool, device=device)
    for off, size in zip(offsets, sizes):
        padding[off : off + size] = False

    params = [make(s, dtype, device, seed=60 + i) for i, s in enumerate(sizes)]
    head = [make(s, dtype, device, seed=200 + i) for i, s in enumerate(sizes)]
    tail = [make(s, dtype, device, seed=400 + i) for i, s in enumerate(sizes)]
    acc = [make(s, dtype, device, seed=600 + i) for i, s in enumerate(sizes)]
    w = _pack(params, offsets, n, dtype, device)
    g = torch.stack([_pack(rows, offsets, n, dtype, device) for rows in (head, tail, acc)])

    sums = grouped_sumsq(g, [0, 1])
    assert_close(sums[0], torch.cat(head).float().pow(2).sum(), "head sumsq")
    assert_close(sums[1], torch.cat(tail).float().pow(2).sum(), "tail sumsq")

    # SSE-SAM stage 1: perturb head, switch to tail, then restore and update with
    # the last tensor in its own parameter group.
    rho_h, rho_t = 0.05, 0.1
    shift_(w, g, add=(0, sums[0], rho_h))
    assert not w[padding].any()
    shift_(w, g, add=(1, sums[1], rho_t), sub=(0, sums[0], rho_h))
    assert not w[padding].any()

    groups = [
        dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-3, nesterov=False),
        dict(lr=0.02, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=True),
    ]
    ranges = [(0, offsets[-1]), (offsets[-1], n)]
    buf = torch.zeros_like(w)
    for hp, (start, end) in zip(groups, ranges):
        restore_sgd_(w, g, 2, (1, sums[1], rho_t), [], buf, first_step=True, start=start, end=end, **hp)
    assert not w[padding].any()
    assert not buf[padding].any()

    # The same step from per-tensor torch ops: fp32 perturb and restore (the
    # published code's e = rho g / ||g||), then torch.optim.SGD.
    s_h, s_t = scale_ref(sums[0], rho_h), scale_ref(sums[1], rho_t)
    refs = [p.clone() for p in params]
    with torch.no_grad():
        for p, gh, gt, ga in zip(refs, head, tail, acc):
            moved = p.float() + s_h * gh.float()
            moved = moved.to(dtype).float() + s_t * gt.float() - s_h * gh.float()
            p.copy_((moved.to(dtype).float() - s_t * gt.float()).to(dtype))
            p.grad = ga.clone()
    opt = torch.optim.SGD([dict(params=refs[:-1], **groups[0]), dict(params=refs[-1:], **groups[1])])
    opt.step()
    assert_close(torch.cat([w[o : o + s] for o, s in zip(offsets, sizes)]), torch.cat(refs), "w")
    ref_buf = torch.cat([opt.state[p]["momentum_buffer"] for p in refs])
    assert_close(torch.cat([buf[o : o + s] for o, s in zip(offsets, sizes)]), ref_buf, "buf")


# Argument checks (no launch)


def test_bad_arguments_name_the_argument():
    w = torch.zeros(8)
    g = torch.zeros(2, 8)
    ok = torch.zeros((), dtype=torch.float32)
    with pytest.raises(ValueError, match="g must"):
        grouped_sumsq(torch.zeros(8), [0])
    with pytest.raises(ValueError, match="rows"):
        grouped_sumsq(g, [2])
    with pytest.raises(ValueError, match="g must be contiguous"):
        grouped_sumsq(torch.zeros(8, 2).t(), [0])
    with pytest.raises(ValueError, match="w must be contiguous"):
        shift_(torch.zeros(16)[::2], g, add=(0, ok, 0.1))
    with pytest.raises(ValueError, match="g must have w's dtype"):
        shift_(w, g.half(), add=(0, ok, 0.1))
    with pytest.raises(ValueError, match="sumsq must be float32"):
        shift_(w, g, add=(0, ok.double(), 0.1))
    with pytest.raises(ValueError, match="sub: row 5"):
        shift_(w, g, sub=(5, ok, 0.1))
    common = dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False, first_step=True)
    with pytest.raises(ValueError, match="momentum_buf"):
        restore_sgd_(w, g, 0, None, [], None, **common)
    with pytest.raises(ValueError, match="extra_rows"):
        restore_sgd_(w, g, 0, None, [0, 1], torch.zeros(8), **common)
    with pytest.raises(ValueError, match="start, end"):
        restore_sgd_(w, g, 0, None, [], torch.zeros(8), start=4, end=2, **common)
