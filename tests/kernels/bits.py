"""Bit-for-bit comparison for the kernel tests."""

import torch

# Integer views for bit-for-bit comparisons (-0.0 vs 0.0, NaN payloads).
BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def assert_same_bits(actual, expected, name):
    """Bit-for-bit equality; report how many elements differ and the first one."""
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().cpu().reshape(-1)
    e = expected.detach().cpu().reshape(-1)
    differ = a.view(BITS[a.dtype]) != e.view(BITS[e.dtype])
    if differ.any():
        first = int(differ.nonzero()[0])
        raise AssertionError(
            f"{name} ({a.dtype}): {int(differ.sum())} of {a.numel()} elements differ in their bits "
            f"(first index {first}: actual {a[first].item()!r}, expected {e[first].item()!r})"
        )
