"""Saved: a bitwise copy of many tensors, restored or selected on the device."""

import torch

from sse_sam_fast._saved import Saved
from tests.support import assert_bitwise, cloned


def _tensors():
    g = torch.Generator().manual_seed(0)
    return [
        torch.randn(3, 4, generator=g),
        torch.tensor(-0.0),  # a sign bit a round trip through arithmetic would lose
        torch.tensor(7, dtype=torch.int64),  # num_batches_tracked, a 0-dim int
        torch.randn(5, generator=g).half(),
        torch.randn(4, 6, generator=g).t(),  # not contiguous: kept apart
    ]


def _scribble(ts):
    for t in ts:
        t.fill_(float("nan") if t.is_floating_point() else 99)


def test_restore_gives_back_every_bit():
    ts = _tensors()
    before = cloned(ts)
    saved = Saved(ts)
    _scribble(ts)
    saved.restore()
    assert_bitwise(ts, before)


def test_keep_if_selects_on_the_device():
    ts = _tensors()
    before = cloned(ts)
    saved = Saved(ts)
    _scribble(ts)
    saved.keep_if(torch.tensor(False))  # the NaNs do not leak into the kept values
    assert_bitwise(ts, before)

    saved.save(ts)
    for t in ts:  # new finite values, the non-contiguous tensor's too
        t.add_(3)
    kept = cloned(ts)
    saved.keep_if(torch.tensor(True))
    assert_bitwise(ts, kept)
    for t in ts:
        t.add_(5)
    saved.restore()  # what keep_if kept is the saved copy from then on
    assert_bitwise(ts, kept)


def test_one_saved_serves_many_steps_and_follows_new_tensors():
    ts = _tensors()
    saved = Saved(ts)
    for _ in range(3):  # the same tensors: the views and buffers of the first layout
        before = cloned(ts)
        saved.save(ts)
        _scribble(ts)
        saved.restore()
        assert_bitwise(ts, before)
        for t in ts:
            t.add_(1)
    assert saved.layouts == 1

    changes = [
        lambda: ts[2].__setattr__("data", torch.tensor(11, dtype=torch.int64)),  # same object, new memory
        lambda: ts.__setitem__(0, torch.randn(2, 2)),  # another tensor in the list
        lambda: ts.append(torch.ones(3)),  # one more
        lambda: ts.pop(1),  # one fewer
    ]
    for layouts, change in enumerate(changes, start=2):
        change()
        before = cloned(ts)
        saved.save(ts)
        assert saved.layouts == layouts
        _scribble(ts)
        saved.restore()
        assert_bitwise(ts, before)


def test_an_empty_saved_takes_nothing_back_then_follows_new_tensors():
    """The optimizer makes its Saved before there is anything to save (no
    BatchNorm layer, no optimizer state before the first step)."""
    saved = Saved()
    saved.restore()
    saved.keep_if(torch.tensor(False))
    assert saved.buffers() == [] and saved.layouts == 1
    ts = _tensors()
    before = cloned(ts)
    saved.save(ts)
    assert saved.layouts == 2 and len(saved.buffers()) == 4  # fp32, int64, fp16 flat; one apart
    _scribble(ts)
    saved.restore()
    assert_bitwise(ts, before)
