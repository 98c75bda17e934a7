"""The quality benchmark: every method side by side on the same data, in one run.

    python benchmarks/quality/run.py --out bench-quality [--categories ...] [--threads 2]

For each of six texture categories (scikit-image's brick, grass, gravel photographs and
three procedural textures of :mod:`lsr.demo_data`) it builds one training set and two
evaluation sets with separate defect instances of eleven kinds (the demo's five and the
six hard ones: thin scratches, hairline cracks, faint stains, smudges, tone shifts,
rotated pastes of the same texture):

* ``val``: where settings are chosen (which map, which image score);
* ``test``: reported only; nothing is chosen on it.

Rows, all on the same images: ``lsr`` in feature space (the ``cpu`` preset), ``lsr`` in
pixel space (``demo-pixels``, the paper's method at the size the CPU demo used), each one's ``direct`` baseline (the
same VQ-VAE's reconstruction error, no prior), each one's ``differential`` and
``differential direct`` rows (D-MAD: every evaluation image against its nearest
``train/good`` image, :mod:`lsr.differential`), and ``patchcore`` (nearest neighbour on
the same backbone's patch features, greedy coreset; :mod:`patchcore`) with the preset's
taps and with each other backbone taps setting (``patchcore-taps8``, ``-taps4``,
``-taps4+8``); ``--lsr-taps 4 ...`` also trains ``lsr`` on those taps, ``--lsr-margin 32 ...``
with that reflected backbone margin (and fits PatchCore with it, ``patchcore-margin32``);
``--lsr-posterior 1 2 ...`` evaluates the trained ``features`` and ``pixels`` runs again with
the posterior draw at each strength (``detect.posterior``; rows ``features-posterior<B>``,
``pixels-posterior<B>``: detection options only, no training of their own; none where the
mode's preset draws at B already, so ``--lsr-posterior 0`` is the feature runs' prior draw;
the direct baseline's image score kind is chosen on validation as ``lsr``'s is). ``--reuse`` takes
finished run folders of an earlier benchmark in OUT as they are (same configuration and
images; their training seconds from that run's ``partial.json``) instead of training again.
A table per defect kind shows which defects each method finds. Metrics: image
AUROC, pixel AUROC, AUPRO (FPR <= 0.3), F1-max; training seconds and detection ms per
image (batch 1, measured separately). Writes ``OUT/quality.json`` and prints the tables.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import lsr  # noqa: E402
from lsr.data import load_images, load_mask, scan_mvtec  # noqa: E402
from lsr.config import BACKBONE_TAPS  # noqa: E402
from lsr.demo_data import BENCHMARK_CATEGORIES, DEFECT_KINDS, HARD_DEFECT_KINDS, build_demo_dataset  # noqa: E402
from lsr.io import write_json  # noqa: E402
from lsr.evaluation import method_metrics  # noqa: E402

COLUMNS = ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "pixel_f1_max")
MAPS = ("restored_vs_input", "restored_vs_direct", "gated")
SCORES = ("max", "topk_mean", "pooled_max")
#: (good, per defect kind): 12 + 22 validation and 24 + 44 test images per category (until
#: 2026-12-02: 6 + 11 and 12 + 22, where mean differences under 0.03-0.04 were noise)
SIZES = {"n_train": 60, "val": (12, 2), "test": (24, 4)}
PRESETS = {"features": "cpu", "pixels": "demo-pixels"}
#: the pixel row gets the feature preset's prior budget (epochs, shifted copies), so the two
#: spaces differ in what is encoded, not in how long the prior trained
PIXEL_OVERRIDES = {"train.prior_epochs": 30, "train.shift_augment": 4}
#: --smoke: the whole pipeline on tiny models and images (a test runs it), no result to quote
SMOKE = {"sizes": {"n_train": 12, "val": (2, 1), "test": (2, 1)}, "image_size": 32,
         "presets": {"features": "tiny-features", "pixels": "tiny"}, "kinds": ("hole", "smudge")}


def build_data(root: Path, categories: tuple[str, ...], sizes: dict[str, Any] = SIZES, image_size: int = 128,
               kinds: tuple[str, ...] = DEFECT_KINDS + HARD_DEFECT_KINDS) -> dict[str, dict[str, Path]]:
    out: dict[str, dict[str, Path]] = {c: {} for c in categories}
    for split in ("val", "test"):
        good, per = sizes[split]
        folders = build_demo_dataset(root / split, categories=categories, image_size=image_size,
                                     n_train=sizes["n_train"], n_test_good=good, n_test_per_defect=per,
                                     defects=kinds, eval_split=split)
        for f in folders:
            out[f.name][split] = f
    return out


def row(metrics: dict[str, Any], method: str, score_kind: str | None = None) -> dict[str, float]:
    """One method's overall metrics from an ``lsr eval`` metrics.json, with its image
    metrics taken from another image score when ``score_kind`` is given."""
    r = {k: metrics["methods"][method][k] for k in COLUMNS if k in metrics["methods"][method]}
    if score_kind is not None:
        r.update(metrics["image_score_kinds"][method][score_kind])
    return r


def detection_ms(run: Path, paths: list[Path], n: int = 6, **options: Any) -> float:
    """Median ms per image at batch 1 (after two warm-up calls: TorchScript specialises
    the native loop's prior on its first calls), with detect ``options``."""
    det = lsr.Detector.load(run, "cpu").with_options(**options)
    x, _ = det.load_batch(paths[: n + 1])
    det.detect(x[:1])
    det.detect(x[:1])
    times = []
    for i in range(1, min(len(paths), n + 1)):
        t0 = time.perf_counter()
        det.detect(x[i:i + 1], [i])
        times.append((time.perf_counter() - t0) * 1000)
    return float(np.median(times))


def run_patchcore(train_dir: Path, splits: dict[str, Path], image_size: int, taps: str = "8+16",
                  margin: int = 0) -> dict[str, Any]:
    from patchcore import PatchCore

    from lsr.models.backbone import build_backbone

    train = scan_mvtec(train_dir, require_test=False).train
    x_train = torch.from_numpy(load_images(train, 3, image_size))
    pc = PatchCore(build_backbone("efficientnet_lite0", taps=taps, margin=margin))
    t0 = time.perf_counter()
    pc.fit(x_train)
    fit_s = time.perf_counter() - t0
    res: dict[str, Any] = {"train_s": fit_s}
    for split, folder in splits.items():
        cat = scan_mvtec(folder, require_test=True)
        x = torch.from_numpy(load_images([s.path for s in cat.test], 3, image_size))
        scores, maps = pc.predict(x)
        labels = np.array([s.label for s in cat.test])
        full = [lsr.anomaly.resize_maps(maps[i:i + 1], _size(s.path))[0].numpy() for i, s in enumerate(cat.test)]
        masks = [load_mask(s.mask_path) if s.mask_path else np.zeros(full[i].shape, bool)
                 for i, s in enumerate(cat.test)]
        defects = np.array([s.defect for s in cat.test])
        res[split] = method_metrics(scores.numpy(), labels, full, masks, defects)
    n = min(6, x.shape[0])
    pc.predict(x[:1])                                   # warm-up
    t0 = time.perf_counter()
    for i in range(n):
        pc.predict(x[i:i + 1])
    res["ms_per_image"] = (time.perf_counter() - t0) * 1000 / n
    return res


def _size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:
        return im.size[1], im.size[0]


def patchcore_taps(preset: str) -> dict[str, str]:
    """The PatchCore rows: one per backbone taps setting (a fit takes seconds), named
    ``patchcore`` for the feature preset's own taps and ``patchcore-taps<T>`` otherwise."""
    base = lsr.preset(preset).vqvae.backbone_taps
    return {("patchcore" if t == base else f"patchcore-taps{t}"): t for t in (base, *(t for t in BACKBONE_TAPS if t != base))}


def modes(presets: dict[str, str], lsr_taps: tuple[str, ...] = (),
          lsr_margins: tuple[int, ...] = ()) -> dict[str, tuple[str, dict[str, Any]]]:
    """Each lsr row's preset and overrides: the feature preset as it is, the pixel preset, and
    for each of ``lsr_taps`` the feature preset with those backbone taps (rows
    ``features-taps<T>``), for each of ``lsr_margins`` with that backbone margin (rows
    ``features-margin<M>``); each costs a training per category, so they are opt-in."""
    out = {"features": (presets["features"], {}),
           "pixels": (presets["pixels"], PIXEL_OVERRIDES if presets is PRESETS else {})}
    base = lsr.preset(presets["features"]).vqvae.backbone_taps
    for t in lsr_taps:
        if t != base:
            out[f"features-taps{t}"] = (presets["features"], {"vqvae.backbone_taps": t})
    base_margin = lsr.preset(presets["features"]).vqvae.backbone_margin
    for m in lsr_margins:
        if m != base_margin:
            out[f"features-margin{m}"] = (presets["features"], {"vqvae.backbone_margin": m})
    return out


def posterior_rows(strengths: tuple[float, ...], presets: dict[str, str] = PRESETS) -> dict[str, tuple[str, float]]:
    """The rows of ``--lsr-posterior``: name -> (the trained mode it re-evaluates, strength),
    for each strength other than the mode's preset's own (0 gives the feature runs' prior-draw
    row since the feature presets draw from the posterior)."""
    return {f"{mode}-posterior{b:g}": (mode, float(b)) for b in strengths for mode in ("features", "pixels")
            if float(b) != lsr.preset(presets[mode]).detect.posterior}


def reusable(run: Path, cfg, data: Path) -> bool:
    """Whether ``run`` is a finished run folder trained with ``cfg``'s models on the training
    images of ``data`` (``--reuse``)."""
    from lsr.io import read_json
    from lsr.runfolder import config_matches, data_fingerprint, read_manifest
    from lsr.training import train_images

    try:
        manifest = read_manifest(run)
        saved = read_json(run / "config.json")
        # the detection settings too (not the values calibration sets): a run trained under
        # another preset default (say, the prior draw and the fused score) would give its rows
        # under another name
        want = {k: v for k, v in dataclasses.asdict(cfg.detect).items() if v is not None}
        same_detect = all(saved.get("detect", {}).get(k) == v for k, v in want.items())
        return (bool(manifest and manifest.get("finished"))
                and config_matches(saved, cfg) and same_detect
                and manifest.get("data", {}).get("sha256") == data_fingerprint(train_images(data))["sha256"])
    except (OSError, ValueError):
        return False


def lsr_modes(result: dict[str, Any]) -> list[str]:
    return [m for m in result if not m.startswith("patchcore")]


def run_category(cat: str, folders: dict[str, Path], out: Path, log, presets: dict[str, str] = PRESETS,
                 lsr_taps: tuple[str, ...] = (), lsr_margins: tuple[int, ...] = (),
                 posteriors: tuple[float, ...] = (), reuse: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every row of one category. ``reuse``: the earlier run's results of this category
    (``--reuse``), or None to train every run folder afresh."""
    result: dict[str, Any] = {}
    paths = [s.path for s in scan_mvtec(folders["test"]).test]
    variants = posterior_rows(posteriors, presets)
    for mode, (preset, overrides) in modes(presets, lsr_taps, lsr_margins).items():
        run = out / "runs" / mode / cat
        cfg = lsr.preset(preset, in_channels=1).with_overrides(overrides)
        if reuse is not None and reusable(run, cfg, folders["test"]):
            train_s = reuse.get(mode, {}).get("train_s", float("nan"))
            log(f"[{cat}] reusing the trained run {run} ({mode}; trained in {train_s:.0f} s)")
        else:
            log(f"[{cat}] training lsr ({mode}, preset {preset}, {overrides or 'no overrides'})")
            t0 = time.perf_counter()
            lsr.train(folders["test"], run, cfg, device="cpu", progress=False, log=lambda *_: None)
            train_s = time.perf_counter() - t0
        calib = json.loads((run / "calibration.json").read_text())
        for name, options in [(mode, {})] + [(n, {"posterior": b}) for n, (m, b) in variants.items() if m == mode]:
            if options:
                log(f"[{cat}] {name}: the {mode} run with {options}")
            entry: dict[str, Any] = {"train_s": train_s, "preset": preset, "options": options}
            for split in ("val", "test"):
                entry[split] = lsr.evaluate(run, folders[split], out / "eval" / name / split / cat, device="cpu",
                                            progress=False, report_rows=6, reference_from="good", **options)
            entry["ms_per_image"] = detection_ms(run, paths, **options)
            entry["val_nll"], entry["uniform_nll"] = calib["val_nll"], calib["uniform_nll"]
            result[name] = entry
    fcfg = lsr.preset(presets["features"]).vqvae
    for name, taps in patchcore_taps(presets["features"]).items():
        log(f"[{cat}] {name} (backbone taps {taps})")
        result[name] = run_patchcore(folders["test"], folders, fcfg.image_size, taps, fcfg.backbone_margin)
    for name, margin in patchcore_margins(presets["features"], lsr_margins).items():
        log(f"[{cat}] {name} (backbone margin {margin} px)")
        result[name] = run_patchcore(folders["test"], folders, fcfg.image_size, fcfg.backbone_taps, margin)
    return result


def patchcore_margins(preset: str, margins: tuple[int, ...]) -> dict[str, int]:
    """PatchCore rows ``patchcore-margin<M>`` for each backbone margin of ``--lsr-margin`` other
    than the preset's own (the ``patchcore`` row), at the preset's taps."""
    base = lsr.preset(preset).vqvae.backbone_margin
    return {f"patchcore-margin{m}": m for m in margins if m != base}


def mean_rows(rows: dict[str, dict[str, float]]) -> dict[str, float]:
    keys = set.intersection(*(set(r) for r in rows.values()))
    return {k: float(np.nanmean([r[k] for r in rows.values()])) for k in COLUMNS if k in keys}


def choose_on_val(results: dict[str, Any], mode: str) -> dict[str, str]:
    """Map and image score of ``mode`` with the best mean over categories on the
    validation split: the map by AUPRO, the image score by image AUROC; and the direct
    baseline's image score kind, chosen the same way, so that the two rows compare the
    maps under equal freedom (the row ``direct (<mode>)`` keeps the run's configured score;
    until 2026-12-06 it was the only direct row, which favoured ``lsr`` on image AUROC)."""
    cats = list(results)
    best_map = max(MAPS, key=lambda m: np.mean([results[c][mode]["val"]["methods"][m]["aupro"] for c in cats]))
    cands = [(m, k) for m in MAPS for k in SCORES] + [("nll", None), ("fused", None)]

    def val_auroc(cand):
        m, k = cand
        vals = []
        for c in cats:
            met = results[c][mode]["val"]
            if k is None:
                vals.append(met["methods"].get(m, {}).get("image_auroc", np.nan))
            else:
                vals.append(met["image_score_kinds"][m][k]["image_auroc"])
        return float(np.nanmean(vals))

    best_score = max(cands, key=val_auroc)
    # the direct baseline gets the same freedom for its image score (its map is fixed)
    direct_kind = max(SCORES, key=lambda k: val_auroc(("direct", k)))
    return {"map": best_map, "score_map": best_score[0], "score_kind": best_score[1] or best_score[0],
            "direct_score_kind": direct_kind}


def tables(results: dict[str, Any], split: str, chosen: dict[str, dict[str, str]]) -> dict[str, Any]:
    """Mean rows over categories on ``split``: every method, plus the val-chosen settings."""
    per: dict[str, dict[str, dict[str, float]]] = {}
    for c, r in results.items():
        for mode in lsr_modes(r):
            met = r[mode][split]
            for m in (*MAPS, "direct"):
                per.setdefault(f"lsr-{mode} {m}" if m != "direct" else f"direct ({mode})", {})[c] = row(met, m)
            for m in ("nll", "fused"):
                if m in met["methods"]:
                    per.setdefault(f"lsr-{mode} {m} (image only)", {})[c] = dict(met["methods"][m])
            for m in ("differential", "differential_direct"):    # D-MAD against the nearest train/good image
                if m in met["methods"]:
                    per.setdefault(f"{m.replace('_', ' ')} ({mode})", {})[c] = row(met, m)
            ch = chosen[mode]
            best = row(met, ch["map"])
            if ch["score_kind"] in SCORES:
                best.update(met["image_score_kinds"][ch["score_map"]][ch["score_kind"]])
            else:
                best.update(image_metrics_of(met, ch["score_map"]))
            per.setdefault(f"lsr-{mode} (chosen on val)", {})[c] = best
            per.setdefault(f"direct ({mode}) (score chosen on val)", {})[c] = row(met, "direct", ch["direct_score_kind"])
        for name in (m for m in r if m.startswith("patchcore")):
            per.setdefault(name, {})[c] = r[name][split]
    return {"mean": {k: mean_rows(v) for k, v in per.items()}, "per_category": per}


#: rows of the per-defect-kind table: (label, lsr mode or None for a peer, method)
KIND_ROWS = (("lsr features (default)", "features", "lsr"), ("direct (features)", "features", "direct"),
             ("lsr features taps 4", "features-taps4", "lsr"), ("direct (features taps 4)", "features-taps4", "direct"),
             ("lsr features margin 32", "features-margin32", "lsr"),
             ("direct (features margin 32)", "features-margin32", "direct"),
             ("lsr pixels", "pixels", "lsr"), ("patchcore", None, "patchcore"),
             ("patchcore-margin32", None, "patchcore-margin32"), ("patchcore-taps8", None, "patchcore-taps8"),
             ("patchcore-taps4", None, "patchcore-taps4"))


def kind_table(results: dict[str, Any], split: str) -> dict[str, dict[str, dict[str, float]]]:
    """Per defect kind (each kind's images against the good ones), the mean over categories of
    image AUROC, pixel AUROC and AUPRO for the rows of ``KIND_ROWS``: which defects each method
    finds at all."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    first = next(iter(results.values()), {})
    extra = tuple((f"lsr {m.replace('-posterior', ' posterior ')}", m, "lsr") for m in first if "-posterior" in m)
    for label, mode, method in KIND_ROWS + extra:
        per: dict[str, list[dict[str, float]]] = {}
        for r in results.values():
            if (mode or method) not in r:
                continue
            met = r[method][split] if mode is None else r[mode][split]["methods"][method]
            for kind, m in met.get("per_defect", {}).items():
                per.setdefault(kind, []).append(m)
        if per:
            out[label] = {k: {c: float(np.nanmean([m[c] for m in ms])) for c in ("image_auroc", "pixel_auroc", "aupro")}
                          for k, ms in sorted(per.items())}
    return out


def format_kinds(table: dict[str, dict[str, dict[str, float]]]) -> str:
    labels = list(table)
    kinds = sorted({k for t in table.values() for k in t})
    lines = ["| defect kind | " + " | ".join(labels) + " |", "| --- |" + " --- |" * len(labels)]
    for k in kinds:
        cells = [" / ".join(f"{table[lb][k][c]:.2f}" for c in ("image_auroc", "pixel_auroc", "aupro"))
                 if k in table[lb] else "n/a" for lb in labels]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def image_metrics_of(met: dict[str, Any], method: str) -> dict[str, float]:
    m = met["methods"][method]
    return {k: m[k] for k in ("image_auroc", "image_f1_max") if k in m}


def format_rows(mean: dict[str, dict[str, float]]) -> str:
    lines = ["| method | " + " | ".join(COLUMNS) + " |", "| --- |" + " --- |" * len(COLUMNS)]
    for name, r in mean.items():
        lines.append(f"| {name} | " + " | ".join(f"{r[k]:.3f}" if k in r else "n/a" for k in COLUMNS) + " |")
    return "\n".join(lines)


def timing(r: dict[str, Any]) -> dict[str, float]:
    """Training / fit seconds, detection ms per image and (lsr) held-out NLL of each row."""
    out: dict[str, float] = {}
    for m, e in r.items():
        key = m.replace("-", "_")
        out[f"{key}_{'fit' if m.startswith('patchcore') else 'train'}_s"] = e["train_s"]
        out[f"{key}_ms_per_image"] = e["ms_per_image"]
        if "val_nll" in e:
            out[f"{key}_val_nll"] = e["val_nll"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench-quality")
    p.add_argument("--categories", nargs="+", default=list(BENCHMARK_CATEGORIES))
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    p.add_argument("--smoke", action="store_true", help="tiny models and images: checks the pipeline only")
    p.add_argument("--lsr-taps", nargs="+", default=[], choices=BACKBONE_TAPS, metavar="TAPS",
                   help=f"also train lsr (features) with these backbone taps, rows features-taps<T> "
                        f"(choices {', '.join(BACKBONE_TAPS)})")
    p.add_argument("--lsr-posterior", nargs="+", default=[], type=float, metavar="B",
                   help="also evaluate the features and pixels runs with the posterior draw of this strength "
                        "(detect.posterior), rows features-posterior<B> and pixels-posterior<B> (no training; "
                        "none for a mode whose preset draws at B already: 0 gives the features' prior draw)")
    p.add_argument("--reuse", action="store_true", help="take the finished run folders of an earlier benchmark "
                   "in --out as they are (same configuration and images) instead of training them again")
    p.add_argument("--lsr-margin", nargs="+", default=[], type=int, metavar="PX",
                   help="also train lsr (features) with these backbone margins (vqvae.backbone_margin), rows "
                        "features-margin<M>, and fit PatchCore with them, rows patchcore-margin<M>")
    a = p.parse_args(argv)
    from lsr.config import ConfigError, check_value
    try:                                                 # before any data is built or run trained
        a.lsr_posterior = [check_value("detect.posterior", b, "--lsr-posterior") for b in a.lsr_posterior]
    except ConfigError as e:
        p.error(str(e))
    if a.threads:
        torch.set_num_threads(a.threads)
    out = Path(a.out)
    t0 = time.perf_counter()
    log = lambda m: print(f"[{time.perf_counter() - t0:6.0f} s] {m}", flush=True)   # noqa: E731
    if a.smoke:
        sizes, presets = SMOKE["sizes"], SMOKE["presets"]
        folders = build_data(out / "data", tuple(a.categories), sizes, SMOKE["image_size"], SMOKE["kinds"])
    else:
        sizes, presets = SIZES, PRESETS
        folders = build_data(out / "data", tuple(a.categories))
    earlier: dict[str, Any] = {}
    if a.reuse:                                          # the earlier run's training seconds
        for name in ("partial.json", "quality.json"):
            try:
                saved = json.loads((out / name).read_text())
                earlier = saved.get("raw", saved) if name == "quality.json" else saved
                break
            except (OSError, ValueError):
                continue
    results: dict[str, Any] = {}
    for cat in a.categories:
        results[cat] = run_category(cat, folders[cat], out, log, presets, tuple(a.lsr_taps), tuple(a.lsr_margin),
                                    tuple(a.lsr_posterior), earlier.get(cat, {}) if a.reuse else None)
        write_json(out / "partial.json", results)
    chosen = {mode: choose_on_val(results, mode) for mode in lsr_modes(next(iter(results.values())))}
    summary = {"categories": a.categories, "sizes": sizes, "presets": presets, "smoke": a.smoke,
               "lsr_taps": a.lsr_taps, "lsr_margin": a.lsr_margin, "lsr_posterior": a.lsr_posterior,
               "reused_runs": a.reuse, "chosen_on_val": chosen,
               "val": tables(results, "val", chosen), "test": tables(results, "test", chosen),
               "test_per_defect_kind": kind_table(results, "test"),
               "timing": {c: timing(r) for c, r in results.items()},
               "raw": results, "seconds": time.perf_counter() - t0, "torch_threads": torch.get_num_threads()}
    write_json(out / "quality.json", summary)
    print(f"\nchosen on the validation split: {json.dumps(chosen)}")
    for split in ("val", "test"):
        print(f"\n== {split} split, mean over {len(a.categories)} categories ==")
        print(format_rows(summary[split]["mean"]))
    print("\n== test split per defect kind (image AUROC / pixel AUROC / AUPRO, mean over categories) ==")
    print(format_kinds(summary["test_per_defect_kind"]))
    print(f"\ntimings: {json.dumps(summary['timing'], indent=1)}")
    print(f"\nwritten: {out / 'quality.json'} ({summary['seconds'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
