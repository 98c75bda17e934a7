#!/usr/bin/env bash
# The one prepared GPU check, for a task that is lent a GPU machine (the `device` tool):
#   run(command="bash scripts/gpu_check.sh", timeout_s=540)
# It builds lsr's extension from source WITH its CUDA kernels there (that machine's
# python3 holds a CUDA build of torch, nvcc, ninja, pytest, pytest-benchmark), runs the
# native-op tests (CUDA and CPU) and the GPU benchmarks, and writes everything under
# $OUT (at most 8 files come back): env.txt, build.log, tests.txt, bench_cuda.txt,
# bench_cuda.json, summary.txt. Record what it measured in benchmarks/RESULTS.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/lsr-gpu-check}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 LSR_CUDA=1 MAX_JOBS="${MAX_JOBS:-16}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"     # the H200: sm_90 only, faster build
PY=python3
t0=$(date +%s)
stamp() { echo "$(( $(date +%s) - t0 )) s: $1" | tee -a "$OUT/summary.txt"; }

{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv;
  command -v nvcc && nvcc --version | tail -2;
  $PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if ! $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; stamp "BUILD FAILED"; exit 1
fi
stamp "built"
$PY -c "import torch, lsr.ops as o; assert o.native_available(), o._native_error; \
print('CUDA kernels:', [torch._C._dispatch_has_kernel_for_dispatch_key(f'lsr::{n}', 'CUDA') for n in ('vq_nearest', 'causal_attention_fwd', 'causal_attention_bwd', 'causal_attention_rows')])" 2>&1 | tee -a "$OUT/summary.txt"

timeout 240 $PY -m pytest tests/test_native_cuda.py tests/test_native_ops.py tests/test_native_resample.py tests/test_build.py -q -rfEs \
  -p no:cacheprovider > "$OUT/tests.txt" 2>&1
echo "tests exit $?" | tee -a "$OUT/summary.txt"; tail -3 "$OUT/tests.txt" | tee -a "$OUT/summary.txt"
stamp "tests"

timeout 240 $PY -m pytest benchmarks/test_bench_cuda.py -q -p no:cacheprovider --benchmark-group-by=group \
  --benchmark-columns=mean,stddev,rounds --benchmark-json="$OUT/bench_cuda.json" > "$OUT/bench_cuda.txt" 2>&1
echo "benchmarks exit $?" | tee -a "$OUT/summary.txt"
# the speed-up and fraction-of-limit summaries pytest printed (benchmarks/conftest.py)
sed -n "/speed-up of native/,/benchmark '/p" "$OUT/bench_cuda.txt" | grep -v "benchmark '" | tee -a "$OUT/summary.txt"
stamp "benchmarks"
