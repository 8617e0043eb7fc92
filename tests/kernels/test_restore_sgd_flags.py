"""restore_sgd_ under every combination of its code paths.

The kernel's flags (snapshot, extra row, weight decay, momentum, first step,
nesterov, the ``ok`` guard, hyperparameters in memory, clipping) are
``tl.constexpr``: each combination is its own program, and one that does not
compile (a name defined only on another branch) fails only when it is first
launched, on a GPU inside a captured step if that is where it first runs.
Every combination runs here through the interpreter against the update written
out in torch, in fp32 (the storage-dtype roundings are tested in test_kernels).
"""

import itertools

import pytest
import torch

pytest.importorskip("triton")

from sse_sam_fast.kernels import restore_sgd_  # noqa: E402

from sse_sam_fast.verify import assert_close  # noqa: E402

FLAGS = ("w0", "extra", "weight_decay", "momentum", "first_step", "nesterov", "hyper", "clip")
N = 37  # one masked block
HP = dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-3)


def _expected(w, w0, g, buf, on, ok, clip):
    """The update of restore_sgd_'s docstring, term by term in torch."""
    base = (w0 if on["w0"] else w).clone()
    d = g[0] + g[1] if on["extra"] else g[0].clone()
    if on["clip"]:
        d = d * clip
    if on["weight_decay"]:
        d = d + HP["weight_decay"] * base
    new_buf = buf.clone()
    if on["momentum"]:
        if on["first_step"]:
            new_buf = d
        else:
            new_buf = HP["momentum"] * buf + (1 - HP["dampening"]) * d
        d = d + HP["momentum"] * new_buf if on["nesterov"] else new_buf
    if ok is False:
        return base, buf
    return base - HP["lr"] * d, new_buf


@pytest.mark.parametrize("ok", [None, True, False], ids=["no_guard", "ok", "failed"])
def test_every_flag_combination_compiles_and_computes_the_update(ok):
    gen = torch.Generator().manual_seed(5)
    w, w0 = torch.randn(N, generator=gen), torch.randn(N, generator=gen)
    g = 0.1 * torch.randn(2, N, generator=gen)
    buf = 0.1 * torch.randn(N, generator=gen)
    clip = torch.tensor([0.7])
    for values in itertools.product((False, True), repeat=len(FLAGS)):
        on = dict(zip(FLAGS, values))
        hp = dict(HP, momentum=HP["momentum"] if on["momentum"] else 0.0)
        hp["weight_decay"] = HP["weight_decay"] if on["weight_decay"] else 0.0
        hyper = None
        if on["hyper"]:  # the float arguments are stale; the values in memory count
            hyper = torch.tensor([hp["lr"], hp["momentum"], hp["dampening"], hp["weight_decay"]])
            hp = dict(hp, lr=1.0, dampening=0.0)
        wk, bk = w.clone(), buf.clone()
        restore_sgd_(
            wk, g, 0, w0 if on["w0"] else None, [1] if on["extra"] else [], bk if on["momentum"] else None,
            hp["lr"], hp["momentum"], hp["dampening"], hp["weight_decay"], on["nesterov"], on["first_step"],
            ok=None if ok is None else torch.tensor(ok), hyper=hyper, clip=clip if on["clip"] else None,
        )  # fmt: skip
        want_w, want_buf = _expected(w, w0, g, buf, on, ok, clip)
        label = ", ".join(k for k, v in on.items() if v) or "no flag"
        assert_close(wk, want_w, "kernel", f"w ({label})")
        assert torch.equal(bk, buf) if ok is False or not on["momentum"] else True, f"buf written ({label})"
        if on["momentum"] and ok is not False:
            assert_close(bk, want_buf, "kernel", f"momentum buffer ({label})")
