"""FSDP2 (``torch.distributed.fsdp.fully_shard``) and torch.distributed.checkpoint.

Every multi-process case runs in one pair of gloo processes on 127.0.0.1
(``spawn_bounded``: a process left in a collective fails the tests instead of
hanging them); rank 0 saves what the tests compare with one process on the
whole batch. Parameters are DTensor shards, sharded unevenly (7, 5 and 3
rows over two processes) and one shard's batch has no tail sample.

The pair of processes costs about 20 s on two cores (half of it starting
torch, FSDP2 and DTensor in each): its tests are marked ``long``.
"""

from __future__ import annotations

import importlib.util
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sse_sam_fast import SAM, SSESAM, ImbSAM, _torch_private
from sse_sam_fast.verify import assert_close
from tests.support import cloned, spawn_bounded

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without distributed")

# the triton cases run its kernels through the interpreter (tests/conftest.py); without
# Triton the other backends are still tested
HAVE_TRITON = importlib.util.find_spec("triton") is not None
BACKENDS = ["reference", "torch"] + ["triton"] * HAVE_TRITON
STEPS = 3


def net(bn: bool = False, depth: int = 3, narrow: bool = False) -> nn.Sequential:
    """Linear layers of 7, 5 and 3 rows (uneven shards over two processes); with
    ``depth`` > 3 more layers, for counting collectives against the parameters;
    ``narrow``: a layer of one row first, whose shards on the second process
    are empty."""
    torch.manual_seed(0)
    widths = [6, 7] + [1] * narrow + [5] + [5] * (depth - 3) + [3]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        layers.append(nn.Linear(a, b))
        if bn and i == 0:
            layers.append(nn.BatchNorm1d(b))
        if i < len(widths) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)


BASES = {
    "sgd": sgd,
    "adam": lambda model: torch.optim.Adam(model.parameters(), lr=0.01),
    "fused-adam": lambda model: torch.optim.Adam(model.parameters(), lr=0.01, fused=True),
}
SYNC_FREE = [("torch", "sgd"), ("torch", "adam"), ("torch", "fused-adam")] + [("triton", "sgd")] * HAVE_TRITON
CHECKPOINTS = [("fsdp", b) for b in BACKENDS] + [("ddp", "torch")]


def build(method: str, model, backend: str, base: str = "sgd", **kw):
    if method == "sam":
        return SAM(BASES[base](model), model, 0.07, backend=backend, **kw)
    if method == "imbsam":  # the group counts, ASAM's |w| and the clipping norm must all be global
        options = dict(normalization="group", adaptive=True, max_grad_norm=0.05)
        return ImbSAM(BASES[base](model), model, 0.3, backend=backend, **options, **kw)
    return SSESAM(BASES[base](model), model, 0.05, 0.11, gamma=0.5, total_epochs=2, backend=backend, **kw)


def batches():
    g = torch.Generator().manual_seed(7)
    for step in range(STEPS):
        x, y = torch.randn(12, 6, generator=g), torch.randint(0, 3, (12,), generator=g)
        tail = y == 2
        if step == 1:
            tail[:6] = False  # the first shard has no tail sample: same passes, no deadlock
        yield x, y, tail


def shard(model, **kw):
    from torch.distributed.fsdp import fully_shard

    for m in model:
        if isinstance(m, (nn.Linear, nn.BatchNorm1d)):
            fully_shard(m, **kw)
    return fully_shard(model, **kw)


def per_shard_losses(model, x, y):
    """BatchNorm in training mode normalises over each process's shard: one
    process sees the same losses when it forwards the two halves apart."""
    return torch.cat(
        [F.cross_entropy(model(x[s]), y[s], reduction="none") for s in (slice(0, 6), slice(6, 12))]
    )


def train(model, opt, rank=None, nan_at=None, bn=False, schedule="exact", steps=range(STEPS), how=None):
    """``STEPS`` steps of ``opt.step`` (those of ``steps``); with ``rank``, on that
    process's half of each batch; a stage switch after the first step (SSE-SAM);
    ``nan_at``: the losses of that step are NaN (on rank 0 only, under processes);
    ``how="micro"``: two micro-batches per step, ``"scaler"``: through a GradScaler."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8) if how == "scaler" else None
    for i, (x, y, tail) in enumerate(batches()):
        if i not in steps:
            continue
        part = slice(None) if rank is None else slice(rank * 6, rank * 6 + 6)
        x, y, tail = x[part], y[part], tail[part]
        nan = i == nan_at and rank in (None, 0)

        def closure(idx=None):
            xs, ys = (x, y) if idx is None else (x[idx], y[idx])
            if bn and rank is None:
                losses = per_shard_losses(model, xs, ys)
            else:
                losses = F.cross_entropy(model(xs), ys, reduction="none")
            return losses * float("nan") if nan else losses

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the skipped step's warning
            if schedule == "split":
                opt.step(closure, tail, schedule="split")
            elif how == "micro":
                halves = [torch.arange(len(y))[: len(y) // 2], torch.arange(len(y))[len(y) // 2 :]]
                opt.step([lambda h=h: closure(h) for h in halves], [tail[h] for h in halves])
            elif how == "scaler":
                opt.step(lambda: closure(), tail, scaler=scaler)
                scaler.update()
            else:
                opt.step(lambda: closure(), tail)
        if i == 0 and isinstance(opt, SSESAM):
            opt.update_rho()


def train_official(method: str, model, opt, rank=None):
    """The official methods, each process's loss the mean over its half (equal
    halves: FSDP2's average is the mean over the whole batch)."""
    for x, y, tail in batches():
        part = slice(None) if rank is None else slice(rank * 6, rank * 6 + 6)
        x, y, tail = x[part], y[part], tail[part]
        losses = lambda: F.cross_entropy(model(x), y, reduction="none")
        if method == "sam":
            losses().mean().backward()
            opt.first_step()
            losses().mean().backward()
            opt.second_step()
            continue
        if method == "imbsam":  # the published loop: one forward for the head and the tail
            clean = losses()
            (clean * ~tail).sum().div(len(y)).backward(retain_graph=True)
            opt.first_step()
            (clean * tail).sum().div(len(y)).mul(2).backward()
            opt.second_step()
            (losses() * tail).sum().div(len(y)).mul(2).backward()
            opt.third_step()
            continue
        for n_i, members in ((0, ~tail), (1, tail)):
            (losses() * members).sum().div(len(y)).backward()
            opt.compute_and_add_epsilon(n_i)
            (losses() * members).sum().div(len(y)).backward()
            opt.compute_grad_sum_and_restore_p()
        opt.update()


# ---- what each process runs ----------------------------------------------------------
class Collectives:
    """Counts the engine's all-reduces (``torch.distributed.all_reduce``) and any
    collective a DTensor operation issues on its own (functional collectives: a
    norm of a sharded DTensor would all-reduce per parameter)."""

    def __init__(self):
        import torch.distributed._functional_collectives as funcol

        self.engine, self.dtensor = 0, 0
        self._undo = []
        for mod, name, kind in [(torch.distributed, "all_reduce", "engine")] + [
            (funcol, n, "dtensor") for n in ("all_reduce", "all_gather_tensor", "reduce_scatter_tensor")
        ]:
            original = getattr(mod, name)

            def counted(*a, _f=original, _kind=kind, **k):
                setattr(self, _kind, getattr(self, _kind) + 1)
                return _f(*a, **k)

            setattr(mod, name, counted)
            self._undo.append((mod, name, original))

    def close(self):
        for mod, name, original in self._undo:
            setattr(mod, name, original)


def full(model) -> list[torch.Tensor]:
    """The whole parameters (an all-gather: every process calls it)."""
    return [p.full_tensor().detach().clone() for p in model.parameters()]


def _fsdp_cases(rank: int, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy

    save = lambda name, value: rank == 0 and torch.save(value, f"{out}/{name}.pt")
    for backend in BACKENDS:
        for method in ("ssesam", "sam", "imbsam"):
            model = shard(net())
            opt = build(method, model, backend)
            counter = Collectives()
            train(model, opt, rank)
            counter.close()
            save(f"{method}-{backend}", (full(model), opt.backend, counter.engine, counter.dtensor))
        for method in ("ssesam", "sam", "imbsam"):
            model = shard(net())
            opt = build(method, model, backend)
            train_official(method, model, opt, rank)
            save(f"official-{method}-{backend}", full(model))
        model = shard(net(narrow=True))
        opt = build("ssesam", model, backend)
        train(model, opt, rank)
        smallest = torch.tensor([float(p.to_local().numel()) for p in model.parameters()])
        dist.all_reduce(smallest, op=dist.ReduceOp.MIN)  # each shard's size on the process with fewest
        save(f"narrow-{backend}", (full(model), smallest.tolist()))
        model = shard(net(bn=True))
        opt = build("ssesam", model, backend)
        train(model, opt, rank, bn=True)
        bn = model[1]
        save(f"bn-{backend}", (full(model), int(bn.num_batches_tracked)))
        model = shard(net())
        opt = build("ssesam", model, backend)
        train(model, opt, rank, nan_at=1)
        weights = full(model)
        skipped = torch.tensor([float(opt.nonfinite_steps)])
        dist.all_reduce(skipped, op=dist.ReduceOp.MIN)  # every process counted the skipped step
        save(f"nan-{backend}", (weights, int(skipped)))
        # collectives per step against the number of parameters: 6 and 18 tensors
        for depth in (3, 9):
            model = shard(net(depth=depth))
            opt = build("ssesam", model, backend)
            counter = Collectives()
            train(model, opt, rank)
            counter.close()
            save(f"count-{depth}-{backend}", (counter.engine, counter.dtensor, len(list(model.parameters()))))
    # the device verdict (the flat backends' default on CUDA), forced on this CPU:
    # the step taken back by selects, the base optimizer's DTensor state included
    for backend, base in SYNC_FREE:
        model = shard(net())
        opt = build("ssesam", model, backend, base=base)
        opt._force_sync_free = True
        train(model, opt, rank, nan_at=1)
        save(f"sync-free-{backend}-{base}", (full(model), opt.nonfinite_steps))
    for reshard in (True, False):
        model = shard(net(), reshard_after_forward=reshard)
        opt = build("ssesam", model, "auto")
        train(model, opt, rank)
        save(f"reshard-{reshard}", (full(model), opt.backend))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    model = shard(net(), mp_policy=policy)
    opt = build("ssesam", model, "torch")
    train(model, opt, rank)
    save("bf16", (full(model), [p.dtype for p in model.parameters()]))
    for how in ("split", "micro", "scaler"):
        model = shard(net())
        opt = build("ssesam", model, "torch")
        train(model, opt, rank, **({"schedule": "split"} if how == "split" else {"how": how}))
        save(how, full(model))
    refusals = {
        "local": lambda: build("ssesam", shard(net()), "torch", local_perturbation=True),
        # kept values would be local shards, which state_dict and DCP do not carry
        "reuse": lambda: build("ssesam", shard(net()), "torch", reuse=2),
        # settings FSDP2 has setters for: each would make the update wrong without a sign
        "sync-off": lambda: _step_with(rank, "set_requires_gradient_sync"),
        "reshard-off": lambda: _step_with(rank, "set_reshard_after_backward"),
        "sync-off-official": lambda: _step_with(rank, "set_requires_gradient_sync", official=True),
        # the root and the later layers left whole: their gradients would not be averaged
        "partly": lambda: build("ssesam", _partly_sharded(), "torch"),
        # no model, so no strategy: the norms would be local
        "davda54": lambda: SAM(shard(net()).parameters(), torch.optim.SGD, rho=0.05, lr=0.1),
    }
    for name, make in refusals.items():
        try:
            make()
        except (ValueError, RuntimeError) as e:
            save(name, str(e))
    # what the refusals read (private to FSDP2): one group per FSDP unit, both on
    save("flags", _torch_private.fsdp2_sync_flags(shard(net())))


def _step_with(rank: int, setter: str, official: bool = False):
    """A step (or the official methods) after turning one of FSDP2's settings off."""
    model = shard(net())
    opt = build("sam", model, "torch")
    getattr(model, setter)(False)
    if official:
        train_official("sam", model, opt, rank)
    else:
        train(model, opt, rank)


def _partly_sharded():
    from torch.distributed.fsdp import fully_shard

    model = net()
    fully_shard(model[0])
    return model


def _checkpoint_cases(rank: int, out: str) -> None:
    """A run saved with torch.distributed.checkpoint after its second step (past
    the stage switch and a skipped step) and resumed by a fresh model and
    optimizer, against the run that went on: under FSDP2 and under DDP."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    wrap = {"fsdp": shard, "ddp": lambda m: nn.parallel.DistributedDataParallel(m)}
    for kind, backend in CHECKPOINTS:
        where = f"{out}/checkpoint-{kind}-{backend}"
        model = wrap[kind](net())
        opt = build("ssesam", model, backend)
        train(model, opt, rank, nan_at=1, steps=range(2))
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
        dcp.save(state, checkpoint_id=where)
        train(model, opt, rank, steps=range(2, STEPS))
        went_on = full(model) if kind == "fsdp" else [p.detach().clone() for p in model.parameters()]
        model = wrap[kind](net())
        opt = build("ssesam", model, backend)
        # a fresh optimizer: get_optimizer_state_dict makes it create its state first
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
        dcp.load(state, checkpoint_id=where)
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, opt, state["optim"])
        resumed_stage = (opt.stage, opt.nonfinite_steps)
        train(model, opt, rank, steps=range(2, STEPS))
        resumed = full(model) if kind == "fsdp" else [p.detach().clone() for p in model.parameters()]
        if rank == 0:
            torch.save((went_on, resumed, resumed_stage), f"{out}/dcp-{kind}-{backend}.pt")


def _fsdp_worker(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    _fsdp_cases(rank, out)
    _checkpoint_cases(rank, out)
    dist.barrier()  # gloo aborts a process whose peer tears the group down first
    dist.destroy_process_group()
    os._exit(0)  # as in test_passes: gloo's teardown at interpreter exit aborts now and then


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory):
    """What rank 0 saved, by case name, from one pair of processes for the module."""
    out = tmp_path_factory.mktemp("fsdp")
    spawn_bounded(_fsdp_worker, (2, f"file://{out}/pg", str(out)))
    return lambda name: torch.load(f"{out}/{name}.pt", weights_only=False)


# ---- one process on the whole batch ---------------------------------------------------
def single(method: str = "ssesam", base: str = "sgd", **kw) -> list[torch.Tensor]:
    model = net(bn=kw.pop("bn", False), narrow=kw.pop("narrow", False))
    opt = build(method, model, "reference", base=base)
    train(model, opt, bn=any(isinstance(m, nn.BatchNorm1d) for m in model), **kw)
    return [p.detach() for p in model.parameters()]


@pytest.mark.long
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["ssesam", "sam", "imbsam"])
def test_a_sharded_step_equals_one_process_on_the_whole_batch(fsdp, backend, method):
    """SSE-SAM across its stage switch, SAM, and ImbSAM with per-group counts,
    ASAM and clipping: norms, counts and the clipping factor are global."""
    got, chosen, _, _ = fsdp(f"{method}-{backend}")
    assert chosen == backend
    assert_close(got, single(method), torch.float32, f"FSDP2 {method} on {backend}")


@pytest.mark.long
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["ssesam", "sam", "imbsam"])
def test_the_official_methods_under_fsdp2(fsdp, backend, method):
    model = net()
    train_official(method, model, build(method, model, "reference"))
    expected = [p.detach() for p in model.parameters()]
    assert_close(fsdp(f"official-{method}-{backend}"), expected, torch.float32, f"official {method}")


@pytest.mark.long
@pytest.mark.parametrize("backend", BACKENDS)
def test_an_empty_shard_on_one_process(fsdp, backend):
    """A layer of one row: the second process holds none of its weight or bias."""
    got, sizes = fsdp(f"narrow-{backend}")
    assert 0 in sizes
    assert_close(got, single(narrow=True), torch.float32, f"an empty shard on {backend}")


@pytest.mark.long
@pytest.mark.parametrize("backend", BACKENDS)
def test_batchnorm_statistics_follow_the_clean_forward_only(fsdp, backend):
    """Each process normalises over its own shard (FSDP2 shares no buffer), and
    only the step's clean forward moves the running statistics: one count per
    step, not one per forward (SSE-SAM stage 1 runs three)."""
    got, tracked = fsdp(f"bn-{backend}")
    assert tracked == STEPS
    assert_close(got, single(bn=True), torch.float32, f"FSDP2 BatchNorm on {backend}")


@pytest.mark.long
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_nan_on_one_process_skips_the_step_on_both(fsdp, backend):
    got, skipped = fsdp(f"nan-{backend}")
    assert skipped == 1
    assert_close(got, single(nan_at=1), torch.float32, f"FSDP2 skipped step on {backend}")


@pytest.mark.long
@pytest.mark.parametrize("backend", BACKENDS)
def test_collectives_per_step_do_not_grow_with_the_parameters(fsdp, backend):
    """SSE-SAM stage 1 then stage 2. Per step: the tail counts, the normaliser,
    the norms of every group together, one check per perturbed pass and the
    verdict; none per parameter, and no DTensor operation collects on its own."""
    small, large = fsdp(f"count-3-{backend}"), fsdp(f"count-9-{backend}")
    assert small[2] == 6 and large[2] == 18
    assert small[0] == large[0], f"all-reduces: {small[0]} for 6 tensors, {large[0]} for 18"
    assert small[1] == large[1] == 0
    # step 1 (stage 1): counts, normaliser, norms, 2 perturbed checks, verdict; steps 2-3 one check
    assert small[0] == 6 + 5 + 5
    # the norms of both groups are one all-reduce: 6 per stage-1 step, not 7
    assert fsdp(f"ssesam-{backend}")[2] == 16
    # SAM: counts, normaliser, norm, check, verdict; ImbSAM with group counts and
    # clipping: one normaliser per group and the clipping norm on top
    assert fsdp(f"sam-{backend}")[2] == 5 * STEPS
    assert fsdp(f"imbsam-{backend}")[2] == 7 * STEPS


@pytest.mark.long
@pytest.mark.parametrize("backend,base", SYNC_FREE)
def test_a_step_taken_back_on_the_device(fsdp, backend, base):
    """The flat backends' verdict on CUDA, forced here: a skipped step selects the
    shards and the base optimizer's DTensor state back (fused Adam: its own skip)."""
    got, skipped = fsdp(f"sync-free-{backend}-{base}")
    assert skipped == 1
    expected = single(base=base, nan_at=1)
    assert_close(got, expected, torch.float32, f"sync-free {backend} {base}")


@pytest.mark.long
@pytest.mark.parametrize("reshard", [True, False])
def test_reshard_after_forward_either_way(fsdp, reshard):
    got, chosen = fsdp(f"reshard-{reshard}")
    assert chosen == "torch"  # auto: the flat backend on a CPU, DTensor shards included
    assert_close(got, single(), torch.float32, f"reshard_after_forward={reshard}")


@pytest.mark.long
def test_bf16_mixed_precision_policy(fsdp):
    """bf16 forwards and backwards over fp32 shards: the optimizer sees fp32
    shards and gradients, and the update is the fp32 one within bf16's tolerance."""
    got, dtypes = fsdp("bf16")
    assert set(dtypes) == {torch.float32}
    expected = single()
    assert_close(got, expected, torch.bfloat16, "bf16 MixedPrecisionPolicy")
    assert any(not torch.equal(a, b) for a, b in zip(got, expected)), "the forward ran in fp32"


@pytest.mark.long
@pytest.mark.parametrize("how", ["split", "micro", "scaler"])
def test_split_schedule_micro_batches_and_a_grad_scaler(fsdp, how):
    """The split schedule; two micro-batches per step (each backward reduce-scatters
    into the same slot); a GradScaler (fp32 here: the scaling, not an overflow)."""
    kw = {"schedule": "split"} if how == "split" else {"how": how}
    assert_close(fsdp(how), single(**kw), torch.float32, f"{how} under FSDP2")


@pytest.mark.long
def test_what_cannot_be_honoured_is_refused_by_name(fsdp):
    assert "local_perturbation=True cannot be honoured under FSDP2" in fsdp("local")
    assert "reuse=2 is not supported under FSDP2 yet" in fsdp("reuse")
    assert fsdp("flags") == [(True, True)] * 3  # one per layer: the root holds no parameter
    assert "set_requires_gradient_sync(False) is in effect" in fsdp("sync-off")
    assert "set_requires_gradient_sync(False) is in effect" in fsdp("sync-off-official")
    assert "set_reshard_after_backward(False) is in effect" in fsdp("reshard-off")
    assert "call torch.distributed.fsdp.fully_shard on the root module too" in fsdp("partly")
    assert "pass the model sharded with torch.distributed.fsdp.fully_shard as model" in fsdp("davda54")


# ---- torch.distributed.checkpoint ------------------------------------------------------
@pytest.mark.long
@pytest.mark.parametrize("kind,backend", CHECKPOINTS)
def test_a_run_resumed_through_distributed_checkpoint_equals_the_one_that_went_on(fsdp, kind, backend):
    """The stage (SSE-SAM switched after the first step), the skipped-step count
    and the momentum travel through get/set_optimizer_state_dict and DCP's files."""
    went_on, resumed, (stage, skipped) = fsdp(f"dcp-{kind}-{backend}")
    assert (stage, skipped) == (2, 1)
    assert_close(resumed, went_on, torch.float32, f"{kind} resumed on {backend}")
    assert all(torch.equal(a, b) for a, b in zip(resumed, went_on)), "not bitwise"


def test_a_step_without_a_closure_only_creates_state():
    """torch.distributed.checkpoint creates optimizer state with ``step()`` on zero
    gradients at lr=0; any other step without a closure would skip the
    perturbation, and is refused with nothing changed."""
    model = net()
    opt = build("ssesam", model, "torch")
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    with pytest.raises(TypeError, match="closure"):
        opt.step()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    with pytest.raises(TypeError, match="lr=0"):
        opt.step()
    assert not opt.state
    opt.param_groups[0]["lr"] = 0.0
    opt.step()
    assert len(opt.state) == len(before)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize("backend", BACKENDS)
def test_get_and_set_optimizer_state_dict_in_one_process(backend):
    """The method's entries ride in the first param group, the only place besides
    ``state`` that get_optimizer_state_dict keeps; loaded back, the run goes on as
    the uninterrupted one (a fresh optimizer's state made first)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    model = net()
    opt = build("ssesam", model, backend)
    train(model, opt, nan_at=1, steps=range(2))
    saved = cloned(get_optimizer_state_dict(model, opt))  # its tensors are the optimizer's own
    assert set(saved) == {"state", "param_groups"}  # what DCP keeps of opt.state_dict()
    weights = [p.detach().clone() for p in model.parameters()]
    train(model, opt, steps=range(2, STEPS))
    other = net()
    with torch.no_grad():
        for p, w in zip(other.parameters(), weights):
            p.copy_(w)
    resumed = build("ssesam", other, backend)
    set_optimizer_state_dict(other, resumed, saved)
    assert (resumed.stage, resumed.nonfinite_steps) == (2, 1)
    assert "sse_sam_fast" not in resumed.param_groups[0]
    train(other, resumed, steps=range(2, STEPS))
    assert all(torch.equal(a, b) for a, b in zip(other.parameters(), model.parameters()))


def test_the_davda54_form_round_trips_through_the_state_dict_functions():
    """``SAM(params, base_cls)``: DCP's state creation on the fresh optimizer goes
    through the same one form of ``step()`` without a closure."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    def run(model, opt, batches):
        for x, y, _ in batches:
            loss = lambda: F.cross_entropy(model(x), y)
            opt.zero_grad()  # davda54's second step keeps the gradients
            loss().backward()
            opt.step(lambda: loss().backward())

    model = net()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    data = list(batches())
    run(model, opt, data[:2])
    saved = cloned(get_optimizer_state_dict(model, opt))
    weights = [p.detach().clone() for p in model.parameters()]
    run(model, opt, data[2:])
    other = net()
    with torch.no_grad():
        for p, w in zip(other.parameters(), weights):
            p.copy_(w)
    resumed = SAM(other.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="davda54/sam convention"):
        resumed.step()  # gradients none, lr 0.1: not DCP's form
    set_optimizer_state_dict(other, resumed, saved)
    run(other, resumed, data[2:])
    assert all(torch.equal(a, b) for a, b in zip(other.parameters(), model.parameters()))
