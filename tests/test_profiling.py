"""lsr.profiling: FLOPs and bytes counted from the operators that ran (matrix products,
convolutions, lsr's native ops, ops called from the C++ resampling loop), and the roofline
arithmetic."""
import doctest
import math

import pytest
import torch

import lsr.profiling as P
from lsr import ops
from lsr.config import PriorConfig
from lsr.models import PixelSNAIL


def test_doctests():
    result = doctest.testmod(P)
    assert result.attempted > 0 and result.failed == 0


def test_matmul_and_conv_flops_and_bytes():
    a, b = torch.randn(8, 5), torch.randn(5, 3)
    _, c = P.count_cost(torch.mm, a, b)
    assert c.flops == 2 * 8 * 5 * 3 and c.bytes == (8 * 5 + 5 * 3 + 8 * 3) * 4 and c.uncounted == ()
    x, w = torch.randn(2, 4, 6, 6), torch.randn(7, 4, 3, 3)
    out, c = P.count_cost(torch.nn.functional.conv2d, x, w)
    assert out.shape == (2, 7, 4, 4)
    assert c.flops == 2 * (2 * 7 * 4 * 4) * (4 * 3 * 3)
    assert c.bytes == (x.numel() + w.numel() + out.numel()) * 4


def test_views_move_nothing_expanded_inputs_count_once_in_place_counts_written_data():
    x = torch.randn(4, 6)
    _, c = P.count_cost(lambda t: t.view(6, 4).transpose(0, 1)[1:], x)
    assert c.bytes == 0 and c.flops == 0 and c.ops == 3
    row = torch.randn(1, 6)
    _, c = P.count_cost(lambda r: r.expand(100, 6) + 1.0, row)
    assert c.bytes == 6 * 4 + 100 * 6 * 4                      # the row once, the output
    t = torch.randn(10, 6)
    assert P.count_cost(lambda: t.mul_(2.0))[1].bytes == 2 * 240          # read and written
    assert P.count_cost(lambda: t.zero_())[1].bytes == 240                 # written
    row = torch.ones(1, 6)
    assert P.count_cost(lambda: t.copy_(row.expand(10, 6)))[1].bytes == 24 + 240        # row read, t written
    a3, w = torch.randn(4, 5, 6), torch.randn(6, 3)
    _, c = P.count_cost(torch.matmul, a3, w)                 # reshape, mm, _unsafe_view: the mm's traffic
    assert c.flops == 2 * 20 * 6 * 3 and c.bytes == (a3.numel() + w.numel() + 20 * 3) * 4
    _, c = P.count_cost(lambda: torch.empty(1000, 1000))
    assert c.bytes == 0
    buf, src, idx = torch.zeros(1000, 6), torch.randn(2, 6), torch.tensor([3, 7])
    _, c = P.count_cost(lambda: buf.index_copy_(0, idx, src))
    assert c.bytes == 2 * (2 * 6 * 4 + 2 * 8)                   # index and rows read, rows written: not the buffer


def test_cpu_sdpa_is_counted():
    """The CPU flash kernel behind scaled_dot_product_attention (the reference path of the
    exported priors) has no formula in torch: lsr counts it (every pair: a mask is applied)."""
    q = torch.randn(2, 3, 10, 8)
    mask = torch.ones(10, 10, dtype=torch.bool).tril()
    _, c = P.count_cost(torch.nn.functional.scaled_dot_product_attention, q, q, q, attn_mask=mask)
    assert c.flops >= 4 * 2 * 3 * 10 * 10 * 8 and c.uncounted == ()


def _pairs(T):
    return T * (T - 1) // 2


@pytest.mark.skipif(not ops.native_available(), reason="needs lsr._C")
def test_native_op_flops():
    q = torch.randn(2, 3, 10, 8)
    _, c = P.count_cost(torch.ops.lsr.causal_attention_fwd, q, q, q)
    assert c.flops == 4 * 8 * 2 * 3 * _pairs(10)
    # rows [4, 10): pairs with keys < t for t = 4..9
    _, c = P.count_cost(torch.ops.lsr.causal_attention_rows, q[:, :, 4:].contiguous(), q, q, 4)
    assert c.flops == 4 * 8 * 2 * 3 * sum(range(4, 10))
    z, e = torch.randn(50, 16), torch.randn(32, 16)
    _, c = P.count_cost(torch.ops.lsr.vq_nearest, z, e)
    assert c.flops == 2 * 50 * 32 * 16


@pytest.mark.skipif(not ops.native_available(), reason="needs lsr._C")
def test_counts_reach_into_the_native_loop():
    """The C++ loop's TorchScript calls are seen: the loop's FLOPs lie between one full pass
    and (calls) full passes, and scale with the positions it evaluated."""
    torch.manual_seed(0)
    prior = PixelSNAIL(PriorConfig(codebook_size=16, grid_size=12, channels=16, n_blocks=1, n_res_blocks=1,
                                   kernel_size=3, n_heads=2, dropout=0.0)).eval()
    codes = torch.randint(0, 16, (1, 12, 12))
    noise = ops.gumbel_noise(1, 144, 16, [3])
    with torch.no_grad():
        _, full = P.count_cost(prior, codes)
        p = ops.resampling.code_likelihood(prior(codes), codes)
        tau = float(p.flatten().quantile(0.1))
        res, c = P.count_cost(ops.resample_native, prior, codes, noise, tau)
    calls, evaluated = int(res.prior_passes[0]), int(res.positions_evaluated[0])
    assert calls > 2 and evaluated < calls * 144
    assert full.flops < c.flops < calls * full.flops
    assert c.flops == pytest.approx(full.flops * evaluated / 144, rel=0.35)


def test_roofline_arithmetic():
    lim = P.Limits("x", 100e9, 10e9)
    r = P.roofline(P.Cost(50e9, 1e9, 1, ()), 1.0, lim)
    assert r["bound_by"] == "compute" and r["fraction_of_limit"] == pytest.approx(0.5)
    assert r["achieved_gflop_per_s"] == pytest.approx(50.0)
    r = P.roofline(P.Cost(1e9, 5e9, 1, ()), 2.0, lim)
    assert r["bound_by"] == "memory" and r["fraction_of_limit"] == pytest.approx(0.25)
    assert math.isnan(P.roofline(P.Cost(1, 1, 1, ()), 0.0, lim)["fraction_of_limit"])


def test_measure_limits_cpu_is_positive():
    lim = P.measure_limits("cpu", repeats=1)
    assert lim.device == "cpu" and lim.matmul_flops_per_s > 1e8 and lim.copy_bytes_per_s > 1e8
