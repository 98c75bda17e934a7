#!/usr/bin/env bash
# Compile, link and import lsr's native extension WITH its CUDA kernels, on a machine that
# need not have a GPU: what can be checked without one.
#
#   scripts/check_cuda_build.sh [VENV]          (or LSR_CUDA_VENV=VENV scripts/check_cuda_build.sh)
#
# VENV is a virtual environment with a CUDA build of torch (default /work/venv-cuda). The
# build runs in a copy of the sources in a temporary folder, so nothing lands in the
# working tree (and an in-place CPU build there is neither used nor touched). Then the
# built lsr._C is loaded with that python and every lsr:: op must have a CUDA kernel.
#
# Environment: CUDA_HOME (default /usr/local/cuda-13.0 if present, else torch's guess),
# TORCH_CUDA_ARCH_LIST (default "8.0;9.0+PTX", as setup.py), MAX_JOBS (default 2), KEEP=1 keeps the
# temporary folder, LSR_CHECK_WERROR=1 fails on compiler warnings in csrc/,
# LSR_PTXAS_VERBOSE=1 prints registers, shared memory and spills per kernel,
# LSR_CHECK_CUDA_ONLY=1 leaves csrc/ops/cpu/ out of the copy (while the CPU kernels are
# being written; the full check is without it).
# Exit status: 0 when it compiled, linked, loaded and registered; non-zero otherwise.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-${LSR_CUDA_VENV:-/work/venv-cuda}}"
PY="$VENV/bin/python"
[ -x "$PY" ] || { echo "check_cuda_build: no python at $PY (pass a venv as \$1 or LSR_CUDA_VENV)" >&2; exit 2; }

if [ -z "${CUDA_HOME:-}" ] && [ -d /usr/local/cuda-13.0 ]; then CUDA_HOME=/usr/local/cuda-13.0; fi
export MAX_JOBS="${MAX_JOBS:-2}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0+PTX}"
export LSR_CUDA=1

now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }
T_START=$(now)

# torch must be a CUDA build; find the pip-installed CUDA headers beside it (cuBLAS,
# cuSPARSE, ... that a minimal toolkit may lack), nvidia/cu<major>/include
read -r TORCH_VERSION TORCH_CUDA CU_INCLUDE < <("$PY" - <<'EOF'
import os, sysconfig
import torch
cuda = torch.version.cuda
inc = ""
if cuda:
    for key in ("purelib", "platlib"):
        p = os.path.join(sysconfig.get_paths()[key], "nvidia", "cu" + cuda.split(".")[0], "include")
        if os.path.isdir(p):
            inc = p
            break
print(torch.__version__, cuda or "none", inc or "-")
EOF
)
if [ -z "${TORCH_VERSION:-}" ]; then
  echo "check_cuda_build: cannot import torch with $PY" >&2; exit 2
fi
if [ "$TORCH_CUDA" = "none" ]; then
  echo "check_cuda_build: torch $TORCH_VERSION in $VENV is not a CUDA build" >&2; exit 2
fi
if [ -z "${CUDA_HOME:-}" ]; then
  CUDA_HOME="$("$PY" -c 'from torch.utils.cpp_extension import CUDA_HOME; print(CUDA_HOME or "")')"
fi
[ -n "$CUDA_HOME" ] && [ -x "$CUDA_HOME/bin/nvcc" ] || { echo "check_cuda_build: no nvcc under CUDA_HOME=$CUDA_HOME" >&2; exit 2; }
export CUDA_HOME
if [ "$CU_INCLUDE" != "-" ]; then
  export CPLUS_INCLUDE_PATH="$CU_INCLUDE${CPLUS_INCLUDE_PATH:+:$CPLUS_INCLUDE_PATH}"
fi
if [ "${LSR_PTXAS_VERBOSE:-0}" = 1 ]; then
  export NVCC_APPEND_FLAGS="${NVCC_APPEND_FLAGS:+$NVCC_APPEND_FLAGS }-Xptxas -v"
fi

TMP="$(mktemp -d "${TMPDIR:-/tmp}/lsr-cuda-build.XXXXXX")"
if [ "${KEEP:-0}" = 1 ]; then echo "check_cuda_build: keeping $TMP"; else trap 'rm -rf "$TMP"' EXIT; fi

echo "== lsr CUDA build check"
echo "   python   $PY (torch $TORCH_VERSION, CUDA $TORCH_CUDA)"
echo "   nvcc     $("$CUDA_HOME/bin/nvcc" --version | tail -1) (CUDA_HOME=$CUDA_HOME)"
echo "   headers  CPLUS_INCLUDE_PATH=${CPLUS_INCLUDE_PATH:-}"
echo "   arch     TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS"
echo "   sources  copied from $REPO to $TMP/src"

# a copy of what the build reads; build products of an in-place build are left behind
mkdir -p "$TMP/src"
for f in setup.py pyproject.toml README.md csrc lsr; do
  if [ -e "$REPO/$f" ]; then cp -r "$REPO/$f" "$TMP/src/"; fi
done
find "$TMP/src" \( -name '*.so' -o -name '__pycache__' -o -name '*.o' \) -prune -exec rm -rf {} +
if [ "${LSR_CHECK_CUDA_ONLY:-0}" = 1 ]; then
  rm -rf "$TMP/src/csrc/ops/cpu"; echo "   LSR_CHECK_CUDA_ONLY=1: csrc/ops/cpu/ left out"
fi
echo "   .cu      $(cd "$TMP/src" && ls csrc/ops/cuda/*.cu | tr '\n' ' ')"
echo "   .cpp     $(cd "$TMP/src" && ls csrc/*.cpp csrc/ops/*.cpp csrc/ops/cpu/*.cpp csrc/resample/*.cpp 2>/dev/null | tr '\n' ' ')"

echo "== build (log: $TMP/build.log)"
T_BUILD=$(now)
set +e
(cd "$TMP/src" && "$PY" setup.py build_ext --build-lib "$TMP/lib" --build-temp "$TMP/tmp") >"$TMP/build.log" 2>&1
RC=$?
set -e
T_BUILT=$(now)
if [ $RC -ne 0 ]; then
  grep -E "error|Error|ERROR" "$TMP/build.log" | head -60 >&2 || true
  echo "-- last lines of the build log:" >&2
  tail -40 "$TMP/build.log" >&2
  echo "check_cuda_build: FAILED to compile/link (exit $RC) after $(secs "$T_BUILD" "$T_BUILT") s" >&2
  exit 1
fi
grep -E "^lsr build:" "$TMP/build.log" || true
echo "   built in $(secs "$T_BUILD" "$T_BUILT") s"

# compiler warnings from our sources (torch's own headers are not ours to fix)
WARN="$(grep -E "(csrc/[^ ]*\.(cu|cpp|h)).*warning" "$TMP/build.log" | sort -u || true)"
if [ -n "$WARN" ]; then
  echo "== $(printf '%s\n' "$WARN" | wc -l) warning(s) in csrc/:"
  printf '%s\n' "$WARN" | head -40
  if [ "${LSR_CHECK_WERROR:-0}" = 1 ]; then echo "check_cuda_build: FAILED (warnings, LSR_CHECK_WERROR=1)" >&2; exit 1; fi
else
  echo "   no compiler warnings in csrc/"
fi
if [ "${LSR_PTXAS_VERBOSE:-0}" = 1 ]; then
  echo "== ptxas resource usage per kernel (registers, static shared memory, spills)"
  "$PY" - "$TMP/build.log" <<'EOF'
import re, subprocess, sys
rows, name = [], None
for line in open(sys.argv[1], errors="replace"):
    # per kernel, ptxas prints: Compiling entry function; spill stores/loads; Used N registers
    m = re.search(r"Compiling entry function '(\w+)' for '(sm_\w+)'", line)
    if m:
        name, arch, spills = m.group(1), m.group(2), ("?", "?")
        continue
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
    if m and name:
        spills = m.group(1), m.group(2)
    m = re.search(r"Used (\d+) registers", line)
    if m and name:
        smem = re.search(r"(\d+) bytes smem", line)
        rows.append((name, arch, m.group(1), smem.group(1) if smem else "0") + spills)
        name = None
try:
    names = subprocess.run(["c++filt"], input="\n".join(r[0] for r in rows), capture_output=True,
                           text=True, check=True).stdout.split("\n")
except (OSError, subprocess.CalledProcessError):
    names = [r[0] for r in rows]
for r, n in zip(rows, names):
    n = re.sub(r"^void lsr::\(anonymous namespace\)::", "", n).split("(")[0]
    spill = f"  SPILLS {r[4]} B stored / {r[5]} B loaded" if r[4] != "0" or r[5] != "0" else ""
    print(f"   {r[1]}  {n:58s} {r[2]:>3s} regs {int(r[3]) / 1024:5.1f} KB smem{spill}")
EOF
fi

SO="$(find "$TMP/lib" -name '_C*.so' | head -1)"
[ -n "$SO" ] || { echo "check_cuda_build: FAILED, no _C*.so under $TMP/lib" >&2; exit 1; }
OBJDUMP="$(command -v cuobjdump || true)"
[ -z "$OBJDUMP" ] && [ -x "$CUDA_HOME/bin/cuobjdump" ] && OBJDUMP="$CUDA_HOME/bin/cuobjdump"
[ -z "$OBJDUMP" ] && OBJDUMP="$(ls "$VENV"/lib/python3*/site-packages/triton/backends/nvidia/bin/cuobjdump 2>/dev/null | head -1 || true)"
if [ -n "$OBJDUMP" ]; then
  echo "== device code in $(basename "$SO") ($OBJDUMP --list-elf)"
  "$OBJDUMP" --list-elf "$SO" | sed -E 's/.*\.(sm_[0-9a-z]+)\..*/\1/' | sort | uniq -c | sed 's/^/   /'
fi

echo "== load and registration"
T_IMPORT=$(now)
"$PY" - "$SO" "$TMP/lib" <<'EOF'
import importlib.util
import sys

import torch

so, lib = sys.argv[1], sys.argv[2]
# load the built lsr._C by its path: no lsr package elsewhere on sys.path can shadow it,
# and the rest of lsr (and its dependencies) need not be importable with this python
sys.path.insert(0, lib)
spec = importlib.util.spec_from_file_location("lsr._C", so)
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
assert mod.__file__.startswith(lib), mod.__file__
print(f"   loaded {mod.__file__}")
print(f"   torch {torch.__version__}, cuda.is_available() = {torch.cuda.is_available()}")
missing = []
for op in ("vq_nearest", "causal_attention_fwd", "causal_attention_bwd"):
    name = f"lsr::{op}"
    has = {key: torch._C._dispatch_has_kernel_for_dispatch_key(name, key) for key in ("CUDA", "CPU")}
    schema = torch._C._dispatch_find_schema_or_throw(name, "")
    getattr(torch.ops.lsr, op)                      # the Python-side handle exists
    print(f"   {name:26s} CUDA kernel: {'yes' if has['CUDA'] else 'NO'}   CPU kernel: {'yes' if has['CPU'] else 'no'}")
    if not has["CUDA"]:
        missing.append(name)
if missing:
    sys.exit(f"check_cuda_build: FAILED, no CUDA kernel registered for {', '.join(missing)}")
EOF
T_END=$(now)
echo "== OK: compiled, linked, loaded; CUDA kernels registered for all lsr:: ops"
echo "   timings: build $(secs "$T_BUILD" "$T_BUILT") s, load check $(secs "$T_IMPORT" "$T_END") s, total $(secs "$T_START" "$T_END") s"
