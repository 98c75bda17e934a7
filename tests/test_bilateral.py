"""Bilateral smoothing of anomaly maps (``detect.smoothing = "bilateral"``): edges kept,
flat noise smoothed (unlike the Gaussian), each map on its own scale, and the option
reaches the detector's maps."""
import numpy as np
import pytest
import torch

import lsr
from lsr import anomaly


def step_maps(noise=0.03, seed=0):
    """Two 32 x 32 maps: 0 on the left half, 1 on the right, plus Gaussian noise."""
    g = torch.Generator().manual_seed(seed)
    m = torch.zeros(2, 32, 32)
    m[:, :, 16:] = 1.0
    return m + noise * torch.randn(2, 32, 32, generator=g)


def test_bilateral_keeps_the_edge_and_smooths_the_flat_parts():
    x = step_maps()
    b = anomaly.smooth(x, "bilateral", 2.0)
    g = anomaly.smooth(x, "gaussian", 2.0)
    assert b.shape == x.shape and b.dtype == x.dtype
    # next to the edge: the bilateral map stays on its side, the Gaussian mixes the two
    assert (b[:, :, 15] < 0.1).all() and (b[:, :, 16] > 0.9).all()
    assert (g[:, :, 15] > 0.25).all() and (g[:, :, 16] < 0.75).all()
    # away from it the noise is smoothed
    flat = (slice(None), slice(2, 30), slice(2, 11))
    assert float(b[flat].std()) < 0.5 * float(x[flat].std())


def test_bilateral_is_per_map_and_scale_free():
    x = step_maps()
    b = anomaly.smooth(x, "bilateral", 2.0)
    # each map alone gives the same (no batch coupling)
    for i in range(2):
        torch.testing.assert_close(anomaly.smooth(x[i:i + 1], "bilateral", 2.0)[0], b[i])
    # each map's range kernel works on the map scaled to [0, 1]: an affine change of the
    # map's values changes the result by the same affine map
    torch.testing.assert_close(anomaly.smooth(7.0 * x + 3.0, "bilateral", 2.0), 7.0 * b + 3.0, rtol=1e-5, atol=1e-5)
    const = torch.full((1, 16, 16), 0.25)
    torch.testing.assert_close(anomaly.smooth(const, "bilateral", 2.0), const)
    assert not torch.allclose(anomaly.smooth(x, "bilateral", 4.0), b, atol=1e-3)   # sigma matters


@pytest.mark.slow
def test_detector_maps_use_bilateral_smoothing(tiny_run, tiny_dataset):
    base = lsr.Detector.load(tiny_run, "cpu").with_options(tau=0.2, resampler="fast")
    x, _ = base.load_batch([s.path for s in lsr.data.scan_mvtec(tiny_dataset).test[:3]])
    raw = base.with_options(smoothing="none").detect(x)
    bil = base.with_options(smoothing="bilateral", sigma=2.0).detect(x)
    gau = base.with_options(smoothing="gaussian", sigma=2.0).detect(x)
    torch.testing.assert_close(bil.map_direct, anomaly.bilateral_smooth(raw.map_direct, 2.0))
    torch.testing.assert_close(bil.anomaly_map, anomaly.bilateral_smooth(raw.anomaly_map, 2.0), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(bil.anomaly_map, gau.anomaly_map, atol=1e-4)
    assert not torch.allclose(bil.anomaly_map, raw.anomaly_map, atol=1e-4)
    np.testing.assert_allclose(bil.score.numpy(), bil.anomaly_map.flatten(1).amax(1).numpy())
