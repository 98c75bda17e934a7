"""Options measured on the validation split of a finished quality benchmark (run.py): the
runs it trained are re-evaluated with one detect option changed at a time.

    python benchmarks/quality/ablations.py --out bench-quality

Writes ``OUT/ablations.json`` and prints, per setting, the mean over categories of image
AUROC, pixel AUROC and AUPRO of the settings' maps. Validation split only: these results
choose, they are not reported as test results.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import numpy as np

import lsr
from lsr.io import write_json

#: (mode, label, detect options)
SETTINGS = (
    ("features", "preset default", {}),
    ("features", "l2 distance", {"distance": "l2", "score_distance": "map"}),
    ("features", "gate dilate 0", {"gate_dilate": 0}),
    ("features", "gate dilate 2", {"gate_dilate": 2}),
    ("features", "tau quantile x2 (tau from 10% quantile)", {"tau_quantile": 0.10}),
    ("features", "4 restorations, mean", {"restorations": 4, "weighting": "mean"}),
    ("features", "4 restorations, closeness-weighted", {"restorations": 4, "weighting": "closeness"}),
    ("features", "per-position likelihood normalisation", {"position_norm": True}),
    ("features", "per-position normalisation + cosine", {"position_norm": True, "distance": "cosine"}),
    ("features", "cosine + gate dilate 2", {"distance": "cosine", "gate_dilate": 2}),
    ("features", "cosine map, l2 image score", {"distance": "cosine", "score_distance": "l2"}),
    ("features", "4 restorations, per-pixel min", {"restorations": 4, "weighting": "min"}),
    ("features", "8 restorations, per-pixel min", {"restorations": 8, "weighting": "min"}),
    ("features", "tau from 1% quantile", {"tau_quantile": 0.01}),
    ("features", "tau from 2% quantile", {"tau_quantile": 0.02}),
    ("features", "tau from 2% quantile, 4 restorations, per-pixel min",
     {"tau_quantile": 0.02, "restorations": 4, "weighting": "min"}),
    ("pixels", "preset default", {}),
    ("pixels", "per-position likelihood normalisation", {"position_norm": True}),
    ("pixels", "msgms distance", {"distance": "msgms"}),
    ("pixels", "ssim distance", {"distance": "ssim"}),
)
#: "lsr": the configured map and image score (the preset's: ``fused`` until 2026-12-06, then the
#: pooled max of the map), then each map's own max
MAPS = ("lsr", "restored_vs_input", "restored_vs_direct", "gated", "direct")


def _tau_for_quantile(run: Path, q: float) -> float:
    """tau at another quantile of the held-out codes' likelihoods (normal images only),
    by the training's own calibration."""
    import dataclasses

    import torch

    from lsr.data import load_images
    from lsr.io import read_json
    from lsr.training import calibrate, extract_codes

    det = lsr.Detector.load(run, "cpu")
    val = [Path(p) for p in read_json(run / "split.json")["val"]]
    x = torch.from_numpy(load_images(val, det.channels, det.image_size))
    cfg = dataclasses.replace(det.config, detect=dataclasses.replace(det.config.detect, tau_quantile=q))
    return calibrate(det.prior, extract_codes(det.vqvae, x, det.device), cfg, det.device)["tau"]


def _position_tau(run: Path, q: float | None = None):
    """Per-position likelihood normalisation (the issue's "likelihoods normalised per
    position by the training images' mean likelihood map"): with m_t the mean likelihood
    of the held-out normal codes at grid position t, the rule compares p_t / m_t with a
    tau' calibrated as the same quantile of p / m; equivalently p_t < tau' * m_t, a
    threshold per position. Returns that (h, w) threshold tensor."""
    import torch

    from lsr.data import load_images
    from lsr.io import read_json
    from lsr.training import extract_codes

    det = lsr.Detector.load(run, "cpu")
    val = [Path(p) for p in read_json(run / "split.json")["val"]]
    x = torch.from_numpy(load_images(val, det.channels, det.image_size))
    with torch.no_grad():
        p = det.prior.log_likelihood(extract_codes(det.vqvae, x, det.device)).exp()   # (N, h, w)
    m = p.mean(0)
    q = det.config.detect.tau_quantile if q is None else q
    tau = float(torch.quantile((p / m).flatten().double(), q))
    return tau * m


class _PositionTau:
    """Within the block, detection resamples with a per-position threshold (the Python
    fast loop; the threshold tensor broadcasts over the batch in flag_positions)."""

    def __init__(self, tau_map):
        self.tau_map = tau_map

    def __enter__(self):
        from lsr import detect, ops
        self._orig = detect.ops.resample

        def resample(prior, codes, noise, tau, temperature=1.0, method="fast"):
            return ops.resample_fast(prior, codes, noise, self.tau_map.to(codes.device), temperature)

        detect.ops.resample = resample
        return self

    def __exit__(self, *exc):
        from lsr import detect
        detect.ops.resample = self._orig
        return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench-quality")
    p.add_argument("--only", nargs="*", default=None, help="labels of the settings to run (default: all)")
    a = p.parse_args(argv)
    out = Path(a.out)
    q = json.loads((out / "quality.json").read_text())
    results = []
    for mode, label, opts in SETTINGS:
        if a.only is not None and label not in a.only and f"{mode}:{label}" not in a.only:
            continue
        per = {}
        for cat in q["categories"]:
            run = out / "runs" / mode / cat
            opts2 = dict(opts)
            if "tau_quantile" in opts2:
                opts2["tau"] = _tau_for_quantile(run, opts2.pop("tau_quantile"))
            position = contextlib.nullcontext()
            if opts2.pop("position_norm", False):
                position = _PositionTau(_position_tau(run))
            with position:
                m = lsr.evaluate(run, out / "data" / "val" / cat,
                                 out / "ablations" / mode / label.replace(" ", "_") / cat,
                                 device="cpu", progress=False, report_rows=0, **opts2)
            per[cat] = {k: {c: m["methods"][k][c] for c in ("image_auroc", "pixel_auroc", "aupro")} for k in MAPS}
        mean = {k: {c: float(np.mean([per[cat][k][c] for cat in per])) for c in ("image_auroc", "pixel_auroc",
                                                                                  "aupro")} for k in MAPS}
        results.append({"mode": mode, "setting": label, "options": opts, "mean": mean, "per_category": per})
        print(f"{mode:8s} {label:42s} " + "  ".join(
            f"{k}: {mean[k]['image_auroc']:.3f}/{mean[k]['pixel_auroc']:.3f}/{mean[k]['aupro']:.3f}" for k in MAPS),
            flush=True)
    write_json(out / ("ablations.json" if a.only is None else "ablations_only.json"), {"split": "val", "columns": "image_auroc/pixel_auroc/aupro",
                                        "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
