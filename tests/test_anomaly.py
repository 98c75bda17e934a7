"""Tests for lsr.anomaly: Gaussian smoothing vs scipy.ndimage, SSIM vs scikit-image,
distances, image scores and the NLL score by hand, map resizing."""
import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage.metrics import structural_similarity

from lsr import anomaly as A


pytestmark = pytest.mark.usefixtures("one_thread")


def scipy_blur(x, sigma):
    """scipy.ndimage.gaussian_filter(mode='mirror') over the last two axes of (..., H, W)."""
    arr = np.asarray(x, dtype=np.float64)
    flat = arr.reshape(-1, *arr.shape[-2:])
    out = np.stack([ndimage.gaussian_filter(m, sigma, mode="mirror") for m in flat])
    return out.reshape(arr.shape)


# ---------------------------------------------------------------- gaussian blur


@pytest.mark.parametrize("sigma", [0.5, 1.0, 1.5, 2.0, 4.0])
def test_gaussian_blur_maps_vs_scipy(sigma):
    rng = np.random.default_rng(0)
    maps = rng.random((2, 20, 23))
    out = A.gaussian_blur(torch.from_numpy(maps), sigma)
    assert out.shape == (2, 20, 23) and out.dtype == torch.float64
    np.testing.assert_allclose(out.numpy(), scipy_blur(maps, sigma), rtol=0, atol=1e-12)


@pytest.mark.parametrize("sigma", [1.0, 4.0])
def test_gaussian_blur_images_vs_scipy(sigma):
    rng = np.random.default_rng(1)
    imgs = rng.random((2, 3, 24, 19)).astype(np.float32)
    out = A.gaussian_blur(torch.from_numpy(imgs), sigma)
    assert out.shape == imgs.shape and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), scipy_blur(imgs, sigma), rtol=0, atol=2e-6)


def test_gaussian_blur_trivial_cases():
    x = torch.rand(2, 9, 9)
    assert torch.equal(A.gaussian_blur(x, 0.0), x)
    assert torch.equal(A.gaussian_blur(x, 0.1), x)             # radius int(0.4 + 0.5) = 0: identity, as scipy
    np.testing.assert_allclose(scipy_blur(x.numpy(), 0.1), x.numpy(), atol=1e-7)
    c = torch.full((1, 12, 12), 0.3, dtype=torch.float64)
    torch.testing.assert_close(A.gaussian_blur(c, 4.0), c)      # constants stay constant


def test_gaussian_kernel1d_matches_scipy_weights():
    for sigma in (0.7, 1.5, 4.0):
        k = A.gaussian_kernel1d(sigma, dtype=torch.float64).numpy()
        r = int(4 * sigma + 0.5)
        assert k.shape == (2 * r + 1,)
        impulse = np.zeros(4 * r + 1)
        impulse[2 * r] = 1.0
        ref = ndimage.gaussian_filter1d(impulse, sigma, mode="constant")[r:3 * r + 1]
        np.testing.assert_allclose(k, ref, atol=1e-15)


def test_gaussian_blur_small_map_caps_the_radius():
    """On maps smaller than the kernel radius the radius is capped at size - 1 (documented);
    the result stays a normalised smoothing: constants are preserved, values stay in range."""
    rng = np.random.default_rng(2)
    maps = rng.random((1, 12, 12))
    out = A.gaussian_blur(torch.from_numpy(maps), 4.0).numpy()
    assert out.shape == maps.shape and maps.min() <= out.min() and out.max() <= maps.max()
    const = A.gaussian_blur(torch.full((1, 5, 5), 0.25, dtype=torch.float64), 4.0)
    torch.testing.assert_close(const, torch.full((1, 5, 5), 0.25, dtype=torch.float64))
    np.testing.assert_allclose(out, scipy_blur(maps, 4.0), rtol=0, atol=2e-3)   # close to scipy


# ---------------------------------------------------------------- SSIM


def _pair(shape, seed):
    rng = np.random.default_rng(seed)
    a = ndimage.gaussian_filter(rng.random(shape), 1.0)
    b = np.clip(a + 0.15 * ndimage.gaussian_filter(rng.standard_normal(shape), 1.0)
                + 0.05 * rng.standard_normal(shape), 0, 1)
    return a, b


def test_ssim_distance_identical_is_zero():
    x = torch.rand(2, 3, 20, 20)
    d = A.ssim_distance(x, x.clone())
    assert d.shape == (2, 20, 20)
    assert d.abs().max() < 1e-6


@pytest.mark.parametrize("channels", [1, 3])
def test_ssim_distance_vs_skimage_away_from_borders(channels):
    a, b = _pair((channels, 40, 36), seed=channels)
    d = A.ssim_distance(torch.from_numpy(a)[None], torch.from_numpy(b)[None])[0].numpy()
    S = np.mean([structural_similarity(a[c], b[c], gaussian_weights=True, sigma=1.5,
                                       use_sample_covariance=False, data_range=1, full=True)[1]
                 for c in range(channels)], axis=0)
    inner = (slice(7, -7), slice(7, -7))
    assert np.abs(1 - S[inner]).mean() > 0.05                   # the images really differ
    np.testing.assert_allclose(d[inner], (1 - S)[inner], rtol=0, atol=2e-3)


def test_ssim_distance_matches_skimage_window_exactly():
    a, b = _pair((1, 40, 36), seed=1)
    d = A.ssim_distance(torch.from_numpy(a)[None], torch.from_numpy(b)[None])[0].numpy()
    S = structural_similarity(a[0], b[0], gaussian_weights=True, sigma=1.5,
                              use_sample_covariance=False, data_range=1, full=True)[1]
    inner = (slice(7, -7), slice(7, -7))
    np.testing.assert_allclose(d[inner], (1 - S)[inner], rtol=0, atol=1e-6)


# ---------------------------------------------------------------- L2 and dispatch


def test_l2_distance_by_hand():
    a = torch.zeros(1, 2, 1, 2)
    b = torch.tensor([[[[3.0, 0.0]], [[4.0, 1.0]]]])            # pixel 0: (3, 4) -> 5; pixel 1: (0, 1) -> 1
    torch.testing.assert_close(A.l2_distance(a, b), torch.tensor([[[5.0, 1.0]]]))
    rng = np.random.default_rng(3)
    x, y = rng.random((2, 3, 4, 5)), rng.random((2, 3, 4, 5))
    expected = np.zeros((2, 4, 5))
    for n in range(2):
        for i in range(4):
            for j in range(5):
                expected[n, i, j] = math.sqrt(sum((x[n, c, i, j] - y[n, c, i, j]) ** 2 for c in range(3)))
    np.testing.assert_allclose(A.l2_distance(torch.from_numpy(x), torch.from_numpy(y)).numpy(), expected,
                               atol=1e-12)


def test_distance_and_smooth_dispatch():
    a, b = torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16)
    assert torch.equal(A.distance(a, b, "l2"), A.l2_distance(a, b))
    assert torch.equal(A.distance(a, b, "ssim"), A.ssim_distance(a, b))
    with pytest.raises(ValueError, match="distance"):
        A.distance(a, b, "l1")
    m = torch.rand(2, 16, 16)
    assert torch.equal(A.smooth(m, "none"), m)
    assert torch.equal(A.smooth(m, "gaussian", 2.0), A.gaussian_blur(m, 2.0))
    with pytest.raises(ValueError, match="smoothing"):
        A.smooth(m, "median")
    am = A.anomaly_map(a, b, "l2", "gaussian", 2.0)
    assert am.shape == (1, 16, 16)
    torch.testing.assert_close(am, A.gaussian_blur(A.l2_distance(a, b), 2.0))


# ---------------------------------------------------------------- scores


def test_image_score_max_and_topk_mean():
    maps = torch.tensor([[[1.0, 5.0, 2.0], [0.0, 3.0, 4.0]],
                         [[-1.0, -2.0, -3.0], [-4.0, -5.0, -0.5]]])
    torch.testing.assert_close(A.image_score(maps, "max"), torch.tensor([5.0, -0.5]))
    torch.testing.assert_close(A.image_score(maps, "topk_mean", topk=3),
                               torch.tensor([4.0, (-0.5 - 1 - 2) / 3]))
    torch.testing.assert_close(A.image_score(maps, "topk_mean", topk=1), torch.tensor([5.0, -0.5]))
    # k larger than the map: the mean of all pixels
    torch.testing.assert_close(A.image_score(maps, "topk_mean", topk=100), maps.flatten(1).mean(1))
    with pytest.raises(ValueError, match="score"):
        A.image_score(maps, "mean")


def test_nll_score_by_hand():
    p = torch.tensor([[[0.1, 0.5], [0.01, 0.9]],
                      [[0.3, 0.2], [0.0, 0.25]]])
    s = A.nll_score(p, 0.2)
    expected = torch.tensor([-math.log(0.1) - math.log(0.01),
                             -math.log(1e-30)])               # 0.2 == tau is not below tau; p = 0 clamped
    torch.testing.assert_close(s, expected)
    assert torch.isfinite(s).all()
    assert torch.equal(A.nll_score(p, 0.0), torch.zeros(2))


def test_resize_maps():
    m = torch.rand(2, 8, 8)
    out = A.resize_maps(m, (32, 40))
    assert out.shape == (2, 32, 40)
    assert torch.equal(A.resize_maps(m, (8, 8)), m)
    c = torch.full((1, 4, 4), 0.7)
    torch.testing.assert_close(A.resize_maps(c, (9, 13)), torch.full((1, 9, 13), 0.7))
    assert A.resize_maps(m, (5, 3)).shape == (2, 5, 3)


# ---------------------------------------------------------------- MSGMS


_PREWITT_X = np.array([[1.0, 0.0, -1.0]] * 3) / 3.0


def numpy_bilinear(m, H, W):
    """Bilinear resize of a 2-D array with half-pixel centres (align_corners=False), by hand."""
    def taps(n_in, n_out):
        src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
        return i0, np.minimum(i0 + 1, n_in - 1), src - i0
    r0, r1, wr = taps(m.shape[0], H)
    c0, c1, wc = taps(m.shape[1], W)
    rows = m[r0] * (1 - wr)[:, None] + m[r1] * wr[:, None]
    return rows[:, c0] * (1 - wc) + rows[:, c1] * wc


def numpy_msgms(a, b, scales=3, c=0.0026):
    """Float64 MSGMS of (B, C, H, W) arrays (H, W divisible by 2**(scales-1)): grey by
    channel mean; per scale s a 2**s block mean (skimage), Prewitt magnitudes with
    scipy.ndimage.convolve (mode 'nearest' = replicate padding), 1 - GMS upsampled."""
    from skimage.measure import block_reduce

    def magnitude(g):
        return np.hypot(ndimage.convolve(g, _PREWITT_X, mode="nearest"),
                        ndimage.convolve(g, _PREWITT_X.T, mode="nearest"))
    B, _, H, W = a.shape
    out = np.zeros((B, H, W))
    for n in range(B):
        ga, gb = a[n].mean(axis=0), b[n].mean(axis=0)
        for s in range(scales):
            f = 2 ** s
            ma = magnitude(block_reduce(ga, (f, f), np.mean))
            mb = magnitude(block_reduce(gb, (f, f), np.mean))
            gms = (2 * ma * mb + c) / (ma ** 2 + mb ** 2 + c)
            out[n] += numpy_bilinear(1 - gms, H, W)
    return out / scales


def test_numpy_bilinear_matches_resize_maps():
    m = np.random.default_rng(9).random((5, 7))
    np.testing.assert_allclose(numpy_bilinear(m, 20, 9), A.resize_maps(torch.from_numpy(m)[None], (20, 9))[0].numpy(),
                               atol=1e-12)


@pytest.mark.parametrize("channels, scales", [(1, 3), (3, 3), (3, 1), (1, 4)])
def test_msgms_vs_numpy(channels, scales):
    a, b = _pair((2, channels, 32, 24), seed=10 + channels + scales)
    d = A.msgms_distance(torch.from_numpy(a), torch.from_numpy(b), scales=scales)
    assert d.shape == (2, 32, 24)
    expected = numpy_msgms(a, b, scales)
    assert expected.mean() > 0.05                               # the images really differ
    np.testing.assert_allclose(d.numpy(), expected, rtol=0, atol=2e-5)


def test_msgms_custom_constant_vs_numpy():
    a, b = _pair((1, 1, 16, 16), seed=20)
    d = A.msgms_distance(torch.from_numpy(a).float(), torch.from_numpy(b).float(), scales=2, c=0.01)
    np.testing.assert_allclose(d.numpy(), numpy_msgms(a, b, 2, c=0.01), rtol=0, atol=2e-5)


def test_msgms_identical_is_zero_and_bounded():
    x = torch.rand(2, 3, 32, 32)
    assert A.msgms_distance(x, x.clone()).abs().max() < 1e-6
    y = torch.rand(2, 3, 32, 32)
    d = A.msgms_distance(x, y)
    assert d.min() >= 0 and d.max() <= 1                         # 2 g_a g_b <= g_a^2 + g_b^2
    torch.testing.assert_close(d, A.msgms_distance(y, x))        # symmetric


def test_msgms_responds_to_an_added_edge():
    flat = torch.full((1, 1, 32, 32), 0.5)
    edged = flat.clone()
    edged[..., 16:] = 0.9                                          # a vertical step at column 16
    d = A.msgms_distance(flat, edged)[0]
    assert d[:, 15:17].min() > 0.9                                  # at the edge: 1 - GMS near 1
    assert d[:, :8].abs().max() < 1e-6 and d[:, -8:].abs().max() < 1e-6    # flat in both, at every scale
    assert d[:, 14:18].mean() > 4 * d.mean()                        # concentrated at the edge
    torch.testing.assert_close(d, d[:1].expand(32, 32))             # the same on every row
    assert d.sum() > A.msgms_distance(flat, flat.clone())[0].sum() + 100


def test_distance_dispatches_msgms():
    a, b = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    assert torch.equal(A.distance(a, b, "msgms"), A.msgms_distance(a, b))


# ---------------------------------------------------------------- pooled max


def brute_pooled_max(maps, size):
    """Max over every size x size window inside each map of the window's mean (a loop)."""
    out = []
    for m in np.asarray(maps, dtype=np.float64):
        H, W = m.shape
        out.append(max(m[i:i + size, j:j + size].mean() for i in range(H - size + 1) for j in range(W - size + 1)))
    return np.array(out)


@pytest.mark.parametrize("size", [1, 2, 3, 5, 9])
def test_pooled_max_vs_brute_force(size):
    maps = np.random.default_rng(size).random((3, 9, 11))
    got = A.pooled_max(torch.from_numpy(maps), size)
    assert got.shape == (3,)
    np.testing.assert_allclose(got.numpy(), brute_pooled_max(maps, size), rtol=0, atol=1e-6)


def test_pooled_max_window_larger_than_map_is_the_mean():
    maps = torch.rand(2, 6, 6)
    torch.testing.assert_close(A.pooled_max(maps, 6), maps.mean(dim=(1, 2)))
    torch.testing.assert_close(A.pooled_max(maps, 21), maps.mean(dim=(1, 2)))


def test_pooled_max_finds_a_blob_a_single_pixel_does_not_win():
    maps = torch.zeros(1, 40, 40)
    maps[0, 2, 2] = 50.0                                           # one hot pixel: 50 / 81 in a 9 x 9 window
    maps[0, 20:29, 25:34] = 1.0                                    # a 9 x 9 blob of 1: window mean 1
    torch.testing.assert_close(A.pooled_max(maps, 9), torch.tensor([1.0]))
    torch.testing.assert_close(A.image_score(maps, "max"), torch.tensor([50.0]))


def test_image_score_pooled_max_dispatch():
    maps = torch.rand(2, 30, 30)
    torch.testing.assert_close(A.image_score(maps, "pooled_max"), A.pooled_max(maps, 21))     # default pool 21
    torch.testing.assert_close(A.image_score(maps, "pooled_max", 100, pool=5), A.pooled_max(maps, 5))
    torch.testing.assert_close(A.image_score(maps, "max", 100), maps.flatten(1).amax(1))      # old positional call
    with pytest.raises(ValueError, match="pooled_max"):
        A.image_score(maps, "pooled_mean")


# ---------------------------------------------------------------- feature distances, code masks, standardise


def test_feature_distance_vs_numpy():
    rng = np.random.default_rng(30)
    a, b = rng.standard_normal((2, 7, 4, 5)), rng.standard_normal((2, 7, 4, 5))
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    l2 = np.sqrt(((a - b) ** 2).sum(axis=1))
    cos = 1 - (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    d = A.feature_distance(ta, tb, "l2")
    assert d.shape == (2, 4, 5)
    np.testing.assert_allclose(d.numpy(), l2, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(A.feature_distance(ta, tb, "cosine").numpy(), cos, rtol=0, atol=1e-5)
    np.testing.assert_allclose(A.feature_distance(ta, tb).numpy(), l2, rtol=1e-5, atol=1e-5)     # default l2
    with pytest.raises(ValueError, match="cosine"):
        A.feature_distance(ta, tb, "l1")


def test_feature_distance_cosine_edge_cases():
    a = torch.tensor([1.0, 2.0, -1.0]).view(1, 3, 1, 1)
    c = A.feature_distance
    torch.testing.assert_close(c(a, 3 * a, "cosine"), torch.zeros(1, 1, 1), atol=1e-6, rtol=0)   # scale-free
    torch.testing.assert_close(c(a, -a, "cosine"), torch.full((1, 1, 1), 2.0))
    zero = torch.zeros_like(a)
    d = c(a, zero, "cosine")                                     # eps keeps it finite: 1 - 0
    assert torch.isfinite(d).all() and torch.equal(d, torch.ones(1, 1, 1))


def _dilated(grid, r):
    """Chebyshev-distance-r dilation of a boolean 2-D grid, clipped at the borders (a loop)."""
    out = np.zeros_like(grid)
    for i, j in zip(*np.nonzero(grid)):
        out[max(0, i - r):i + r + 1, max(0, j - r):j + r + 1] = True
    return out


@pytest.mark.parametrize("dilate", [0, 1, 2])
def test_code_mask_map_dilation_and_upsampling(dilate):
    grid = np.zeros((2, 4, 5), dtype=bool)
    grid[0, 1, 1] = grid[0, 3, 4] = True                           # one inside, one at the corner
    grid[1, 0, 2] = True
    m = A.code_mask_map(torch.from_numpy(grid), (8, 15), dilate)
    assert m.shape == (2, 8, 15) and m.dtype == torch.float32
    for n in range(2):
        expected = np.kron(_dilated(grid[n], dilate), np.ones((2, 3)))   # each cell a 2 x 3 block
        np.testing.assert_array_equal(m[n].numpy(), expected.astype(np.float32))


def test_code_mask_map_by_hand():
    grid = torch.tensor([[[False, False, False],
                          [False, True, False],
                          [False, False, False]]])
    assert torch.equal(A.code_mask_map(grid, (3, 3), 0), grid.float())
    assert torch.equal(A.code_mask_map(grid, (3, 3), 1), torch.ones(1, 3, 3))
    assert torch.equal(A.code_mask_map(torch.zeros(1, 3, 3, dtype=torch.bool), (6, 6), 2), torch.zeros(1, 6, 6))
    m = A.code_mask_map(grid, (6, 6), 0)[0]
    assert m.sum() == 4 and torch.equal(m[2:4, 2:4], torch.ones(2, 2))


def test_standardise():
    x = torch.tensor([1.0, 3.0, 5.0])
    torch.testing.assert_close(A.standardise(x, 3.0, 2.0), torch.tensor([-1.0, 0.0, 1.0]))
    torch.testing.assert_close(A.standardise(x, 1.0, 0.0, eps=0.5), torch.tensor([0.0, 4.0, 8.0]))  # std floored
    assert torch.isfinite(A.standardise(x, 0.0, 0.0)).all()


@pytest.mark.parametrize("score", ["max", "pooled_max", "fused"])
def test_score_distance_scores_another_map_and_keeps_the_map(score):
    """score_distance: the map is the map distance's, the image scores (score and
    direct_score) are those of the same map kind under the score's distance, which is what
    a run with that distance for both would score."""
    g = torch.Generator().manual_seed(0)
    B, N, F, H, S = 2, 1, 6, 8, 32
    seen, direct = torch.randn(B, F, H, H, generator=g), torch.randn(B, F, H, H, generator=g)
    restored = torch.randn(B, N, F, H, H, generator=g)
    resampled = torch.rand(B, N, 4, 4, generator=g) < 0.3
    nll, held = torch.rand(B, generator=g) * 5, torch.tensor([0.5, 0.2, 1.0, 2.0])
    base = A.MapSettings(space="features", image_size=S, distance="cosine", score=score, pool=5)
    mixed = A.postprocess(seen, direct, restored, resampled, nll, held, base._replace(score_distance="l2"))
    cosine = A.postprocess(seen, direct, restored, resampled, nll, held, base)
    l2 = A.postprocess(seen, direct, restored, resampled, nll, held, base._replace(distance="l2"))
    for name in ("anomaly_map", "map_restored_vs_input", "map_restored_vs_direct", "map_direct", "map_gated"):
        torch.testing.assert_close(getattr(mixed, name), getattr(cosine, name))
    for name in ("score", "direct_score", "map_score", "fused_score"):
        torch.testing.assert_close(getattr(mixed, name), getattr(l2, name))
    assert not torch.allclose(cosine.score, l2.score)
    same = A.postprocess(seen, direct, restored, resampled, nll, held, base._replace(score_distance="cosine"))
    torch.testing.assert_close(same.score, cosine.score)
