"""The metrics of an evaluation (``lsr eval``): per method, overall and per defect type;
the operating point's measured false-alarm and detection rates; ROC points for the report.
Numpy only. The command that runs detection over a category and writes the files is
:func:`lsr.commands.evaluate` (``lsr.evaluate``).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .metrics import all_metrics, image_metrics, roc_curve

VARIANTS = ("restored_vs_input", "restored_vs_direct", "gated")
MAP_METHODS = ("lsr", *VARIANTS, "direct")                 # methods with a map
SCORE_KINDS = ("max", "topk_mean", "pooled_max")           # image scores measured for every map


def method_metrics(scores: np.ndarray, labels: np.ndarray, maps: list[np.ndarray] | None,
                    masks: list[np.ndarray], defects: np.ndarray) -> dict[str, Any]:
    """Metrics overall and per defect type (each defect type against the good images)."""
    def one(sel: np.ndarray) -> dict[str, float]:
        if maps is None:
            return image_metrics(scores[sel], labels[sel])
        return all_metrics(scores[sel], labels[sel], [maps[i] for i in np.flatnonzero(sel)],
                           [masks[i] for i in np.flatnonzero(sel)])

    out: dict[str, Any] = one(np.ones(len(scores), dtype=bool))
    per: dict[str, Any] = {}
    for d in sorted(set(defects.tolist()) - {"good"}):
        per[d] = one((defects == d) | (defects == "good"))
    out["per_defect"] = per
    return out


def roc_points(scores: np.ndarray, labels: np.ndarray, auc: float, kind: str, max_points: int = 2000) -> dict:
    fpr, tpr, _ = roc_curve(scores, labels)
    if len(fpr) > max_points:
        pick = np.unique(np.linspace(0, len(fpr) - 1, max_points).round().astype(int))
        fpr, tpr = fpr[pick], tpr[pick]
    return {"fpr": fpr, "tpr": tpr, "auc": auc, "kind": kind}


def operating_point(rows: list[dict[str, Any]], labels: np.ndarray, defects: np.ndarray,
                    maps: list[np.ndarray], masks: list[np.ndarray], d: Any) -> dict[str, Any] | None:
    """How the stored thresholds (set on held-out train/good images only) did on the test
    set: the false-alarm rate on test/good against the chosen one (with a Wilson 95%
    interval, so a small test set's error is visible), the detection rate per defect type,
    and pixel precision / recall of the thresholded maps. None without thresholds."""
    if d.image_threshold is None:
        return None
    flagged = np.array([bool(r["anomalous"]) for r in rows])
    good = labels == 0
    out: dict[str, Any] = {"image_threshold": d.image_threshold, "false_alarm_rate_chosen": d.false_alarm_rate}
    if good.any():
        k, n = int(flagged[good].sum()), int(good.sum())
        far = k / n
        out.update(false_alarm_rate_measured=far, false_alarm_rate_ci95=list(wilson(k, n)), n_good=n,
                   false_alarm_rate_difference=far - d.false_alarm_rate)
    if (~good).any():
        out["detection_rate"] = float(flagged[~good].mean())
        out["detection_rate_per_defect"] = {str(kd): float(flagged[defects == kd].mean())
                                            for kd in sorted(set(defects[~good].tolist()))}
    if d.pixel_threshold is not None:
        tp = fp = fn = 0
        for m, gt in zip(maps, masks):
            pred = m > d.pixel_threshold
            tp += int((pred & gt).sum())
            fp += int((pred & ~gt).sum())
            fn += int((~pred & gt).sum())
        good_px = sum(int((~gt).sum()) for gt, lab in zip(masks, labels) if lab == 0)
        fp_good = sum(int((m > d.pixel_threshold).sum()) for m, lab in zip(maps, labels) if lab == 0)
        out.update(pixel_threshold=d.pixel_threshold, pixel_fpr_chosen=d.pixel_fpr,
                   pixel_fpr_measured_on_good=fp_good / good_px if good_px else None,
                   pixel_precision=tp / (tp + fp) if tp + fp else None,
                   pixel_recall=tp / (tp + fn) if tp + fn else None)
    return out


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion k / n."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (float(max(0.0, mid - half)), float(min(1.0, mid + half)))


def report_rows(defects: np.ndarray, n_rows: int) -> list[int]:
    """Up to n_rows test images for the report: round-robin over defect types, good last."""
    kinds = [d for d in sorted(set(defects.tolist())) if d != "good"] + ["good"]
    queues = {kd: list(np.flatnonzero(defects == kd)) for kd in kinds}
    picked: list[int] = []
    while len(picked) < n_rows and any(queues.values()):
        for kd in kinds:
            if queues[kd] and len(picked) < n_rows:
                picked.append(int(queues[kd].pop(0)))
    return picked


__all__ = ["VARIANTS", "MAP_METHODS", "SCORE_KINDS", "method_metrics", "roc_points", "operating_point",
           "wilson", "report_rows"]
