"""How detection quality and training time scale with the number of training images,
on the quality benchmark's validation split only (this chooses; it reports no test result).

    python benchmarks/quality/training_size.py --out bench-size --sizes 60 200 \
        [--categories grass gravel wood] [--threads 2]

For each category and each training-set size it builds the benchmark's validation data
(as :func:`run.build_data`: the same validation images for every size, since the benchmark's
random streams are keyed per image; the first ``n`` training images are shared), trains
``lsr`` with the feature preset (``cpu``, epoch budgets, so more images mean more steps) and
fits the ``patchcore-taps8`` peer, then prints side by side, per size, the mean over the
categories of image AUROC / pixel AUROC / AUPRO for ``lsr`` (the preset's map and score),
``lsr`` with tau from the 1% quantile (the 2026-12-03 ablation candidate), its ``direct``
baseline and the peer, with training and fit seconds. Writes ``OUT/training_size.json``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import lsr  # noqa: E402
from lsr.io import write_json  # noqa: E402

from ablations import _tau_for_quantile  # noqa: E402
from run import PRESETS, SIZES, mean_rows, run_patchcore  # noqa: E402

from lsr.demo_data import BENCHMARK_CATEGORIES, DEFECT_KINDS, HARD_DEFECT_KINDS, build_demo_dataset  # noqa: E402

METRICS = ("image_auroc", "pixel_auroc", "aupro")
IMAGE_SIZE = 128                      # the benchmark's image size (run.build_data)
ROWS = ("lsr", "lsr tau 1%", "direct", "patchcore-taps8")


def _pick(m: dict[str, Any]) -> dict[str, float]:
    return {k: float(m[k]) for k in METRICS}


def run_size(cat: str, n_train: int, out: Path, log, preset: str = PRESETS["features"]) -> dict[str, Any]:
    """lsr (``preset``) and the peer trained on ``n_train`` images of ``cat``, measured on val."""
    good, per = SIZES["val"]
    folder = build_demo_dataset(out / f"data-{n_train}" / "val", (cat,), image_size=IMAGE_SIZE, n_train=n_train,
                                n_test_good=good, n_test_per_defect=per, defects=DEFECT_KINDS + HARD_DEFECT_KINDS,
                                eval_split="val")[0]
    run = out / "runs" / f"{n_train}" / cat
    cfg = lsr.preset(preset, in_channels=1)
    log(f"[{cat}] n_train {n_train}: training lsr (preset {preset})")
    t0 = time.perf_counter()
    lsr.train(folder, run, cfg, device="cpu", progress=False, log=lambda *_: None)
    train_s = time.perf_counter() - t0
    ev = out / "eval" / f"{n_train}"
    m = lsr.evaluate(run, folder, ev / "preset" / cat, device="cpu", progress=False, report_rows=0)
    m1 = lsr.evaluate(run, folder, ev / "tau1" / cat, device="cpu", progress=False, report_rows=0,
                      tau=_tau_for_quantile(run, 0.01))
    log(f"[{cat}] n_train {n_train}: patchcore-taps8")
    pc = run_patchcore(folder, {"val": folder}, cfg.vqvae.image_size, "8")
    return {"lsr": _pick(m["methods"]["lsr"]), "lsr tau 1%": _pick(m1["methods"]["lsr"]),
            "direct": _pick(m["methods"]["direct"]), "patchcore-taps8": _pick(pc["val"]),
            "lsr_train_s": train_s, "patchcore_fit_s": pc["train_s"],
            "per_defect": {"lsr": m["methods"]["lsr"]["per_defect"], "direct": m["methods"]["direct"]["per_defect"],
                           "patchcore-taps8": pc["val"]["per_defect"]}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench-size")
    p.add_argument("--sizes", nargs="+", type=int, default=[60, 200])
    p.add_argument("--categories", nargs="+", default=["grass", "gravel", "wood"], choices=BENCHMARK_CATEGORIES)
    p.add_argument("--preset", default=PRESETS["features"], help="lsr preset (tiny-features: a smoke run)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    a = p.parse_args(argv)
    if min(a.sizes) < 4 or len(set(a.sizes)) != len(a.sizes):
        p.error(f"--sizes must be distinct training-set sizes of at least 4 images, got {a.sizes}")
    if a.threads:
        torch.set_num_threads(a.threads)
    out = Path(a.out)
    t0 = time.perf_counter()
    log = lambda m: print(f"[{time.perf_counter() - t0:6.0f} s] {m}", flush=True)   # noqa: E731
    res: dict[str, dict[str, Any]] = {}
    for cat in a.categories:
        for n in a.sizes:
            res.setdefault(str(n), {})[cat] = run_size(cat, n, out, log, a.preset)
            write_json(out / "partial.json", res)
    summary: dict[str, Any] = {"split": "val", "categories": a.categories, "sizes": a.sizes, "per_size": res,
                               "mean": {}, "seconds": time.perf_counter() - t0,
                               "torch_threads": torch.get_num_threads()}
    print("\n| training images | " + " | ".join(ROWS) + " | lsr train s | peer fit s |")
    print("| --- |" + " --- |" * (len(ROWS) + 2))
    for n in a.sizes:
        r = res[str(n)]
        mean: dict[str, Any] = {row: mean_rows({c: r[c][row] for c in r}) for row in ROWS}
        mean["lsr_train_s"] = float(np.mean([r[c]["lsr_train_s"] for c in r]))
        mean["patchcore_fit_s"] = float(np.mean([r[c]["patchcore_fit_s"] for c in r]))
        summary["mean"][str(n)] = mean
        cells = [" / ".join(f"{mean[row][k]:.3f}" for k in METRICS) for row in ROWS]
        print(f"| {n} | " + " | ".join(cells) + f" | {mean['lsr_train_s']:.0f} | {mean['patchcore_fit_s']:.0f} |")
    write_json(out / "training_size.json", summary)
    print(f"\nwritten: {out / 'training_size.json'} ({summary['seconds'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
