"""What several test modules share, imported as ``tests.support``: the one
bitwise snapshot of a model and its optimizer, the batch of the step tests and
a poisoned backward."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

# the batch the step tests run on (passes, sync-free steps)
_G = torch.Generator().manual_seed(0)
X, Y = torch.randn(10, 6, generator=_G), torch.randint(0, 3, (10,), generator=_G)
TAIL = torch.tensor([True, False] * 5)


class PoisonGrad(torch.autograd.Function):
    """Identity forward; the backward makes the gradient of the ``bad`` samples NaN
    (where it is not zero: a group's backward leaves the other group's rows at 0)."""

    @staticmethod
    def forward(ctx, x, bad):
        ctx.bad = bad
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        poison = ctx.bad[:, None] & (g != 0).any(1, keepdim=True)
        return torch.where(poison, torch.full_like(g, float("nan")), g), None


def cloned(tree):
    """``tree`` (tensors in dicts, lists and tuples) with every tensor detached and
    cloned: what it holds now, whatever later writes into the originals."""
    if isinstance(tree, Tensor):
        return tree.detach().clone()
    if isinstance(tree, dict):
        return {k: cloned(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(cloned(v) for v in tree)
    return copy.deepcopy(tree)


def snapshot(model: nn.Module, opt=None) -> dict:
    """Everything a refused call or a skipped step must leave bit for bit as it
    was: the weights, every buffer (BatchNorm running mean, variance and count)
    and, with ``opt`` (a method of this library), its ``state_dict``: the base
    optimizer's state and param groups, the stage and any kept gradient sets.
    ``nonfinite_steps`` is left out: a skipped step counts itself, and the tests
    assert the count beside the snapshot."""
    snap = {
        "weights": cloned(list(model.parameters())),
        "buffers": cloned(dict(model.named_buffers())),
    }
    if opt is not None:
        sd = opt.state_dict()
        sd.pop("nonfinite_steps")
        for group in sd["param_groups"]:  # and the copy that rides in the first group (for DCP)
            group.get("sse_sam_fast", {}).pop("nonfinite_steps", None)
        snap.update(cloned(sd))
    return snap


_SAME_WIDTH = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: Tensor) -> Tensor:
    # an integer view of the same width: -0.0 differs from 0.0, a NaN equals
    # itself, and a count of differing elements is still a count of elements
    return t.detach().contiguous().view(_SAME_WIDTH[t.element_size()])


def assert_bitwise(actual, expected, where: str = "") -> None:
    """``actual`` is ``expected`` bit for bit (tensors in dicts, lists and tuples;
    anything else by ``==``); the message names the entry and counts the
    elements that differ."""
    if isinstance(expected, Tensor):
        assert isinstance(actual, Tensor), f"{where}: a {type(actual).__name__}, not a tensor"
        kind = lambda t: (t.dtype, tuple(t.shape), t.device)
        assert kind(actual) == kind(expected), f"{where}: {kind(actual)} != {kind(expected)}"
        differ = _bits(actual) != _bits(expected)
        if differ.any():
            first = tuple(int(i) for i in differ.nonzero()[0])
            n = int(differ.sum())
            raise AssertionError(f"{where}: {n} of {expected.numel()} elements differ, the first at {first}")
    elif isinstance(expected, dict):
        assert isinstance(actual, dict), f"{where}: a {type(actual).__name__}, not a dict"
        assert actual.keys() == expected.keys(), f"{where}: keys {list(actual)} != {list(expected)}"
        for k in expected:
            assert_bitwise(actual[k], expected[k], f"{where}[{k!r}]")
    elif isinstance(expected, (list, tuple)):
        assert isinstance(actual, (list, tuple)), f"{where}: a {type(actual).__name__}, not a sequence"
        assert len(actual) == len(expected), f"{where}: length {len(actual)} != {len(expected)}"
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_bitwise(a, e, f"{where}[{i}]")
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def tensors(tree) -> list[Tensor]:
    """The tensors of ``tree`` in order, for a comparison within tolerances."""
    if isinstance(tree, Tensor):
        return [tree]
    values = tree.values() if isinstance(tree, dict) else tree if isinstance(tree, (list, tuple)) else ()
    return [t for v in values for t in tensors(v)]


def spawn_bounded(fn, args: tuple, nprocs: int = 2, seconds: float = 300) -> None:
    """``torch.multiprocessing.spawn(fn, args, nprocs)``, failing the test instead of
    waiting forever when a process hangs (a rank left in a collective)."""
    import time

    import pytest
    import torch.multiprocessing as mp

    ctx = mp.spawn(fn, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + seconds
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"a process of {fn.__name__} still ran after {seconds} s")
