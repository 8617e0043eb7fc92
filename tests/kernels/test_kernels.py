"""Triton kernels (kernels/) against plain torch.

On CPU the kernels run under Triton's interpreter (conftest.py sets
TRITON_INTERPRET=1 before triton is first imported).  The ``cuda``
variants repeat every comparison on the GPU; run them with
``TRITON_INTERPRET=0 pytest -m cuda tests/kernels`` to test the compiled
kernels rather than the interpreter.  Comparisons use the "kernel" rows of the
one tolerance table, ``sse_sam_fast.verify.TOLERANCES``.
"""

import math

import pytest
import torch

from sse_sam_fast.verify import assert_close

pytest.importorskip("triton")

from sse_sam_fast.kernels import grouped_sumsq, perturb_, restore_sgd_  # noqa: E402

from tests.kernels.bits import BITS, assert_same_bits  # noqa: E402

SIZES = (0, 1, 7, 97, 4097, 98432)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

EPS = 1e-16  # added to the norm by the published code; a literal here, so the library constant is tested too
ALIGN_BYTES = 128


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
    assert_close(out, expected, "kernel", "sumsq")
    # Deterministic: fixed partial slots, no atomics.
    assert torch.equal(grouped_sumsq(g, rows), out)


def test_grouped_sumsq_any_rows(device):
    g = make((6, 300), torch.float32, device, seed=1)
    rows = [5, 1, 1, 0, 3, 2]  # repeats, unsorted, more than one launch's worth
    expected = torch.stack([sumsq_ref(g[r]) for r in rows])
    assert_close(grouped_sumsq(g, rows), expected, "kernel", "sumsq")
    assert grouped_sumsq(g, []).shape == (0,)


def test_grouped_sumsq_many_slots(device):
    # More blocks than partial slots: each slot then loops over several blocks.
    n = 300 * 1024 + 5
    g = make((1, n), torch.bfloat16, device, seed=2)
    out = grouped_sumsq(g, [0])
    assert_close(out, sumsq_ref(g[0]).reshape(1), "kernel", "sumsq")
    assert torch.equal(grouped_sumsq(g, [0]), out)


# perturb_


@pytest.mark.parametrize("save", [True, False], ids=["save", "from_w0"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("n", SIZES)
def test_perturb_matches_torch(n, dtype, save, device):
    w = make(n, dtype, device, seed=10 + n)
    # With save this is overwritten; without, it is the base and w is never read.
    w0 = make(n, dtype, device, seed=30 + n)
    g = make((3, n), dtype, device, seed=20 + n)
    sums = grouped_sumsq(g, [1])
    rho = rho_for(n)
    w_before, w0_before, g_before = w.clone(), w0.clone(), g.clone()

    assert perturb_(w, w0, g, (1, sums[0], rho), save) is w
    base = w_before if save else w0_before
    expected = base.float() + scale_ref(sums[0], rho) * g[1].float()
    assert_close(w, expected.to(dtype), "kernel", f"w, save={save}")
    assert_same_bits(w0, base, f"w0, save={save}")
    assert torch.equal(g, g_before)


def test_perturb_zero_gradient_is_a_no_op(device):
    # An empty head or tail group has a zero gradient: no step, never NaN.
    w = make(97, torch.bfloat16, device, seed=3)
    w0 = torch.empty_like(w)
    g = torch.zeros((2, 97), dtype=torch.bfloat16, device=device)
    w_before = w.clone()
    sums = grouped_sumsq(g, [0, 1])
    perturb_(w, w0, g, (0, sums[0], 0.05), save=True)
    assert_same_bits(w, w_before, "w after save")
    assert_same_bits(w0, w_before, "w0 after save")
    perturb_(w, w0, g, (1, sums[1].reshape(1), 0.1), save=False)
    assert_same_bits(w, w_before, "w after switch")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_perturb_then_copy_restores_bitwise(dtype, device):
    # The restore contract: the snapshot holds the stored bits, whatever they are.
    n = 4097
    info = torch.finfo(dtype)
    w = make(n, dtype, device, seed=80)
    w[:5] = torch.tensor([-0.0, info.tiny * info.eps, -info.tiny, info.max, -math.inf], dtype=dtype)
    # A NaN with a non-default payload.
    w.view(BITS[dtype])[5] = 0x7FC00001 if dtype == torch.float32 else 0x7E01
    g = make((2, n), dtype, device, seed=81)
    sums = grouped_sumsq(g, [1])
    w0 = torch.empty_like(w)
    w_before = w.clone()

    perturb_(w, w0, g, (1, sums[0], rho_for(n)), save=True)
    moved = w.view(BITS[dtype]) != w_before.view(BITS[dtype])
    assert int(moved.sum()) > n // 2, "the perturbation did not move w"
    w.copy_(w0)
    assert_same_bits(w, w_before, "w after perturb_ and w.copy_(w0)")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_perturb_switch_leaves_no_trace(dtype, device):
    # SSE-SAM's head -> tail switch: the second perturbation starts from w0, so
    # the result is exactly the tail perturbation of the unperturbed weights.
    n = 4097
    w = make(n, dtype, device, seed=90)
    g = make((2, n), dtype, device, seed=91)
    sums = grouped_sumsq(g, [0, 1])
    rho_h, rho_t = rho_for(n), 0.5 * rho_for(n)
    w_before = w.clone()
    w0 = torch.empty_like(w)

    perturb_(w, w0, g, (0, sums[0], rho_h), save=True)
    perturb_(w, w0, g, (1, sums[1], rho_t), save=False)
    direct, direct_w0 = w_before.clone(), torch.empty_like(w)
    perturb_(direct, direct_w0, g, (1, sums[1], rho_t), save=True)
    assert_same_bits(w, direct, "w after switch vs w0 + s_t g_t")
    assert_same_bits(w0, w_before, "w0 after switch")
    expected = w_before.float() + scale_ref(sums[1], rho_t) * g[1].float()
    assert_close(w, expected.to(dtype), "kernel", "w after switch")


# restore_sgd_


def _sgd_step_pair(n, dtype, device, hp, use_w0, use_extra, steps=2):
    """Run perturb_ + restore_sgd_ and (w.copy_(w0), torch.optim.SGD) side by side."""
    w = make(n, dtype, device, seed=30 + n)
    w0 = torch.empty_like(w)
    p = w.clone()
    has_momentum = hp["momentum"] != 0
    buf = torch.zeros_like(w) if has_momentum else None
    opt = torch.optim.SGD([p], **hp)
    grad_row, tail_row, head_row = 2, 1, 0
    extra = [head_row] if use_extra else []
    for step in range(steps):
        # Gradients an order of magnitude below the weights, as in training.
        g = make((3, n), dtype, device, seed=40 + 7 * step + n, scale=0.1)
        if use_w0:
            sums = grouped_sumsq(g, [tail_row])
            perturb_(w, w0, g, (tail_row, sums[0], rho_for(n)), save=True)

        with torch.no_grad():
            # Both sides start each step from the kernel's state: in bf16 the
            # one-ulp differences of a step would otherwise carry over.
            p.copy_(w0 if use_w0 else w)
            if has_momentum and step > 0:
                opt.state[p]["momentum_buffer"].copy_(buf)
            grad = g[grad_row].float() + (g[head_row].float() if use_extra else 0.0)
            p.grad = grad.to(dtype)
        opt.step()

        g_before = g.clone()
        restore_sgd_(w, g, grad_row, w0 if use_w0 else None, extra, buf, first_step=step == 0, **hp)
        label = f"step {step}"
        assert_close(w, p, "kernel", f"w, {label}")
        assert torch.equal(g, g_before), f"g changed, {label}"
        if has_momentum:
            assert_close(buf, opt.state[p]["momentum_buffer"], "kernel", f"momentum buffer, {label}")


@pytest.mark.parametrize("nesterov", [False, True], ids=["heavy_ball", "nesterov"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("n", SIZES)
def test_restore_sgd_matches_torch_sgd(n, dtype, nesterov, device):
    # torch.optim.SGD refuses nesterov with dampening, so dampening is tested
    # on the heavy-ball path.
    hp = dict(lr=0.05, momentum=0.9, dampening=0.0 if nesterov else 0.1, weight_decay=1e-3, nesterov=nesterov)
    _sgd_step_pair(n, dtype, device, hp, use_w0=True, use_extra=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_restore_sgd_plain_sgd_without_restore(dtype, device):
    hp = dict(lr=0.05, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False)
    _sgd_step_pair(4097, dtype, device, hp, use_w0=False, use_extra=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=dtype_id)
def test_restore_sgd_fused_equals_unfused(dtype, device):
    # The fused kernel rounds the summed gradient where the unfused sequence
    # stores it, so the two agree bit for bit.  (bf16 is left out: torch's bf16
    # add rounds to nearest even, the interpreter truncates.)
    n = 4097
    hp = dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-3, nesterov=False)
    w = make(n, dtype, device, seed=69)  # the perturbed weights, never read
    w0 = make(n, dtype, device, seed=70)
    g = make((3, n), dtype, device, seed=71, scale=0.1)
    buf = make(n, dtype, device, seed=72, scale=0.1)
    w_unfused, g_unfused, buf_unfused = w.clone(), g.clone(), buf.clone()
    g_before, w0_before = g.clone(), w0.clone()

    restore_sgd_(w, g, 2, w0, [0], buf, first_step=False, **hp)
    w_unfused.copy_(w0)
    g_unfused[2] += g_unfused[0]
    restore_sgd_(w_unfused, g_unfused, 2, None, [], buf_unfused, first_step=False, **hp)
    assert_same_bits(w, w_unfused, "w")
    assert_same_bits(buf, buf_unfused, "buf")
    assert torch.equal(g, g_before), "the fused kernel wrote g"
    assert torch.equal(w0, w0_before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("use_w0", [True, False], ids=["from_w0", "in_place"])
def test_restore_sgd_guarded_by_ok(dtype, use_w0, device):
    """ok=True is the unguarded step bit for bit; ok=False leaves w restored and
    the momentum buffer's bits as they were, NaN gradients included."""
    n = 4097
    hp = dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-3, nesterov=False)
    w0 = make(n, dtype, device, seed=80) if use_w0 else None
    g = make((2, n), dtype, device, seed=81, scale=0.1)
    buf = make(n, dtype, device, seed=82, scale=0.1)
    w = make(n, dtype, device, seed=83)
    runs = {}
    for name, ok in (("none", None), ("true", True), ("false", False)):
        wk, bk = w.clone(), buf.clone()
        flag = None if ok is None else torch.tensor(ok, device=device)
        gk = g.clone()
        if ok is False:
            gk[0, ::7] = float("nan")  # what a failed step leaves behind
        restore_sgd_(wk, gk, 0, w0, [1], bk, first_step=False, ok=flag, **hp)
        runs[name] = wk, bk
    assert_same_bits(runs["true"][0], runs["none"][0], "w, ok=True")
    assert_same_bits(runs["true"][1], runs["none"][1], "buf, ok=True")
    assert_same_bits(runs["false"][0], w0 if use_w0 else w, "w, ok=False")
    assert_same_bits(runs["false"][1], buf, "buf, ok=False")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=dtype_id)
def test_restore_sgd_reads_hyperparameters_from_memory(dtype, device):
    """With ``hyper`` the kernel uses the values in memory, not its float arguments
    (what a CUDA graph replayed after an LR scheduler step needs)."""
    n = 4097
    hp = dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-3, nesterov=False)
    g = make((2, n), dtype, device, seed=91, scale=0.1)
    w, buf = make(n, dtype, device, seed=92), make(n, dtype, device, seed=93, scale=0.1)
    expected_w, expected_buf = w.clone(), buf.clone()
    restore_sgd_(expected_w, g, 0, None, [1], expected_buf, first_step=False, **hp)
    stale = dict(hp, lr=1.0, momentum=0.5, dampening=0.0, weight_decay=0.5)  # what the graph was built with
    hyper = torch.tensor([0.05, 0.9, 0.1, 1e-3], dtype=torch.float32, device=device)
    restore_sgd_(w, g, 0, None, [1], buf, first_step=False, hyper=hyper, **stale)
    assert_same_bits(w, expected_w, "w")
    assert_same_bits(buf, expected_buf, "buf")


def test_restore_sgd_checks_ok():
    w, g, buf = torch.zeros(8), torch.zeros(2, 8), torch.zeros(8)
    with pytest.raises(ValueError, match="ok must be a one-element bool"):
        restore_sgd_(w, g, 0, None, [], buf, 0.1, 0.9, 0.0, 0.0, False, False, ok=torch.tensor(1.0))


def test_restore_sgd_only_touches_its_range(device):
    n, start, end = 4097, 1024, 3000
    w = make(n, torch.float32, device, seed=50)
    w0 = make(n, torch.float32, device, seed=53)
    g = make((2, n), torch.float32, device, seed=51)
    buf = make(n, torch.float32, device, seed=52)
    w_before, w0_before, g_before, buf_before = w.clone(), w0.clone(), g.clone(), buf.clone()
    restore_sgd_(
        w,
        g,
        0,
        w0,
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
    for name, after, before in (("w", w, w_before), ("buf", buf, buf_before)):
        assert torch.equal(after[outside], before[outside]), f"{name} changed outside range"
        assert not torch.equal(after[start:end], before[start:end]), f"{name} not updated"
    assert torch.equal(g, g_before)
    assert torch.equal(w0, w0_before)


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
    w0 = torch.full_like(w, math.nan)  # every element, padding included, must be saved
    g = torch.stack([_pack(rows, offsets, n, dtype, device) for rows in (head, tail, acc)])

    def segments(flat):
        return torch.cat([flat[o : o + s] for o, s in zip(offsets, sizes)])

    sums = grouped_sumsq(g, [0, 1])
    assert_close(sums[0], torch.cat(head).float().pow(2).sum(), "kernel", "head sumsq")
    assert_close(sums[1], torch.cat(tail).float().pow(2).sum(), "kernel", "tail sumsq")

    # SSE-SAM stage 1: perturb head, switch to tail, then restore and update with
    # the last tensor in its own parameter group.
    rho_h, rho_t = 0.05, 0.1
    s_h, s_t = scale_ref(sums[0], rho_h), scale_ref(sums[1], rho_t)
    perturb_(w, w0, g, (0, sums[0], rho_h), save=True)
    assert not w[padding].any()
    assert_same_bits(w0, _pack(params, offsets, n, dtype, device), "w0")
    at_head = [(p.float() + s_h * gh.float()).to(dtype) for p, gh in zip(params, head)]
    assert_close(segments(w), torch.cat(at_head), "kernel", "w at the head perturbation")
    perturb_(w, w0, g, (1, sums[1], rho_t), save=False)
    assert not w[padding].any()
    at_tail = [(p.float() + s_t * gt.float()).to(dtype) for p, gt in zip(params, tail)]
    assert_close(segments(w), torch.cat(at_tail), "kernel", "w at the tail perturbation")

    groups = [
        dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-3, nesterov=False),
        dict(lr=0.02, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=True),
    ]
    ranges = [(0, offsets[-1]), (offsets[-1], n)]
    buf = torch.zeros_like(w)
    for hp, (start, end) in zip(groups, ranges):
        restore_sgd_(w, g, 2, w0, [], buf, first_step=True, start=start, end=end, **hp)
    assert not w[padding].any()
    assert not buf[padding].any()

    # The same step from per-tensor torch ops: the restore is exact, so the
    # reference is torch.optim.SGD on the original parameters.
    refs = [p.clone() for p in params]
    for p, ga in zip(refs, acc):
        p.grad = ga.clone()
    opt = torch.optim.SGD([dict(params=refs[:-1], **groups[0]), dict(params=refs[-1:], **groups[1])])
    opt.step()
    assert_close(segments(w), torch.cat(refs), "kernel", "w")
    ref_buf = torch.cat([opt.state[p]["momentum_buffer"] for p in refs])
    assert_close(segments(buf), ref_buf, "kernel", "buf")


# Argument checks (no launch)


def test_bad_arguments_name_the_argument():
    w = torch.zeros(8)
    w0 = torch.zeros(8)
    g = torch.zeros(2, 8)
    ok = torch.zeros((), dtype=torch.float32)
    add = (0, ok, 0.1)
    with pytest.raises(ValueError, match="g must"):
        grouped_sumsq(torch.zeros(8), [0])
    with pytest.raises(ValueError, match="rows"):
        grouped_sumsq(g, [2])
    with pytest.raises(ValueError, match="g must be contiguous"):
        grouped_sumsq(torch.zeros(8, 2).t(), [0])
    with pytest.raises(ValueError, match="w must be contiguous"):
        perturb_(torch.zeros(16)[::2], w0, g, add, True)
    with pytest.raises(ValueError, match="g must have w's dtype"):
        perturb_(w, w0, g.half(), add, True)
    with pytest.raises(ValueError, match="sumsq must be float32"):
        perturb_(w, w0, g, (0, ok.double(), 0.1), True)
    with pytest.raises(ValueError, match="add: row 5"):
        perturb_(w, w0, g, (5, ok, 0.1), False)
    with pytest.raises(ValueError, match="add must be a tuple"):
        perturb_(w, w0, g, None, True)
    with pytest.raises(ValueError, match="save must be a bool"):
        perturb_(w, w0, g, add, 1)
    with pytest.raises(ValueError, match="w0 must be a tensor of shape"):
        perturb_(w, torch.zeros(9), g, add, True)
    with pytest.raises(ValueError, match="w0 must have w's dtype"):
        perturb_(w, w0.half(), g, add, True)
    with pytest.raises(ValueError, match="w0 must be on w's device"):
        perturb_(w, torch.zeros(8, device="meta"), g, add, True)
    with pytest.raises(ValueError, match="w0 must be contiguous"):
        perturb_(w, torch.zeros(16)[::2], g, add, True)
    with pytest.raises(ValueError, match="w0 must not share memory with w"):
        perturb_(w, w, g, add, True)
    storage = torch.zeros(12)
    with pytest.raises(ValueError, match="w0 must not share memory with w"):
        perturb_(storage[:8], storage[4:], g, add, False)
    with pytest.raises(ValueError, match="w0 must not share memory with g"):
        perturb_(w, g[1], g, add, True)
    common = dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False, first_step=True)
    with pytest.raises(ValueError, match="momentum_buf"):
        restore_sgd_(w, g, 0, None, [], None, **common)
    with pytest.raises(ValueError, match="extra_rows"):
        restore_sgd_(w, g, 0, None, [0, 1], torch.zeros(8), **common)
    with pytest.raises(ValueError, match="start, end"):
        restore_sgd_(w, g, 0, None, [], torch.zeros(8), start=4, end=2, **common)
    with pytest.raises(ValueError, match="w0 must have w's dtype"):
        restore_sgd_(w, g, 0, w0.half(), [], torch.zeros(8), **common)
    with pytest.raises(ValueError, match="w0 must not share memory with w"):
        restore_sgd_(w, g, 0, w, [], torch.zeros(8), **common)
