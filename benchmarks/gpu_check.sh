#!/usr/bin/env bash
# The GPU check: one prepared run of at most 10 minutes on a machine with torch
# and Triton preinstalled and no network (the lent H100/H200: torch 2.11,
# Triton 3.6). Each step has its own time limit, in seconds; together 560, and
# under 590 with the 5 s grace a killed step gets:
#   env 2 x 10 | install 50 | cuda_tests 185 | verify 100 | bench 140 | profile 35 | host 25
# A step that fails or runs out of time is recorded and the next one runs.
# Everything goes under $OUT (default ./gpu_out), 8 files at most:
#   summary.txt   environment, each step's command, exit status, time and last line,
#                 and at its end the install's output
#   cuda_tests.txt verify.txt bench.txt profile.txt host.txt   each step's output
#   bench.json bench.png                                       the bench's tables
#
#   bash benchmarks/gpu_check.sh
#
# GPU_CHECK_DEVICE=cpu rehearses the script on a CPU: the same commands with small
# sizes, the CUDA-only steps (install, CUDA tests) skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# the checkout first on the path, installed or not (benchmarks/profile_step.py runs as a script)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
status=0
start=$SECONDS

step() {  # step NAME TIMEOUT CMD...: run with a time limit, log to $OUT/NAME.txt, remember failures
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit} s): $*" | tee -a "$OUT/summary.txt"
    local t0=$SECONDS
    timeout -k 5 "$limit" "$@" >"$OUT/$name.txt" 2>&1
    local rc=$?
    local note=""
    [ $rc -eq 124 ] || [ $rc -eq 137 ] && note=" (time limit)"
    echo "   rc=$rc$note in $((SECONDS - t0)) s; $(tail -n 1 "$OUT/$name.txt")" | tee -a "$OUT/summary.txt"
    [ $rc -eq 0 ] || status=1
}
skip() {
    echo "== $1: skipped ($2)" | tee -a "$OUT/summary.txt"
}

{
    echo "gpu_check on $DEVICE, $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null)"
    timeout 10 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
    timeout 10 $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)" 2>&1
} >"$OUT/summary.txt"
cat "$OUT/summary.txt"

# the kernels as this checkout has them (an editable install of it, or the link below)
KERNELS_HERE="import os, sse_sam_fast.kernels as k; assert os.path.dirname(os.path.realpath(k.__file__)) == os.path.realpath('kernels')"
if [ "$DEVICE" = cuda ]; then
    if $PY -c "$KERNELS_HERE" >/dev/null 2>&1; then
        skip install "sse_sam_fast.kernels already imports from this checkout"
    else
        # no network there: neither pip's version check nor an index may wait
        step install 50 $PY -m pip install -e . --no-deps --no-build-isolation --no-index --disable-pip-version-check
    fi
    # without the install, sse_sam_fast.kernels (the top-level kernels/ folder) does not import
    if ! $PY -c "$KERNELS_HERE" >/dev/null 2>&1; then
        ln -sfn ../kernels sse_sam_fast/kernels
        echo "   sse_sam_fast.kernels did not import: linked sse_sam_fast/kernels -> ../kernels" | tee -a "$OUT/summary.txt"
    fi
    # the compiled kernels, capture and the loop's --capture on the GPU
    # the step and capture tests first, the kernel variants (also run interpreted on CPU) last:
    # what a time limit cuts is what the CPU suite covers best
    step cuda_tests 185 env TRITON_INTERPRET=0 $PY -m pytest -m cuda -q -p no:cacheprovider \
        tests/optim tests/backends tests/train tests/test_bench.py tests/kernels
    VERIFY=(--backend triton --device cuda --capture --dtypes float32)
    BENCH=(--device cuda --models resnet32 resnet34 --steps 20 --warmup 3)
    PROFILE=(--device cuda --model resnet32 --steps 3)
    HOST=(--device cuda --steps 100)
else
    skip install "not on $DEVICE"
    skip cuda_tests "not on $DEVICE"
    VERIFY=(--backend torch --device cpu --capture --dtypes float32 --steps 2)
    BENCH=(--device cpu --models resnet32 --methods ssesam sam --batch 16 --steps 1 --warmup 0)
    PROFILE=(--device cpu --model resnet32 --batch 8 --steps 1)
    HOST=(--device cpu --steps 20)
fi
# every method through opt.step, the official methods and opt.capture against the published loop
step verify 100 $PY -m sse_sam_fast verify "${VERIFY[@]}"
# eager SGD, captured SGD, published, exact eager and captured: SSE-SAM stages 1 and 2, SAM, ImbSAM
step bench 140 $PY -m sse_sam_fast bench --part whole --out "$OUT" "${BENCH[@]}"
# kernels, launches, copies and host synchronisations per step, eager against captured
step profile 35 $PY benchmarks/profile_step.py "${PROFILE[@]}"
# the library's own host time per sync-free step (engine), both flat backends
step host 25 bash -c "$PY benchmarks/host_proxy.py ${HOST[*]} --backend triton && $PY benchmarks/host_proxy.py ${HOST[*]} --backend torch"

rm -f "$OUT"/*.tmp  # a bench.json being rewritten when its step ran out of time
if [ -f "$OUT/install.txt" ]; then  # at most 8 files come back
    { echo "== install output"; cat "$OUT/install.txt"; } >>"$OUT/summary.txt"
    rm -f "$OUT/install.txt"
fi
echo "gpu_check: total $((SECONDS - start)) s, status $status" | tee -a "$OUT/summary.txt"
exit $status
