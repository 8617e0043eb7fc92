"""What a GPU would compile: the Triton specializations of the kernels the CPU tests launch.

On a GPU, Triton compiles and loads one binary per *specialization* of a kernel:
its ``tl.constexpr`` values, the dtype of each pointer, whether each pointer and
integer argument is divisible by 16, and integers equal to 1. The interpreter
compiles nothing, so a CPU run never sees that a launch would compile. This
module keys every interpreted launch with Triton's own argument binder, built
for an sm_90 target, so a test can tell which launches would compile (a key the
process has not launched before) and compile them offline.

Pointer alignment is the one input that differs between devices: CPU and CUDA
allocations both start 16-byte aligned, and the launchers' views are offsets
of whole elements from them, so the divisibility a CPU launch shows is the one
the same launch shows on a GPU.

Imported by the tests as ``triton_launches`` (pytest puts ``tests/`` on the path
for ``tests/conftest.py``).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction, create_function_from_signature

TARGET = GPUTarget("cuda", 90, 32)


@dataclass(frozen=True)
class Spec:
    """One specialization of one kernel: ``spec`` is Triton's list of ``(type,
    attribute)`` per parameter, ``("constexpr", value)`` for the constexprs."""

    kernel: str  # module.name, e.g. sse_sam_fast.kernels.update._restore_sgd_kernel
    spec: tuple

    def constexprs(self, names: list[str]) -> dict[str, object]:
        return {n: v for n, (ty, v) in zip(names, self.spec) if ty == "constexpr"}

    def to_json(self) -> list:
        return [self.kernel, [list(x) for x in self.spec]]

    @classmethod
    def from_json(cls, item: list) -> Spec:
        kernel, spec = item
        return cls(kernel, tuple(tuple(x) for x in spec))


def kernels() -> dict[str, InterpretedFunction]:
    """Every ``@triton.jit`` kernel of ``sse_sam_fast.kernels``, by module.name."""
    from sse_sam_fast.kernels import norms, perturb, update

    out = {}
    for module in (norms, perturb, update):
        for name, obj in vars(module).items():
            if isinstance(obj, (InterpretedFunction, JITFunction)):
                out[f"{module.__name__}.{name}"] = obj
    return out


def jit_function(kernel) -> JITFunction:
    """The JITFunction a GPU run would build from ``kernel``'s source and options."""
    if isinstance(kernel, JITFunction):
        return kernel
    named = ("do_not_specialize", "do_not_specialize_on_alignment")
    return JITFunction(kernel.fn, **{k: v for k, v in kernel.kwargs.items() if k in named})


class Launches:
    """Records the specialization of every launch of the library's kernels.

    ``with launches.watching(): ...`` records; ``launches.seen`` holds each
    specialization once, in the order first launched; ``on_new`` (if set) is
    called with each specialization not seen before, before the launch runs;
    ``around`` (if set) is a context manager factory entered around each launch."""

    def __init__(self):
        self.seen: dict[Spec, None] = {}
        self.on_new = None
        self.around = contextlib.nullcontext
        self._binders = {}

    def key(self, name: str, kernel, args: tuple, kwargs: dict) -> Spec:
        if name not in self._binders:
            jf = jit_function(kernel)
            backend = make_backend(TARGET)
            self._binders[name] = create_function_from_signature(jf.signature, jf.params, backend)
        _, spec, _ = self._binders[name](*args, **kwargs)
        return Spec(name, tuple(tuple(x) for x in spec))

    @contextlib.contextmanager
    def watching(self):
        patched = []
        for name, kernel in kernels().items():
            run = kernel.run
            before = vars(kernel).get("run")  # another recorder's, if one is watching too

            def watched(*args, grid, warmup, _name=name, _kernel=kernel, _run=run, **kwargs):
                spec = self.key(_name, _kernel, args, kwargs)
                if spec not in self.seen:
                    self.seen[spec] = None
                    if self.on_new is not None:
                        self.on_new(spec)
                with self.around():
                    return _run(*args, grid=grid, warmup=warmup, **kwargs)

            kernel.run = watched  # KernelInterface.__getitem__ looks run up at each launch
            patched.append((kernel, before))
        try:
            yield self
        finally:
            for kernel, before in patched:
                if before is None:
                    del kernel.run
                else:
                    kernel.run = before

    def dump(self, path: str) -> None:
        """As JSON, one specialization a line (a diff shows what changed)."""
        lines = ",\n".join(json.dumps(s.to_json(), separators=(",", ":")) for s in self.seen)
        with open(path, "w") as f:
            f.write(f'{{"triton": "{triton.__version__}", "specs": [\n{lines}\n]}}\n')
