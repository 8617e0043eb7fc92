"""The kernels compile for the GPUs they run on, checked on a machine without one.

The CPU suite runs the kernels through Triton's interpreter, which compiles
nothing: a specialization that fails Triton's front end or ptxas would first
fail on a GPU, inside a training run or a captured step. tests/kernels/
launches.json records every specialization the CPU suite launches (see
tests/record_launches.py); this test compiles them with the installed Triton,
down to cubin with its bundled ptxas, for sm_90 (H100/H200) and sm_80 (A100).

In CI time, a covering set rather than all of them: for sm_90, specializations
such that each parameter's recorded dtype, alignment, integer specialization
and constexpr value occurs, and every combination of values of any three
``tl.constexpr`` flags; for sm_80, the first part only (a flag combination is
target-independent Triton until its lowering). tests/kernels/
test_restore_sgd_flags.py runs every flag combination through the interpreter.
Triton's on-disk cache makes a second run fast.
"""

import itertools
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from tests import triton_launches  # noqa: E402

RECORD = os.path.join(os.path.dirname(__file__), "launches.json")
SCRIPT = os.path.join(os.path.dirname(__file__), "compile_offline.py")
# the shared memory one block may use (CUDA programming guide, compute capabilities)
SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}


def _record() -> list:
    with open(RECORD) as f:
        return [triton_launches.Spec.from_json(item) for item in json.load(f)["specs"]]


def _params(kernel) -> list:
    return triton_launches.jit_function(kernel).params


def _features(spec, flags: bool) -> set:
    """What one compile covers: each parameter's (type, attribute), which
    includes each tl.constexpr value; with ``flags``, each combination of the
    values of any three of the kernel's tl.constexpr parameters (a branch that
    fails only under three flags at once, like HAS_MOMENTUM, FIRST_STEP and
    HAS_OK once did, is compiled)."""
    out = {(spec.kernel, i, tuple(x)) for i, x in enumerate(spec.spec)}
    if flags:
        params = _params(triton_launches.kernels()[spec.kernel])
        values = [(i, v) for i, (p, (_, v)) in enumerate(zip(params, spec.spec)) if p.is_constexpr]
        out |= {(spec.kernel, c) for c in itertools.combinations(values, min(3, len(values)))}
    return out


def _cover(specs: list, flags: bool) -> list:
    """A few specializations that together show every feature of all of them
    (greedy, deterministic: the record's order breaks ties)."""
    features = [_features(s, flags) for s in specs]
    needed, chosen = set().union(*features), []
    while needed:
        best = max(range(len(specs)), key=lambda i: len(features[i] & needed))
        chosen.append(specs[best])
        needed -= features[best]
    return chosen


def test_the_record_fits_the_kernels_and_covers_every_flag():
    """A kernel whose parameters changed, or a flag value no CPU test launches,
    means the record is stale: run tests/record_launches.py again (and test the
    new branch)."""
    specs, kernels = _record(), triton_launches.kernels()
    assert {s.kernel for s in specs} == set(kernels), "a kernel is missing from the record"
    for name, kernel in kernels.items():
        params = _params(kernel)
        mine = [s for s in specs if s.kernel == name]
        assert all(len(s.spec) == len(params) for s in mine), f"{name}: parameters changed since recorded"
        for i, p in enumerate(params):
            values = {s.spec[i][1] for s in mine}
            if p.is_constexpr and values <= {True, False}:
                assert values == {True, False}, f"{name}: {p.name} is never {not values.pop()} in the record"
        pointer_types = {s.spec[0][0] for s in mine}
        if name.endswith(("_sumsq_partial_kernel", "_perturb_kernel", "_restore_sgd_kernel")):
            assert pointer_types == {"*fp32", "*bf16", "*fp16"}, f"{name}: storage dtypes {pointer_types}"


def test_every_recorded_specialization_compiles_for_sm90_and_sm80(tmp_path):
    specs = _record()
    jobs = [(90, s) for s in _cover(specs, flags=True)] + [(80, s) for s in _cover(specs, flags=False)]
    path = tmp_path / "jobs.json"
    path.write_text(json.dumps([[cc, s.kernel, s.to_json()[1]] for cc, s in jobs]))
    env = dict(os.environ, TRITON_INTERPRET="0")
    cmd = [sys.executable, SCRIPT, str(path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(results) == len(jobs)
    problems = []
    for (cc, spec), res in zip(jobs, results):
        where = f"sm_{cc} {spec.kernel.rsplit('.', 1)[-1]} {spec.spec}"
        if "error" in res:
            problems.append(f"{where}: {res['error']}")
        elif "cubin" not in res["stages"]:
            problems.append(f"{where}: no cubin (stages {res['stages']})")
        elif res["shared"] > SHARED_LIMIT[cc]:
            problems.append(f"{where}: {res['shared']} bytes of shared memory")
        elif res["global_scratch"] or res["profile_scratch"]:
            # a launch would call Triton's allocator: outside a CUDA graph's pool
            problems.append(f"{where}: needs scratch memory {res}")
    assert not problems, "\n".join(problems)
