"""``lsr eval``: detection over an MVTec AD category's test set, metrics, maps, report.

Writes into OUT:

* ``metrics.json``: image AUROC, pixel AUROC, AUPRO (FPR <= 0.3, normalised) and
  F1-max for ``lsr`` (the configured map), each map variant, the ``nll`` score
  (image-level only) and the ``direct`` baseline (|x - x_d| of the same VQ-VAE, no
  prior); overall and per defect type;
* ``anomaly_maps/<category>/test/<defect>/<name>.tiff`` (the lsr map) and
  ``baseline_maps/...`` (the direct baseline): float32 at each image's own size, the
  layout of the official MVTec AD evaluation;
* ``results.jsonl``: a line per test image; ``report.png``: images, maps, ground truth
  and ROC curves; ``panels/``: detection panels of the images shown in the report.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import anomaly, decision
from .data import check_mask_sizes, load_mask, scan_mvtec
from .detect import Detector, map_score_kind, result_row, with_held_out_stats
from .report_html import save_thumbnail, thumbnail_scale, write_index
from .io import atomic_write, dumps, locks_output, save_tiff, write_json
from .metrics import all_metrics, image_metrics, roc_curve

VARIANTS = ("restored_vs_input", "restored_vs_direct", "gated")
MAP_METHODS = ("lsr", *VARIANTS, "direct")                 # methods with a map
SCORE_KINDS = ("max", "topk_mean", "pooled_max")           # image scores measured for every map


def _method_metrics(scores: np.ndarray, labels: np.ndarray, maps: list[np.ndarray] | None,
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


def _curve(scores: np.ndarray, labels: np.ndarray, auc: float, kind: str, max_points: int = 2000) -> dict:
    fpr, tpr, _ = roc_curve(scores, labels)
    if len(fpr) > max_points:
        pick = np.unique(np.linspace(0, len(fpr) - 1, max_points).round().astype(int))
        fpr, tpr = fpr[pick], tpr[pick]
    return {"fpr": fpr, "tpr": tpr, "auc": auc, "kind": kind}


@locks_output("out")
def evaluate(run: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike, *,
             batch_size: int = 8, device: str | None = None, progress: bool = True,
             report_rows: int = 10, reference_from: str | None = None, max_shift: int | None = None,
             **options: Any) -> dict[str, Any]:
    """Evaluate a trained run on an MVTec AD category; returns what ``metrics.json`` holds.

    Args:
        run: run folder from ``lsr train``.
        data: MVTec AD category folder (``test/`` and ``ground_truth/`` are read).
        out: output folder.
        reference_from: ``"good"`` adds the ``differential`` and ``differential_direct`` rows
            (D-MAD, :mod:`lsr.differential`): every test image against its nearest ``train/good``
            image.
        max_shift: the differential registration's search radius (model pixels).
        options: detect options to override (resampler, seed, restorations, ...).
    """
    from . import distributed as dist

    ctx = dist.context(device)
    det = with_held_out_stats(Detector.load(run, ctx.device).with_options(**options), run)
    if det.config.detect.score in ("fused",) and det.config.detect.score_mean is None:
        raise ValueError(f"{run}: --score fused needs the held-out images listed in split.json, which are gone; "
                         f"choose another --score (e.g. max)")
    cat = scan_mvtec(data, require_test=True, require_train=False)
    check_mask_sizes(cat)
    # -- differential detection (D-MAD, lsr.differential): its options checked before any work --
    if reference_from is not None or max_shift is not None:
        from .differential import check_differential_inputs
        check_differential_inputs(reference_from, cat, max_shift, det.image_size)
    # -- end of the differential block --
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    samples = cat.test
    paths = [s.path for s in samples]

    n = len(samples)
    labels = np.array([s.label for s in samples], dtype=np.int64)
    defects = np.array([s.defect for s in samples])
    shown = set(_pick_rows(defects, report_rows))
    d = det.config.detect
    d_dict = dataclasses.asdict(d)
    t_start = time.perf_counter()
    mine: list[tuple[int, dict[str, Any]]] = []           # (test index, record) of this rank's images
    for start, chunk, sizes, x, res, ms in det.detect_paths(paths, batch_size, progress=progress and ctx.main,
                                                            shard=(ctx.rank, ctx.world)):
        variant_maps = {"restored_vs_input": res.map_restored_vs_input,
                        "restored_vs_direct": res.map_restored_vs_direct, "gated": res.map_gated}
        model_maps = {"lsr": res.anomaly_map, **variant_maps, "direct": res.map_direct}
        for i, size in enumerate(sizes):
            k = start + i
            s = samples[k]
            full = {
                "lsr": anomaly.resize_maps(res.anomaly_map[i:i + 1].cpu(), size)[0].numpy(),
                **{v: anomaly.resize_maps(variant_maps[v][i:i + 1].cpu(), size)[0].numpy() for v in VARIANTS},
                "direct": anomaly.resize_maps(res.map_direct[i:i + 1].cpu(), size)[0].numpy(),
            }
            scores = {"lsr": float(res.score[i]), "direct": float(res.direct_score[i]),
                      "nll": float(res.nll_score[i]), "fused": float(res.fused_score[i]),
                      **{v: float(anomaly.image_score(variant_maps[v][i:i + 1], map_score_kind(d.score), d.topk,
                                                      pool=d.pool)[0])
                         for v in VARIANTS}}
            kinds = {m: {kd: float(anomaly.image_score(model_maps[m][i:i + 1], kd, d.topk, pool=d.pool)[0])
                         for kd in SCORE_KINDS} for m in MAP_METHODS}
            rel = Path(cat.name) / "test" / s.defect / f"{s.path.stem}.tiff"
            save_tiff(out / "anomaly_maps" / rel, full["lsr"])
            save_tiff(out / "baseline_maps" / rel, full["direct"])
            row = {"image": str(s.path), "defect": s.defect, "label": s.label,
                   **result_row(res, i, det.config.detect.restorations),
                   "time_ms": ms}
            row.update(decision.verdict(row["score"], full["lsr"], d_dict))
            thumb = out / "thumbs" / f"{s.defect}_{s.path.stem}.png"
            save_thumbnail(thumb, x[i].numpy(), res.anomaly_map[i].cpu().numpy(), **thumbnail_scale(d_dict))
            row["thumbnail"] = str(thumb)
            if k in shown:
                row["panel"] = str(out / "panels" / f"{s.defect}_{s.path.stem}.png")
            item = None
            if k in shown:
                item = {"image": x[i].numpy(), "direct": res.direct[i].cpu().numpy(),
                        "restored": res.restored[i].cpu().numpy(),
                        "map": res.anomaly_map[i].cpu().numpy(),
                        "direct_map": res.map_direct[i].cpu().numpy(),
                        "resampled": res.resampled[i].cpu().numpy()}
            mine.append((k, {"maps": full, "scores": scores, "kinds": kinds, "row": row, "keep": item,
                             "size": size}))
    gathered = dist.gather_objects(mine)                  # every rank's records on rank 0
    if not ctx.main:
        return dist.broadcast_object(None)
    records = dict(item for part in gathered for item in part)
    seconds = time.perf_counter() - t_start

    names = {m: np.array([records[k]["scores"][m] for k in range(n)]) for m in (*MAP_METHODS, "nll", "fused")}
    maps = {m: [records[k]["maps"][m] for k in range(n)] for m in MAP_METHODS}
    masks = [load_mask(s.mask_path) if s.mask_path is not None else np.zeros(records[k]["size"], dtype=bool)
             for k, s in enumerate(samples)]
    rows = [records[k]["row"] for k in range(n)]
    keep = {k: records[k]["keep"] for k in range(n) if records[k]["keep"] is not None}

    methods: dict[str, Any] = {}
    for m in MAP_METHODS:
        methods[m] = _method_metrics(names[m], labels, maps[m], masks, defects)
    methods["nll"] = _method_metrics(names["nll"], labels, None, masks, defects)
    if np.isfinite(names["fused"]).all():
        methods["fused"] = _method_metrics(names["fused"], labels, None, masks, defects)
    score_kinds = {m: {kd: image_metrics(np.array([records[k]["kinds"][m][kd] for k in range(n)]), labels)
                       for kd in SCORE_KINDS} for m in MAP_METHODS}
    result = {
        "category": cat.name,
        "run": str(run),
        "data": str(data),
        "n_test": n,
        "n_anomalous": int(labels.sum()),
        "default_map": d.map_kind,
        "detect": {k2: getattr(d, k2) for k2 in ("tau", "resampler", "map_kind", "distance", "smoothing", "sigma",
                                                 "score", "topk", "pool", "gate_dilate", "restorations",
                                                 "weighting", "seed", "temperature")},
        "space": det.space,
        "methods": methods,
        "operating_point": operating_point(rows, labels, defects, maps["lsr"], masks, d),
        "image_score_kinds": score_kinds,
        "mean_resampled_codes": float(np.mean([r["n_resampled"] for r in rows])),
        "mean_prior_passes": float(np.mean([r["prior_passes"] for r in rows])),
        "seconds": seconds,
        "ms_per_image": 1000.0 * seconds / max(1, n),
    }
    # -- differential detection (D-MAD, lsr.differential): a row beside the single-image ones --
    if reference_from is not None:
        from .differential import evaluate_differential
        rows_d, result["differential"] = evaluate_differential(
            det, cat, samples, masks, labels, defects, out, batch_size=batch_size, max_shift=max_shift,
            progress=progress, method_metrics=_method_metrics)
        methods.update(rows_d)                             # differential, differential_direct
    # -- end of the differential block --
    with atomic_write(out / "results.jsonl", "w") as f:
        for r in rows:
            f.write(dumps(r) + "\n")
    write_json(out / "metrics.json", result)
    _write_pictures(out, cat.name, samples, keep, masks, names, maps, labels, methods)
    write_index(out, rows, title=f"lsr eval: {cat.name} ({n} test images, run {Path(run).name})", metrics=result,
                pictures=["report.png"])
    return dist.broadcast_object(result)


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


def _pick_rows(defects: np.ndarray, n_rows: int) -> list[int]:
    """Up to n_rows test images for the report: round-robin over defect types, good last."""
    kinds = [d for d in sorted(set(defects.tolist())) if d != "good"] + ["good"]
    queues = {kd: list(np.flatnonzero(defects == kd)) for kd in kinds}
    picked: list[int] = []
    while len(picked) < n_rows and any(queues.values()):
        for kd in kinds:
            if queues[kd] and len(picked) < n_rows:
                picked.append(int(queues[kd].pop(0)))
    return picked


def _write_pictures(out: Path, category: str, samples, keep, masks, scores, maps, labels, methods) -> None:
    from .report import save_panel, save_report

    rows = []
    for k, item in sorted(keep.items()):
        s = samples[k]
        h, w = item["image"].shape[1:]
        mask = load_mask(s.mask_path, (h, w)) if s.mask_path is not None else None
        rows.append({"image": item["image"], "mask": mask,
                     "maps": {"lsr": item["map"], "direct": item["direct_map"]},
                     "label": f"{s.defect}/{s.path.stem}\nlsr {scores['lsr'][k]:.3f}\ndirect {scores['direct'][k]:.3f}"})
        save_panel(out / "panels" / f"{s.defect}_{s.path.stem}.png", item["image"], item["direct"],
                   item["restored"], item["map"], item["resampled"], mask=mask,
                   title=f"{s.defect}/{s.path.name}  lsr score {scores['lsr'][k]:.4f}")
    curves: dict[str, Any] = {}
    if 0 < labels.sum() < len(labels):
        for m in ("lsr", "direct", "nll"):
            curves[f"{m} (image)"] = _curve(scores[m], labels, methods[m]["image_auroc"], "image")
        rng = np.random.default_rng(0)
        for m in ("lsr", "direct"):
            flat = np.concatenate([a.ravel() for a in maps[m]])
            gt = np.concatenate([a.ravel() for a in masks])
            if flat.size > 2_000_000:
                pick = rng.choice(flat.size, 2_000_000, replace=False)
                flat, gt = flat[pick], gt[pick]
            if 0 < gt.sum() < gt.size:
                curves[f"{m} (pixel)"] = _curve(flat, gt, methods[m]["pixel_auroc"], "pixel")
    save_report(out / "report.png", rows, curves, title=f"{category}: lsr vs direct reconstruction")


__all__ = ["evaluate", "VARIANTS"]
