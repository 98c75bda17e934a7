"""Operating thresholds, verdicts, regions and masks (lsr.decision), and where they come
from: only the held-out part of train/good."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage, stats

from lsr import decision


@pytest.mark.parametrize("seed", range(40))
def test_label_equals_scipy(seed):
    rng = np.random.default_rng(seed)
    H, W = rng.integers(1, 70, 2)
    m = rng.random((H, W)) < rng.uniform(0.05, 0.95)
    ours, n = decision.label(m)
    ref, n_ref = ndimage.label(m, structure=np.ones((3, 3), int))
    assert n == n_ref
    np.testing.assert_array_equal(ours, ref)           # scipy numbers components in raster order too


def test_label_long_snake():
    """A one-pixel-wide serpentine: the worst case of label propagation."""
    m = np.zeros((61, 61), bool)
    m[::2, :] = True
    for r in range(1, 61, 2):
        m[r, -1 if (r // 2) % 2 == 0 else 0] = True
    ours, n = decision.label(m)
    assert n == 1 and (ours[m] == 1).all()


def test_regions_match_brute_force():
    rng = np.random.default_rng(3)
    mp = ndimage.gaussian_filter(rng.random((90, 70)), 3).astype(np.float32)
    thr = float(np.quantile(mp, 0.9))
    regs, n = decision.regions(mp, thr)
    lab, n_ref = ndimage.label(mp > thr, structure=np.ones((3, 3), int))
    assert n == n_ref > 1
    brute = []
    for i in range(1, n_ref + 1):
        ys, xs = np.nonzero(lab == i)
        vals = mp[ys, xs]
        j = int(np.argmax(vals))                        # first maximum in raster order
        brute.append({"area": len(ys), "bbox": [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())],
                      "peak": float(vals.max()), "peak_xy": [int(xs[j]), int(ys[j])]})
    brute.sort(key=lambda r: -r["peak"])
    assert regs == brute[:decision.MAX_REGIONS]
    assert decision.regions(mp, float(mp.max())) == ([], 0)
    m = decision.mask(mp, thr)
    assert m.dtype == np.uint8 and set(np.unique(m)) == {0, 255} and (m == 255).sum() == (mp > thr).sum()


def test_empirical_threshold_meets_the_rate():
    """Distribution-free branch: for any continuous scores the expected false-alarm rate
    of the order statistic is (n + 1 - k) / (n + 1) <= rate; measured over many samples."""
    rng = np.random.default_rng(0)
    n, rate, reps = 199, 0.05, 3000
    far = []
    for _ in range(reps):
        s = rng.exponential(size=n)                     # skewed on purpose
        t = decision.image_threshold(s, rate, n_boot=0)
        assert t["method"] == "empirical"
        far.append(math.exp(-t["threshold"]))           # P(new > t) for Exp(1)
    far = np.array(far)
    se = far.std() / math.sqrt(reps)
    assert abs(far.mean() - 10 / 200) < 4 * se          # k = 190: (200 - 190) / 200 = 0.05 exactly


def test_small_sample_threshold_meets_the_rate_for_normal_scores():
    """14 held-out images cannot resolve 1% without a model; the normal prediction bound's
    exceedance probability is exactly the rate for normal scores (measured)."""
    rng = np.random.default_rng(1)
    n, rate, reps = 14, 0.01, 4000
    far = []
    for _ in range(reps):
        s = rng.normal(3.0, 2.0, size=n)
        t = decision.image_threshold(s, rate, n_boot=0)
        assert t["method"] == "normal-prediction" and t["supported_rate"] == pytest.approx(1 / 15)
        far.append(stats.norm.sf(t["threshold"], 3.0, 2.0))
    far = np.array(far)
    se = far.std() / math.sqrt(reps)
    assert abs(far.mean() - rate) < 4 * se
    t = decision.image_threshold(rng.normal(size=n), rate)
    assert t["ci90"][0] < t["threshold"] < t["ci90"][1] and "extrapolated" in t["note"]


def test_pixel_threshold_rate():
    v = np.random.default_rng(2).random(100_000)
    t = decision.pixel_threshold(v, 0.001)
    assert abs((v > t["threshold"]).mean() - 0.001) <= 0.0001


def test_threshold_errors():
    with pytest.raises(ValueError, match="at least 2"):
        decision.image_threshold(np.array([1.0]), 0.01)
    with pytest.raises(ValueError, match="finite"):
        decision.image_threshold(np.array([1.0, np.nan]), 0.01)


def test_verdict_fields():
    mp = np.zeros((10, 12), np.float32)
    mp[2:4, 3:6] = 1.0
    mp[8, 11] = 0.7
    d = {"image_threshold": 2.0, "pixel_threshold": 0.5, "false_alarm_rate": 0.01, "pixel_fpr": 0.001}
    v = decision.verdict(3.0, mp, d)
    assert v["anomalous"] is True and v["normalised_score"] == 1.5 and v["threshold"] == 2.0
    assert v["n_regions"] == 2 and v["regions"][0] == {"area": 6, "bbox": [3, 2, 5, 3], "peak": 1.0,
                                                       "peak_xy": [3, 2]}
    assert decision.verdict(2.0, mp, d)["anomalous"] is False            # boundary: score must exceed
    none = decision.verdict(3.0, mp, {"image_threshold": None, "pixel_threshold": None})
    assert none["anomalous"] is None and "regions" not in none
    assert decision.verdict(-1.0, mp, {**d, "image_threshold": -2.0})["normalised_score"] is None
    assert decision.verdict(None, mp, d)["anomalous"] is None


def test_thresholds_come_from_train_good_only(tmp_path, tiny_dataset, monkeypatch):
    """Training (tau, score statistics, thresholds) and `lsr calibrate` never open a test
    image: every image opened is recorded."""
    import lsr
    import lsr.images as D
    from lsr.detect import calibrate_thresholds

    opened = []
    real_open = D.Image.open

    def spy(path, *a, **k):
        opened.append(Path(str(path)).resolve())
        return real_open(path, *a, **k)

    monkeypatch.setattr(D.Image, "open", spy)
    lsr.train(tiny_dataset, tmp_path / "run", lsr.preset("tiny", in_channels=1), device="cpu", progress=False,
              log=lambda *_: None)
    calibrate_thresholds(tmp_path / "run", false_alarm_rate=0.05)
    test_dir = (tiny_dataset / "test").resolve()
    assert opened and not [p for p in opened if test_dir in p.parents]
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())["detect"]
    assert cfg["false_alarm_rate"] == 0.05 and cfg["image_threshold"] is not None
    calib = json.loads((tmp_path / "run" / "calibration.json").read_text())
    assert calib["thresholds"]["image"]["rate"] == 0.05


def test_detect_rows_and_masks(tiny_run, tiny_dataset, tmp_path):
    import tifffile

    from lsr.cli import main

    images = sorted((tiny_dataset / "test").rglob("*.png"))
    assert main(["--no-progress", "detect", str(tiny_run), *map(str, images), "--out", str(tmp_path),
                 "--masks", "--tiff", "--no-panels"]) == 0
    cfg = json.loads((tiny_run / "config.json").read_text())["detect"]
    for line in (tmp_path / "results.jsonl").read_text().splitlines():
        r = json.loads(line)
        assert r["threshold"] == cfg["image_threshold"] and r["anomalous"] == (r["score"] > r["threshold"])
        assert r["normalised_score"] == pytest.approx(r["score"] / r["threshold"])
        full = tifffile.imread(r["map_tiff"])
        regs, n = decision.regions(full, cfg["pixel_threshold"])
        assert r["n_regions"] == n and r["regions"] == json.loads(json.dumps(regs))
        from PIL import Image
        m = np.asarray(Image.open(r["mask"]))
        np.testing.assert_array_equal(m, decision.mask(full, cfg["pixel_threshold"]))


def test_eval_operating_point(tiny_run, tiny_dataset, tmp_path):
    from lsr.cli import main

    assert main(["--no-progress", "eval", str(tiny_run), str(tiny_dataset), "--out", str(tmp_path)]) == 0
    m = json.loads((tmp_path / "metrics.json").read_text())
    op = m["operating_point"]
    rows = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    good = [r for r in rows if r["label"] == 0]
    assert op["n_good"] == len(good)
    assert op["false_alarm_rate_measured"] == pytest.approx(np.mean([r["anomalous"] for r in good]))
    lo, hi = op["false_alarm_rate_ci95"]
    assert lo <= op["false_alarm_rate_measured"] <= hi
    for kind, rate in op["detection_rate_per_defect"].items():
        assert rate == pytest.approx(np.mean([r["anomalous"] for r in rows if r["defect"] == kind]))


def test_verdicts_equal_between_run_and_onnx_bundle(tiny_run, tiny_dataset, tmp_path):
    """The PyTorch path and the onnxruntime path give the same verdicts, regions and masks
    from the same thresholds (a lowered pixel threshold, set in a gap of the map values so
    float rounding between the two cannot flip a pixel, makes regions exist)."""
    import shutil

    from PIL import Image

    from lsr.cli import main
    from lsr.deploy.export import export_bundle

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    images = sorted((tiny_dataset / "test").rglob("*.png"))
    assert main(["--no-progress", "detect", str(run), *map(str, images), "--out", str(tmp_path / "probe"),
                 "--tiff", "--no-panels"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "probe" / "results.jsonl").read_text().splitlines()]
    import tifffile
    vals = np.sort(np.concatenate([tifffile.imread(r["map_tiff"]).ravel() for r in rows]))
    lo = int(0.85 * vals.size)
    gaps = np.diff(vals[lo:int(0.95 * vals.size)])
    j = lo + int(np.argmax(gaps))
    pixel_thr = float((vals[j] + vals[j + 1]) / 2)
    image_thr = float(np.median([r["score"] for r in rows]))
    cfg = json.loads((run / "config.json").read_text())
    cfg["detect"].update(pixel_threshold=pixel_thr, image_threshold=image_thr)
    (run / "config.json").write_text(json.dumps(cfg))
    bundle = tmp_path / "bundle"
    export_bundle(run, bundle, "onnx", check=False, log=lambda *_: None)
    for src, out in ((run, "a"), (bundle, "b")):
        assert main(["--no-progress", "detect", str(src), *map(str, images), "--out", str(tmp_path / out),
                     "--masks", "--no-panels"]) == 0
    a = [json.loads(x) for x in (tmp_path / "a" / "results.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "b" / "results.jsonl").read_text().splitlines()]
    assert sum(r["n_regions"] for r in a) > 0 and len({r["anomalous"] for r in a}) == 2   # not vacuous
    for ra, rb in zip(a, b):
        assert ra["anomalous"] == rb["anomalous"] and ra["threshold"] == rb["threshold"] == image_thr
        assert ra["n_regions"] == rb["n_regions"]
        assert [(g["area"], g["bbox"], g["peak_xy"]) for g in ra["regions"]] == \
               [(g["area"], g["bbox"], g["peak_xy"]) for g in rb["regions"]]
        np.testing.assert_allclose([g["peak"] for g in ra["regions"]], [g["peak"] for g in rb["regions"]],
                                   atol=1e-4)
        np.testing.assert_array_equal(np.asarray(Image.open(ra["mask"])), np.asarray(Image.open(rb["mask"])))
