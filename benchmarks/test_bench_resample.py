"""Resampling loops side by side: naive (H*W prior passes) vs exact fast (1 + changes).

Run: ``pytest benchmarks --benchmark-columns=mean,stddev,rounds --benchmark-group-by=group``.
The prior is the ``demo`` preset's PixelSNAIL (randomly initialised: its speed does not
depend on training); tau is set so that the rule flags the wanted share of codes.
"""
import pytest
import torch

import lsr.ops as ops
from lsr.config import preset
from lsr.models import PixelSNAIL


def _setup(grid: int, batch: int, flagged: float, seed: int = 0):
    cfg = preset("demo", 1).prior
    cfg.grid_size = grid
    torch.manual_seed(seed)
    prior = PixelSNAIL(cfg).eval()
    codes = torch.randint(0, cfg.codebook_size, (batch, grid, grid))
    p = torch.softmax(prior(codes), 1).gather(1, codes.unsqueeze(1)).squeeze(1)
    # smallest tau whose rule flags at least `flagged` of the codes (first pass)
    qs = torch.linspace(0.0, 1.0, 401)
    tau = 0.0
    for q in qs:
        tau = float(torch.quantile(p.flatten(), q))
        if ops.flag_positions(p, tau).float().mean() >= flagged:
            break
    noise = ops.gumbel_noise(batch, grid * grid, cfg.codebook_size, list(range(batch)))
    return prior, codes, noise, tau


@pytest.mark.parametrize("flagged", [0.0, 0.02, 0.10])
@pytest.mark.parametrize("method", ["naive", "fast"])
def test_resample_16x16_batch1(benchmark, method, flagged):
    prior, codes, noise, tau = _setup(16, 1, flagged)
    benchmark.group = f"resample 16x16 batch 1, {flagged:.0%} flagged"
    res = benchmark.pedantic(ops.resample, args=(prior, codes, noise, tau, 1.0, method),
                             rounds=3 if method == "naive" else 10, iterations=1)
    benchmark.extra_info["prior_passes"] = int(res.prior_passes.sum())
    benchmark.extra_info["changed"] = int(res.resampled.sum())


@pytest.mark.parametrize("method", ["naive", "fast"])
def test_resample_32x32_batch1_2pct(benchmark, method):
    prior, codes, noise, tau = _setup(32, 1, 0.02)
    benchmark.group = "resample 32x32 batch 1, 2% flagged"
    res = benchmark.pedantic(ops.resample, args=(prior, codes, noise, tau, 1.0, method),
                             rounds=1 if method == "naive" else 5, iterations=1)
    benchmark.extra_info["prior_passes"] = int(res.prior_passes.sum())
    benchmark.extra_info["changed"] = int(res.resampled.sum())
