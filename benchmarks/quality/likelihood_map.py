"""Does a map of the prior's per-code NLL add to the feature maps? Measured on the
validation split of a finished quality benchmark (run.py); validation only: it chooses,
its numbers are not test results.

    python benchmarks/quality/likelihood_map.py --out bench-quality [--split val] [--mode features]

For every category's run, maps of the evaluation images (image AUROC by each map's max,
its 21 x 21 pooled max, pixel AUROC, AUPRO, pixel F1-max):

* ``A``: the configured map (restored vs input); ``B``: the direct map (no prior);
* ``C``: the NLL map, -log p_t of the image's own codes under the prior, bilinearly
  upsampled to the image and smoothed like the maps;
* ``A+wC``, ``B+wC`` (w = 0.5, 1, 2): each map standardised by the pixel mean and standard
  deviation of the held-out normal training images' maps (split.json), then summed;
* ``B gated d``: the direct map where codes were resampled (mask dilated by d cells).

Image scores beside them: the ``fused`` score and ``z(max B) + z(NLL)`` (each
standardised on the held-out normal images). Writes ``OUT/likelihood_map_<split>_<mode>.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from lsr import anomaly
from lsr.data import load_mask, scan_mvtec
from lsr.detect import Detector, with_held_out_stats
from lsr.io import read_json, write_json
from lsr.metrics import all_metrics, image_metrics

WEIGHTS = (0.5, 1.0, 2.0)


def collect(det: Detector, paths: list[Path]) -> tuple[dict[str, torch.Tensor], list[tuple[int, int]]]:
    """Maps (N, S, S) and scores (N,) of ``paths``, and each file's own (H, W)."""
    S, d = det.image_size, det.config.detect
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("A", "B", "C", "Bgate1", "Bgate2", "fused", "maxB", "nll")}
    sizes: list[tuple[int, int]] = []
    for _, _, sz, _, res, _ in det.detect_paths(paths, 8):
        sizes += sz
        nll = -torch.log(res.likelihood.float().clamp_min(1e-30))
        parts["A"].append(res.anomaly_map)
        parts["B"].append(res.map_direct)
        parts["C"].append(anomaly.smooth(anomaly.resize_maps(nll, (S, S)), d.smoothing, d.sigma))
        for dil in (1, 2):
            parts[f"Bgate{dil}"].append(res.map_direct * anomaly.code_mask_map(res.resampled, (S, S), dil))
        parts["fused"].append(res.fused_score)
        parts["maxB"].append(res.map_direct.flatten(1).amax(1))
        parts["nll"].append(res.nll_score.float())
    return {k: torch.cat(v) for k, v in parts.items()}, sizes


def category(run: Path, data: Path) -> dict[str, dict[str, float]]:
    det = with_held_out_stats(Detector.load(run, "cpu"), run)
    held, _ = collect(det, [Path(p) for p in read_json(run / "split.json")["val"]])
    cat = scan_mvtec(data, require_test=True, require_train=False)
    ev, sizes = collect(det, [s.path for s in cat.test])
    z = {k: (ev[k] - held[k].mean()) / held[k].std() for k in ("A", "B", "C", "maxB", "nll")}
    maps = {"A": ev["A"], "B": ev["B"], "C": ev["C"], "Bgate1": ev["Bgate1"], "Bgate2": ev["Bgate2"]}
    for w in WEIGHTS:
        maps[f"A+{w}C"] = z["A"] + w * z["C"]
        maps[f"B+{w}C"] = z["B"] + w * z["C"]
    labels = np.array([s.label for s in cat.test])
    masks = [load_mask(s.mask_path) if s.mask_path else np.zeros(sizes[i], bool) for i, s in enumerate(cat.test)]
    out: dict[str, dict[str, float]] = {}
    for name, m in maps.items():
        full = [anomaly.resize_maps(m[i:i + 1], sizes[i])[0].numpy() for i in range(len(sizes))]
        r = all_metrics(m.flatten(1).amax(1).numpy(), labels, full, masks)
        r["pooled_image_auroc"] = image_metrics(anomaly.pooled_max(m, det.config.detect.pool).numpy(),
                                                labels)["image_auroc"]
        out[name] = r
    out["fused"] = image_metrics(ev["fused"].numpy(), labels)
    out["z(max B)+z(nll)"] = image_metrics((z["maxB"] + z["nll"]).numpy(), labels)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench-quality")
    p.add_argument("--split", default="val", choices=("val", "test"))
    p.add_argument("--mode", default="features")
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    out = Path(a.out)
    if not (out / "quality.json").is_file():
        p.error(f"--out {out}: no quality.json there; run benchmarks/quality/run.py --out {out} first")
    cats = json.loads((out / "quality.json").read_text())["categories"]
    per = {c: category(out / "runs" / a.mode / c, out / "data" / a.split / c) for c in cats}
    keys = ("image_auroc", "pooled_image_auroc", "pixel_auroc", "aupro", "pixel_f1_max")
    print(f"mean over {len(cats)} categories ({a.split} split, {a.mode}): " + " / ".join(keys))
    mean = {}
    for name in per[cats[0]]:
        mean[name] = {k: float(np.mean([per[c][name][k] for c in cats])) for k in keys if k in per[cats[0]][name]}
        print(f"  {name:18s} " + " / ".join(f"{mean[name].get(k, float('nan')):.3f}" for k in keys), flush=True)
    write_json(out / f"likelihood_map_{a.split}_{a.mode}.json", {"split": a.split, "mode": a.mode, "mean": mean,
                                                                 "per_category": per})
    return 0


if __name__ == "__main__":
    sys.exit(main())
