"""The private torch attributes the library relies on (sse_sam_fast/_torch_private.py).

If one of these fails after a torch upgrade, the fused SGD path falls back to
``optimizer.step()`` (no wrong update), but loses its speed: update the module."""

import warnings

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from sse_sam_fast import _torch_private


def _sgd(**kw):
    return torch.optim.SGD(nn.Linear(3, 2).parameters(), **{"lr": 0.1, **kw})


def test_torch_still_has_the_hook_registries():
    from torch.optim import optimizer as module

    opt = _sgd()
    for name in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks"):
        assert isinstance(getattr(opt, name), dict), name
    for name in ("_global_optimizer_pre_hooks", "_global_optimizer_post_hooks"):
        assert isinstance(getattr(module, name), dict), name
    assert _torch_private._has_hooks(opt) is False


@pytest.mark.parametrize("register", ["pre", "post", "global_pre", "global_post"])
def test_any_step_hook_makes_sgd_not_plain(register):
    opt = _sgd(momentum=0.9)
    assert _torch_private.plain_sgd(opt)
    fn = {
        "pre": opt.register_step_pre_hook,
        "post": opt.register_step_post_hook,
        "global_pre": register_optimizer_step_pre_hook,
        "global_post": register_optimizer_step_post_hook,
    }[register]
    handle = fn(lambda *_: None)
    try:
        assert not _torch_private.plain_sgd(opt)
    finally:
        handle.remove()
    assert _torch_private.plain_sgd(opt)


def test_options_the_kernel_does_not_implement_are_not_plain():
    assert not _torch_private.plain_sgd(_sgd(maximize=True))
    assert not _torch_private.plain_sgd(_sgd(lr=torch.tensor(0.1)))
    assert not _torch_private.plain_sgd(torch.optim.Adam(nn.Linear(3, 2).parameters()))

    class MySGD(torch.optim.SGD):
        pass

    assert not _torch_private.plain_sgd(MySGD(nn.Linear(3, 2).parameters(), lr=0.1))


def test_a_missing_private_attribute_falls_back_instead_of_crashing():
    opt = _sgd()
    del opt._optimizer_step_pre_hooks
    assert _torch_private._has_hooks(opt) is None
    assert not _torch_private.plain_sgd(opt)


def test_sgd_keeps_momentum_under_the_key_the_fused_step_fills():
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    assert all(isinstance(opt.state[p]["momentum_buffer"], torch.Tensor) for p in model.parameters())


def test_momentum_buffers_start_continue_or_refuse():
    model = nn.Linear(3, 2)
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    views = [torch.zeros_like(p) for p in params]
    # a step taken back on the device cannot create the buffers
    assert _torch_private.sgd_momentum_buffers(opt, params, views, start=False) is None
    assert not opt.state
    assert _torch_private.sgd_momentum_buffers(opt, params, views) is True
    assert all(opt.state[p]["momentum_buffer"] is v for p, v in zip(params, views))
    # a buffer that is not the view (loaded from a state_dict) is copied into it
    opt.state[params[0]]["momentum_buffer"] = torch.ones_like(params[0])
    assert _torch_private.sgd_momentum_buffers(opt, params, views, start=False) is False
    assert opt.state[params[0]]["momentum_buffer"] is views[0]
    assert torch.equal(views[0], torch.ones_like(params[0]))
    del opt.state[params[1]]["momentum_buffer"]
    assert _torch_private.sgd_momentum_buffers(opt, params, views) is None
    # SGD without momentum: nothing to start or continue, the fused step may run
    assert _torch_private.sgd_momentum_buffers(opt, [], [], start=False) is True


def test_mark_stepped_silences_the_scheduler_order_warning():
    """The LR scheduler warns when it steps before its optimizer did; the fused
    step never calls optimizer.step(), so it must set the flag torch reads."""
    opt = _sgd()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    _torch_private.mark_stepped(opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sched.step()
    unmarked = _sgd()
    sched = torch.optim.lr_scheduler.StepLR(unmarked, step_size=1)
    with pytest.warns(UserWarning, match="optimizer.step"):
        sched.step()


def test_inverse_scale_is_the_device_reciprocal_of_the_scale():
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(torch.ones((), requires_grad=True))  # creates the scale tensor lazily
    inv = _torch_private.inverse_scale(scaler)
    assert isinstance(inv, torch.Tensor) and inv.dtype == torch.float32
    assert inv.item() == 1 / 1024


def test_scaler_skipped_reads_the_scalers_verdict():
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    scaler.scale(model(torch.randn(4, 3)).sum()).backward()
    scaler.step(opt)
    assert not _torch_private.scaler_skipped(scaler, opt)
    scaler.update()
    opt.zero_grad()
    scaler.scale(model(torch.randn(4, 3)).sum()).backward()
    next(model.parameters()).grad[0, 0] = float("inf")
    scaler.step(opt)
    assert _torch_private.scaler_skipped(scaler, opt)


def test_capturable_adam_needs_capturable_and_a_tensor_lr():
    params = lambda: nn.Linear(3, 2).parameters()
    lr = lambda: torch.tensor(1e-3)
    assert _torch_private.capturable_adam(torch.optim.Adam(params(), lr=lr(), capturable=True))
    assert _torch_private.capturable_adam(torch.optim.AdamW(params(), lr=lr(), capturable=True))
    assert not _torch_private.capturable_adam(torch.optim.Adam(params(), lr=1e-3, capturable=True))
    assert not _torch_private.capturable_adam(torch.optim.Adam(params(), lr=lr(), foreach=False))
    assert not _torch_private.capturable_adam(torch.optim.SGD(params(), lr=0.1))
    opt = torch.optim.AdamW(params(), lr=lr(), capturable=True)
    handle = opt.register_step_pre_hook(lambda *a: None)
    assert not _torch_private.capturable_adam(opt)  # a hook would run inside the graph once only
    handle.remove()
    assert _torch_private.capturable_adam(opt)


def test_the_normalisation_families_hold_the_layers_models_use():
    batch = [nn.BatchNorm1d(3), nn.BatchNorm2d(3), nn.SyncBatchNorm(3), nn.LazyBatchNorm1d()]
    instance = [nn.InstanceNorm1d(3, track_running_stats=True), nn.InstanceNorm2d(3)]
    assert all(isinstance(m, _torch_private.BATCH_NORMS) for m in batch)
    assert not any(isinstance(m, _torch_private.BATCH_NORMS) for m in instance)
    assert all(isinstance(m, _torch_private.INSTANCE_NORMS) for m in instance)
    assert all(isinstance(m, _torch_private.NORM_LAYERS) for m in batch + instance)
    assert not isinstance(nn.LayerNorm(3), _torch_private.NORM_LAYERS)


def test_find_modules_finds_each_layer_once_as_modules_does():
    shared = nn.BatchNorm1d(4)
    model = nn.Sequential(nn.Linear(4, 4), shared, nn.Sequential(shared, nn.BatchNorm1d(4)), nn.Tanh())
    model.add_module("gone", None)
    expected = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
    assert _torch_private.find_modules(model, nn.BatchNorm1d) == expected
    assert _torch_private.find_modules(model, nn.Sequential) == [model, model[2]]


def test_hiding_an_instance_norms_buffers_keeps_its_statistics_out_of_the_forward():
    m = nn.InstanceNorm1d(3, track_running_stats=True)
    bufs = _torch_private.buffers_of(m)
    mean, var = bufs["running_mean"], bufs["running_var"]
    assert mean is m.running_mean and var is m.running_var
    bufs["running_mean"] = bufs["running_var"] = None
    m(torch.randn(2, 3, 5))  # no statistics to update
    bufs["running_mean"], bufs["running_var"] = mean, var
    assert m.running_mean is mean and torch.equal(mean, torch.zeros(3)) and torch.equal(var, torch.ones(3))
    m(torch.randn(2, 3, 5))  # and with them back, the forward updates them again
    assert not torch.equal(mean, torch.zeros(3))


def test_version_counts_in_place_writes():
    t = torch.zeros(3)
    before = _torch_private.version(t)
    t.add_(1)
    assert _torch_private.version(t) == before + 1
    t + 1  # noqa: B018  (out of place: not a write to t)
    assert _torch_private.version(t) == before + 1


def test_call_unwrapped_gives_plain_tensors_inside_a_subclass():
    class Tagged(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            return _torch_private.call_unwrapped(func, args, kwargs or {})

    out = torch.arange(3).as_subclass(Tagged) * 2
    assert type(out) is torch.Tensor and out.tolist() == [0, 2, 4]
