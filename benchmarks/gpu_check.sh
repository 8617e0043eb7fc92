#!/usr/bin/env bash
# The GPU check, one script for a machine with torch and Triton preinstalled
# and no network (the lent H100/H200 has torch 2.11 and Triton 3.6). Writes
# everything under $OUT (default ./gpu_out). Budget: under 8 minutes.
#   bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
status=0
step() {  # step NAME TIMEOUT CMD...: run with a time limit, log to $OUT/NAME.txt, remember failures
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*" | tee -a "$OUT/summary.txt"
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1
    local rc=$?
    echo "   rc=$rc in $((SECONDS - t0)) s; $(tail -n 1 "$OUT/$name.txt")" | tee -a "$OUT/summary.txt"
    [ $rc -eq 0 ] || status=1
}
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
    $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
step install 120 $PY -m pip install -e . --no-deps --no-build-isolation
# compiled kernels on the GPU, then the library's CUDA tests
step cuda_tests 150 env TRITON_INTERPRET=0 $PY -m pytest -m cuda -q -p no:cacheprovider tests
step verify_triton 90 $PY -m sse_sam_fast verify --device cuda --backend triton
step verify_torch 60 $PY -m sse_sam_fast verify --device cuda --backend torch --dtypes float32
step bench 150 $PY -m sse_sam_fast bench --device cuda --steps 20 --warmup 5
exit $status
