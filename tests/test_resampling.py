"""Tests for lsr.ops.resampling: the neighbour rule on hand-made grids, the pre-drawn
Gumbel noise, and the exact fast loop against the naive loop (identical codes, masks,
likelihoods; 1 + changes prior passes vs H*W)."""
import pytest
import torch

from lsr import ops
from lsr.config import preset
from lsr.models import PixelSNAIL
from lsr.ops import flag_positions, gumbel_noise, resample_fast, resample_naive

HI, LO, TAU = 0.9, 0.01, 0.5


pytestmark = pytest.mark.usefixtures("one_thread")


def grid(H, W, lows=()):
    """Likelihood grid (1, H, W): HI everywhere, LO at the given (i, j)."""
    p = torch.full((1, H, W), HI)
    for i, j in lows:
        p[0, i, j] = LO
    return p


def flags(H, W, lows):
    """Positions flagged by the rule, as a set of (i, j)."""
    f = flag_positions(grid(H, W, lows), TAU)
    assert f.shape == (1, H, W) and f.dtype == torch.bool
    return {(int(i), int(j)) for i, j in f[0].nonzero()}


def naive_rule(low):
    """The rule written out with loops on a bool grid (H, W)."""
    H, W = low.shape
    out = torch.zeros(H, W, dtype=torch.bool)
    for i in range(H):
        for j in range(W):
            nb = [(i, j + 1), (i + 1, j - 1), (i + 1, j), (i + 1, j + 1)]
            nb = [(a, b) for a, b in nb if 0 <= a < H and 0 <= b < W]
            out[i, j] = bool(low[i, j]) and (not nb or any(bool(low[a, b]) for a, b in nb))
    return out


# ---------------------------------------------------------------- the rule, by hand

C = (1, 1)                                           # centre of a 3x3 grid


@pytest.mark.parametrize("nb", [(1, 2), (2, 0), (2, 1), (2, 2)],
                         ids=["right", "below_left", "below", "below_right"])
def test_each_bottom_half_neighbour_alone(nb):
    f = flags(3, 3, [C, nb])
    assert C in f
    # the neighbour's own fate: only (2, 2), the last position, is judged alone
    assert (nb in f) == (nb == (2, 2))


def test_isolated_low_not_flagged():
    assert flags(3, 3, [C]) == set()
    assert flags(4, 5, [(0, 0)]) == set()
    assert flags(4, 5, [(2, 3)]) == set()


@pytest.mark.parametrize("nb", [(1, 0), (0, 0), (0, 1), (0, 2)],
                         ids=["left", "above_left", "above", "above_right"])
def test_upper_half_neighbours_do_not_count(nb):
    f = flags(3, 3, [C, nb])
    assert C not in f
    assert nb in f                                   # but C is a bottom-half neighbour of nb


def test_all_upper_half_neighbours_together_do_not_count():
    f = flags(3, 3, [C, (1, 0), (0, 0), (0, 1), (0, 2)])
    assert f == {(1, 0), (0, 0), (0, 1), (0, 2)}


def test_last_column_neighbours():
    # (0, 2) in a 3x3 grid: only (1, 1) and (1, 2) exist among its bottom-half neighbours
    assert (0, 2) in flags(3, 3, [(0, 2), (1, 1)])
    assert (0, 2) in flags(3, 3, [(0, 2), (1, 2)])
    # no wrap-around to the next row's start: (0, 3) would be (1, 0) flattened, (1, 3) is (2, 0)
    assert flags(3, 3, [(0, 2), (1, 0)]) == set()
    assert flags(3, 3, [(1, 2), (2, 0)]) == set()
    assert flags(3, 3, [(0, 2), (0, 1)]) == {(0, 1)}


def test_first_column_neighbours():
    # (1, 0): (1, 1), (2, 0), (2, 1) exist; (2, -1) does not (no wrap to (2, 2) or (1, 2))
    for nb in [(1, 1), (2, 0), (2, 1)]:
        assert (1, 0) in flags(3, 3, [(1, 0), nb]), nb
    assert (1, 0) not in flags(3, 3, [(1, 0), (2, 2)])
    assert (1, 0) not in flags(3, 3, [(1, 0), (1, 2)])
    assert (0, 0) not in flags(3, 3, [(0, 0), (0, 2)])


def test_last_row_only_right_neighbour():
    assert flags(3, 3, [(2, 0), (2, 1)]) == {(2, 0)}
    assert flags(3, 3, [(2, 1), (2, 2)]) == {(2, 1), (2, 2)}
    assert flags(3, 3, [(2, 0), (1, 0), (1, 1)]) == {(1, 0), (1, 1)}   # rows above do not count for (2, 0)
    assert flags(3, 3, [(2, 0), (2, 2)]) == {(2, 2)}              # (2, 2) is not a neighbour of (2, 0)


def test_last_position_judged_alone():
    assert flags(3, 3, [(2, 2)]) == {(2, 2)}
    assert flags(4, 5, [(3, 4)]) == {(3, 4)}
    assert flags(3, 3, [(2, 1)]) == set()
    assert flags(1, 1, [(0, 0)]) == {(0, 0)}
    assert flags(1, 1, []) == set()


def test_one_row_grid():
    p = torch.tensor([[[LO, HI, LO, LO, HI, LO]]])
    assert flag_positions(p, TAU)[0, 0].tolist() == [False, False, True, False, False, True]


def test_one_column_grid():
    p = torch.tensor([LO, LO, HI, LO, HI, LO]).view(1, 6, 1)
    assert flag_positions(p, TAU)[0, :, 0].tolist() == [True, False, False, False, False, True]


def test_batch_of_grids_no_cross_talk():
    # grid 0: low last row; grid 1: low first row; grid 2: a flagged pair; grid 3: nothing low
    gs = [grid(3, 4, [(2, 1), (2, 2)]), grid(3, 4, [(0, 0), (0, 1)]),
          grid(3, 4, [(1, 3), (2, 2)]), grid(3, 4, [])]
    batch = torch.cat(gs)
    f = flag_positions(batch, TAU)
    assert f.shape == (4, 3, 4)
    for b, g in enumerate(gs):
        assert torch.equal(f[b], flag_positions(g, TAU)[0])
    assert {tuple(x) for x in f[0].nonzero().tolist()} == {(2, 1)}
    assert {tuple(x) for x in f[1].nonzero().tolist()} == {(0, 0)}
    assert {tuple(x) for x in f[2].nonzero().tolist()} == {(1, 3)}
    assert not f[3].any()


def test_threshold_is_strict_and_may_be_a_tensor():
    p = torch.tensor([[[0.5, 0.5], [0.5, 0.5]]])
    assert not flag_positions(p, 0.5).any()
    assert flag_positions(p, torch.tensor(0.5001)).all()


def test_rule_matches_loops_on_random_grids():
    g = torch.Generator().manual_seed(0)
    for H in range(1, 6):
        for W in range(1, 6):
            p = torch.rand(3, H, W, generator=g)
            f = flag_positions(p, 0.5)
            for b in range(3):
                assert torch.equal(f[b], naive_rule(p[b] < 0.5)), (H, W, b)


# ---------------------------------------------------------------- noise


def test_gumbel_noise_reproducible_and_batch_independent():
    T, K = 20, 7
    a = gumbel_noise(3, T, K, [5, 6, 7])
    assert a.shape == (3, T, K) and a.dtype == torch.float32 and torch.isfinite(a).all()
    assert torch.equal(a, gumbel_noise(3, T, K, [5, 6, 7]))
    assert torch.equal(a, gumbel_noise(3, T, K, torch.tensor([5, 6, 7])))
    assert torch.equal(gumbel_noise(1, T, K, [6])[0], a[1])                 # alone or in a batch
    assert torch.equal(gumbel_noise(2, T, K, [7, 5]), a[[2, 0]])            # any order
    assert not torch.equal(a[0], a[1])
    big = gumbel_noise(2, 200, 50, [1, 2])
    assert abs(float(big.mean()) - 0.5772156649) < 0.05                      # Gumbel(0, 1) mean


# ---------------------------------------------------------------- loops


class CountingPrior:
    """Wraps a prior: records the batch size of every call."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __call__(self, codes):
        self.calls.append(codes.shape[0])
        with torch.no_grad():
            return self.model(codes)


def random_prior(dtype, seed=0):
    torch.manual_seed(seed)
    return PixelSNAIL(preset("tiny", in_channels=1).prior).to(dtype).eval()


def setup_case(dtype, B=4, H=8, W=8, quantile=0.25, seed=0):
    model = random_prior(dtype, seed)
    K = model.cfg.codebook_size
    codes = torch.randint(0, K, (B, H, W), generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        p = torch.softmax(model(codes).float(), 1).gather(1, codes[:, None])[:, 0]
    tau = float(p.flatten().quantile(quantile))
    noise = gumbel_noise(B, H * W, K, [100 + seed * 10 + i for i in range(B)])
    return model, codes, noise, tau


def run_both(model, codes, noise, tau, temperature):
    naive_prior, fast_prior = CountingPrior(model), CountingPrior(model)
    n = resample_naive(naive_prior, codes, noise, tau, temperature)
    f = resample_fast(fast_prior, codes, noise, tau, temperature)
    return n, f, naive_prior.calls, fast_prior.calls


def check_equal(n, f, naive_calls, fast_calls, codes, min_changes=3):
    B, H, W = codes.shape
    assert torch.equal(n.codes, f.codes)
    assert torch.equal(n.resampled, f.resampled)
    assert torch.equal(n.likelihood, f.likelihood)
    changes = f.resampled.flatten(1).sum(1)
    assert (changes >= min_changes).all(), changes                        # the test exercises the loop
    assert ((f.codes != codes).flatten(1).sum(1) >= 1).all()
    assert torch.equal(f.prior_passes, 1 + changes)                        # fast: 1 + changes per image
    assert sum(fast_calls) == int(f.prior_passes.sum())                    # and that is what ran
    assert fast_calls[0] == B
    assert torch.equal(n.prior_passes, torch.full((B,), H * W))           # naive: H*W
    assert naive_calls == [B] * (H * W)
    # codes only change where resampled
    assert torch.equal(f.codes[~f.resampled], codes[~f.resampled])
    # images differ: the test is on a batch of DIFFERENT images
    assert len({tuple(c.flatten().tolist()) for c in codes}) == B


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_naive_equals_fast(dtype):
    model, codes, noise, tau = setup_case(dtype)
    n, f, nc, fc = run_both(model, codes, noise, tau, 1.0)
    check_equal(n, f, nc, fc, codes)
    assert f.codes.dtype == torch.int64 and f.resampled.dtype == torch.bool
    assert f.likelihood.shape == codes.shape
    # the first-pass likelihood is p(c_t | c_<t) of the original codes (softmax over K per position)
    with torch.no_grad():
        p = torch.softmax(model(codes).float().movedim(1, -1), -1).gather(-1, codes[..., None])[..., 0]
    assert torch.equal(f.likelihood, p)
    # the dispatch point gives the same
    r = ops.resample(CountingPrior(model), codes, noise, tau, 1.0, method="fast")
    assert torch.equal(r.codes, f.codes)
    r = ops.resample(CountingPrior(model), codes, noise, tau, 1.0, method="naive")
    assert torch.equal(r.codes, f.codes)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_naive_equals_fast_with_temperature(temperature):
    model, codes, noise, tau = setup_case(torch.float64, seed=1)
    n, f, nc, fc = run_both(model, codes, noise, tau, temperature)
    check_equal(n, f, nc, fc, codes)
    # a different temperature changes some draws (same noise)
    base = resample_fast(CountingPrior(model), codes, noise, tau, 1.0)
    assert not torch.equal(base.codes, f.codes)


def test_non_square_grid():
    model, codes, noise, tau = setup_case(torch.float64, B=3, H=5, W=7, quantile=0.3, seed=2)
    n, f, nc, fc = run_both(model, codes, noise, tau, 1.0)
    check_equal(n, f, nc, fc, codes, min_changes=1)


def test_nothing_flagged_single_pass():
    model, codes, noise, _ = setup_case(torch.float64)
    prior = CountingPrior(model)
    r = resample_fast(prior, codes, noise, 0.0)
    assert prior.calls == [codes.shape[0]]
    assert torch.equal(r.prior_passes, torch.ones(codes.shape[0], dtype=torch.long))
    assert torch.equal(r.codes, codes) and not r.resampled.any()


def test_image_with_nothing_flagged_in_a_busy_batch_uses_one_pass():
    K, H, W = 6, 4, 5

    def prior(c):                       # a (trivially causal) prior that expects code 0 everywhere
        logits = torch.zeros(c.shape[0], K, H, W, dtype=torch.float64)
        logits[:, 0] = 5.0
        return logits

    codes = torch.zeros(3, H, W, dtype=torch.long)
    codes[1, 1:3, 1:3] = 4              # a 2x2 block of unlikely codes: (2, 2) has no low neighbour
    codes[2, 3, 4] = 2                  # only the last position is unlikely: judged alone
    noise = gumbel_noise(3, H * W, K, [1, 2, 3])
    tau = 0.1
    f = resample_fast(prior, codes, noise, tau)
    n = resample_naive(prior, codes, noise, tau)
    assert torch.equal(f.codes, n.codes) and torch.equal(f.resampled, n.resampled)
    assert f.resampled[0].sum() == 0 and int(f.prior_passes[0]) == 1
    assert {tuple(x) for x in f.resampled[1].nonzero().tolist()} == {(1, 1), (1, 2), (2, 1)}
    assert int(f.prior_passes[1]) == 4
    assert {tuple(x) for x in f.resampled[2].nonzero().tolist()} == {(3, 4)}
    assert int(f.prior_passes[2]) == 2


def test_fast_same_alone_or_in_batch():
    model, codes, noise, tau = setup_case(torch.float64, seed=3)
    prior = CountingPrior(model)
    batch = resample_fast(prior, codes, noise, tau)
    assert (batch.resampled.flatten(1).sum(1) >= 3).all()
    for i in range(codes.shape[0]):
        alone = resample_fast(prior, codes[i:i + 1], noise[i:i + 1], tau)
        assert torch.equal(alone.codes[0], batch.codes[i]), i
        assert torch.equal(alone.resampled[0], batch.resampled[i]), i
        assert torch.equal(alone.likelihood[0], batch.likelihood[i]), i
        assert int(alone.prior_passes[0]) == int(batch.prior_passes[i]), i
    # and in a different batch order
    perm = torch.tensor([2, 0, 3, 1])
    shuffled = resample_fast(prior, codes[perm], noise[perm], tau)
    assert torch.equal(shuffled.codes, batch.codes[perm])
    assert torch.equal(shuffled.prior_passes, batch.prior_passes[perm])
