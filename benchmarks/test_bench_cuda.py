"""CUDA kernels of the native ops against what PyTorch does with the same work.

- vq_nearest (fused: distances and argmin in one kernel) vs the cuBLAS GEMM alone
  (``z @ codebook.T``, the distance matrix's main cost, without the argmin) and vs the
  whole reference (GEMM + argmin), N = B * 1024 rows, K = 512, D = 64.
- causal_attention forward vs ``F.scaled_dot_product_attention`` with the same boolean
  mask (built once, outside the timing), B = 8, h = 8, T in {256, 1024, 4096},
  d in {16, 64}.

Run on a GPU: ``pytest benchmarks/test_bench_cuda.py --benchmark-columns=mean,stddev,rounds
--benchmark-group-by=group``. Each timed call ends with ``torch.cuda.synchronize()``; the
speed-up of ``native`` over the others in its group is printed at the end.
Skipped without a GPU or without the CUDA kernels.
"""
import pytest
import torch
import torch.nn.functional as F

import lsr.ops as ops
from lsr.ops import reference as R


def _cuda_kernels_built() -> bool:
    if not torch.cuda.is_available() or not ops.native_available():
        return False
    try:
        return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"lsr::{op}", "CUDA")
                   for op in ("vq_nearest", "causal_attention_fwd"))
    except RuntimeError:
        return False


pytestmark = pytest.mark.skipif(not _cuda_kernels_built(),
                                reason="needs a GPU and lsr._C built with its CUDA kernels")


def _timed(fn, *args):
    def run():
        out = fn(*args)
        torch.cuda.synchronize()
        return out
    return run


def _bench(benchmark, bench_means, group, name, fn, *args, rounds=30):
    benchmark.group = group
    benchmark.pedantic(_timed(fn, *args), rounds=rounds, iterations=1, warmup_rounds=3)
    if benchmark.stats is not None:                       # None under --benchmark-disable
        # for the speed-up summary of benchmarks/conftest.py
        bench_means.setdefault(group, {})[name] = benchmark.stats.stats.mean


# ---------------------------------------------------------------- vq_nearest

VQ_METHODS = {
    "native": lambda z, e: torch.ops.lsr.vq_nearest(z, e),
    "cublas_gemm_only": lambda z, e: z @ e.t(),
    "reference": R.vq_nearest,
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("method", list(VQ_METHODS))
@pytest.mark.parametrize("B", [1, 8, 32])
def test_vq_nearest(benchmark, bench_means, B, method, dtype):
    N, K, D = B * 1024, 512, 64
    g = torch.Generator(device="cuda").manual_seed(0)
    z = torch.randn(N, D, generator=g, device="cuda").to(dtype)
    e = torch.randn(K, D, generator=g, device="cuda").to(dtype)
    group = f"cuda vq_nearest N={N} K={K} D={D} {str(dtype).replace('torch.', '')}"
    _bench(benchmark, bench_means, group, method, VQ_METHODS[method], z, e)
    benchmark.extra_info["GFLOP"] = 2 * N * K * D / 1e9


# ---------------------------------------------------------------- causal attention


def _sdpa_masked(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("method", ["native", "sdpa_bool_mask"])
@pytest.mark.parametrize("d", [16, 64])
@pytest.mark.parametrize("T", [256, 1024, 4096])
def test_causal_attention_fwd(benchmark, bench_means, T, d, method, dtype):
    B, h = 8, 8
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, h, T, d, generator=g, device="cuda").to(dtype) for _ in range(3))
    group = f"cuda attention fwd B={B} h={h} T={T} d={d} {str(dtype).replace('torch.', '')}"
    if method == "native":
        _bench(benchmark, bench_means, group, method, torch.ops.lsr.causal_attention_fwd, q, k, v)
    else:
        # the mask of lsr.ops.reference.causal_attention_sdpa: s < t, and key 0 for row 0
        idx = torch.arange(T, device="cuda")
        mask = (idx[None, :] < idx[:, None]) | ((idx[:, None] == 0) & (idx[None, :] == 0))
        _bench(benchmark, bench_means, group, method, _sdpa_masked, q, k, v, mask)
    benchmark.extra_info["GFLOP_causal"] = 4 * B * h * d * T * (T - 1) / 2 / 1e9


# ---------------------------------------------------------------- detection latency (issue: native resampling)

_DETECTORS: dict = {}


def _paper_detector(batch: int):
    """The `paper` preset (256 px, 32x32 codes, K = 512) with random weights on the GPU,
    tau set so that about 2% of the first pass's codes are flagged; speed does not depend
    on training."""
    from lsr.config import preset
    from lsr.detect import Detector
    from lsr.models import VQVAE, PixelSNAIL

    if batch not in _DETECTORS:
        torch.manual_seed(0)
        cfg = preset("paper", 3)
        det = Detector(VQVAE(cfg.vqvae), PixelSNAIL(cfg.prior), cfg, "cuda")
        x = torch.rand(batch, 3, 256, 256, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            codes = det.vqvae.quantizer(det.vqvae.encoder(x.cuda())).indices
            p = ops.resampling.code_likelihood(det.prior(codes), codes)
        tau = float(torch.quantile(p.flatten().float().cpu(), 0.02))
        cfg.detect.tau = tau
        _DETECTORS[batch] = (det, x)
    return _DETECTORS[batch]


@pytest.mark.parametrize("resampler", ["fast", "native"])
@pytest.mark.parametrize("batch", [1, 16])
def test_detect_latency_paper_preset(benchmark, bench_means, machine_limits, batch, resampler):
    """Latency per batch, and the fraction of the GPU's limit reached: FLOPs and bytes of
    the operators the detection actually ran (lsr.profiling, an instrumented run of the
    same call: encoder, every prior pass or partial call, decoders, post-processing)
    against the measured float32 matrix rate and copy bandwidth."""
    from lsr.profiling import count_cost, roofline
    det, x = _paper_detector(batch)
    d = det.with_options(resampler=resampler)
    res = d.detect(x)                                        # warm-up (scripts the prior once)
    group = f"detect paper preset 256px batch {batch}"
    _bench(benchmark, bench_means, group, resampler, d.detect, x, rounds=3)
    benchmark.extra_info.update(prior_passes=int(res.prior_passes.sum()), changed=float(res.n_resampled.sum()),
                                positions_evaluated=int(res.positions_evaluated.sum()), images=batch)
    if benchmark.stats is None:                              # --benchmark-disable
        return
    limits = machine_limits("cuda")
    _, cost = count_cost(d.detect, x)
    r = roofline(cost, benchmark.stats.stats.median, limits)
    benchmark.extra_info.update(r, uncounted_ops=list(cost.uncounted))
    bench_means.setdefault("_roofline", {})[(group, resampler)] = (r, cost, limits)
