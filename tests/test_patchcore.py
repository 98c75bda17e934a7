"""Tests for the PatchCore peer of the quality benchmark (benchmarks/quality/patchcore.py):
nearest-neighbour distances and the greedy coreset against brute force, and PatchCore
end to end on a synthetic case with a stand-in backbone (no weights needed)."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pytestmark = pytest.mark.usefixtures("one_thread")

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "quality" / "patchcore.py"
_spec = importlib.util.spec_from_file_location("patchcore_under_test", _PATH)
patchcore = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(patchcore)


# ---------------------------------------------------------------- nearest neighbour


def brute_nn(queries, bank):
    """Float64 nearest-neighbour distances by an explicit loop."""
    q, b = np.asarray(queries, np.float64), np.asarray(bank, np.float64)
    return np.array([min(np.sqrt(((qi - bj) ** 2).sum()) for bj in b) for qi in q])


def test_nearest_neighbour_distance_vs_brute_force():
    rng = np.random.default_rng(0)
    q, b = rng.standard_normal((37, 5)), rng.standard_normal((23, 5))
    d = patchcore.nearest_neighbour_distance(torch.from_numpy(q), torch.from_numpy(b))
    assert d.shape == (37,) and d.dtype == torch.float64
    np.testing.assert_allclose(d.numpy(), brute_nn(q, b), rtol=0, atol=1e-12)
    d32 = patchcore.nearest_neighbour_distance(torch.from_numpy(q).float(), torch.from_numpy(b).float())
    assert d32.dtype == torch.float32
    np.testing.assert_allclose(d32.numpy(), brute_nn(q, b), rtol=0, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 4, 10, 36, 37, 1000])
def test_nearest_neighbour_distance_chunked_equals_unchunked(chunk):
    g = torch.Generator().manual_seed(1)
    q, b = torch.randn(37, 6, generator=g, dtype=torch.float64), torch.randn(11, 6, generator=g, dtype=torch.float64)
    whole = patchcore.nearest_neighbour_distance(q, b, chunk=10_000)
    torch.testing.assert_close(patchcore.nearest_neighbour_distance(q, b, chunk=chunk), whole, rtol=0, atol=1e-12)


def test_nearest_neighbour_distance_of_bank_rows_is_zero_not_nan():
    b = torch.randn(50, 16, generator=torch.Generator().manual_seed(2)) * 10
    d = patchcore.nearest_neighbour_distance(b[::3], b)          # cancellation may go below 0: clamped
    assert torch.isfinite(d).all() and d.min() >= 0
    assert d.max() < 1e-3 * b.norm(dim=1).max()                  # ~ sqrt(eps) x the norm in float32


def test_nearest_neighbour_distance_far_from_the_origin():
    """Features with a large common offset (as post-ReLU features have) keep their accuracy
    in float32: the expansion is computed around the bank's mean."""
    rng = np.random.default_rng(3)
    q, b = rng.standard_normal((40, 32)) + 100, rng.standard_normal((30, 32)) + 100
    q32, b32 = torch.from_numpy(q).float(), torch.from_numpy(b).float()
    d = patchcore.nearest_neighbour_distance(q32, b32, chunk=7)
    np.testing.assert_allclose(d.numpy(), brute_nn(q32.numpy(), b32.numpy()), rtol=0, atol=1e-4)


# ---------------------------------------------------------------- greedy coreset


def brute_farthest_gaps(x, picks):
    """For each pick i >= 1: (distance of pick i to picks[:i], the largest such distance of any row)."""
    x = np.asarray(x, np.float64)
    out = []
    for i in range(1, len(picks)):
        to_set = np.sqrt(((x[:, None, :] - x[None, picks[:i], :]) ** 2).sum(-1)).min(axis=1)    # (N,)
        out.append((to_set[picks[i]], to_set.max()))
    return np.array(out)


@pytest.mark.parametrize("projection_dim", [None, 4, 100])
def test_greedy_coreset_without_projection_is_farthest_point(projection_dim):
    """projection_dim None or >= D (= 4): no projection, so every pick is a farthest row."""
    x = torch.randn(60, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    picks = patchcore.greedy_coreset(x, 15, projection_dim, seed=3)
    assert picks.shape == (15,) and picks.dtype == torch.long
    gaps = brute_farthest_gaps(x.numpy(), picks.tolist())
    np.testing.assert_allclose(gaps[:, 0], gaps[:, 1], rtol=0, atol=1e-12)
    assert np.all(np.diff(gaps[:, 1]) <= 1e-12)                   # the covering radius never grows
    assert torch.equal(picks, patchcore.greedy_coreset(x, 15, None, seed=3))


def test_greedy_coreset_deterministic_unique_and_in_range():
    x = torch.randn(300, 20, generator=torch.Generator().manual_seed(4))
    a = patchcore.greedy_coreset(x, 40, projection_dim=8, seed=7)
    assert torch.equal(a, patchcore.greedy_coreset(x, 40, projection_dim=8, seed=7))
    assert len(set(a.tolist())) == 40 and 0 <= a.min() and a.max() < 300
    others = [patchcore.greedy_coreset(x, 40, projection_dim=8, seed=s) for s in range(8, 12)]
    assert any(not torch.equal(a, o) for o in others)            # the seed matters


def test_greedy_coreset_no_duplicates_among_duplicate_rows():
    x = torch.randn(10, 3, generator=torch.Generator().manual_seed(5)).repeat(5, 1)    # 10 distinct rows x 5
    picks = patchcore.greedy_coreset(x, 25, None, seed=0)
    assert len(set(picks.tolist())) == 25
    assert len({tuple(r) for r in x[picks[:10]].tolist()}) == 10  # all distinct rows come first


def test_greedy_coreset_all_and_none():
    x = torch.randn(12, 3)
    assert torch.equal(patchcore.greedy_coreset(x, 12, 2, seed=0), torch.arange(12))
    assert torch.equal(patchcore.greedy_coreset(x, 50, 2, seed=0), torch.arange(12))
    assert patchcore.greedy_coreset(x, 0, 2, seed=0).numel() == 0
    assert patchcore.greedy_coreset(x, 1, 2, seed=0).shape == (1,)


# ---------------------------------------------------------------- PatchCore end to end


class RandomConvBackbone(nn.Module):
    """Stand-in feature extractor: a fixed random 8 x 8 convolution of stride 8 and a tanh,
    (B, 1, S, S) -> (B, out_channels, S / 8, S / 8)."""

    out_channels = 16
    stride = 8

    def __init__(self, seed: int = 0):
        super().__init__()
        self.conv = nn.Conv2d(1, self.out_channels, self.stride, stride=self.stride)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) / self.stride)
            self.conv.bias.zero_()
        self.requires_grad_(False)

    def forward(self, x):
        return torch.tanh(self.conv(x))


S = 64
BOX = (slice(24, 32), slice(40, 48))                     # one 8 x 8 cell of the stride-8 grid: (3, 5)


def normal_images(n, seed):
    g = torch.Generator().manual_seed(seed)
    return (0.5 + 0.1 * torch.randn(n, 1, S, S, generator=g)).clamp(0, 1)


def with_anomaly(img):
    out = img.clone()
    yy, xx = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    out[:, :, BOX[0], BOX[1]] = ((yy + xx) % 2).float()           # a checkerboard patch
    return out


@pytest.fixture(scope="module")
def fitted():
    return patchcore.PatchCore(RandomConvBackbone(), coreset_fraction=0.25, projection_dim=8, sigma=2.0,
                               batch_size=3).fit(normal_images(10, seed=1))


def test_patchcore_bank_is_a_coreset_of_the_training_patches(fitted):
    train = normal_images(10, seed=1)
    feats = fitted.patches(fitted.features(train))                # (10 * 8 * 8, 16)
    assert feats.shape == (640, 16)
    assert fitted.bank.shape == (160, 16)                         # 25 % of the patches, full dimension
    idx = patchcore.greedy_coreset(feats, 160, 8, seed=0)
    assert torch.equal(fitted.bank, feats[idx])                   # original feature space rows
    capped = patchcore.PatchCore(RandomConvBackbone(), coreset_fraction=0.5, max_coreset=30).fit(train)
    assert capped.bank.shape == (30, 16)


def test_patchcore_scores_and_localises_an_inserted_patch(fitted):
    normal = normal_images(1, seed=2)
    x = torch.cat([normal, with_anomaly(normal)])
    scores, maps = fitted.predict(x)
    assert scores.shape == (2,) and maps.shape == (2, S, S)
    assert scores[1] > 2 * scores[0]
    peak = divmod(int(maps[1].argmax()), S)
    assert BOX[0].start <= peak[0] < BOX[0].stop and BOX[1].start <= peak[1] < BOX[1].stop
    patch = fitted.patch_distances(x)                             # (2, 8, 8)
    assert divmod(int(patch[1].argmax()), 8) == (3, 5)
    torch.testing.assert_close(scores, patch.flatten(1).amax(1))  # the score: max of the unsmoothed map


def test_patchcore_normal_patches_are_close_to_the_bank(fitted):
    """Training patches in the bank are at distance 0; a new normal image scores far below an anomaly."""
    d = fitted.patch_distances(normal_images(10, seed=1))
    assert (d < 1e-3).sum() >= 160 - 1                              # the bank rows themselves
    assert d.flatten().median() > 0                                # the others are not


def test_patchcore_predict_before_fit_raises():
    with pytest.raises(RuntimeError, match="before fit"):
        patchcore.PatchCore(RandomConvBackbone()).predict(normal_images(1, seed=0))
