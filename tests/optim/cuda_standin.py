"""A CPU stand-in for CUDA graph capture that fails where a real capture would.

``opt.capture`` records a step with ``torch.cuda.graph``; on a CPU the tests put
:func:`record` in its place. Recording here runs the step once (and puts the
state back, as a recording runs nothing) while watching for what CUDA forbids
between ``capture_begin`` and ``capture_end``, or what a replay would not redo:

- a Triton kernel compiled: a launch whose specialization (as Triton's JIT keys
  it, see ``tests/triton_launches.py``) the test had not launched before the
  recording. On a GPU the binary is loaded with ``cuModuleLoadData``, which a
  capturing stream does not permit. Each test starts as a fresh process would,
  with nothing compiled;
- a host synchronisation: a device value read on the host (``.item()``,
  ``bool(t)``, ``float(t)``, ``.tolist()``, ``.numpy()``, ``torch.equal``) or
  an op whose output size depends on device values (``nonzero``, boolean
  indexing, ``masked_select``, ``unique``, ``repeat_interleave`` without
  ``output_size``);
- an RNG draw (any op torch tags ``nondeterministic_seeded``): a replay draws
  anew where the eager step drew once, so the first-replay check cannot hold;
- an allocation outside the graph's pool. On CUDA every tensor the recorded ops
  allocate on the capturing stream comes from the graph's private pool, and is
  the graph's: a temporary, the static output, or a gradient the recorded
  backward allocated. Outside that pool are: a tensor made from host data
  (``torch.tensor``, ``as_tensor``: a pageable host-to-device copy), pinned
  host memory, allocations on another stream (entering ``torch.cuda.stream``),
  and lasting state — a tensor the optimizer keeps after the step (its flat
  buffers, optimizer state, saved copies, hyperparameters; see
  ``capture._alive``) first allocated during the recording, whose creation a
  replay would run again. On the CPU an "allocation" is an op output whose
  storage none of the op's inputs had.

What the interpreter does to run a kernel on the host (copies, numpy views) is
the launch itself, not part of the step, and is not watched.
"""

from __future__ import annotations

import contextlib

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten

SYNC_OPS = {
    aten._local_scalar_dense,
    aten.nonzero,
    aten.masked_select,
    aten.is_nonzero,
    aten.equal,
    aten.unique_consecutive,
    aten._unique,
    aten._unique2,
    aten.unique_dim,
}
SYNC_METHODS = {"tolist", "numpy", "__array__"}
HOST_DATA_OPS = {aten.lift_fresh, aten.lift_fresh_copy, aten._pin_memory}


class CaptureHazard(RuntimeError):
    """What the stand-in raises where a CUDA capture would fail."""


def _storage(t: torch.Tensor):
    return t.untyped_storage() if t.numel() else None


def _fault(faults: list[str], what: str):
    """A CUDA capture fails at the call that breaks it; so does the stand-in."""
    faults.append(what)
    raise CaptureHazard(what)


class _Ops(TorchDispatchMode):
    def __init__(self, faults: list[str]):
        super().__init__()
        self.faults = faults
        self.created: list[tuple[StorageWeakRef, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if packet in SYNC_OPS:
            _fault(self.faults, f"host synchronisation: {func}")
        if packet is aten.index and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None
        ):
            _fault(self.faults, "host synchronisation: boolean indexing (aten.index with a mask)")
        if packet is aten.repeat_interleave and kwargs.get("output_size") is None and len(args) == 1:
            _fault(self.faults, "host synchronisation: repeat_interleave without output_size")
        if torch.Tag.nondeterministic_seeded in func.tags:
            _fault(self.faults, f"RNG draw: {func}")
        if packet in HOST_DATA_OPS or kwargs.get("pin_memory"):
            _fault(self.faults, f"allocation outside the graph's pool: {func} (host data or pinned memory)")
        out = func(*args, **kwargs)
        inputs = {s.data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)
                  for s in [_storage(t)] if s is not None}  # fmt: skip
        for t in tree_flatten(out)[0]:
            s = _storage(t) if isinstance(t, torch.Tensor) else None
            if s is not None and s.data_ptr() not in inputs:
                self.created.append((StorageWeakRef(s), s.data_ptr()))
        return out


class _Methods(TorchFunctionMode):
    def __init__(self, faults: list[str]):
        super().__init__()
        self.faults = faults

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in SYNC_METHODS:
            _fault(self.faults, f"host synchronisation: Tensor.{func.__name__}()")
        return func(*args, **(kwargs or {}))


class Standin:
    """The stand-in for one test: install with :meth:`install` (monkeypatch),
    read :attr:`faults` (every fault of every recording, in order)."""

    def __init__(self, launches):
        self.launches = launches
        self.faults: list[str] = []
        self.recording: list[str] | None = None  # the faults of the recording under way
        launches.on_new = self._compiled
        launches.around = self._launch

    def _compiled(self, spec) -> None:
        if self.recording is not None:
            name = spec.kernel.rsplit(".", 1)[-1]
            flags = ", ".join(f"{k}={v}" for k, v in spec.constexprs(_names(spec)).items())
            _fault(self.recording, f"Triton kernel compiled: {name} ({flags})")

    @contextlib.contextmanager
    def _launch(self):
        with _disable_current_modes(), torch._C.DisableTorchFunction():
            yield

    def stream(self, _stream):
        if self.recording is not None:
            _fault(self.recording, "allocation outside the graph's pool: a stream switch while recording")
        return contextlib.nullcontext()

    def record(self, opt, graph, step):
        """capture._record: ``step()`` run once under watch, its effects taken back."""
        from sse_sam_fast.optim import capture

        # a recording runs nothing, failed or not: every tensor the step can write keeps its values
        tensors = {id(t): t for t in capture._State(opt).tensors + capture._alive(opt)}.values()
        before = [(t, t.clone()) for t in tensors]
        faults: list[str] = []
        ops = _Ops(faults)
        self.recording = faults
        try:
            with _Methods(faults), ops:
                out = step()
        finally:
            self.recording = None
            self.faults += faults
            with torch.no_grad():
                for t, saved in before:
                    t.copy_(saved)
        created = {ptr for ref, ptr in ops.created if not ref.expired()}
        grads = {id(p.grad) for p in opt._backend.params if p.grad is not None}
        for t in capture._alive(opt):
            if id(t) not in grads and t.numel() and t.untyped_storage().data_ptr() in created:
                what = f"lasting state {tuple(t.shape)} {t.dtype} first allocated during the recording"
                _fault(self.faults, f"allocation outside the graph's pool: {what}")
        graph.step, graph.out = step, out
        return out

    def install(self, monkeypatch) -> None:
        from sse_sam_fast.optim import capture

        monkeypatch.setattr(capture, "_graphs_on", lambda device: True)
        monkeypatch.setattr(capture, "_record", self.record)
        monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
        monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: FakeStream())
        monkeypatch.setattr(torch.cuda, "stream", self.stream)
        # what the library asks to know that it is being captured (and not an eager step)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: self.recording is not None)
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: self.recording is not None)


def _names(spec) -> list[str]:
    from tests import triton_launches

    return triton_launches.kernels()[spec.kernel].arg_names


class FakeGraph:
    """Stands in for torch.cuda.CUDAGraph: replay() runs the recorded step again and
    writes its loss into the static output, as a replay rewrites its memory."""

    def __init__(self):
        self.step, self.out, self.replays = None, None, 0

    def replay(self):
        self.replays += 1
        self.out.copy_(self.step())


class FakeStream:
    def wait_stream(self, other):
        pass
