"""The commands' bodies that write files: ``lsr detect RUN`` (:func:`detect_images`) and
``lsr detect BUNDLE`` (:func:`detect_bundle`), apart from the library they call
(:class:`lsr.detect.Detector`, :class:`lsr.deploy.Inferencer`). ``lsr.cli`` parses flags
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


def _fmt(score: float | None) -> str:
    return "n/a" if score is None else f"{score:.4f}"


__all__ = ["detect_images", "detect_bundle"]
