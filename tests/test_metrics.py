"""Tests for lsr.metrics (scikit-learn is used only as an oracle)."""

import doctest
import json
import math
from bisect import bisect

import numpy as np
import pytest
from scipy import ndimage
from sklearn import metrics as skm

import lsr.metrics as M
from lsr.metrics import (
    all_metrics,
    aupro,
    auroc,
    f1_max,
    image_metrics,
    pixel_auroc,
    pixel_f1_max,
    pixel_metrics,
    roc_curve,
)


# ---------------------------------------------------------------- helpers


def _datasets():
    rng = np.random.default_rng(0)
    out = {}
    y = rng.integers(0, 2, 300)
    out["random"] = (rng.normal(size=300) + y, y)
    y = rng.integers(0, 2, 400)
    out["heavy_ties"] = (rng.integers(0, 4, 400).astype(float) + 0.5 * y, y)
    y = rng.integers(0, 2, 200)
    out["all_tied"] = (np.full(200, 3.0), y)
    out["two_samples"] = (np.array([0.3, 0.7]), np.array([1, 0]))
    out["two_samples_tied"] = (np.array([0.5, 0.5]), np.array([0, 1]))
    out["float32_bool"] = (
        rng.random(100).astype(np.float32),
        rng.random(100) < 0.3,
    )
    out["imbalanced"] = (rng.random(500), (np.arange(500) < 3).astype(int))
    return out


DATA = _datasets()


def _sk_f1_max(y, s):
    p, r, _ = skm.precision_recall_curve(y, s)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(p + r > 0, 2 * p * r / (p + r), 0.0)
    return float(np.max(f1))


def _official_aupro(maps, masks, limit):
    """Direct transcription of the MVTec AD algorithm: joint argsort of all
    pixels, cumulative sums, last point per distinct score, bisect-based
    truncated trapezoid."""
    structure = np.ones((3, 3), dtype=int)
    scores, fp_changes, pro_changes = [], [], []
    n_ok = n_regions = 0
    for m, g in zip(maps, masks):
        labeled, n = ndimage.label(g, structure)
        n_regions += n
        ok = labeled == 0
        n_ok += ok.sum()
        pro_change = np.zeros(g.shape)
        for k in range(1, n + 1):
            region = labeled == k
            pro_change[region] = 1.0 / region.sum()
        scores.append(np.ravel(m))
        fp_changes.append(ok.ravel().astype(float))
        pro_changes.append(pro_change.ravel())
    s = np.concatenate(scores)
    order = np.argsort(s)[::-1]
    s = s[order]
    fprs = np.cumsum(np.concatenate(fp_changes)[order]) / n_ok
    pros = np.cumsum(np.concatenate(pro_changes)[order]) / n_regions
    keep = np.append(np.diff(s) != 0, True)
    x = np.concatenate(([0.0], np.minimum(fprs[keep], 1), [1.0]))
    y = np.concatenate(([0.0], np.minimum(pros[keep], 1), [1.0]))
    correction = 0.0
    if limit not in x:
        i = bisect(x, limit)
        y_i = y[i - 1] + (y[i] - y[i - 1]) * (limit - x[i - 1]) / (x[i] - x[i - 1])
        correction = 0.5 * (y_i + y[i - 1]) * (limit - x[i - 1])
    keep = x <= limit
    x, y = x[keep], y[keep]
    area = np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction
    return area / limit


# ---------------------------------------------------------------- image level


@pytest.mark.parametrize("name", sorted(DATA))
def test_roc_curve_matches_sklearn(name):
    s, y = DATA[name]
    fpr, tpr, thr = roc_curve(s, y)
    efpr, etpr, ethr = skm.roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, efpr)
    np.testing.assert_allclose(tpr, etpr)
    assert thr[0] == np.inf and fpr[0] == 0 and tpr[0] == 0
    np.testing.assert_allclose(thr[1:], ethr[1:], rtol=1e-6)
    assert np.all(np.diff(thr) < 0)  # distinct thresholds only


@pytest.mark.parametrize("name", sorted(DATA))
def test_auroc_matches_sklearn_and_trapezoid(name):
    s, y = DATA[name]
    value = auroc(s, y)
    assert isinstance(value, float)
    assert value == pytest.approx(skm.roc_auc_score(y, s), rel=1e-12, abs=1e-12)
    fpr, tpr, _ = roc_curve(s, y)
    assert value == pytest.approx(np.trapezoid(tpr, fpr), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("name", sorted(DATA))
def test_f1_max_matches_sklearn(name):
    s, y = DATA[name]
    value = f1_max(s, y)
    assert isinstance(value, float)
    assert value == pytest.approx(_sk_f1_max(y, s), rel=1e-12)


def test_simple_values():
    assert auroc([0.1, 0.9], [0, 1]) == 1.0
    assert auroc([0.9, 0.1], [0, 1]) == 0.0
    assert auroc([0.5, 0.5], [0, 1]) == 0.5
    assert f1_max([0.5, 0.5], [0, 1]) == pytest.approx(2 / 3)


def test_single_class():
    assert math.isnan(auroc([0.1, 0.2, 0.3], [0, 0, 0]))
    assert math.isnan(auroc([0.1, 0.2, 0.3], [1, 1, 1]))
    assert math.isnan(f1_max([0.1, 0.2], [0, 0]))
    assert f1_max([0.1, 0.2], [1, 1]) == 1.0
    fpr, tpr, _ = roc_curve([0.1, 0.2], [0, 0])
    assert np.all(np.isnan(tpr)) and fpr[-1] == 1.0
    out = image_metrics([0.1, 0.2], [0, 0])
    assert math.isnan(out["image_auroc"]) and math.isnan(out["image_f1_max"])


def test_image_metrics():
    s, y = DATA["heavy_ties"]
    out = image_metrics(s, y)
    assert set(out) == {"image_auroc", "image_f1_max"}
    assert all(type(v) is float for v in out.values())
    assert out["image_auroc"] == auroc(s, y)
    assert out["image_f1_max"] == f1_max(s, y)


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize("fn", [auroc, f1_max, roc_curve, image_metrics])
def test_image_level_validation(fn):
    with pytest.raises(ValueError, match=r"\(3,\).*\(2,\)"):
        fn([0.1, 0.2, 0.3], [0, 1])
    with pytest.raises(ValueError, match="NaN"):
        fn([0.1, np.nan], [0, 1])
    with pytest.raises(ValueError, match="binary"):
        fn([0.1, 0.2], [0, 2])
    with pytest.raises(ValueError, match="binary"):
        fn([0.1, 0.2], [0.0, 0.5])
    with pytest.raises(ValueError):
        fn([], [])


@pytest.mark.parametrize("fn", [pixel_auroc, pixel_f1_max, aupro, pixel_metrics])
def test_pixel_level_validation(fn):
    with pytest.raises(ValueError, match=r"\(2, 4, 4\).*\(2, 4, 5\)"):
        fn(np.zeros((2, 4, 4)), np.zeros((2, 4, 5), dtype=bool))
    with pytest.raises(ValueError, match=r"\(4, 4\).*\(3, 4\)"):
        fn([np.zeros((2, 2)), np.zeros((4, 4))], [np.zeros((2, 2)), np.zeros((3, 4))])
    with pytest.raises(ValueError, match="2 maps but 1 masks"):
        fn([np.zeros((2, 2))] * 2, [np.zeros((2, 2))])
    bad = np.zeros((1, 2, 2))
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        fn(bad, np.zeros((1, 2, 2), dtype=bool))
    with pytest.raises(ValueError, match="binary"):
        fn(np.zeros((1, 2, 2)), np.full((1, 2, 2), 255, dtype=np.uint8))
    with pytest.raises(ValueError):
        fn(np.zeros((2, 2)), np.zeros((2, 2), dtype=bool))  # not (N, H, W)


def test_fpr_limit_validation():
    maps, masks = np.zeros((1, 2, 2)), np.eye(2, dtype=bool)[None]
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="fpr_limit"):
            aupro(maps, masks, fpr_limit=bad)


# ---------------------------------------------------------------- pixel level


def _random_pixel_data(seed=1, quantize=False):
    rng = np.random.default_rng(seed)
    maps, masks = [], []
    for h, w in [(8, 8), (5, 11), (16, 9), (7, 7)]:
        g = np.zeros((h, w), dtype=bool)
        g[rng.integers(0, h) :, : rng.integers(1, w)] = True
        g[0, -1] = True  # extra single-pixel region in some images
        m = rng.random((h, w)) + 0.7 * g
        if quantize:
            m = np.round(m * 4) / 4
        maps.append(m)
        masks.append(g)
    return maps, masks


@pytest.mark.parametrize("quantize", [False, True])
def test_pixel_auroc_and_f1_on_lists_of_different_sizes(quantize):
    maps, masks = _random_pixel_data(quantize=quantize)
    s = np.concatenate([m.ravel() for m in maps])
    y = np.concatenate([g.ravel() for g in masks])
    assert pixel_auroc(maps, masks) == pytest.approx(skm.roc_auc_score(y, s), rel=1e-12)
    assert pixel_auroc(maps, masks) == auroc(s, y)
    assert pixel_f1_max(maps, masks) == pytest.approx(_sk_f1_max(y, s), rel=1e-12)


def test_pixel_auroc_on_float32_stack():
    rng = np.random.default_rng(2)
    masks = rng.random((3, 6, 5)) < 0.2
    maps = (rng.random((3, 6, 5)) + masks).astype(np.float32)
    expected = skm.roc_auc_score(masks.ravel(), maps.ravel())
    assert pixel_auroc(maps, masks) == pytest.approx(expected, rel=1e-12)
    # masks as 0/1 integers are accepted too
    assert pixel_auroc(maps, masks.astype(np.uint8)) == pixel_auroc(maps, masks)
    assert math.isnan(pixel_auroc(maps, np.zeros_like(masks)))


def test_aupro_perfect_map():
    masks = np.zeros((2, 6, 6), dtype=bool)
    masks[0, 1:3, 1:4] = True
    masks[1, 4:, 4:] = True
    assert aupro(masks.astype(float), masks) == pytest.approx(1.0)
    assert aupro(masks.astype(float) * 5 + 1, masks, fpr_limit=0.05) == pytest.approx(1.0)


def test_aupro_hand_computed_integral():
    # One region of two pixels scoring 0.95 and 0.75; ten normal pixels
    # scoring 0.0, 0.1, ..., 0.9.  Curve: (0,0) (0,.5) (.1,.5) (.2,.5) (.2,1) ...
    m = np.array([[0.95, 0.75] + [k / 10 for k in range(10)]])
    g = np.zeros_like(m, dtype=bool)
    g[0, :2] = True
    # area up to .3 = .5*.2 + 1*.1 = .2
    assert aupro([m], [g]) == pytest.approx(0.2 / 0.3)
    # area up to .25 = .5*.2 + 1*.05 = .15
    assert aupro([m], [g], fpr_limit=0.25) == pytest.approx(0.15 / 0.25)
    # area up to .15 lies on the flat part at PRO = .5
    assert aupro([m], [g], fpr_limit=0.15) == pytest.approx(0.5)


def test_aupro_ties_and_interpolation():
    # Anomalous pixel scores 0.5, tied with two of the four normal pixels.
    # Curve: (0,0) -> (.25,0) [t=.9] -> (.75,1) [t=.5] -> (1,1).
    m = np.array([[0.5, 0.9, 0.5, 0.5, 0.1]])
    g = np.array([[1, 0, 0, 0, 0]], dtype=bool)
    # PRO(.5) interpolated = .5; area = .5 * .5 * .25
    assert aupro([m], [g], fpr_limit=0.5) == pytest.approx(0.0625 / 0.5)
    # PRO(.3) interpolated = .1; area = .5 * .1 * .05
    assert aupro([m], [g], fpr_limit=0.3) == pytest.approx(0.0025 / 0.3)
    assert aupro([m], [g], fpr_limit=0.25) == 0.0


def test_aupro_averages_per_region_not_per_pixel():
    g = np.zeros((5, 5), dtype=bool)
    g[0, 0] = True  # region A: 1 pixel
    g[2:, 2:] = True  # region B: 9 pixels, not touching A
    m = np.ones((5, 5))
    m[0, 0] = 2.0  # A fully detected before any false positive, B never
    m[2:, 2:] = 0.0
    # PRO = (1 + 0) / 2 regions = .5 on [0, 1); per pixel it would be .1
    assert aupro([m], [g]) == pytest.approx(0.5)
    m2 = np.ones((5, 5))
    m2[2:, 2:] = 2.0  # now only the big region is detected: still .5
    m2[0, 0] = 0.0
    assert aupro([m2], [g]) == pytest.approx(0.5)
    # regions are averaged across images as well: the 3-pixel diagonal of a
    # second image is one (8-connected) region, detected at FPR 0
    eye = np.eye(3, dtype=bool)
    assert aupro([m, 1.0 + eye], [g, eye]) == pytest.approx(2 / 3)


def test_aupro_uses_8_connectivity():
    g = np.zeros((4, 4), dtype=bool)
    g[0, 0] = g[1, 1] = True  # diagonal neighbours: one region
    g[3, 3] = True  # separate region
    m = np.ones((4, 4))
    m[g] = 0.0
    m[0, 0] = 2.0
    # 8-connectivity: PRO = (1/2 + 0) / 2 = .25 ; 4-connectivity would give 1/3
    assert aupro([m], [g]) == pytest.approx(0.25)


@pytest.mark.parametrize("limit", [0.05, 0.3, 0.5, 1.0])
def test_aupro_constant_map_is_normalised_diagonal(limit):
    # A constant map gives the single point (1, 1): PRO = FPR, area = limit^2/2
    masks = np.zeros((2, 5, 5), dtype=bool)
    masks[0, :2, :3] = True
    masks[1, 3, 3] = True
    assert aupro(np.full((2, 5, 5), 0.7), masks, fpr_limit=limit) == pytest.approx(
        limit / 2
    )


@pytest.mark.parametrize("quantize", [False, True])
@pytest.mark.parametrize("limit", [0.3, 0.1, 1.0])
def test_aupro_matches_official_algorithm(quantize, limit):
    maps, masks = _random_pixel_data(seed=3, quantize=quantize)
    expected = _official_aupro(maps, masks, limit)
    assert aupro(maps, masks, fpr_limit=limit) == pytest.approx(expected, rel=1e-9)


def test_aupro_matches_official_on_stack():
    rng = np.random.default_rng(4)
    masks = ndimage.binary_dilation(rng.random((3, 20, 20)) < 0.02, iterations=1)
    maps = ndimage.gaussian_filter(rng.random((3, 20, 20)), 1.0) + 0.2 * masks
    maps = maps.astype(np.float32)
    expected = _official_aupro(maps, masks, 0.3)
    assert aupro(maps, masks) == pytest.approx(expected, rel=1e-6)


def test_aupro_undefined_cases():
    assert math.isnan(aupro(np.zeros((1, 3, 3)), np.zeros((1, 3, 3), dtype=bool)))
    assert math.isnan(aupro(np.zeros((1, 3, 3)), np.ones((1, 3, 3), dtype=bool)))


def test_pixel_metrics_and_all_metrics():
    maps, masks = _random_pixel_data(seed=5, quantize=True)
    out = pixel_metrics(maps, masks, fpr_limit=0.2)
    assert set(out) == {"pixel_auroc", "aupro", "pixel_f1_max"}
    assert out["pixel_auroc"] == pixel_auroc(maps, masks)
    assert out["pixel_f1_max"] == pixel_f1_max(maps, masks)
    assert out["aupro"] == aupro(maps, masks, fpr_limit=0.2)

    scores = [m.max() for m in maps]
    labels = [1, 0, 1, 0]
    both = all_metrics(scores, labels, maps, masks)
    assert set(both) == {
        "image_auroc",
        "image_f1_max",
        "pixel_auroc",
        "aupro",
        "pixel_f1_max",
    }
    assert all(type(v) is float for v in both.values())
    assert both["aupro"] == aupro(maps, masks)
    json.dumps(both)


# ---------------------------------------------------------------- doctests


def test_doctests():
    result = doctest.testmod(M, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0
    assert result.failed == 0
