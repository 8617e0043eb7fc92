"""Head/tail bookkeeping."""

import pytest
import torch

from sse_sam_fast import tail_classes, tail_mask


def test_tail_classes_and_mask():
    assert tail_classes([500, 120, 30, 8], eta=100).tolist() == [2, 3]
    assert tail_classes([5, 5], eta=1).tolist() == []
    targets = torch.tensor([0, 3, 2, 1, 3])
    mask = tail_mask(targets, tail_classes([500, 120, 30, 8], 100))
    assert mask.tolist() == [False, True, True, False, True]
    with pytest.raises(ValueError, match="class_counts"):
        tail_classes([[1, 2]], 3)
    with pytest.raises(ValueError, match="class_counts"):
        tail_classes([1.5, 2.0], 3)
    with pytest.raises(TypeError, match="targets"):
        tail_mask(torch.tensor([0.0, 1.0]), [1])
