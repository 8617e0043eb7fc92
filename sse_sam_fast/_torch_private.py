"""Every use of private torch attributes, classes and functions, in one place.

The rule: a private name of torch (one with a leading underscore, on a torch
module, class, tensor, module or optimizer) is touched only here, behind a
name that says what the library needs it for, with a line saying why no public
one serves. One family is exempt: the ``torch._foreach_*`` multi-tensor ops
are called directly where they are used, as torch.optim's own multi-tensor
paths call them; they are the grouped primitive (one launch per device and
dtype, not one per tensor), and a wrapper around each would hide simple code.

The triton backend replaces ``torch.optim.SGD.step()`` with a fused kernel. That
is only equal to the real step when nothing else would have run around it
(optimizer hooks) and when the step's options are ones the kernel implements;
afterwards an attached LR scheduler must believe the optimizer stepped, and
the momentum buffers the kernel fills must be the ones ``optimizer.state``
holds. Those facts live in private torch attributes. ``tests/
test_torch_private.py`` fails loudly if a torch release renames them; until
then, a missing attribute makes the step fall back to ``optimizer.step()``,
never a wrong update. The names are unchanged from torch 2.0 to 2.13 (the GPU
machines run 2.11).

Under AMP the engine takes norms of unscaled gradients, so it reads the
GradScaler's current scale, which has no public device-side accessor. A step
taken back on the device uses the fused optimizers' ``found_inf`` argument,
which only GradScaler's private protocol sets.

FSDP2 has setters and no getters for whether a backward reduce-scatters and
reshards; two settings that would make a SAM step wrong without a sign are
read from its parameter groups (the FSDP2 section).

The normalisation layers have no public base classes, the module tree no
public walk without names, a tensor no public write counter: those are here
too (the last section).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

_HYPERPARAMETERS = ("lr", "momentum", "dampening", "weight_decay")


def _has_hooks(optimizer: torch.optim.Optimizer) -> bool | None:
    """Whether any step hook is registered; None if torch no longer says where."""
    from torch.optim import optimizer as module

    try:
        return bool(
            optimizer._optimizer_step_pre_hooks
            or optimizer._optimizer_step_post_hooks
            or module._global_optimizer_pre_hooks
            or module._global_optimizer_post_hooks
        )
    except AttributeError:
        return None


def plain_sgd(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step()`` is exactly the update of ``kernels.update``:
    a ``torch.optim.SGD`` without hooks, ``maximize``, ``differentiable`` or
    tensor-valued hyperparameters."""
    if type(optimizer) is not torch.optim.SGD or _has_hooks(optimizer) is not False:
        return False
    for group in optimizer.param_groups:
        if group.get("maximize") or group.get("differentiable"):
            return False
        if any(isinstance(group[k], Tensor) for k in _HYPERPARAMETERS):
            return False
    return True


def capturable_adam(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step()`` can be recorded in a CUDA graph and replayed
    with the learning rate of the moment: a ``torch.optim.Adam`` or ``AdamW``
    built with ``capturable=True`` (step counts on the device, no host reads)
    and a tensor ``lr`` (LR schedulers ``fill_`` it in place, so a replay reads
    the current value), without hooks or ``differentiable``."""
    if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW) or _has_hooks(optimizer) is not False:
        return False
    return all(
        g.get("capturable") is True and isinstance(g.get("lr"), Tensor) and not g.get("differentiable")
        for g in optimizer.param_groups
    )


def skips_on_found_inf(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step()`` takes a device flag ``found_inf`` and skips the
    whole update inside its kernel where it is set (the protocol GradScaler
    uses): torch's SGD, Adam and AdamW built with ``fused=True``, without hooks."""
    return (
        type(optimizer) in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)
        and getattr(optimizer, "_step_supports_amp_scaling", False) is True
        and all(g.get("fused") is True for g in optimizer.param_groups)
        and _has_hooks(optimizer) is False
    )


def step_unless(optimizer: torch.optim.Optimizer, found_inf: Tensor) -> None:
    """``optimizer.step()`` that leaves weights and state as they were where the
    float device flag ``found_inf`` is 1 (see :func:`skips_on_found_inf`)."""
    optimizer.found_inf = found_inf
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf


def sgd_momentum_buffers(
    optimizer: torch.optim.SGD, params: Sequence[Tensor], views: Sequence[Tensor], start: bool = True
) -> bool | None:
    """Point ``optimizer.state[p]["momentum_buffer"]`` at ``views[i]`` for the
    ``params`` (those that use momentum). Returns True if the buffers start now
    (SGD's first step: the kernel sets them instead of decaying them), False if
    they continue (values loaded from a state_dict or made by a plain ``step()``
    are copied into the views first), None if the fused step cannot reproduce
    it: some buffers exist and some do not, or none does and ``start`` is False
    (a step to be taken back on the device cannot create state). No parameter
    with momentum: True, and nothing to do."""
    state = optimizer.state
    current = [None if st is None else st.get("momentum_buffer") for st in map(state.get, params)]
    if all(s is None for s in current):
        if not start and params:
            return None
        # a first step, or optimizer.state emptied since (a state_dict saved before any step)
        for p, view in zip(params, views):
            state[p]["momentum_buffer"] = view
        return True
    if any(s is None for s in current):
        return None
    for p, s, view in zip(params, current, views):
        if s is not view:
            view.copy_(s)
            state[p]["momentum_buffer"] = view
    return False


def mark_stepped(optimizer: torch.optim.Optimizer) -> None:
    """Tell an attached LR scheduler that the optimizer stepped: its wrapper of
    ``step()`` did not run, and it warns otherwise."""
    optimizer._opt_called = True


def inverse_scale(scaler: torch.amp.GradScaler) -> Tensor:
    """``1 / scale`` of a GradScaler as a device tensor (``get_scale()`` would
    read it on the host); fp64 reciprocal as the scaler's own unscale does."""
    return scaler._scale.double().reciprocal().float()


def scaler_skipped(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``scaler.step(optimizer)`` just skipped the step for an inf or NaN
    gradient (the scaler has read that on the host already). False if torch no
    longer says where: then only the BatchNorm statistics of such a step stay."""
    try:
        found = scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"]
    except (AttributeError, KeyError):
        return False
    return any(bool(v.item()) for v in found.values())


def end_failed_capture(device: int, pool: tuple[int, int]) -> None:
    """After ``torch.cuda.graph(graph, pool=pool)`` raised: take the caching
    allocator out of capture mode for ``pool`` and release the pool, which
    ``CUDAGraph.capture_end`` skips when the capture failed (it throws first).
    Nothing to do where ``capture_end`` got that far: the allocator then says it
    is not recording to ``pool``, and the graph releases its pool when dropped.
    Older torch releases name the first function ``_cuda_endAllocateCurrentStreamToPool``."""
    end = getattr(torch._C, "_cuda_endAllocateToPool", None)
    end = end or getattr(torch._C, "_cuda_endAllocateCurrentStreamToPool", None)
    if end is None:
        return
    try:
        end(device, pool)
    except RuntimeError:
        return
    torch._C._cuda_releasePool(device, pool)


# ---- modules and tensors ---------------------------------------------------------
# torch has no public base class for these families; the library's BatchNorm
# policy is about the families, whatever subclass (SyncBatchNorm, Lazy*) a model uses
NORM_LAYERS = nn.modules.batchnorm._NormBase  # BatchNorm and InstanceNorm, running statistics or not
BATCH_NORMS = nn.modules.batchnorm._BatchNorm  # the ones whose statistics couple a batch's samples
INSTANCE_NORMS = nn.modules.instancenorm._InstanceNorm
DROPOUTS = nn.modules.dropout._DropoutNd  # every DropoutNd: a captured graph would replay one mask


def find_modules(model: nn.Module, kind: type | tuple[type, ...]) -> list[nn.Module]:
    """The modules of ``model`` (itself included) that are instances of ``kind``,
    each once. A walk over ``_modules``: ``model.modules()`` builds the name of
    every module on the way, and this runs at every step (a layer swapped in
    since the last one must be found)."""
    found, todo, seen = [], [model], {id(model)}
    for m in todo:
        if isinstance(m, kind):
            found.append(m)
        for child in m._modules.values():
            if child is not None and id(child) not in seen:
                seen.add(id(child))
                todo.append(child)
    return found


def buffers_of(module: nn.Module) -> dict[str, Tensor | None]:
    """The dict a module keeps its buffers in. Setting an entry to None hides
    the buffer from the module's forward and putting the tensor back restores
    the same object; ``setattr`` would do the same through ``Module.__setattr__``'s
    checks, at every perturbed pass."""
    return module._buffers


def version(t: Tensor) -> int:
    """The counter of in-place writes autograd keeps on every tensor: tells a
    gradient written in place from one left alone without comparing values."""
    return t._version


def call_unwrapped(func, args: tuple, kwargs: dict):
    """``func(*args, **kwargs)`` from inside a tensor subclass's
    ``__torch_function__``, with the subclass's handling off and the results as
    they come: ``super().__torch_function__`` would turn every result into the
    subclass."""
    with torch._C.DisableTorchFunctionSubclass():
        return func(*args, **kwargs)


# ---- FSDP2 ------------------------------------------------------------------------------
def fsdp2_sync_flags(model: nn.Module) -> list[tuple[bool, bool]]:
    """``(reduce_grads, reshard_after_backward)`` of every FSDP2 parameter group
    under ``model``, as ``set_requires_gradient_sync`` and
    ``set_reshard_after_backward`` left them: FSDP2 has setters for both and no
    getter. A state laid out otherwise (another torch release) gives nothing to
    check, and tests/test_torch_private.py says so."""
    flags = []
    for m in model.modules():
        get_state = getattr(m, "_get_fsdp_state", None)
        if get_state is None:
            continue
        state = get_state()
        groups = getattr(state, "_fsdp_param_groups", None)
        if groups is None:  # torch before 2.9 kept one group per module
            groups = [g for g in [getattr(state, "_fsdp_param_group", None)] if g is not None]
        flags += [(bool(g.reduce_grads), bool(g.reshard_after_backward)) for g in groups]
    return flags
