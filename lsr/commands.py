"""The commands' bodies that write files: ``lsr detect RUN`` (:func:`detect_images`),
``lsr detect BUNDLE`` (:func:`detect_bundle`) and ``lsr eval`` (:func:`evaluate`), apart
from the library they call (:class:`lsr.detect.Detector`, :class:`lsr.deploy.Inferencer`,
:mod:`lsr.evaluation`'s metrics). ``lsr.cli`` parses flags
and calls these; Python users may call them too.

Imports are inside the functions: :func:`detect_bundle` needs neither torch nor scipy
(the bundle path is torch-free), :func:`detect_images` needs torch.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from .contract import result_row, unique_stems
from .io import atomic_write, dumps, locks_output


@locks_output("out")
def detect_images(run: str | os.PathLike, inputs: Sequence[str | os.PathLike], out: str | os.PathLike, *,
                  batch_size: int = 8, device: str | None = None, save_tiff_maps: bool = False,
                  panels: bool = True, progress: bool = True, masks: bool = False,
                  **options: Any) -> list[dict[str, Any]]:
    """``lsr detect``: write a panel PNG per image, ``results.jsonl`` and (optionally)
    raw float32 TIFF maps and binary defect masks (``masks/``) at each image's own size.
    Returns the result rows; each has the verdict at the run's operating point
    (:func:`lsr.decision.verdict`: ``anomalous``, ``threshold``, ``normalised_score``,
    ``false_alarm_rate``, the pixel threshold and the defect ``regions``).

    Under ``torchrun`` the batches are shared out over the ranks; each rank writes the
    pictures of its images, rank 0 writes ``results.jsonl`` in input order."""
    from . import anomaly, decision
    from . import distributed as dist
    from .data import list_images
    from .detect import Detector, with_held_out_stats
    from .detect import result_row as run_row
    from .io import save_tiff
    from .config import OPTION_RULES, check_value
    from .io import save_png
    from .report import save_panel
    from .report_html import save_thumbnail, thumbnail_scale, write_index

    check_value("batch_size", batch_size, "--batch-size", OPTION_RULES)
    ctx = dist.context(device)
    det = with_held_out_stats(Detector.load(run, ctx.device).with_options(**options), run)
    d = dataclasses.asdict(det.config.detect)
    paths = list_images(list(inputs))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stems = unique_stems(paths)
    mine: list[tuple[int, dict[str, Any]]] = []
    for start, chunk, sizes, x, res, ms in det.detect_paths(paths, batch_size, progress=progress and ctx.main,
                                                            shard=(ctx.rank, ctx.world)):
        for i, (path, size) in enumerate(zip(chunk, sizes)):
            stem = stems[start + i]
            row = {"image": str(path), **run_row(res, i, det.config.detect.restorations), "time_ms": ms,
                   "resampler": det.resampler, "map": det.config.detect.map_kind}
            full = anomaly.resize_maps(res.anomaly_map[i:i + 1].cpu(), size)[0].numpy()
            row.update(decision.verdict(row["score"], full, d))
            if masks and d["pixel_threshold"] is not None:
                save_png(out / "masks" / f"{stem}.png", decision.mask(full, d["pixel_threshold"]))
                row["mask"] = str(out / "masks" / f"{stem}.png")
            thumb = out / "thumbs" / f"{stem}.png"
            save_thumbnail(thumb, x[i].numpy(), res.anomaly_map[i].cpu().numpy(), **thumbnail_scale(d))
            row["thumbnail"] = str(thumb)
            if panels:
                row["panel"] = str(out / f"{stem}.png")
                save_panel(out / f"{stem}.png", x[i].numpy(), res.direct[i].cpu().numpy(),
                           res.restored[i].cpu().numpy(), res.anomaly_map[i].cpu().numpy(),
                           res.resampled[i].cpu().numpy(),
                           title=f"{path.name}  score {row['score'] if row['score'] is None else round(row['score'], 4)}  nll {row['nll_score']:.1f}  "
                                 f"resampled {row['n_resampled']:.0f}/{row['n_codes']}")
            if save_tiff_maps:
                save_tiff(out / "maps" / f"{stem}.tiff", full)
                row["map_tiff"] = str(out / "maps" / f"{stem}.tiff")
            mine.append((start + i, row))
    gathered = dist.gather_objects(mine)
    rows: list[dict[str, Any]] = []
    if ctx.main:
        rows = [row for _, row in sorted(item for part in gathered for item in part)]
        with atomic_write(out / "results.jsonl", "w") as f:
            for row in rows:
                f.write(dumps(row) + "\n")
        write_index(out, rows, title=f"lsr detect: {Path(run).name} ({len(rows)} images)")
    return dist.broadcast_object(rows)


@locks_output("out")
def detect_bundle(bundle: str | os.PathLike, inputs: Sequence[str | os.PathLike], out: str | os.PathLike, *,
                  batch_size: int = 8, providers: Sequence[str] | None = None, save_tiff_maps: bool = False,
                  panels: bool = True, progress: bool = True, log=None, masks: bool = False,
                  **options: Any) -> list[dict[str, Any]]:
    """``lsr detect BUNDLE ...``: the outputs of :func:`lsr.detect.detect_images` (a line
    per image in ``results.jsonl``, a panel PNG per image when matplotlib is installed,
    ``--tiff`` raw float32 maps at each image's size in ``maps/``) from an exported
    bundle run by onnxruntime. Returns the result rows."""
    from . import decision
    from .config import OPTION_RULES, check_value
    from .data import list_images
    from .deploy import numpy_ops as nops
    from .deploy.inferencer import Inferencer
    from .report_html import save_thumbnail, thumbnail_scale, write_index
    from .io import atomic_write, dumps, save_png, save_tiff

    check_value("batch_size", batch_size, "--batch-size", OPTION_RULES)

    log = log or (lambda msg: print(msg, file=sys.stderr))
    inf = Inferencer(bundle, providers=providers, **options)
    paths = list_images(list(inputs))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stems = unique_stems(paths)
    save_panel = None
    if panels:
        try:
            from .report import save_panel
        except ImportError:
            log("lsr: matplotlib is not installed: panels skipped (results.jsonl and --tiff maps are written)")
    rows: list[dict[str, Any]] = []
    d = inf.options
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        x, sizes = inf.load(chunk)
        t0 = time.perf_counter()
        res = inf.predict_batch(x, range(start, start + len(chunk)))
        ms = (time.perf_counter() - t0) * 1000.0 / len(chunk)
        for i, (path, size) in enumerate(zip(chunk, sizes)):
            stem = stems[start + i]
            row = {"image": str(path),
                   **result_row(res.score[i], res.nll_score[i], res.direct_score[i], res.fused_score[i],
                                res.n_resampled[i], res.prior_passes[i], res.positions_evaluated[i],
                                res.codes[i].size, int(d["restorations"])),
                   "time_ms": ms, "resampler": inf.loop, "map": d["map_kind"],
                   "bundle": str(inf.bundle.root), "providers": inf.providers}
            if save_panel is not None:
                row["panel"] = str(out / f"{stem}.png")
                save_panel(out / f"{stem}.png", x[i], res.direct[i], res.restored[i], res.anomaly_map[i],
                           res.resampled[i],
                           title=f"{path.name}  score {_fmt(row['score'])}  nll {row['nll_score']:.1f}  "
                                 f"resampled {row['n_resampled']:.0f}/{row['n_codes']}")
            full = nops.resize_maps(res.anomaly_map[i:i + 1], size)[0]
            row.update(decision.verdict(row["score"], full, d))
            thumb = out / "thumbs" / f"{stem}.png"
            save_thumbnail(thumb, x[i], res.anomaly_map[i], **thumbnail_scale(d))
            row["thumbnail"] = str(thumb)
            if masks and d.get("pixel_threshold") is not None:
                save_png(out / "masks" / f"{stem}.png", decision.mask(full, d["pixel_threshold"]))
                row["mask"] = str(out / "masks" / f"{stem}.png")
            if save_tiff_maps:
                save_tiff(out / "maps" / f"{stem}.tiff", full)
                row["map_tiff"] = str(out / "maps" / f"{stem}.tiff")
            rows.append(row)
        if progress:
            log(f"detect: {min(start + batch_size, len(paths))}/{len(paths)} images, {ms:.0f} ms/img")
    with atomic_write(out / "results.jsonl", "w") as f:
        for row in rows:
            f.write(dumps(row) + "\n")
    write_index(out, rows, title=f"lsr detect: bundle {inf.bundle.root.name} ({len(rows)} images)")
    return rows


@locks_output("out")
def evaluate(run: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike, *,
             batch_size: int = 8, device: str | None = None, progress: bool = True,
             report_rows: int = 10, reference_from: str | None = None, max_shift: int | None = None,
             **options: Any) -> dict[str, Any]:
    """Evaluate a trained run on an MVTec AD category (``lsr eval``); returns what
    ``metrics.json`` holds.

    Writes into ``out``: ``metrics.json`` (image AUROC, pixel AUROC, AUPRO (FPR <= 0.3,
    normalised) and F1-max for ``lsr`` (the configured map), each map variant, the ``nll``
    score (image level only) and the ``direct`` baseline (the same VQ-VAE's
    reconstruction error, no prior), overall and per defect type);
    ``anomaly_maps/<category>/test/<defect>/<name>.tiff`` (the lsr map) and
    ``baseline_maps/...`` (the direct baseline), float32 at each image's own size, the
    layout of the official MVTec AD evaluation; ``results.jsonl`` (a line per test image),
    ``report.png`` (images, maps, ground truth, ROC curves), ``panels/``, ``thumbs/`` and
    ``index.html``.

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
    import numpy as np

    from . import anomaly, decision
    from . import distributed as dist
    from . import evaluation as E
    from .data import check_mask_sizes, load_mask, scan_mvtec
    from .detect import Detector, map_score_kind, result_row, with_held_out_stats
    from .io import save_tiff, write_json
    from .metrics import image_metrics
    from .report_html import save_thumbnail, thumbnail_scale, write_index

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
    shown = set(E.report_rows(defects, report_rows))
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
                **{v: anomaly.resize_maps(variant_maps[v][i:i + 1].cpu(), size)[0].numpy() for v in E.VARIANTS},
                "direct": anomaly.resize_maps(res.map_direct[i:i + 1].cpu(), size)[0].numpy(),
            }
            scores = {"lsr": float(res.score[i]), "direct": float(res.direct_score[i]),
                      "nll": float(res.nll_score[i]), "fused": float(res.fused_score[i]),
                      **{v: float(anomaly.image_score(variant_maps[v][i:i + 1], map_score_kind(d.score), d.topk,
                                                      pool=d.pool)[0])
                         for v in E.VARIANTS}}
            kinds = {m: {kd: float(anomaly.image_score(model_maps[m][i:i + 1], kd, d.topk, pool=d.pool)[0])
                         for kd in E.SCORE_KINDS} for m in E.MAP_METHODS}
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

    names = {m: np.array([records[k]["scores"][m] for k in range(n)]) for m in (*E.MAP_METHODS, "nll", "fused")}
    maps = {m: [records[k]["maps"][m] for k in range(n)] for m in E.MAP_METHODS}
    masks = [load_mask(s.mask_path) if s.mask_path is not None else np.zeros(records[k]["size"], dtype=bool)
             for k, s in enumerate(samples)]
    rows = [records[k]["row"] for k in range(n)]
    keep = {k: records[k]["keep"] for k in range(n) if records[k]["keep"] is not None}

    methods: dict[str, Any] = {}
    for m in E.MAP_METHODS:
        methods[m] = E.method_metrics(names[m], labels, maps[m], masks, defects)
    methods["nll"] = E.method_metrics(names["nll"], labels, None, masks, defects)
    if np.isfinite(names["fused"]).all():
        methods["fused"] = E.method_metrics(names["fused"], labels, None, masks, defects)
    score_kinds = {m: {kd: image_metrics(np.array([records[k]["kinds"][m][kd] for k in range(n)]), labels)
                       for kd in E.SCORE_KINDS} for m in E.MAP_METHODS}
    result = {
        "category": cat.name,
        "run": str(run),
        "data": str(data),
        "n_test": n,
        "n_anomalous": int(labels.sum()),
        "default_map": d.map_kind,
        "detect": {k2: getattr(d, k2) for k2 in ("tau", "resampler", "map_kind", "distance", "score_distance",
                                                 "smoothing", "sigma",
                                                 "score", "topk", "pool", "gate_dilate", "restorations",
                                                 "weighting", "seed", "temperature")},
        "space": det.space,
        "methods": methods,
        "operating_point": E.operating_point(rows, labels, defects, maps["lsr"], masks, d),
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
            progress=progress, method_metrics=E.method_metrics)
        methods.update(rows_d)                             # differential, differential_direct
    # -- end of the differential block --
    with atomic_write(out / "results.jsonl", "w") as f:
        for r in rows:
            f.write(dumps(r) + "\n")
    write_json(out / "metrics.json", result)
    _write_eval_pictures(out, cat.name, samples, keep, masks, names, maps, labels, methods)
    write_index(out, rows, title=f"lsr eval: {cat.name} ({n} test images, run {Path(run).name})", metrics=result,
                pictures=["report.png"])
    return dist.broadcast_object(result)


def _write_eval_pictures(out: Path, category: str, samples, keep, masks, scores, maps, labels, methods) -> None:
    import numpy as np

    from . import evaluation as E
    from .data import load_mask
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
            curves[f"{m} (image)"] = E.roc_points(scores[m], labels, methods[m]["image_auroc"], "image")
        rng = np.random.default_rng(0)
        for m in ("lsr", "direct"):
            flat = np.concatenate([a.ravel() for a in maps[m]])
            gt = np.concatenate([a.ravel() for a in masks])
            if flat.size > 2_000_000:
                pick = rng.choice(flat.size, 2_000_000, replace=False)
                flat, gt = flat[pick], gt[pick]
            if 0 < gt.sum() < gt.size:
                curves[f"{m} (pixel)"] = E.roc_points(flat, gt, methods[m]["pixel_auroc"], "pixel")
    save_report(out / "report.png", rows, curves, title=f"{category}: lsr vs direct reconstruction")


def _fmt(score: float | None) -> str:
    return "n/a" if score is None else f"{score:.4f}"


__all__ = ["detect_images", "detect_bundle", "evaluate"]
