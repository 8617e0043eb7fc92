"""Compile kernel specializations for a GPU on a machine without one.

    python tests/kernels/compile_offline.py JOBS.json

JOBS.json: ``[[capability, kernel, spec], ...]`` (``kernel`` as module.name,
``spec`` Triton's list of ``(type, attribute)`` per parameter, as
tests/triton_launches.py records it). Prints one JSON object per job: the
stages reached (``cubin`` when the bundled ptxas assembled it), the shared
memory, global and profile scratch sizes, or the error.

It runs in its own process with ``TRITON_INTERPRET=0``: in a process where the
interpreter has run, its patches to ``triton.language`` break the compiler.
"""

import importlib
import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "0"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default, said aloud (3.9 warns otherwise)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402


def compile_one(capability: int, kernel: str, spec: list) -> dict:
    module, name = kernel.rsplit(".", 1)
    fn = getattr(importlib.import_module(module), name)
    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    signature = {arg: ty for arg, (ty, _) in zip(fn.arg_names, spec)}
    constexprs = {(i,): value for i, (ty, value) in enumerate(spec) if ty == "constexpr"}
    attrs = {(i,): backend.parse_attr(a) for i, (_, a) in enumerate(spec) if isinstance(a, str)}
    try:
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target)
    except Exception as err:  # reported, not raised: one bad specialization must not hide the others
        return {"error": f"{type(err).__name__}: {err}"}
    meta = compiled.metadata
    return {
        "stages": sorted(compiled.asm),
        "shared": meta.shared,
        "global_scratch": getattr(meta, "global_scratch_size", 0),
        "profile_scratch": getattr(meta, "profile_scratch_size", 0),
    }


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        jobs = json.load(f)
    for capability, kernel, spec in jobs:
        print(json.dumps(compile_one(capability, kernel, spec)), flush=True)
