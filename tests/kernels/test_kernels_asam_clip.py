"""The ASAM norm and perturbation, element ranges and fused gradient clipping
(kernels/, issue 12) against plain torch formulas.

On CPU the kernels run under Triton's interpreter (conftest.py sets
TRITON_INTERPRET=1 before triton is first imported).  The sizes are odd so the
last block of every launch is partial.  The interpreter converts fp32 to bf16 by
truncation where torch rounds to nearest even, so bit-for-bit comparisons of
rounded sums are made in fp32 and fp16 only; bf16 is compared with the "kernel"
tolerance of ``sse_sam_fast.verify.TOLERANCES``.
"""

import pytest
import torch

from sse_sam_fast.verify import assert_close

pytest.importorskip("triton")

from sse_sam_fast.kernels import grouped_sumsq, perturb_, restore_sgd_  # noqa: E402

from tests.kernels.bits import assert_same_bits  # noqa: E402

EPS = 1e-16
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SIZES = (1000, 3000)
# (start, end) as fractions are awkward: explicit ranges per size, None = N.
# Empty at the start and at the end, ending mid-block, block-aligned, a tail.
RANGES = ((0, 0), (None, None), (5, 1500), (1024, 2048), (999, None), (0, 1))


def dtype_id(dtype):
    return str(dtype).replace("torch.", "")


def make(shape, dtype, device, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=gen)).to(dtype=dtype, device=device)


def assert_same_sum(actual, expected, name):
    """Two norms of the same elements: bit for bit through the interpreter, which
    has one order of summation; compiled, Triton picks the reduction layout from
    the pointers' alignment and the sizes' divisibility, so calls that differ in
    those may sum in another order (fp32, a few ulps)."""
    if actual.device.type == "cpu":
        assert torch.equal(actual, expected), name
    else:
        torch.testing.assert_close(actual, expected, rtol=3e-6, atol=0, msg=name)


def bounds(rng, n):
    """A RANGES entry for size n: (start, end) with None meaning N, clipped to n."""
    start, end = rng
    start = n if start is None else min(start, n)
    end = n if end is None else min(end, n)
    return start, max(start, end)


# grouped_sumsq: w, plus, ranges


def sumsq_ref(g, row, w=None, plus=None, start=0, end=None):
    x = g[row] if plus is None else g[row] + g[plus]  # torch's add, rounded to g's dtype
    x = x.float()
    if w is not None:
        x = x * w.float()
    return x[start:end].pow(2).sum()


@pytest.mark.parametrize("rng", RANGES, ids=str)
@pytest.mark.parametrize("use_w", [False, True], ids=["", "w"])
@pytest.mark.parametrize("use_plus", [False, True], ids=["", "plus"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("n", SIZES)
def test_grouped_sumsq_weighted_summed_ranged(n, dtype, use_plus, use_w, rng, device):
    g = make((4, n), dtype, device, seed=n)
    w = make(n, dtype, device, seed=n + 1) if use_w else None
    plus = 3 if use_plus else None
    start, end = bounds(rng, n)
    rows = [2, 0, 2, 1, 0]  # repeats, more than one launch's worth
    g_before = g.clone()

    out = grouped_sumsq(g, rows, w=w, plus=plus, start=start, end=end)
    assert out.dtype == torch.float32 and out.shape == (len(rows),) and out.device == g.device
    expected = torch.stack([sumsq_ref(g, r, w, plus, start, end) for r in rows])
    # fp32 sums; only the interpreter's truncated bf16 sum g[r] + g[plus] needs
    # the bf16 row (a bias of up to one ulp per element)
    key = ("kernel", dtype if use_plus and dtype == torch.bfloat16 else torch.float32)
    assert_close(out, expected, key, "sumsq")
    assert torch.equal(g, g_before), "grouped_sumsq wrote g"
    # Deterministic, and the range is the same slot scheme as a copy of the range.
    assert torch.equal(grouped_sumsq(g, rows, w=w, plus=plus, start=start, end=end), out)
    sliced_w = None if w is None else w[start:end].contiguous()
    sliced = grouped_sumsq(g[:, start:end].contiguous(), rows, w=sliced_w, plus=plus)
    assert_same_sum(out, sliced, "a range differs from the same elements copied out")
    if start == end:
        assert not out.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=dtype_id)
def test_grouped_sumsq_plus_and_w_round_as_torch(dtype, device):
    """Bit for bit: with ``plus`` the norm of the sum torch's ``a + b`` stores
    (round-to-nearest-even), with ``w`` of the fp32 product (exact for fp16
    operands, rounded as torch's in fp32)."""
    n, start, end = 3000, 7, 2900
    g = make((3, n), dtype, device, seed=5)
    w = make(n, dtype, device, seed=6)
    summed = torch.stack([g[0] + g[1], g[2] + g[1]])
    weighted = summed.float() * w.float()
    cases = (
        (dict(plus=1), summed),
        (dict(plus=1, w=w), weighted),
        (dict(w=w), torch.stack([g[0].float() * w.float(), g[2].float() * w.float()])),
    )
    for kw, stored in cases:
        for s, e in ((0, n), (start, end)):
            got = grouped_sumsq(g, [0, 2], start=s, end=e, **kw)
            assert_same_sum(got, grouped_sumsq(stored, [0, 1], start=s, end=e), f"{sorted(kw)} {s} {e}")


def test_grouped_sumsq_defaults_are_the_plain_norm(device):
    g = make((3, 3000), torch.bfloat16, device, seed=8)
    plain = grouped_sumsq(g, [1, 2])
    assert torch.equal(grouped_sumsq(g, [1, 2], w=None, plus=None, start=0, end=3000), plain)
    assert_same_sum(grouped_sumsq(g, [1, 2], w=torch.ones_like(g[0])), plain, "w = 1")
    assert grouped_sumsq(g, [], w=g[0], plus=1).shape == (0,)


# perturb_: adaptive and ranges


@pytest.mark.parametrize("save", [True, False], ids=["save", "from_w0"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("n", SIZES)
def test_perturb_adaptive_matches_asam(n, dtype, save, device):
    w = make(n, dtype, device, seed=10 + n)
    w0 = make(n, dtype, device, seed=30 + n)
    g = make((3, n), dtype, device, seed=20 + n)
    base = (w if save else w0).clone()
    sums = grouped_sumsq(g, [1], w=base)
    rho = 0.05
    w_before, g_before = w.clone(), g.clone()

    assert perturb_(w, w0, g, (1, sums[0], rho), save, adaptive=True) is w
    t, gr = base.float(), g[1].float()
    # e = rho * T^2 g / ||T g||, T = |w unperturbed|
    expected = t + rho * t.pow(2) * gr / ((t * gr).pow(2).sum().sqrt() + EPS)
    assert_close(w, expected.to(dtype), "kernel", f"w, save={save}")
    assert_same_bits(w0, base, f"w0, save={save}")
    assert torch.equal(g, g_before)
    # The same move spelled as the kernel's formula, s * base^2 * g.
    s = rho / (sums[0].sqrt() + EPS)
    assert_close(w, (t + s * t.pow(2) * gr).to(dtype), "kernel", "w, s * base^2 * g")
    if not save:
        assert not torch.equal(w, w_before)


@pytest.mark.parametrize("rng", RANGES, ids=str)
@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
@pytest.mark.parametrize("save", [True, False], ids=["save", "from_w0"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_perturb_range_touches_only_its_elements(dtype, save, adaptive, rng, device):
    n = 3000
    start, end = bounds(rng, n)
    w = make(n, dtype, device, seed=40)
    w0 = make(n, dtype, device, seed=41)
    g = make((2, n), dtype, device, seed=42)
    base = w if save else w0
    sums = grouped_sumsq(g, [1], w=base if adaptive else None, start=start, end=end)
    w_before, w0_before = w.clone(), w0.clone()

    perturb_(w, w0, g, (1, sums[0], 0.05), save, adaptive=adaptive, start=start, end=end)
    outside = torch.ones(n, dtype=torch.bool, device=device)
    outside[start:end] = False
    assert_same_bits(w[outside], w_before[outside], "w outside the range")
    assert_same_bits(w0[outside], w0_before[outside], "w0 outside the range")
    # Inside: bit for bit what the whole-buffer call does on a copy of the range.
    cw, cw0 = w_before[start:end].clone(), w0_before[start:end].clone()
    perturb_(cw, cw0, g[:, start:end].contiguous(), (1, sums[0], 0.05), save, adaptive=adaptive)
    assert_same_bits(w[start:end], cw, "w inside the range")
    assert_same_bits(w0[start:end], cw0, "w0 inside the range")
    if end - start > 1:
        assert not torch.equal(w[start:end], w_before[start:end]), "the range did not move"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=dtype_id)
def test_perturb_defaults_are_the_plain_move(dtype, device):
    n = 1000
    g = make((2, n), dtype, device, seed=50)
    sums = grouped_sumsq(g, [0])
    w = make(n, dtype, device, seed=51)
    a, a0, b, b0 = w.clone(), torch.empty_like(w), w.clone(), torch.empty_like(w)
    perturb_(a, a0, g, (0, sums[0], 0.1), True)
    perturb_(b, b0, g, (0, sums[0], 0.1), True, True, adaptive=False, start=0, end=n)
    assert_same_bits(b, a, "w")
    assert_same_bits(b0, a0, "w0")


# restore_sgd_: clip

HPS = {
    "heavy_ball": dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-3, nesterov=False),
    "nesterov": dict(lr=0.05, momentum=0.9, dampening=0.0, weight_decay=1e-3, nesterov=True),
    "plain": dict(lr=0.05, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False),
    "decay_only": dict(lr=0.05, momentum=0.0, dampening=0.0, weight_decay=1e-2, nesterov=False),
}


def _assert_step_close(actual, expected, name):
    if actual.dtype == torch.float32:
        torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-6, msg=name)
    else:
        assert_close(actual, expected, "kernel", name)


@pytest.mark.parametrize("use_extra", [True, False], ids=["extra", "no_extra"])
@pytest.mark.parametrize("hp_name", list(HPS))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_restore_sgd_clip_matches_torch(dtype, hp_name, use_extra, device):
    """w.copy_(w0); p.grad = g_row (+ extra); p.grad.mul_(coef); SGD.step(), two steps."""
    hp, n = HPS[hp_name], 3000
    has_momentum = hp["momentum"] != 0
    w = make(n, dtype, device, seed=60)
    w0 = make(n, dtype, device, seed=61)
    buf = torch.zeros_like(w) if has_momentum else None
    p = w0.clone()
    opt = torch.optim.SGD([p], **hp)
    extra = [0] if use_extra else []
    for step, coef in enumerate((0.37, 0.81)):
        g = make((3, n), dtype, device, seed=62 + step, scale=0.1)
        clip = torch.tensor([coef], dtype=torch.float32, device=device)
        with torch.no_grad():
            p.copy_(w0)  # the restore; later steps start from the kernel's momentum
            if has_momentum and step > 0:
                opt.state[p]["momentum_buffer"].copy_(buf)
            p.grad = g[2] + g[0] if use_extra else g[2].clone()
            p.grad.mul_(clip)
        opt.step()
        restore_sgd_(w, g, 2, w0, extra, buf, first_step=step == 0, clip=clip, **hp)
        _assert_step_close(w, p, f"w, step {step}")
        if has_momentum:
            _assert_step_close(buf, opt.state[p]["momentum_buffer"], f"buf, step {step}")
        w0 = make(n, dtype, device, seed=70 + step)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=dtype_id)
def test_restore_sgd_clip_is_the_stored_product(dtype, device):
    """Bit for bit: clip=None is the old step, clip=1 changes nothing, and clip
    equals the unclipped kernel on the gradient torch's mul_ stores (0-dim or
    one-element coefficient, with a range, ok and hyper)."""
    n, start, end = 3000, 5, 2900
    hp = HPS["heavy_ball"]
    g = make((3, n), dtype, device, seed=80, scale=0.1)
    w, w0, buf = (make(n, dtype, device, seed=seed) for seed in (81, 82, 83))

    def run(gk, extra, **kw):
        wk, bk = w.clone(), buf.clone()
        restore_sgd_(wk, gk, 2, w0, extra, bk, first_step=False, start=start, end=end, **hp, **kw)
        return wk, bk

    plain = run(g, [0])
    for name, kw in (("clip=None", dict(clip=None)), ("clip=1", dict(clip=torch.ones(1, device=device)))):
        for got, want, what in zip(run(g, [0], **kw), plain, ("w", "buf")):
            assert_same_bits(got, want, f"{what}, {name}")
    hyper = torch.tensor([hp["lr"], hp["momentum"], hp["dampening"], hp["weight_decay"]], device=device)
    flag = torch.tensor(True, device=device)
    for coef in (torch.tensor(0.37, device=device), torch.tensor([0.37], device=device)):
        clipped = g.clone()
        # the fp32 factor, one rounding of the product (a 0-dim CUDA factor would be
        # rounded to the gradient's dtype first by mul_: the library multiplies by
        # a one-element tensor, and so does this reference)
        clipped[2] = (g[2] + g[0]).mul_(coef.reshape(1))
        want = run(clipped, [])
        for kw in (dict(), dict(ok=flag), dict(hyper=hyper), dict(ok=flag, hyper=hyper)):
            for got, ref, what in zip(run(g, [0], clip=coef, **kw), want, ("w", "buf")):
                assert_same_bits(got, ref, f"{what}, clip {tuple(coef.shape)}, {sorted(kw)}")
    # Read from memory, as a replayed CUDA graph needs: a new value in the same tensor.
    coef = torch.tensor([0.37], device=device)
    first = run(g, [0], clip=coef)
    coef.fill_(0.5)
    assert not torch.equal(run(g, [0], clip=coef)[0], first[0])
    # ok=False still leaves the restored weights and the old buffer.
    wk, bk = run(g, [0], clip=coef, ok=torch.tensor(False, device=device))
    assert_same_bits(wk[start:end], w0[start:end], "w, ok=False")
    assert_same_bits(bk, buf, "buf, ok=False")
    assert_same_bits(wk[:start], w[:start], "w before the range")


# Argument checks (no launch)


def test_bad_new_arguments_name_the_argument():
    w, w0, g = torch.zeros(8), torch.zeros(8), torch.zeros(2, 8)
    add = (0, torch.zeros(()), 0.1)
    sumsq_cases = [
        (dict(w=torch.zeros(7)), "w must be a tensor of shape"),
        (dict(w=torch.zeros(2, 8)), "w must be a tensor of shape"),
        (dict(w=torch.zeros(8).half()), "w must have g's dtype"),
        (dict(w=torch.zeros(8, device="meta")), "w must be on g's device"),
        (dict(w=torch.zeros(16)[::2]), "w must be contiguous"),
        (dict(w=[0.0] * 8), "w must be a tensor of shape"),
        (dict(plus=2), "plus: row 2 out of range"),
        (dict(plus=-1), "plus: row -1 out of range"),
        (dict(plus=True), "plus: row must be an int"),
        (dict(plus=1.0), "plus: row must be an int"),
        (dict(start=4, end=2), "start, end"),
        (dict(start=-1), "start, end"),
        (dict(end=9), "start, end"),
        (dict(start=1.0), "start, end"),
    ]
    for kw, match in sumsq_cases:
        with pytest.raises(ValueError, match=match):
            grouped_sumsq(g, [0], **kw)
    for bad in (1, 0, None, "yes", torch.tensor(True)):
        with pytest.raises(ValueError, match="adaptive must be a bool"):
            perturb_(w, w0, g, add, True, adaptive=bad)
    for start, end in ((3, 2), (0, 9), (-1, 4), (0, 2.0)):
        with pytest.raises(ValueError, match="start, end"):
            perturb_(w, w0, g, add, True, start=start, end=end)
    common = dict(lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, first_step=True)
    for clip, match in (
        (torch.ones(1, dtype=torch.float64), "clip must be a one-element float32"),
        (torch.ones(2), "clip must be a one-element float32"),
        (torch.ones(1).half(), "clip must be a one-element float32"),
        (0.5, "clip must be a one-element float32"),
        (torch.ones(1, device="meta"), "clip must be on w's device"),
    ):
        with pytest.raises(ValueError, match=match):
            restore_sgd_(w, g, 0, None, [], None, **common, clip=clip)
