"""Decisions a production line can act on: thresholds set on normal images only, a
verdict per image, and the defect regions of its map.

Numpy only (no torch): the PyTorch path (:mod:`lsr.detect`, :mod:`lsr.evaluation`) and
the bundle path (:mod:`lsr.deploy.inferencer`) call the same functions, and the C++
runtime (export/src) is held to them by tests.

**Image threshold** at a false-alarm rate ``r`` from the scores s_1..s_n of n held-out
normal images (the held-out part of ``train/good``, never ``test/``): a new normal image
is flagged when its score is *above* the threshold.

* When ``r >= 1 / (n + 1)`` the sample resolves the rate without assumptions: the
  threshold is the order statistic s_(k), k = ceil((n + 1)(1 - r)); for any continuous
  score distribution a new normal image exceeds it with probability (n + 1 - k) / (n + 1)
  <= r (method ``empirical``).
* Below that (e.g. 1% from 14 images, which could at best resolve 1/15 = 6.7%), the
  rate is extrapolated by a normal model of the scores: the upper prediction bound
  mean + t_{n-1}(1 - r) * std * sqrt(1 + 1/n), whose exceedance probability for a new
  normal-distributed score is exactly r (method ``normal-prediction``). It rests on the
  scores' tail being normal; the record says so and gives the rate the sample supports
  and a bootstrap 90% interval of the threshold.

**Pixel threshold** at a per-pixel false-positive rate ``p`` of good images: the same
order statistic over every pixel of the held-out maps (model resolution). Neighbouring
pixels are correlated (the map is smoothed), so the rate holds on average over good
images' pixels, not independently per pixel.

**Regions**: connected components (8-connected) of ``map > pixel threshold`` on the map at
the image's own size; each with its area (pixels), bounding box ``[x0, y0, x1, y1]``
(inclusive), peak value and peak position ``[x, y]``; listed by peak, highest first.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

#: most regions listed per image (``n_regions`` counts all of them)
MAX_REGIONS = 50


def _order_statistic_index(n: int, rate: float) -> int:
    """k (1-based) of the distribution-free threshold s_(k), or n + 1 when the sample
    cannot resolve ``rate``."""
    return int(math.ceil((n + 1) * (1.0 - rate) - 1e-9))


def image_threshold(scores: np.ndarray, rate: float, n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """The image threshold at false-alarm rate ``rate`` from normal images' scores.

    Example:
        >>> t = image_threshold(np.arange(1.0, 200.0), 0.05)      # 199 scores 1..199
        >>> t["method"], t["threshold"]
        ('empirical', 190.0)
    """
    s = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    n = s.size
    if n < 2 or not np.isfinite(s).all():
        raise ValueError(f"image threshold: need at least 2 finite held-out scores, got {n}")
    if not 0.0 < rate < 1.0:
        raise ValueError(f"false-alarm rate must be in (0, 1), got {rate}")

    def estimate(x: np.ndarray) -> float:
        k = _order_statistic_index(x.size, rate)
        if k <= x.size:
            return float(np.partition(x, k - 1)[k - 1])
        from scipy.stats import t as student_t

        return float(x.mean() + student_t.ppf(1.0 - rate, x.size - 1) * x.std(ddof=1) * math.sqrt(1 + 1 / x.size))

    k = _order_statistic_index(n, rate)
    method = "empirical" if k <= n else "normal-prediction"
    thr = estimate(s)
    rng = np.random.default_rng(seed)
    boot = np.array([estimate(rng.choice(s, n)) for _ in range(n_boot)])
    ci = [float(np.quantile(boot, 0.05)), float(np.quantile(boot, 0.95))] if n_boot else None
    note = ("order statistic of the held-out scores (distribution-free)" if method == "empirical" else
            f"{n} held-out images resolve false-alarm rates down to {1 / (n + 1):.3g} only; {rate:g} is "
            f"extrapolated by a normal model of the scores (upper prediction bound), which holds only if "
            f"their tail is normal")
    return {"threshold": thr, "rate": rate, "method": method, "n_images": n, "supported_rate": 1.0 / (n + 1),
            "ci90": ci,
            "held_out_max": float(s[-1]), "note": note}


def pixel_threshold(values: np.ndarray, rate: float) -> dict[str, Any]:
    """The pixel threshold at per-pixel false-positive rate ``rate`` over good images'
    map values (the order statistic; the maximum when the sample cannot resolve it)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    n = v.size
    if n < 2 or not np.isfinite(v).all():
        raise ValueError(f"pixel threshold: need finite held-out map values, got {n}")
    if not 0.0 < rate < 1.0:
        raise ValueError(f"pixel false-positive rate must be in (0, 1), got {rate}")
    k = min(_order_statistic_index(n, rate), n)
    return {"threshold": float(np.partition(v, k - 1)[k - 1]), "rate": rate, "n_pixels": n,
            "supported_rate": 1.0 / (n + 1),
            "note": "order statistic of every held-out map pixel (model resolution); pixels are correlated"}


def label(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected components (8-connectivity) of a boolean mask (H, W): labels (H, W)
    int64, 0 for background and 1..n in raster order of each component's first pixel.

    Vectorised min-label propagation with pointer jumping (numpy only, so the bundle
    path needs no scipy); tests hold it to ``scipy.ndimage.label``.
    """
    mask = np.asarray(mask, dtype=bool)
    H, W = mask.shape
    big = H * W
    lab = np.where(mask, np.arange(big).reshape(H, W), big)
    while True:
        p = np.pad(lab, 1, constant_values=big)
        nb = lab
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                if dy == 1 and dx == 1:
                    continue
                nb = np.minimum(nb, p[dy:dy + H, dx:dx + W])
        new = np.where(mask, nb, big).ravel()
        # pointer jumping: a pixel takes the label of the pixel its label names
        inside = new < big
        for _ in range(64):
            jumped = new.copy()
            jumped[inside] = new[new[inside]]
            if np.array_equal(jumped, new):
                break
            new = jumped
        new = new.reshape(H, W)
        if np.array_equal(new, lab):
            break
        lab = new
    roots = np.unique(lab[mask])
    out = np.zeros((H, W), np.int64)
    if roots.size:
        lut = np.zeros(big + 1, np.int64)
        lut[roots] = np.arange(1, roots.size + 1)
        out[mask] = lut[lab[mask]]
    return out, int(roots.size)


def regions(map_full: np.ndarray, threshold: float, max_regions: int = MAX_REGIONS) -> tuple[list[dict], int]:
    """Defect regions of a map: (the ``max_regions`` regions with the highest peaks, the
    total count)."""
    m = np.asarray(map_full, dtype=np.float32)
    lab, n = label(m > threshold)
    if n == 0:
        return [], 0
    flat = lab.ravel()
    vals = m.ravel()
    H, W = m.shape
    ys, xs = np.divmod(np.arange(flat.size), W)
    sel = flat > 0
    ids, ys, xs, vs = flat[sel] - 1, ys[sel], xs[sel], vals[sel]
    area = np.bincount(ids, minlength=n)
    x0 = np.full(n, W)
    np.minimum.at(x0, ids, xs)
    y0 = np.full(n, H)
    np.minimum.at(y0, ids, ys)
    x1 = np.zeros(n, np.int64)
    np.maximum.at(x1, ids, xs)
    y1 = np.zeros(n, np.int64)
    np.maximum.at(y1, ids, ys)
    peak = np.full(n, -np.inf, np.float32)
    np.maximum.at(peak, ids, vs)
    # peak position: the first pixel (raster order) holding the region's peak
    at_peak = vs == peak[ids]
    first = np.full(n, flat.size)
    np.minimum.at(first, ids[at_peak], (ys * W + xs)[at_peak])
    order = np.lexsort((np.arange(n), -peak))[:max_regions]
    out = [{"area": int(area[i]), "bbox": [int(x0[i]), int(y0[i]), int(x1[i]), int(y1[i])],
            "peak": float(peak[i]), "peak_xy": [int(first[i] % W), int(first[i] // W)]} for i in order]
    return out, n


def mask(map_full: np.ndarray, threshold: float) -> np.ndarray:
    """The binary defect mask (H, W) uint8, 255 where the map exceeds the pixel threshold."""
    return np.where(np.asarray(map_full) > threshold, 255, 0).astype(np.uint8)


def verdict(score: float | None, map_full: np.ndarray | None, d: Mapping[str, Any]) -> dict[str, Any]:
    """The decision fields of one image's result row, from its image score, its map at
    its own size and the detect settings ``d`` (``image_threshold``, ``pixel_threshold``,
    ``false_alarm_rate``, ``pixel_fpr``; a missing threshold gives null fields).

    ``normalised_score`` is score / threshold, so 1.0 is the decision boundary (null when
    the threshold is not positive, where the ratio would not order the images)."""
    t, pt = d.get("image_threshold"), d.get("pixel_threshold")
    row: dict[str, Any] = {"anomalous": None, "threshold": t, "normalised_score": None,
                           "false_alarm_rate": d.get("false_alarm_rate"), "pixel_threshold": pt,
                           "pixel_fpr": d.get("pixel_fpr")}
    if t is not None and score is not None and math.isfinite(score):
        row["anomalous"] = bool(score > t)
        row["normalised_score"] = float(score / t) if t > 0 else None
    if pt is not None and map_full is not None:
        regs, n = regions(map_full, pt)
        row["n_regions"], row["regions"] = n, regs
    return row


__all__ = ["image_threshold", "pixel_threshold", "label", "regions", "mask", "verdict", "MAX_REGIONS"]
