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
