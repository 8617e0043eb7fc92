"""opt.capture(loss_fn): the same update as opt.step, graphed on CUDA where it can be."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sse_sam_fast import SAM, SSESAM, ImbSAM
from sse_sam_fast.verify import Case, assert_close, per_sample_losses, run, run_published
from tests.support import snapshot, tensors

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def build(method="ssesam", backend="torch", device="cpu", base="sgd", dropout=0.0):
    torch.manual_seed(0)
    layers = [nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 3)]
    model = nn.Sequential(*layers).to(device)
    if base == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True)
    elif base == "sgd-plain":  # torch's defaults: no momentum
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
    elif base in ("adam-capturable", "adamw-capturable"):
        cls = torch.optim.Adam if base == "adam-capturable" else torch.optim.AdamW
        lr = torch.tensor(1e-2, device=device)
        opt = cls(model.parameters(), lr=lr, weight_decay=1e-3, capturable=True)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    cls, args = {"sam": (SAM, (0.1,)), "imbsam": (ImbSAM, (0.1,)), "ssesam": (SSESAM, (0.05, 0.1, 0.5, 4))}[
        method
    ]
    return model, cls(opt, model, *args, backend=backend)


def batches(n=10, device="cpu", sizes=(12,)):
    g = torch.Generator().manual_seed(3)
    for i in range(n):
        b = sizes[i % len(sizes)]
        x, y = torch.randn(b, 6, generator=g), torch.randint(0, 3, (b,), generator=g)
        tail = y == 2
        if i == 2:
            tail[:] = False  # an empty tail group
        yield x.to(device), y.to(device), tail.to(device)


def train(method, backend, device, api, sched=None, sizes=(12,), base="sgd"):
    model, opt = build(method, backend, device, base)
    loss_fn = lambda x, y: F.cross_entropy(model(x), y, reduction="none")
    captured = opt.capture(loss_fn)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10) if sched else None
    graphed = []
    for i, (x, y, tail) in enumerate(batches(device=device, sizes=sizes)):
        if api == "capture":
            captured(x, y, tail_mask=tail)
            graphed.append(captured.graphed)
        else:
            opt.step(lambda: loss_fn(x, y), tail)
        if scheduler is not None:
            scheduler.step()
        if method == "ssesam" and i % 4 == 3:
            opt.update_rho()
    return [t.detach().cpu().clone() for t in [*model.parameters(), *model.buffers()]], graphed


@pytest.mark.parametrize("method", ["sam", "imbsam", "ssesam"])
def test_on_cpu_the_captured_step_is_the_eager_step(method):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a CPU runs eagerly without complaint
        captured, graphed = train(method, "torch", "cpu", "capture", sched=True)
    eager, _ = train(method, "torch", "cpu", "step", sched=True)
    assert not any(graphed)
    for a, b in zip(captured, eager):
        assert torch.equal(a, b)


def test_capture_returns_the_loss_and_checks_its_arguments():
    model, opt = build()
    with pytest.raises(TypeError, match="loss_fn"):
        opt.capture("not callable")
    with pytest.raises(ValueError, match="schedule"):
        opt.capture(lambda x: x, schedule="fast")
    x, y, tail = next(batches())
    captured = opt.capture(lambda x, y: F.cross_entropy(model(x), y, reduction="none"))
    expected = F.cross_entropy(copy.deepcopy(model)(x), y)
    loss = captured(x, y, tail_mask=tail)
    torch.testing.assert_close(loss, expected)
    with pytest.raises(ValueError, match="tail_mask"):
        captured(x, y, tail_mask=tail[:5])


def test_verify_capture_api_on_cpu():
    case = Case(method="ssesam", model="bn_cnn", steps=5)
    expected = run_published(case)
    assert_close(run(case, "torch", "capture"), expected, torch.float32, "capture on cpu")


# ---- CUDA: graphs -------------------------------------------------------------------------
@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize("method", ["sam", "imbsam", "ssesam"])
def test_cuda_graphs_give_the_eager_update(method):
    captured, graphed = train(method, "triton", "cuda", "capture", sched=True)
    eager, _ = train(method, "triton", "cuda", "step", sched=True)
    assert any(graphed), "no call replayed a graph"
    assert_close(captured, eager, torch.float32, f"graphed {method}")


@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize("base", ["adam-capturable", "adamw-capturable"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_cuda_capturable_adam_is_graphed_and_follows_its_scheduler(base, backend):
    # a cosine schedule per step fills the tensor lr in place: replays must read it
    captured, graphed = train("ssesam", backend, "cuda", "capture", sched=True, base=base)
    eager, _ = train("ssesam", backend, "cuda", "step", sched=True, base=base)
    assert graphed[4], "no call replayed a graph"  # 3 warm-ups and a checked capture first
    assert_close(captured, eager, torch.float32, f"graphed {base} on {backend}")


@pytest.mark.cuda
@CUDA
def test_cuda_a_last_batch_of_another_shape_gets_its_own_graph_or_runs_eagerly():
    captured, _ = train("ssesam", "triton", "cuda", "capture", sizes=(12, 12, 12, 12, 7))
    eager, _ = train("ssesam", "triton", "cuda", "step", sizes=(12, 12, 12, 12, 7))
    assert_close(captured, eager, torch.float32, "two shapes")


@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize(
    "base,backend,dropout", [("adam", "triton", 0.0), ("sgd", "torch", 0.0), ("sgd", "triton", 0.2)]
)
def test_cuda_what_cannot_be_graphed_runs_eagerly_with_a_warning(base, backend, dropout):
    model, opt = build("ssesam", backend, "cuda", base, dropout)
    captured = opt.capture(lambda x, y: per_sample_losses(model, x, y))
    with pytest.warns(RuntimeWarning, match="capture: running eagerly"):
        for x, y, tail in batches(6, "cuda"):
            captured(x, y, tail_mask=tail)
    assert not captured.graphed


def test_a_graph_keeps_alive_what_it_touches():
    import gc
    import weakref

    from sse_sam_fast.optim.capture import _alive

    model, opt = build("ssesam", "triton")
    x, y, tail = next(batches())
    opt.step(lambda: F.cross_entropy(model(x), y, reduction="none"), tail)
    be = opt._backend
    touched = [t for b in be.buckets for t in (b.w, b.g)] + [m for m in be._momentum if m is not None]
    touched += [st["momentum_buffer"] for st in opt.optimizer.state.values()]
    refs = [weakref.ref(t) for t in touched]
    kept = _alive(opt)
    del touched
    with torch.no_grad():  # a re-layout: the backend drops its buffers
        for p in model.parameters():
            p.data = p.data.clone()
    be._check_layout()
    opt.step(lambda: F.cross_entropy(model(x), y, reduction="none"), tail)  # new momentum views
    gc.collect()
    assert all(r() is not None for r in refs)  # a graph holding `kept` still has its memory
    del kept
    gc.collect()
    assert any(r() is None for r in refs)  # and without it they were gone


def test_the_graph_key_names_what_an_adam_graph_bakes_in():
    """A capturable Adam reads only its tensor lr from memory: filling it keeps
    the graph; a new lr tensor or any other changed value is a new graph."""
    model, opt = build("ssesam", "torch", base="adamw-capturable")
    captured = opt.capture(lambda x, y: F.cross_entropy(model(x), y, reduction="none"))
    x, y = torch.randn(12, 6), torch.randint(0, 3, (12,))
    group = opt.param_groups[0]
    key = captured._key((x, y), None)
    group["lr"].fill_(0.5)
    assert captured._key((x, y), None) == key
    for name, value in (("lr", torch.tensor(0.5)), ("betas", (0.8, 0.99)), ("weight_decay", 0.0),
                        ("amsgrad", True), ("eps", 1e-6)):  # fmt: skip
        old = group[name]
        group[name] = value
        assert captured._key((x, y), None) != key, name
        group[name] = old
    assert captured._key((x, y), None) == key


def test_the_graph_key_names_the_sgd_branches_a_graph_bakes_in():
    """lr, momentum, dampening and weight decay are read from device memory at
    replay, but whether momentum and weight decay are on (and nesterov) choose
    the fused kernel's code path: changing them must not replay an old graph."""
    model, opt = build("sam", "torch")
    captured = opt.capture(lambda x, y: F.cross_entropy(model(x), y, reduction="none"))
    x, y = torch.randn(12, 6), torch.randint(0, 3, (12,))
    group = opt.param_groups[0]
    key = captured._key((x, y), None)
    group["lr"], group["momentum"] = 0.05, 0.5  # values only: the same graph
    assert captured._key((x, y), None) == key
    for name, value in (("weight_decay", 0.0), ("momentum", 0.0), ("nesterov", False)):
        old = group[name]
        group[name] = value
        assert captured._key((x, y), None) != key, name
        group[name] = old


def test_the_graph_key_names_the_batchnorm_statistics_a_graph_updates():
    """A graph writes the running statistics where they were at its capture:
    values changed in place keep the graph, a buffer replaced must not replay it."""
    model, opt = build("ssesam", "torch")
    loss_fn = lambda x, y: F.cross_entropy(model(x), y, reduction="none")
    captured = opt.capture(loss_fn)
    x, y, tail = next(batches())
    opt.step(lambda: loss_fn(x, y), tail)
    key = captured._key((x, y), None)
    bn = model[1]
    with torch.no_grad():
        bn.running_mean.add_(1.0)
    assert captured._key((x, y), None) == key
    bn.running_mean = torch.zeros(16)
    replaced = captured._key((x, y), None)
    assert replaced != key
    opt.step(lambda: loss_fn(x, y), tail)
    assert captured._key((x, y), None) == replaced
    bn.running_mean = torch.zeros(16)
    assert captured._key((x, y), None) not in (key, replaced)


def test_a_graph_keeps_alive_the_statistics_and_the_copies_a_step_saves():
    from sse_sam_fast.optim.capture import _alive

    model, opt = build("ssesam", "torch", base="adam")
    opt._force_sync_free = True  # the guarded base step saves the Adam state
    x, y, tail = next(batches())
    for _ in range(2):  # the first Adam step creates its state
        opt.step(lambda: F.cross_entropy(model(x), y, reduction="none"), tail)
    kept = {id(t) for t in _alive(opt)}
    copies = opt._stats.buffers() + opt._backend._state_copy.buffers()
    assert len(copies) == 3  # fp32 and int64 statistics, fp32 Adam state
    assert all(id(t) in kept for t in copies)
    assert all(id(t) in kept for t in (model[1].running_mean, model[1].num_batches_tracked))


# ---- the requirements, each on the CPU (eager: checks the test's own logic)
# ---- and on CUDA (graphed) ------------------------------------------------------------
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, CUDA])]


def _run(opt_model, device, steps, call, start=0, per_epoch=None, sched=None):
    """``steps`` calls of ``call(x, y, tail)`` from batch ``start`` on; SSE-SAM's
    epoch of 4 steps ends with update_rho() (and a per-epoch scheduler step)."""
    model, opt = opt_model
    graphed = []
    for i, (x, y, tail) in enumerate(batches(start + steps, device)):
        if i < start:
            continue
        graphed.append(call(x, y, tail))
        if sched is not None and not per_epoch:
            sched.step()
        if i % 4 == 3:
            if isinstance(opt, SSESAM):
                opt.update_rho()
            if sched is not None and per_epoch:
                sched.step()
    return graphed


def _state(model):
    """Weights and buffers, on the CPU, for comparisons within the tolerance table."""
    return [t.cpu() for t in tensors(snapshot(model))]


def _both(device, make, loss_of, steps=10, sched_of=None, per_epoch=False):
    """The same run through opt.capture and through opt.step: (captured, eager, graphed)."""
    out = []
    for api in ("capture", "step"):
        model, opt = make()
        loss_fn = loss_of(model)
        sched = sched_of(opt) if sched_of else None
        captured = opt.capture(loss_fn)

        def call(x, y, tail):
            if api == "capture":
                captured(x, y, tail_mask=tail)
                return captured.graphed
            opt.step(lambda: loss_fn(x, y), tail)
            return False

        graphed = _run((model, opt), device, steps, call, sched=sched, per_epoch=per_epoch)
        out.append((_state(model), graphed))
    (cap, graphed), (eager, _) = out
    if device == "cuda":  # stage 1 replays from call 4 on (3 warm-ups, a checked capture)
        assert graphed[4], "no call replayed a graph"
    return cap, eager


def _ce(model):
    return lambda x, y: F.cross_entropy(model(x), y, reduction="none")


@pytest.mark.parametrize("device", DEVICES)
def test_a_per_epoch_cosine_schedule_takes_effect(device):
    cosine = lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=3)
    cap, eager = _both(
        device, lambda: build("ssesam", "triton", device), _ce, 12, cosine, per_epoch=True
    )  # fmt: skip
    assert_close(cap, eager, torch.float32, "per-epoch cosine")


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_inside_loss_fn(device):
    def loss_of(model):
        def loss_fn(x, y):
            with torch.autocast(device, dtype=torch.bfloat16):
                return F.cross_entropy(model(x).float(), y, reduction="none")

        return loss_fn

    cap, eager = _both(device, lambda: build("ssesam", "triton", device), loss_of)
    assert_close(cap, eager, torch.bfloat16, "bf16 autocast")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bn_stats", ["clean", "all"])
def test_bn_stats_keep_their_meaning(device, bn_stats):
    def make():
        model, opt = build("ssesam", "triton", device)
        opt.bn_stats = bn_stats
        return model, opt

    cap, eager = _both(device, make, _ce)
    assert_close(cap, eager, torch.float32, f"bn_stats={bn_stats}")
    if bn_stats == "all":  # and it matters: the running statistics differ from "clean"
        clean, _ = _both(device, lambda: build("ssesam", "triton", device), _ce)
        assert not torch.equal(clean[-2], cap[-2])


@pytest.mark.parametrize("device", DEVICES)
def test_a_bn_free_model_and_sam_imbsam(device):
    for method in ("sam", "imbsam"):

        def make():
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).to(device)
            base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
            return model, (SAM if method == "sam" else ImbSAM)(base, model, 0.1, backend="triton")

        cap, eager = _both(device, make, _ce)
        assert_close(cap, eager, torch.float32, method)


@pytest.mark.parametrize("device", DEVICES)
def test_resume_across_captured_and_eager_steps(device):
    # 6 captured calls, a state_dict, a fresh model and optimizer, 6 eager steps:
    # the same weights as 12 eager steps
    model, opt = build("ssesam", "triton", device)
    captured = opt.capture(_ce(model))
    _run((model, opt), device, 6, lambda x, y, t: captured(x, y, tail_mask=t))
    saved = {"model": model.state_dict(), "opt": opt.state_dict()}
    model2, opt2 = build("ssesam", "triton", device)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    _run((model2, opt2), device, 6, lambda x, y, t: opt2.step(lambda: _ce(model2)(x, y), t), start=6)
    ref, ref_opt = build("ssesam", "triton", device)
    _run((ref, ref_opt), device, 12, lambda x, y, t: ref_opt.step(lambda: _ce(ref)(x, y), t))
    assert opt2.epoch_count == ref_opt.epoch_count == 3
    assert_close(_state(model2), _state(ref), torch.float32, "resumed")


@pytest.mark.parametrize("device", DEVICES)
def test_re_bound_parameters_get_a_new_graph_not_the_old_buffers(device):
    def call_maker(model, captured):
        def call(x, y, tail):
            if call.n == 5:  # after the graph exists: p.data re-bound behind the optimizer's back
                with torch.no_grad():
                    for p in model.parameters():
                        p.data = p.data.clone()
            call.n += 1
            captured(x, y, tail_mask=tail)
            return captured.graphed

        call.n = 0
        return call

    # stage 1 graphs from call 4, the re-bind at 5 warms up a new layout, stage 2 from
    # call 8 another key: its graph is captured at 11 and replayed at 12 and 13
    model, opt = build("ssesam", "triton", device)
    graphed = _run((model, opt), device, 14, call_maker(model, opt.capture(_ce(model))))
    ref, ref_opt = build("ssesam", "triton", device)
    _run((ref, ref_opt), device, 14, lambda x, y, t: ref_opt.step(lambda: _ce(ref)(x, y), t))
    assert_close(_state(model), _state(ref), torch.float32, "re-bound")
    if device == "cuda":
        assert graphed[4] and not any(graphed[5:11]) and graphed[-1]


# ---- the capture machinery on a CPU, with a stand-in for CUDA graphs --------------------
def _capturable_adam_on_cpu(monkeypatch):
    # torch allows capturable Adam on accelerators only; the stand-in needs it on the CPU
    import torch.optim.adam as adam

    if not hasattr(adam, "_get_capturable_supported_devices"):
        pytest.skip("this torch has no list of capturable devices to extend")
    devices = adam._get_capturable_supported_devices
    monkeypatch.setattr(adam, "_get_capturable_supported_devices", lambda *a, **k: ["cpu", *devices(*a, **k)])


@pytest.mark.parametrize(
    "base,backend",
    [("sgd", "triton"), ("sgd-plain", "triton"), ("adam-capturable", "torch"),
     ("adamw-capturable", "triton")],
)  # fmt: skip
def test_captured_steps_replay_and_give_the_eager_update(fake_graphs, monkeypatch, base, backend):
    if not base.startswith("sgd"):
        _capturable_adam_on_cpu(monkeypatch)

    def run(api):
        model, opt = build("ssesam", backend, base=base)
        opt._force_sync_free = True  # as on CUDA
        loss_fn = _ce(model)
        captured = opt.capture(loss_fn)
        graphed = []
        for i, (x, y, tail) in enumerate(batches(12)):
            if api == "capture":
                captured(x, y, tail_mask=tail)
                graphed.append(captured.graphed)
            else:
                opt.step(lambda: loss_fn(x, y), tail)
            if i % 4 == 3:
                opt.update_rho()
        return _state(model), graphed

    (cap, graphed), (eager, _) = run("capture"), run("step")
    # 3 warm-ups and a checked recording, then replays; stage 2 (from call 8) anew
    assert graphed == [False] * 4 + [True] * 4 + [False] * 4
    assert all(torch.equal(a, b) for a, b in zip(cap, eager))


def test_loading_a_state_drops_the_graphs(fake_graphs):
    model, opt = build("sam", "triton")
    opt._force_sync_free = True  # as on CUDA: a recorded step reads no verdict on the host
    captured = opt.capture(_ce(model))
    data = list(batches(10))
    graphed = []
    for i, (x, y, tail) in enumerate(data):
        if i == 5:
            opt.load_state_dict(opt.state_dict())  # new param-group dicts and state tensors
        captured(x, y, tail_mask=tail)
        graphed.append(captured.graphed)
    assert graphed == [False] * 4 + [True] + [False] * 4 + [True]


def test_a_key_that_changes_at_every_call_stops_warming_up(fake_graphs):
    from sse_sam_fast.optim.capture import MAX_KEYS

    model, opt = build("sam", "triton")
    captured = opt.capture(_ce(model))
    with pytest.warns(RuntimeWarning, match="key changed on more than"):
        for b in range(2, MAX_KEYS + 4):  # a new batch size, hence a new key, every call
            x, y, tail = next(batches(1, sizes=(b,)))
            captured(x, y, tail_mask=tail)
    assert len(captured._calls) == MAX_KEYS


def test_the_key_names_modes_and_frozen_parameters():
    model, opt = build("ssesam", "triton")
    captured = opt.capture(_ce(model))
    x, y, _ = next(batches(1))
    key = captured._key((x, y), None)
    for change, undo in (
        (lambda: model.eval(), lambda: model.train()),
        (lambda: setattr(opt, "bn_stats", "all"), lambda: setattr(opt, "bn_stats", "clean")),
        (lambda: model[0].weight.requires_grad_(False), lambda: model[0].weight.requires_grad_(True)),
    ):
        change()
        assert captured._key((x, y), None) != key
        undo()
        assert captured._key((x, y), None) == key


def test_a_tensor_hyperparameter_elsewhere_is_refused(fake_graphs):
    model, opt = build("ssesam", "torch", base="adam-capturable")
    opt.param_groups[0]["lr"] = torch.tensor(1e-2, device="meta")  # not the parameters' device
    captured = opt.capture(_ce(model))
    x, y, _ = next(batches(1))
    assert "not on the parameters' device" in captured._refusal((x, y))


# ---- what a CUDA capture cannot do, caught on the CPU ---------------------------------
@pytest.mark.parametrize("method", ["sam", "imbsam", "ssesam"])
@pytest.mark.parametrize("base", ["sgd", "sgd-plain", "adam-capturable"])
def test_a_recording_compiles_syncs_draws_and_allocates_nothing(fake_graphs, monkeypatch, method, base):
    """Every kernel variant a graph launches ran in the eager warm-ups, and the
    recorded step reads nothing on the host, draws no random numbers and makes
    no lasting state: the stand-in's recording raises on any of them, so a
    fault shows as a call that did not replay, and is listed here."""
    if base.startswith("adam"):
        _capturable_adam_on_cpu(monkeypatch)
    model, opt = build(method, "triton" if base.startswith("sgd") else "torch", base=base)
    opt._force_sync_free = True  # as on CUDA
    captured = opt.capture(_ce(model))
    graphed = []
    for x, y, tail in batches(6):
        captured(x, y, tail_mask=tail)
        graphed.append(captured.graphed)
    faults, fake_graphs.faults[:] = list(fake_graphs.faults), []  # reported here, not again at teardown
    assert faults == []
    assert graphed == [False] * 4 + [True] * 2


def _hazards():
    """loss_fn additions, each a fault the stand-in must catch when it runs
    inside a recording (they run in the eager warm-ups too, where they are fine)."""
    from sse_sam_fast.kernels import grouped_sumsq

    def new_kernel_variant(x, opt):  # options the warm-ups never launched
        if torch.cuda.is_current_stream_capturing():  # the stand-in says so while it records
            grouped_sumsq(torch.zeros(2, 5), [0], plus=1)

    def lasting_state(x, opt):
        state = opt.optimizer.state[next(iter(opt._backend.params))]
        state["made_in_the_step"] = torch.zeros(3)

    def stream_switch(x, opt):
        with torch.cuda.stream(torch.cuda.Stream()):
            pass

    return {
        "item": (lambda x, opt: x.sum().item(), "_local_scalar_dense"),
        "bool": (lambda x, opt: bool(x.sum() > 0), "_local_scalar_dense"),
        "nonzero": (lambda x, opt: x.nonzero(), "nonzero"),
        "boolean index": (lambda x, opt: x[x > 0], "boolean indexing"),
        "tolist": (lambda x, opt: x.tolist(), "Tensor.tolist"),
        "rng": (lambda x, opt: torch.randn(3), "RNG draw"),
        "dropout": (lambda x, opt: F.dropout(x, 0.5), "RNG draw"),
        "host data": (lambda x, opt: x + torch.tensor(1.0), "host data"),
        "stream": (stream_switch, "stream switch"),
        "lasting state": (lasting_state, "lasting state"),
        "kernel": (new_kernel_variant, "Triton kernel compiled: _sumsq_partial_kernel"),
    }


@pytest.mark.parametrize("hazard", list(_hazards()))
def test_the_stand_in_catches_what_a_cuda_capture_cannot_do(fake_graphs, hazard):
    """Each fault fails the recording where it happens, as on CUDA; the step
    runs eagerly with a warning that names the fault, later calls stay eager,
    and the weights are those of eager steps."""
    extra, expected = _hazards()[hazard]

    def run(api):
        model, opt = build("sam", "triton", base="sgd")
        opt._force_sync_free = True

        def loss_fn(x, y):
            extra(x, opt)
            return F.cross_entropy(model(x), y, reduction="none")

        captured = opt.capture(loss_fn)
        graphed = []
        for x, y, tail in batches(6):
            if api == "capture":
                captured(x, y, tail_mask=tail)
                graphed.append(captured.graphed)
            else:
                opt.step(lambda: loss_fn(x, y), tail)
        return _state(model), graphed

    with pytest.warns(RuntimeWarning, match="capture failed") as warned:
        cap, graphed = run("capture")
    eager, _ = run("step")
    assert not any(graphed)
    assert any(expected in str(w.message) for w in warned), [str(w.message) for w in warned]
    assert any(expected in f for f in fake_graphs.faults)
    fake_graphs.faults.clear()  # expected here
    assert all(torch.equal(a, b) for a, b in zip(cap, eager))


# ---- a failed capture does not poison the process -------------------------------------
class _FailingCapture:
    """torch.cuda.graph after a capture was invalidated: capture_end throws, before
    it ends the allocator's capture mode and before it gives the stream back."""

    def __init__(self, log, allocator, graph, pool=None, capture_error_mode="global"):
        self.log, self.allocator = log, allocator
        log.append(("graph", pool, capture_error_mode))

    def __enter__(self):
        self.allocator["recording"] = True

    def __exit__(self, *exc):
        raise RuntimeError("CUDA error: operation failed due to a previous error during capture")


@pytest.mark.parametrize("ended_by_torch", [False, True])
def test_a_failed_recording_leaves_the_allocator_and_the_stream_ready(monkeypatch, ended_by_torch):
    from sse_sam_fast.optim import capture

    log, allocator = [], {"recording": False}

    def end(device, pool):
        if not allocator["recording"]:
            raise RuntimeError("endAllocatePool: not currently recording to mempool_id")
        allocator["recording"] = False
        log.append(("end", device, pool))

    monkeypatch.setattr(torch.cuda, "graph", lambda *a, **k: _FailingCapture(log, allocator, *a, **k))
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: (0, 7))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: "the caller's stream")
    monkeypatch.setattr(torch.cuda, "set_stream", lambda s: log.append(("set_stream", s)))
    monkeypatch.setattr(torch._C, "_cuda_endAllocateToPool", end, raising=False)
    release = lambda d, p: log.append(("release", d, p))
    monkeypatch.setattr(torch._C, "_cuda_releasePool", release, raising=False)
    with pytest.raises(RuntimeError, match="previous error during capture"):
        with capture.recording(object()):
            if ended_by_torch:  # capture_end got past endAllocateToPool; the graph releases its pool
                allocator["recording"] = False
    freed = [] if ended_by_torch else [("end", 0, (0, 7)), ("release", 0, (0, 7))]
    assert log == [("graph", (0, 7), "thread_local"), *freed, ("set_stream", "the caller's stream")]
    assert not allocator["recording"]
