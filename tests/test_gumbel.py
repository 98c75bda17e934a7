"""The resampling draw is a sample of softmax(logits / T): a chi-square test over many
draws of the package's own noise (lsr.ops.gumbel_noise) and loop (the fast loop, whose
codes the naive and native loops are tested equal to), with fixed seeds (deterministic,
never flaky), for T = 0.5, 1 and 2; each test also shows it would see a wrong temperature."""
import numpy as np
import pytest
import torch
from scipy import stats

import lsr.ops as ops

pytestmark = pytest.mark.usefixtures("one_thread")

LOGITS = torch.tensor([-1.5, 0.0, 0.7, 1.2, -0.5, 0.3])     # code 0 (p 0.026 < tau) is the original
K = LOGITS.numel()
H = W = 16
CHAINS = 40                                                # 40 x 256 = 10240 draws per temperature


def constant_prior(codes):
    """The same logits at every position, whatever the codes: every draw is from one law."""
    B, h, w = codes.shape
    return LOGITS.view(1, K, 1, 1).expand(B, K, h, w).clone()


def draws(temperature, method="fast", seed0=0):
    """Codes drawn at every position (all flagged: code 0 has p = 0.026 < tau everywhere)."""
    codes = torch.zeros(CHAINS, H, W, dtype=torch.long)
    noise = ops.gumbel_noise(CHAINS, H * W, K, list(range(seed0, seed0 + CHAINS)))
    res = ops.resample(constant_prior, codes, noise, tau=0.05, temperature=temperature, method=method)
    assert bool(res.resampled.all())                       # every position was redrawn once
    return res.codes


def law(temperature):
    return torch.softmax(LOGITS.double() / temperature, dim=0).numpy()


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_gumbel_max_draw_samples_softmax_of_logits_over_temperature(temperature):
    codes = draws(temperature)
    n = codes.numel()
    counts = np.bincount(codes.flatten().numpy(), minlength=K)
    expected = law(temperature) * n
    assert expected.min() >= 5                              # the chi-square approximation holds
    p = stats.chisquare(counts, expected).pvalue
    assert p > 1e-3, (temperature, counts.tolist(), expected.round(1).tolist(), p)
    # power: the same counts reject the law of another temperature
    for other in {0.5, 1.0, 2.0} - {temperature}:
        assert stats.chisquare(counts, law(other) * n).pvalue < 1e-6, other


def test_draws_at_neighbouring_positions_and_chains_are_independent():
    """The joint counts of (position t, position t+1) and of (chain i, chain i+1) at the
    same position factor into their marginals (chi-square test of independence)."""
    codes = draws(1.0).view(CHAINS, H * W).numpy()
    along = np.zeros((K, K))
    np.add.at(along, (codes[:, :-1].ravel(), codes[:, 1:].ravel()), 1)
    across = np.zeros((K, K))
    np.add.at(across, (codes[:-1].ravel(), codes[1:].ravel()), 1)
    for table in (along, across):
        keep = table.sum(1) > 0
        assert stats.chi2_contingency(table[keep][:, table.sum(0) > 0]).pvalue > 1e-3


def test_naive_loop_draws_the_same_codes():
    """The naive loop (a pass before every position) gives the very same draws."""
    assert torch.equal(draws(2.0, "naive"), draws(2.0, "fast"))
