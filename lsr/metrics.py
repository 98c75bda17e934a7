"""Anomaly-detection metrics following the MVTec AD evaluation conventions.

Everything here is plain numpy (plus :mod:`scipy.ndimage` for connected
components), so it can be used without torch or scikit-learn.

Image level:
    :func:`roc_curve`, :func:`auroc`, :func:`f1_max`, :func:`image_metrics`.

Pixel level:
    :func:`pixel_auroc`, :func:`pixel_f1_max`, :func:`aupro`,
    :func:`pixel_metrics`.

Both levels at once: :func:`all_metrics`.

Conventions:
    * A sample is predicted anomalous when ``score >= threshold``.
    * Labels and masks must be binary: ``bool`` or numbers that are exactly
      0 or 1 (an 8-bit 0/255 mask must be converted first, e.g. ``m > 0``).
    * NaN scores raise :class:`ValueError`; infinite scores are allowed.
    * Metrics that are undefined for the given labels (AUROC with a single
      class, AUPRO without any ground-truth region, ...) return
      ``float('nan')`` rather than raising.

Memory:
    The pixel-level functions never build the joint (score, label) argsort
    used by the reference implementations. Anomalous and normal pixels are
    copied once into two preallocated arrays (keeping float32 input as
    float32) and each is sorted in place; all curve points are then obtained
    with :func:`numpy.searchsorted`. For ~100M float32 pixels this needs
    roughly 0.4 GB of extra memory plus small per-image temporaries, instead
    of several GB.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence, Union

import numpy as np
from scipy import ndimage

__all__ = [
    "roc_curve",
    "auroc",
    "f1_max",
    "pixel_auroc",
    "pixel_f1_max",
    "aupro",
    "image_metrics",
    "pixel_metrics",
    "all_metrics",
]

MapsLike = Union[np.ndarray, Sequence[Any]]

# Structuring element of the official MVTec AD evaluation code
# (8-connectivity: diagonal neighbours belong to the same region).
_REGION_STRUCTURE = np.ones((3, 3), dtype=int)


# --------------------------------------------------------------------------
# Input validation helpers
# --------------------------------------------------------------------------


def _as_scores(x: Any, name: str) -> np.ndarray:
    """Return ``x`` as a float ndarray (float32 kept, others -> float64).

    Raises ``ValueError`` on NaN or non-numeric input. No copy is made when
    ``x`` already is a float32/float64 ndarray.
    """
    a = np.asarray(x)
    kind = a.dtype.kind
    if kind == "f":
        if a.dtype.itemsize < 4:
            a = a.astype(np.float32)
        elif a.dtype.itemsize > 8:
            a = a.astype(np.float64)
    elif kind in "biu":
        a = a.astype(np.float64)
    elif kind == "O":
        try:
            a = a.astype(np.float64)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{name} must be numeric") from exc
    else:
        raise ValueError(f"{name} must be real-valued numbers, got dtype {a.dtype}")
    # np.min propagates NaN and needs no temporary array of the input's size.
    if a.size and np.isnan(np.min(a)):
        raise ValueError(f"{name} contains NaN")
    return a


def _as_binary(x: Any, name: str) -> np.ndarray:
    """Return ``x`` as a bool ndarray; raise ``ValueError`` if not 0/1."""
    a = np.asarray(x)
    kind = a.dtype.kind
    if kind == "b":
        return a
    if kind in "iu":
        if a.size and (np.min(a) < 0 or np.max(a) > 1):
            raise ValueError(f"{name} must be binary (bool or 0/1)")
        return a.astype(bool)
    if kind in "fO":
        try:
            is_binary = bool(np.all((a == 0) | (a == 1)))
        except TypeError:
            is_binary = False
        if not is_binary:
            raise ValueError(f"{name} must be binary (bool or 0/1)")
        return a != 0
    raise ValueError(f"{name} must be binary (bool or 0/1), got dtype {a.dtype}")


def _check_pair(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate an image-level (scores, labels) pair and flatten it."""
    s = _as_scores(scores, "scores")
    y = np.asarray(labels)
    if s.shape != y.shape:
        raise ValueError(
            f"scores shape {s.shape} does not match labels shape {y.shape}"
        )
    y = _as_binary(y, "labels")
    if s.size == 0:
        raise ValueError("scores and labels are empty")
    return s.ravel(), y.ravel()


def _check_fpr_limit(fpr_limit: float) -> float:
    fpr_limit = float(fpr_limit)
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must lie in (0, 1], got {fpr_limit}")
    return fpr_limit


def _as_image_list(x: MapsLike, name: str) -> list:
    """Split ``(N, H, W)`` arrays or sequences of ``(H, W)`` arrays into a list."""
    if isinstance(x, np.ndarray) or (
        hasattr(x, "__array__") and not isinstance(x, (list, tuple))
    ):
        a = np.asarray(x)
        if a.ndim != 3:
            raise ValueError(
                f"{name} must be an (N, H, W) array or a sequence of (H, W) "
                f"arrays, got an array of shape {a.shape}"
            )
        return list(a)
    return list(x)


# --------------------------------------------------------------------------
# Core computations on class-wise sorted scores
# --------------------------------------------------------------------------


def _runs(sorted_values: np.ndarray) -> np.ndarray:
    """Start indices of the runs of equal values in an ascending array."""
    if sorted_values.size == 0:
        return np.zeros(0, dtype=np.intp)
    change = np.flatnonzero(sorted_values[1:] != sorted_values[:-1]) + 1
    return np.concatenate(([0], change))


def _auroc_sorted(pos: np.ndarray, neg: np.ndarray) -> float:
    """AUROC from ascending positive and negative scores.

    Uses the Mann-Whitney statistic with ties counted 1/2, which is exactly
    the trapezoidal area under the ROC curve with ties handled as in
    scikit-learn (a tie group is one diagonal segment). Integer arithmetic
    keeps it exact up to the final division.
    """
    n_pos, n_neg = int(pos.size), int(neg.size)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    starts = _runs(pos)
    values = pos[starts]
    counts = np.diff(np.append(starts, n_pos)).astype(np.int64)
    below = np.searchsorted(neg, values, side="left").astype(np.int64)
    below_or_equal = np.searchsorted(neg, values, side="right").astype(np.int64)
    # 2 * U = sum_pos (2 * #neg < p + #neg == p); every term fits in int64
    twice_u = int(np.sum(counts * (below + below_or_equal), dtype=np.int64))
    return twice_u / (2 * n_pos * n_neg)


def _f1_max_sorted(pos: np.ndarray, neg: np.ndarray) -> float:
    """Maximum F1 from ascending positive and negative scores.

    The maximum over all thresholds is attained at a threshold equal to a
    positive score (raising any other threshold to the next positive score
    keeps the true positives and can only drop false positives), so only the
    distinct positive scores are evaluated.
    """
    n_pos, n_neg = int(pos.size), int(neg.size)
    if n_pos == 0:
        return float("nan")
    starts = _runs(pos)
    values = pos[starts]
    tp = (n_pos - starts).astype(np.float64)
    fp = (n_neg - np.searchsorted(neg, values, side="left")).astype(np.float64)
    # F1 = 2 TP / (2 TP + FP + FN) = 2 TP / (TP + FP + P)
    f1 = 2.0 * tp / (tp + fp + n_pos)
    return float(np.max(f1))


def _trapezoid_limited(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoidal area under ``y(x)`` on ``[x[0], x_max]``.

    ``x`` must be ascending (repeated values allowed), with
    ``x[0] <= x_max <= x[-1]``. If ``x_max`` is not a sample point, ``y`` is
    linearly interpolated between the last point with ``x <= x_max`` and the
    next one, as in the official MVTec AD ``trapezoid``.
    """
    ins = int(np.searchsorted(x, x_max, side="right"))
    xs, ys = x[:ins], y[:ins]
    area = float(np.sum(0.5 * (ys[1:] + ys[:-1]) * np.diff(xs)))
    if ins < x.size and xs[-1] < x_max:
        x0, x1, y0, y1 = x[ins - 1], x[ins], y[ins - 1], y[ins]
        y_interp = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        area += 0.5 * (y_interp + y0) * (x_max - x0)
    return area


def _pro_curve(
    pos: np.ndarray, weights: np.ndarray, n_regions: int, neg: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, PRO) polyline of the official MVTec AD ``compute_pro``.

    ``pos`` holds the ascending scores of the anomalous pixels and
    ``weights`` the matching ``1 / size`` of each pixel's region; ``neg``
    holds the ascending scores of the normal pixels.

    The official curve has one point per distinct score over all pixels. For
    each distinct anomalous score ``v`` (descending) we emit the point just
    before ``v`` is reached (normal pixels ``> v``, previous PRO) and the
    point at ``v`` (normal pixels ``>= v``, new PRO). Official points at
    scores held only by normal pixels lie on the horizontal segments between
    these, so the polyline, and hence its (truncated) trapezoidal area, is
    the same.
    """
    n_neg = neg.size
    pos_desc = pos[::-1]
    cum = np.cumsum(weights[::-1])
    ends = np.append(np.flatnonzero(pos_desc[1:] != pos_desc[:-1]), pos_desc.size - 1)
    values = pos_desc[ends]
    pro_at = cum[ends] / n_regions
    pro_before = np.concatenate(([0.0], pro_at[:-1]))
    fpr_at = (n_neg - np.searchsorted(neg, values, side="left")) / n_neg
    fpr_before = (n_neg - np.searchsorted(neg, values, side="right")) / n_neg

    k = values.size
    fpr = np.empty(2 * k + 2)
    pro = np.empty(2 * k + 2)
    fpr[0] = pro[0] = 0.0
    fpr[-1] = pro[-1] = 1.0
    fpr[1:-1:2], pro[1:-1:2] = fpr_before, pro_before
    fpr[2:-1:2], pro[2:-1:2] = fpr_at, pro_at
    # Rounding in the cumulative sums must not push the curve past 1.
    np.clip(fpr, None, 1.0, out=fpr)
    np.clip(pro, None, 1.0, out=pro)
    return fpr, pro


@dataclass
class _PixelData:
    pos: np.ndarray  # ascending scores of anomalous pixels
    neg: np.ndarray  # ascending scores of normal pixels
    weights: np.ndarray | None  # 1/region size per entry of ``pos``
    n_regions: int


def _collect_pixels(maps: MapsLike, masks: MapsLike, regions: bool) -> _PixelData:
    """Validate maps/masks and split all pixels into sorted class arrays."""
    if isinstance(maps, np.ndarray) and isinstance(masks, np.ndarray):
        if maps.shape != masks.shape:
            raise ValueError(
                f"maps shape {maps.shape} does not match masks shape {masks.shape}"
            )
    map_list = _as_image_list(maps, "maps")
    mask_list = _as_image_list(masks, "masks")
    if len(map_list) != len(mask_list):
        raise ValueError(
            f"got {len(map_list)} maps but {len(mask_list)} masks"
        )
    if not map_list:
        raise ValueError("maps and masks are empty")

    # Pass 1: validate, count pixels per class, find the common dtype.
    checked = []
    n_pos = n_neg = 0
    dtype = np.dtype(np.float32)
    for i, (m, g) in enumerate(zip(map_list, mask_list)):
        m = np.asarray(m)
        g = np.asarray(g)
        if m.shape != g.shape:
            raise ValueError(
                f"maps[{i}] shape {m.shape} does not match masks[{i}] shape {g.shape}"
            )
        if m.ndim != 2:
            raise ValueError(f"maps[{i}] must be 2-D (H, W), got shape {m.shape}")
        m = _as_scores(m, f"maps[{i}]")
        g = _as_binary(g, f"masks[{i}]")
        dtype = np.result_type(dtype, m.dtype)
        k = int(np.count_nonzero(g))
        n_pos += k
        n_neg += g.size - k
        checked.append((m, g, k))

    # Pass 2: copy into preallocated class arrays (one copy of every pixel).
    pos = np.empty(n_pos, dtype=dtype)
    neg = np.empty(n_neg, dtype=dtype)
    weights = np.empty(n_pos, dtype=np.float64) if regions else None
    n_regions = 0
    ip = ineg = 0
    for m, g, k in checked:
        pos[ip : ip + k] = m[g]
        neg[ineg : ineg + g.size - k] = m[~g]
        if regions and k:
            labeled, n = ndimage.label(g, structure=_REGION_STRUCTURE)
            sizes = np.bincount(labeled.ravel())
            weights[ip : ip + k] = 1.0 / sizes[labeled[g]]
            n_regions += int(n)
        ip += k
        ineg += g.size - k
    del checked

    neg.sort()
    if regions:
        order = np.argsort(pos, kind="stable")
        pos = pos[order]
        weights = weights[order]
    else:
        pos.sort()
    return _PixelData(pos=pos, neg=neg, weights=weights, n_regions=n_regions)


def _aupro_from(data: _PixelData, fpr_limit: float) -> float:
    if data.n_regions == 0 or data.neg.size == 0:
        return float("nan")
    fpr, pro = _pro_curve(data.pos, data.weights, data.n_regions, data.neg)
    return _trapezoid_limited(fpr, pro, fpr_limit) / fpr_limit


# --------------------------------------------------------------------------
# Public API: image level
# --------------------------------------------------------------------------


def roc_curve(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Receiver operating characteristic curve.

    One point per distinct score (like ``sklearn.metrics.roc_curve`` with
    ``drop_intermediate=False``), preceded by the point ``(0, 0)`` whose
    threshold is ``+inf``. A sample is positive when ``score >= threshold``.

    Args:
        scores: Anomaly scores, any shape (flattened).
        labels: Binary ground truth (1 = anomalous) of the same shape.

    Returns:
        ``(fpr, tpr, thresholds)``, with thresholds strictly decreasing.
        If a class is missing, the rate that would divide by zero is all NaN.

    Raises:
        ValueError: On shape mismatch, non-binary labels, NaN scores or
            empty input.

    Example:
        >>> fpr, tpr, thr = roc_curve([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
        >>> fpr.tolist(), tpr.tolist()
        ([0.0, 0.0, 0.5, 0.5, 1.0], [0.0, 0.5, 0.5, 1.0, 1.0])
        >>> thr.tolist()
        [inf, 0.8, 0.4, 0.35, 0.1]
    """
    s, y = _check_pair(scores, labels)
    order = np.argsort(s, kind="stable")[::-1]
    s_desc = s[order]
    y_desc = y[order]
    last_of_run = np.append(np.flatnonzero(s_desc[1:] != s_desc[:-1]), s.size - 1)
    tps = np.cumsum(y_desc, dtype=np.int64)[last_of_run]
    fps = last_of_run + 1 - tps
    tps = np.concatenate(([0], tps))
    fps = np.concatenate(([0], fps))
    thresholds = np.concatenate(([np.inf], s_desc[last_of_run].astype(np.float64)))
    with np.errstate(invalid="ignore", divide="ignore"):
        fpr = fps / fps[-1] if fps[-1] > 0 else np.full(fps.shape, np.nan)
        tpr = tps / tps[-1] if tps[-1] > 0 else np.full(tps.shape, np.nan)
    return fpr, tpr, thresholds


def auroc(scores: Any, labels: Any) -> float:
    """Area under the ROC curve.

    Equal to the trapezoidal area under :func:`roc_curve` and to
    ``sklearn.metrics.roc_auc_score`` (ties included). It is computed as the
    Mann-Whitney statistic (ties count 1/2) on the class-wise sorted scores,
    which is the same number without materialising the curve.

    Args:
        scores: Anomaly scores, any shape (flattened).
        labels: Binary ground truth (1 = anomalous) of the same shape.

    Returns:
        The AUROC as a Python float, or ``nan`` if only one class is present.

    Raises:
        ValueError: On shape mismatch, non-binary labels, NaN scores or
            empty input.

    Example:
        >>> auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
        0.75
        >>> auroc([0.1, 0.2], [1, 1])
        nan
    """
    s, y = _check_pair(scores, labels)
    pos = s[y]
    neg = s[~y]
    pos.sort()
    neg.sort()
    return _auroc_sorted(pos, neg)


def f1_max(scores: Any, labels: Any) -> float:
    """Maximum F1 score over all thresholds (``score >= threshold``).

    Equals the maximum of ``2PR / (P + R)`` over the precision/recall curve
    of ``sklearn.metrics.precision_recall_curve``.

    Args:
        scores: Anomaly scores, any shape (flattened).
        labels: Binary ground truth (1 = anomalous) of the same shape.

    Returns:
        The maximum F1 as a Python float; ``nan`` when there is no positive
        sample (recall undefined); ``1.0`` when every sample is positive.

    Raises:
        ValueError: On shape mismatch, non-binary labels, NaN scores or
            empty input.

    Example:
        >>> f1_max([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
        0.8
    """
    s, y = _check_pair(scores, labels)
    pos = s[y]
    neg = s[~y]
    pos.sort()
    neg.sort()
    return _f1_max_sorted(pos, neg)


def image_metrics(scores: Any, labels: Any) -> dict[str, float]:
    """Image-level metrics.

    Args:
        scores: One anomaly score per image.
        labels: Binary image labels (1 = anomalous), same shape.

    Returns:
        ``{"image_auroc": float, "image_f1_max": float}``.

    Example:
        >>> image_metrics([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
        {'image_auroc': 0.75, 'image_f1_max': 0.8}
    """
    s, y = _check_pair(scores, labels)
    pos = s[y]
    neg = s[~y]
    pos.sort()
    neg.sort()
    return {
        "image_auroc": float(_auroc_sorted(pos, neg)),
        "image_f1_max": float(_f1_max_sorted(pos, neg)),
    }


# --------------------------------------------------------------------------
# Public API: pixel level
# --------------------------------------------------------------------------


def pixel_auroc(maps: MapsLike, masks: MapsLike) -> float:
    """AUROC over all pixels of all images.

    Args:
        maps: Anomaly maps, an ``(N, H, W)`` array or a sequence of
            ``(H, W)`` arrays (sizes may differ between images).
        masks: Binary ground-truth masks with the same shapes.

    Returns:
        The same value as :func:`auroc` on all pixels flattened and
        concatenated; ``nan`` if all pixels belong to one class.

    Raises:
        ValueError: On shape or length mismatch, non-binary masks or NaN.

    Example:
        >>> maps = [np.array([[0.9, 0.1], [0.2, 0.3]]), np.array([[0.8, 0.4]])]
        >>> masks = [np.array([[1, 0], [0, 0]]), np.array([[0, 1]])]
        >>> pixel_auroc(maps, masks)
        0.875
    """
    data = _collect_pixels(maps, masks, regions=False)
    return _auroc_sorted(data.pos, data.neg)


def pixel_f1_max(maps: MapsLike, masks: MapsLike) -> float:
    """Maximum F1 over all pixels of all images (see :func:`f1_max`).

    Args:
        maps: Anomaly maps, ``(N, H, W)`` array or sequence of ``(H, W)``.
        masks: Binary ground-truth masks with the same shapes.

    Returns:
        The maximum pixel-level F1, ``nan`` if no pixel is anomalous.

    Example:
        >>> pixel_f1_max(np.array([[[0.9, 0.1], [0.2, 0.3]]]),
        ...              np.array([[[1, 0], [0, 0]]]))
        1.0
    """
    data = _collect_pixels(maps, masks, regions=False)
    return _f1_max_sorted(data.pos, data.neg)


def aupro(maps: MapsLike, masks: MapsLike, fpr_limit: float = 0.3) -> float:
    """Normalised area under the per-region-overlap (PRO) curve.

    Follows the official MVTec AD evaluation (``compute_pro`` + ``trapezoid``):

    * regions are the connected components of each image's mask, found with
      ``scipy.ndimage.label`` and an all-ones 3x3 structure (8-connectivity);
    * for every distinct score ``t`` over all pixels, FPR is the fraction of
      normal pixels with score ``>= t`` and PRO the mean over all regions
      (of all images) of the fraction of the region's pixels with
      score ``>= t``; the curve starts at (0, 0) and ends at (1, 1);
    * the curve is integrated with the trapezoid rule from FPR 0 to
      ``fpr_limit`` (interpolating linearly at ``fpr_limit``) and divided by
      ``fpr_limit``, so a perfect map scores 1.0 and a constant map
      ``fpr_limit / 2``.

    Args:
        maps: Anomaly maps, ``(N, H, W)`` array or sequence of ``(H, W)``.
        masks: Binary ground-truth masks with the same shapes.
        fpr_limit: Upper integration limit in ``(0, 1]``.

    Returns:
        AU-PRO as a Python float; ``nan`` if there is no anomalous region or
        no normal pixel.

    Raises:
        ValueError: On shape or length mismatch, non-binary masks, NaN, or
            ``fpr_limit`` outside ``(0, 1]``.

    Example:
        >>> masks = np.zeros((1, 4, 4), dtype=bool)
        >>> masks[0, :2, :2] = True
        >>> aupro(masks.astype(float), masks)   # perfect map
        1.0
        >>> round(aupro(np.zeros((1, 4, 4)), masks), 6)   # constant map
        0.15
    """
    fpr_limit = _check_fpr_limit(fpr_limit)
    data = _collect_pixels(maps, masks, regions=True)
    return float(_aupro_from(data, fpr_limit))


def pixel_metrics(
    maps: MapsLike, masks: MapsLike, fpr_limit: float = 0.3
) -> dict[str, float]:
    """Pixel-level metrics, sharing one pass over the pixels.

    Args:
        maps: Anomaly maps, ``(N, H, W)`` array or sequence of ``(H, W)``.
        masks: Binary ground-truth masks with the same shapes.
        fpr_limit: Integration limit of the AU-PRO.

    Returns:
        ``{"pixel_auroc": float, "aupro": float, "pixel_f1_max": float}``.

    Example:
        >>> masks = np.zeros((1, 4, 4), dtype=bool)
        >>> masks[0, :2, :2] = True
        >>> pixel_metrics(masks.astype(float), masks)
        {'pixel_auroc': 1.0, 'aupro': 1.0, 'pixel_f1_max': 1.0}
    """
    fpr_limit = _check_fpr_limit(fpr_limit)
    data = _collect_pixels(maps, masks, regions=True)
    return {
        "pixel_auroc": float(_auroc_sorted(data.pos, data.neg)),
        "aupro": float(_aupro_from(data, fpr_limit)),
        "pixel_f1_max": float(_f1_max_sorted(data.pos, data.neg)),
    }


def all_metrics(
    scores: Any,
    labels: Any,
    maps: MapsLike,
    masks: MapsLike,
    fpr_limit: float = 0.3,
) -> dict[str, float]:
    """Image- and pixel-level metrics in one dictionary.

    Args:
        scores: One anomaly score per image.
        labels: Binary image labels.
        maps: Anomaly maps, ``(N, H, W)`` array or sequence of ``(H, W)``.
        masks: Binary ground-truth masks with the same shapes.
        fpr_limit: Integration limit of the AU-PRO.

    Returns:
        Keys ``image_auroc``, ``image_f1_max``, ``pixel_auroc``, ``aupro``,
        ``pixel_f1_max``; plain Python floats (JSON-serialisable).
    """
    out = image_metrics(scores, labels)
    out.update(pixel_metrics(maps, masks, fpr_limit=fpr_limit))
    return out
