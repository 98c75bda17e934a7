"""Native CPU kernels vs their pure-PyTorch counterparts, side by side (one group per shape).

Run: ``pytest benchmarks/test_bench_ops.py --benchmark-columns=mean,stddev,rounds
--benchmark-group-by=group``. The speed-up of ``native`` over every other entry of a group
is printed at the end. T = 4096 attention runs only with ``--run-big`` or
``LSR_BENCH_BIG=1`` (the masked-softmax reference needs ~12 GiB and about a minute there).

* vq_nearest, N = B*1024 rows, K = 512, D = 64, float32: ``native`` (lsr._C);
  ``cdist`` (``torch.cdist(z, codebook).argmin(1)``, the baseline the issue names);
  ``reference`` (lsr.ops.reference.vq_nearest, chunked matmul + argmin).
* causal attention forward, B = 8, h = 8, d = 16 / 64, float32: ``native``;
  ``reference`` (masked softmax over the full T x T scores); ``sdpa`` (the fast PyTorch
  path, scaled_dot_product_attention with a boolean mask).

Peak memory: each entry is run once more in a fresh subprocess, and its peak resident set
above the resident set before the call (Linux VmHWM, reset first) is stored as
``extra_info["peak_extra_MiB"]`` (tracemalloc does not see torch's allocations; set
LSR_BENCH_MEMORY=0 to skip; None where it could not be measured). Expected: native
vq_nearest needs O(N + K) (the indices, ||e||^2, the codebook repacked in panels, and a
block of 64 rows per thread: the N x K distances are never formed) where cdist holds all
N x K distances; native attention needs O(B h T d) (packed copies of q, k, v) where the
reference holds several B h T x T score tensors.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import lsr.ops as ops
from lsr.ops import reference as R

pytestmark = pytest.mark.skipif(not ops.native_available(), reason="the native extension lsr._C is not built")

ROOT = Path(__file__).resolve().parents[1]


def _native_vq(z, e):
    return torch.ops.lsr.vq_nearest(z, e)


def _cdist_vq(z, e):
    return torch.cdist(z, e).argmin(1)


def _native_attention(q, k, v):
    return torch.ops.lsr.causal_attention_fwd(q, k, v)[0]


VQ = {"native": _native_vq, "cdist": _cdist_vq, "reference": R.vq_nearest}
ATTENTION = {"native": _native_attention, "reference": R.causal_attention, "sdpa": R.causal_attention_sdpa}


def _vq_inputs(B):
    g = torch.Generator().manual_seed(0)
    return torch.randn(B * 1024, 64, generator=g), torch.randn(512, 64, generator=g)


def _attention_inputs(T, d):
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(8, 8, T, d, generator=g) for _ in range(3))


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _peak_growth_mib(fn, args) -> float:
    """Peak resident set during fn(*args) minus the resident set before it (Linux: the
    peak, VmHWM, is reset through /proc/self/clear_refs first)."""
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS")
    fn(*args)
    return (_status_kib("VmHWM") - before) / 1024


def _peak_extra_mib(kind: str, impl: str, shape: tuple) -> float | None:
    """Peak RSS growth of one call of `impl` over its inputs, in a fresh process (MiB)."""
    if os.environ.get("LSR_BENCH_MEMORY", "1") == "0":
        return None
    code = f"""
import sys, torch
sys.path.insert(0, {str(ROOT)!r})
import benchmarks.test_bench_ops as b
torch.set_grad_enabled(False)
args = b._{kind}_inputs(*{shape!r})
fn = b.{kind.upper()}[{impl!r}]
fn(*(a[..., :2, :] if a.dim() == 4 else a[:8] for a in args))   # load kernels, start threads
print(b._peak_growth_mib(fn, args))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    return round(float(res.stdout.strip()), 1) if res.returncode == 0 else None


def _run(benchmark, bench_means, group, name, fn, args, memory):
    """Time fn(*args) with enough rounds for ~2 s (at least 3), record mean and memory."""
    fn(*args)                                           # warm-up, and a time estimate
    t0 = time.perf_counter()
    fn(*args)
    est = time.perf_counter() - t0
    rounds = int(max(3, min(100, 2.0 / max(est, 1e-6))))
    benchmark.group = group
    benchmark.pedantic(fn, args=args, rounds=rounds, iterations=1)
    benchmark.extra_info["peak_extra_MiB"] = memory
    bench_means.setdefault(group, {})[name] = benchmark.stats.stats.mean


@pytest.mark.parametrize("impl", list(VQ))
@pytest.mark.parametrize("B", [1, 8, 32])
def test_vq_nearest(benchmark, bench_means, B, impl):
    z, e = _vq_inputs(B)
    if impl != "native":
        assert torch.equal(VQ[impl](z, e), _native_vq(z, e))     # same indices (no ties in random data)
    _run(benchmark, bench_means, f"vq_nearest N={B}*1024 K=512 D=64", impl, VQ[impl], (z, e),
         _peak_extra_mib("vq", impl, (B,)))


def _big_enabled(config) -> bool:
    return bool(config.getoption("--run-big", default=False)) or os.environ.get("LSR_BENCH_BIG") == "1"


@pytest.mark.parametrize("impl", list(ATTENTION))
@pytest.mark.parametrize("d", [16, 64])
@pytest.mark.parametrize("T", [256, 1024, 4096])
def test_causal_attention_forward(benchmark, bench_means, request, T, d, impl):
    if T == 4096 and not _big_enabled(request.config):
        pytest.skip("T = 4096 needs --run-big or LSR_BENCH_BIG=1 (about a minute and ~12 GiB for the reference)")
    q, k, v = _attention_inputs(T, d)
    _run(benchmark, bench_means, f"attention fwd B=8 h=8 T={T} d={d}", impl, ATTENTION[impl], (q, k, v),
         _peak_extra_mib("attention", impl, (T, d)))

