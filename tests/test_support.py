"""The suite's one bitwise check must itself be able to fail."""

import pytest
import torch

from tests.support import assert_bitwise, cloned


def test_assert_bitwise_sees_a_sign_bit_and_counts_what_differs():
    a = {"w": [torch.zeros(3), torch.tensor(float("nan"))], "n": 2}
    assert_bitwise(cloned(a), a)  # NaN is its own bits
    b = cloned(a)
    b["w"][0][1:] = -0.0  # equal as numbers, not as bits
    with pytest.raises(AssertionError, match=r"\['w'\]\[0\]: 2 of 3 elements differ, the first at \(1,\)"):
        assert_bitwise(b, a)
    with pytest.raises(AssertionError, match=r"\['n'\]: 3 != 2"):
        assert_bitwise({**a, "n": 3}, a)
    with pytest.raises(AssertionError, match="float16"):
        assert_bitwise({**a, "w": [torch.zeros(3).half(), a["w"][1]]}, a)
