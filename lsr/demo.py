"""``lsr demo``: a complete run on textures that ship with scikit-image.

Builds an MVTec-AD-layout dataset from the CC0 photographs ``skimage.data.brick()``,
``grass()`` and ``gravel()`` (train and test cut from separate parts of each photo,
synthetic defects with pixel masks; see :mod:`lsr.demo_data`), trains one run per
category, evaluates it, and prints LSR against the direct-reconstruction baseline.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .config import preset
from .io import locks_output, write_json

DEMO_CATEGORIES = ("brick", "grass", "gravel")
TABLE_COLUMNS = ["image_auroc", "pixel_auroc", "aupro", "image_f1_max", "pixel_f1_max"]
METHOD_ORDER = ("lsr", "restored_vs_input", "restored_vs_direct", "gated", "direct", "nll", "fused")


def summarise(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean over categories of every method's overall metrics."""
    methods = [m for m in METHOD_ORDER if all(m in r["methods"] for r in results.values())]
    mean: dict[str, dict[str, float]] = {}
    for m in methods:
        mean[m] = {}
        for c in TABLE_COLUMNS:
            vals = [r["methods"][m][c] for r in results.values() if c in r["methods"][m]]
            if vals and not all(np.isnan(vals)):
                mean[m][c] = float(np.nanmean(vals))
    return mean


def operating_point_line(op: dict[str, Any] | None) -> str:
    """One line on the verdicts at the stored threshold (set on held-out good images)."""
    if not op:
        return "no operating point (the run has no thresholds)"
    far, lo, hi = op.get("false_alarm_rate_measured"), *op.get("false_alarm_rate_ci95", (None, None))
    text = f"at the threshold for {op['false_alarm_rate_chosen']:.0%} false alarms (held-out good images):"
    if far is not None:
        text += f" {far:.0%} of test/good flagged (95% interval {lo:.0%}-{hi:.0%}, {op['n_good']} images)"
    if op.get("detection_rate") is not None:
        text += f", {op['detection_rate']:.0%} of defective images caught"
    return text


@locks_output("out")
def run_demo(out: str | os.PathLike = "lsr-demo", categories: Sequence[str] | None = None,
             preset_name: str = "demo", overrides: dict[str, Any] | None = None,
             device: str | None = None, progress: bool = True, dataset_kwargs: dict[str, Any] | None = None,
             log=print) -> dict[str, Any]:
    """Build the demo dataset, train and evaluate each category; returns the summary
    (also written to ``OUT/summary.json``)."""
    from .demo_data import build_demo_dataset
    from .commands import evaluate
    from .tables import format_table
    from .training import train

    out = Path(out)
    cats = tuple(categories or DEMO_CATEGORIES)
    unknown = set(cats) - set(DEMO_CATEGORIES)
    if unknown:
        raise ValueError(f"unknown demo categories {sorted(unknown)}; choose from {DEMO_CATEGORIES}")
    t0 = time.perf_counter()
    log(f"building the demo dataset in {out / 'data'} ...")
    folders = build_demo_dataset(out / "data", categories=cats, **(dataset_kwargs or {}))
    results: dict[str, Any] = {}
    timings: dict[str, Any] = {}
    for folder in folders:
        cat = folder.name
        cfg = preset(preset_name, in_channels=1)
        if overrides:
            cfg = cfg.with_overrides(overrides)
        log(f"\n== {cat}: training ({preset_name} preset) ==")
        t_train = time.perf_counter()
        train(folder, out / "runs" / cat, cfg, device=device, progress=progress, log=log)
        t_eval = time.perf_counter()
        log(f"== {cat}: evaluating ==")
        results[cat] = evaluate(out / "runs" / cat, folder, out / "results" / cat, device=device,
                                progress=progress)
        timings[cat] = {"train_s": t_eval - t_train, "eval_s": time.perf_counter() - t_eval}
        log(format_table({m: results[cat]["methods"][m] for m in METHOD_ORDER if m in results[cat]["methods"]},
                         TABLE_COLUMNS))
        log(operating_point_line(results[cat].get("operating_point")))
    mean = summarise(results)
    summary = {"categories": list(results), "mean": mean,
               "per_category": {c: {m: {k: r["methods"][m][k] for k in TABLE_COLUMNS if k in r["methods"][m]}
                                    for m in r["methods"]} for c, r in results.items()},
               "default_map": next(iter(results.values()))["default_map"] if results else None,
               "operating_point": {c: r.get("operating_point") for c, r in results.items()},
               "timings": timings, "total_seconds": time.perf_counter() - t0, "preset": preset_name}
    write_json(out / "summary.json", summary)
    log("\n== mean over " + ", ".join(results) + " ==")
    log("lsr = the default map (" + str(summary["default_map"]) + "); direct = |x - x_d| of the same "
        "VQ-VAE without the prior; nll = image score from code likelihoods")
    log(format_table(mean, TABLE_COLUMNS))
    log(f"\nfinished in {summary['total_seconds'] / 60:.1f} min. Reports: "
        + ", ".join(str(out / "results" / c / "report.png") for c in results))
    log(f"metrics: {out / 'summary.json'} and {out / 'results'}/<category>/metrics.json")
    return summary
