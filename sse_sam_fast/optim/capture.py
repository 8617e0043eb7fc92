"""Whole-step capture: ``opt.capture(loss_fn)`` replays one CUDA graph per step.

At the sizes SAM is trained at, a step on a GPU is bound by the host: each of
its thousands of kernels is launched from Python. A CUDA graph records the
launches of one step (the clean forward, every backward, the perturbations,
the restore and the update) once and replays them with one call.

What a graph cannot do is decided on the host: so a graph is only built where
the step is sync-free and every decision it takes is fixed by things the key
of the graph names (input shapes and dtypes, the stage's radii, the schedule,
the parameter layout). Everything else runs the same step eagerly, with a
one-time warning saying why. A new graph is checked once against the eager
step on the same batch before it is used; a graph that disagrees is dropped.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .. import _torch_private
from .._saved import Saved
from . import batchnorm
from .checks import micro_batches

WARMUP = 3  # eager calls per graph key before it is captured (lazy initialisation, compilation)
# graph keys at most: a key that changes at every call (a scheduler moving Adam's betas)
# would otherwise warm up forever and keep one entry per call
MAX_KEYS = 16


class _Graph:
    """One captured step: its static inputs, the graph, and its static loss."""

    def __init__(self, inputs: tuple, mask: Tensor | None):
        self.inputs = tuple(x.clone() if isinstance(x, Tensor) else x for x in inputs)
        self.mask = None if mask is None else mask.clone()
        self.graph = torch.cuda.CUDAGraph()
        self.loss: Tensor | None = None
        self.reused = False  # a step moving groups by kept gradients (reuse=K): counted at each replay
        self.rows: tuple = ()  # the gradient buffers it was recorded with
        # what the recorded kernels touch outside the graph's own pool (see _alive)
        self.keep: list[Tensor] = []

    def load(self, inputs: tuple, mask: Tensor | None) -> None:
        for static, x in zip(self.inputs, inputs):
            if isinstance(static, Tensor):
                static.copy_(x, non_blocking=True)
        if mask is not None:
            self.mask.copy_(mask, non_blocking=True)


class CapturedStep:
    """``captured(*inputs, tail_mask=None)`` is ``opt.step(lambda: loss_fn(*inputs),
    tail_mask)``, replayed as a CUDA graph where that gives the same update.

    ``graphed`` tells whether the last call replayed a graph.
    """

    def __init__(self, opt, loss_fn: Callable[..., Tensor], schedule: str = "exact"):
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        self.opt, self.loss_fn, self.schedule = opt, loss_fn, schedule
        self.graphed = False
        self._graphs: dict[tuple, _Graph | None] = {}  # None: this key runs eagerly
        self._calls: dict[tuple, int] = {}
        self._warned: set[str] = set()
        # a state loaded into the base optimizer replaces the param groups and the
        # momentum tensors a graph reads: every graph is dropped (weakly held, so
        # the optimizer does not keep this object alive)
        ref = weakref.ref(self)
        opt.optimizer.register_load_state_dict_post_hook(lambda _: ref() is not None and ref().forget())

    def forget(self) -> None:
        """Drop every graph; the next calls warm up and capture anew."""
        self._graphs.clear()
        self._calls.clear()

    def __call__(self, *inputs, tail_mask: Tensor | None = None) -> Tensor:
        why = self._refusal(inputs)
        if why is not None:
            return self._eager(inputs, tail_mask, why)
        key = self._key(inputs, tail_mask)
        if key not in self._graphs:
            if key not in self._calls and len(self._calls) >= MAX_KEYS:
                why = (
                    f"the graph key changed on more than {MAX_KEYS} calls (a value baked into a graph "
                    "changes at every step, such as Adam's betas under OneCycleLR)"
                )
                return self._eager(inputs, tail_mask, why)
            self._calls[key] = self._calls.get(key, 0) + 1
            if self._calls[key] <= WARMUP:
                if _kind(self.opt.optimizer) == "sgd":
                    # the warm-ups launch the kernel variant the graph will (hyperparameters read
                    # from memory): compiling and loading it inside the capture is not permitted
                    self.opt._backend.hyperparameters_on_device()
                return self._eager(inputs, tail_mask, side_stream=self._calls[key] == WARMUP)
            return self._capture(key, inputs, tail_mask)
        graph = self._graphs[key]
        if graph is None:
            return self._eager(inputs, tail_mask)
        if graph.rows != _rows(self.opt._backend):  # gradient rows grown since (official methods)
            del self._graphs[key], self._calls[key]
            return self(*inputs, tail_mask=tail_mask)
        return self._replay(graph, inputs, tail_mask)

    # ---- when a graph gives the same update ---------------------------------------
    def _refusal(self, inputs: tuple) -> str | None:
        """Why this call cannot replay a graph (None: it can). CPU: silently eager."""
        opt, be = self.opt, self.opt._backend
        device = be.params[0].device
        if not _graphs_on(device):
            return ""
        if opt._reuse_plan(opt._groups()).get("keep"):
            return ""  # reuse=K: a step that keeps its clean gradients reads its verdict on the host
        kind = _kind(opt.optimizer)
        elsewhere = [
            k for g in opt.param_groups for k, v in g.items() if isinstance(v, Tensor) and v.device != device
        ]
        reasons = [
            (
                kind is None,
                "the base optimizer is neither a plain torch.optim.SGD nor a torch.optim.Adam/AdamW built "
                "with capturable=True and a tensor lr (lr=torch.tensor(1e-3, device='cuda'))",
            ),
            (kind == "sgd" and be.name != "triton", "a captured SGD step needs the triton backend"),
            (
                bool(elsewhere),
                f"the tensor {elsewhere[0] if elsewhere else ''} is not on the parameters' device {device}: "
                "a graph would keep its value of the capture",
            ),
            (be.name == "reference", "the reference backend is not captured"),
            (opt._dist.lockstep, "distributed steps (DDP, FSDP2) are not captured"),
            (opt.nonfinite != "skip", "nonfinite='raise' reads the verdict on the host"),
            (self.schedule != "exact", "only the exact schedule is captured"),
            (
                any(isinstance(x, Tensor) and x.device != device for x in inputs),
                "inputs are not on the parameters' device",
            ),
            (_random(opt.model), "dropout draws differ between a graph and the eager step"),
        ]
        return next((why for bad, why in reasons if bad), None)

    def _key(self, inputs: tuple, mask: Tensor | None) -> tuple:
        """Everything a graph bakes in: a change must select another graph."""
        opt, be = self.opt, self.opt._backend
        opt._track_params()  # parameters added to the base optimizer join the step ...
        be._check_layout()  # ... and a re-bound parameter gets new buffers: a new layout
        shapes = tuple((x.shape, x.dtype) if isinstance(x, Tensor) else ("value", x) for x in inputs)
        layout = (tuple(id(b.w) for b in be.buckets), tuple(p.requires_grad for p in be.params))
        # reuse=K: the rows of the kept gradients a graph reads (another row: a new graph)
        kept = tuple(sorted((s, be.slots[s][0]) for s in be.lasting if be.holds(s)))
        # the param group dicts by identity: the fused kernel reads each one's device copy
        groups = (tuple(map(id, opt.param_groups)), _baked(opt.optimizer))
        model, batchnorms = opt.model, opt._batchnorms
        modes = (model.training, tuple(m.training for m in batchnorms), opt.bn_stats)
        # the running statistics a graph updates, by the number of their layout in the
        # step's copy: a buffer replaced (bn.running_mean = ...) makes a new one
        stats = opt._stats.follow(batchnorm.running_stats(batchnorms))
        # ASAM and clipping choose kernels and their arguments too
        options = (opt._adaptive(), opt.max_grad_norm)
        mask_shape = None if mask is None else mask.shape
        groups_now = tuple(opt._groups())
        phase = tuple(sorted(opt._reuse_plan(groups_now).items()))
        return shapes, mask_shape, groups_now, phase, layout, kept, groups, modes, stats, options

    # ---- the three ways to run a call ---------------------------------------------------
    def _eager(self, inputs: tuple, mask, why: str | None = None, side_stream: bool = False) -> Tensor:
        if why:
            self._eager_warning(why)
        self.graphed = False
        step = lambda: self.opt.step(lambda: self.loss_fn(*inputs), mask, schedule=self.schedule)
        if not side_stream:
            return step()
        # the last warm-up runs on a side stream, as torch.cuda.graph requires
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            loss = step()
        torch.cuda.current_stream().wait_stream(stream)
        return loss

    def _replay(self, graph: _Graph, inputs: tuple, mask) -> Tensor:
        # the layout was checked by _key, which chose this graph
        graph.load(inputs, mask)
        if _kind(self.opt.optimizer) == "sgd":
            self.opt._backend.load_hyperparameters()
        graph.graph.replay()
        self.opt._advance(graph.reused)
        self.graphed = True
        return graph.loss.clone()  # the static loss is overwritten by the next replay

    def _capture(self, key: tuple, inputs: tuple, mask) -> Tensor:
        opt, be = self.opt, self.opt._backend
        sgd = _kind(opt.optimizer) == "sgd"
        if sgd:
            be.hyperparameters_on_device()
        graph = _Graph(inputs, mask)
        phase = opt._reuse_plan(opt._groups())
        graph.reused = bool(phase.get("reused")) or phase.get("corrected", False)
        # recorded without counting it for reuse=K: every replay counts itself
        closures, masks = micro_batches(lambda: self.loss_fn(*graph.inputs), graph.mask)
        step = lambda: opt._step(closures, masks, self.schedule, None, advance=False)
        try:
            graph.loss = _record(opt, graph.graph, step)
            fused = be.fused_last
        except Exception as err:  # nothing ran: the recorded kernels are dropped with the graph
            self._graphs[key] = None
            return self._eager(inputs, mask, f"capture failed ({type(err).__name__}: {err})")
        graph.keep, graph.rows = _alive(opt), _rows(be)
        if sgd and not fused:
            self._graphs[key] = None
            return self._eager(inputs, mask, "the step did not take the fused SGD update")
        return self._first_replay(key, graph, inputs, mask)

    def _first_replay(self, key: tuple, graph: _Graph, inputs: tuple, mask) -> Tensor:
        """Replay once and compare with the eager step from the same state; keep
        the eager result either way, and the graph only if they agree."""
        state = _State(self.opt)
        self._replay(graph, inputs, mask)
        replayed = state.now()
        state.restore()
        loss = self._eager(inputs, mask)
        from ..verify import compare  # the verify tables; only a GPU ever gets here

        diff = compare(replayed, state.now(), torch.float32)
        if diff.ok:
            self._graphs[key] = graph
        else:
            self._graphs[key] = None
            self._eager_warning(f"the captured step differed from the eager step ({diff})")
        return loss

    def _eager_warning(self, why: str) -> None:
        if why not in self._warned:
            self._warned.add(why)
            warnings.warn(f"capture: running eagerly: {why}", RuntimeWarning, stacklevel=4)


def _graphs_on(device: torch.device) -> bool:
    """Whether steps on ``device`` can be captured."""
    return device.type == "cuda" and torch.cuda.is_available()


def _record(opt, graph: torch.cuda.CUDAGraph, step: Callable[[], Tensor]) -> Tensor:
    """Record ``step()`` into ``graph`` (nothing runs); returns its static output.
    With :func:`_graphs_on`, the one seam where the CPU tests stand in for a GPU."""
    with recording(graph):
        return step()


@contextlib.contextmanager
def recording(graph: torch.cuda.CUDAGraph):
    """``torch.cuda.graph(graph)``, such that a recording that raises leaves the
    process able to capture again (docs/capture.md).

    When a recording fails, torch's ``capture_end`` throws before it takes the
    caching allocator out of capture mode for the graph's pool and before it
    gives the current stream back: every later ``torch.cuda.graph`` then fails
    an internal assert. Naming the pool lets it be ended and released here.
    Errors are those of this thread only ("thread_local", as torch.compile's
    CUDA graphs): a DataLoader thread pinning memory meanwhile neither fails
    nor breaks the recording."""
    device, stream = torch.cuda.current_device(), torch.cuda.current_stream()
    pool = torch.cuda.graph_pool_handle()
    try:
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            yield
    except BaseException:
        _torch_private.end_failed_capture(device, pool)
        torch.cuda.set_stream(stream)
        raise


def _alive(opt) -> list[Tensor]:
    """Every tensor a captured step reads or writes that the graph's memory pool
    does not own: the flat buffers, the base optimizer's state and tensor
    hyperparameters, the gradients, the BatchNorm statistics, and the copies a
    step saves of those statistics and of the optimizer state. A graph keeps
    them alive: a re-layout drops the backend's references, and a replay must
    never write into memory handed out again, nor an id in a graph key be reused."""
    be = opt._backend
    keep = [t for b in be.buckets for t in (b.w, b.g, b.w0)]
    keep += [t for t in getattr(be, "_momentum", []) if t is not None]
    keep += list((getattr(be, "_hyper", None) or {}).values())
    keep += [p.grad for p in be.params if p.grad is not None]
    for st in opt.optimizer.state.values():
        keep += [t for t in st.values() if isinstance(t, Tensor)]
    for g in opt.optimizer.param_groups:
        keep += [v for v in g.values() if isinstance(v, Tensor)]
    keep += batchnorm.running_stats(opt._batchnorms)
    keep += opt._stats.buffers() + be._state_copy.buffers()
    return keep


def _rows(be) -> tuple:
    """The gradient buffers by identity: rows added for a new gradient set
    replace them, and a graph must not read the old ones."""
    return tuple(id(b.g) for b in be.buckets)


def _kind(optimizer: torch.optim.Optimizer) -> str | None:
    """Which captured base step this is: "sgd" (the fused kernel, hyperparameters
    read from device memory), "adam" (torch's capturable Adam/AdamW with a tensor
    lr) or None (not captured)."""
    from .._torch_private import capturable_adam, plain_sgd

    if plain_sgd(optimizer):
        return "sgd"
    return "adam" if capturable_adam(optimizer) else None


def _baked(optimizer: torch.optim.Optimizer) -> tuple:
    """What a graph bakes in of the base optimizer, for the graph key: changing any
    of it must not replay an old graph. The fused SGD kernel reads the values
    from memory, but whether momentum and weight decay are on, and nesterov,
    choose its code path. Adam's step reads only ``lr`` from memory (the tensor,
    named by id: a new tensor is a new graph); every other value is baked in."""
    if _kind(optimizer) == "sgd":
        groups = optimizer.param_groups
        return tuple((g["momentum"] != 0, g["weight_decay"] != 0, bool(g["nesterov"])) for g in groups)
    return tuple(
        tuple((k, id(v) if isinstance(v, Tensor) else repr(v)) for k, v in sorted(g.items()) if k != "params")
        for g in optimizer.param_groups
    )


def _random(model: nn.Module) -> bool:
    return any(m.training and m.p > 0 for m in batchnorm.find_layers(model, _torch_private.DROPOUTS))


class _State:
    """Everything a step writes (weights, momentum, BatchNorm buffers, the
    skipped-step counter), copied so that a trial step can be taken back."""

    def __init__(self, opt):
        self.tensors = [b.w for b in opt._backend.buckets]
        state = opt.optimizer.state.values()
        self.tensors += [t for st in state for t in st.values() if isinstance(t, Tensor)]
        self.tensors += list(opt.model.buffers())
        if opt._skipped_device is not None:
            self.tensors.append(opt._skipped_device)
        self.saved = Saved(self.tensors)
        self.opt, self.kept_age = opt, opt._kept_age

    def now(self) -> list[Tensor]:
        return [t.clone() for t in self.tensors]

    def restore(self) -> None:
        self.saved.restore()
        self.opt._kept_age = self.kept_age
