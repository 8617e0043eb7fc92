"""The one tolerance table and the one comparison (sse_sam_fast.verify)."""

import torch

from sse_sam_fast.verify import TOLERANCES, compare, tolerance_key


def test_counts_and_locates_what_differs():
    expected = torch.zeros(3, 4)
    actual = expected.clone()
    actual[1, 2], actual[2, 0] = 1e-3, -2e-3
    d = compare(actual, expected)
    assert not d.ok and d.n_bad == 2 and d.numel == 12
    assert "index (2, 0)" in str(d) and "2/12 differ" in str(d)  # the worst of the two
    d = compare([expected, actual], [expected, expected])
    assert d.n_bad == 2 and "tensor 1 index (2, 0)" in str(d)
    assert compare([actual], [actual]).ok


def test_nan_and_inf_fail_and_are_reported_apart():
    x = torch.ones(5)
    x[3] = float("nan")
    d = compare(x, x.clone())  # even where both agree: a NaN parameter is a failure
    assert not d.ok and d.n_bad == 0 and "NaN: 1 actual, 1 expected" in d.nonfinite
    y = torch.ones(5)
    y[0] = float("inf")
    d = compare(torch.ones(5), y)
    assert not d.ok and "+inf: 0 actual, 1 expected, 1 at different places" in d.nonfinite


def test_keys_pick_their_rows():
    e = torch.zeros(4)
    a = torch.full((4,), 5e-6)  # inside the kernel row's atol, outside the step row's
    assert compare(a, e, "kernel").ok
    assert compare(a, e, ("kernel", torch.float32)).ok
    assert not compare(a, e).ok and not compare(a, e, torch.float32).ok
    assert "('step', torch.float32)" in str(compare(a, e))
    assert tolerance_key(torch.float32, "triton") == ("step", torch.float32)
    assert all(atol >= 0 and rtol >= 0 for atol, rtol in TOLERANCES.values())
