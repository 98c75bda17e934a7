"""The C++ runtime (export/, `lsr_detect`): a TorchScript bundle of the tiny run detected
without Python gives the codes, prior passes, scores and maps of the Python path
(``lsr detect RUN --resampler native``, and the same codes as ``fast``); its verdicts,
regions and masks are lsr.decision's (the one definition) and the Python bundle path's;
bad bundles and bad images give clear errors. The bad-input suite (``BAD_INPUTS``): every flag and
bundle.json value the runtime reads follows lsr.config.RULES (same words), graph files stay
inside the bundle, images above Pillow's pixel limit are refused from the header; each case
exits 2 with no C++ exception dump and leaves an earlier output folder byte-identical.

The binary is built by CMake (README "C++ runtime"); tests use ``$LSR_DETECT_BIN`` or
``export/build/lsr_detect`` and skip when neither exists, unless
``LSR_REQUIRE_CPP_RUNTIME=1`` (CI builds it first and sets that), which makes a
missing binary a failure.
"""
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import tifffile

from lsr import ops
from lsr.cli import main

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(os.environ.get("LSR_DETECT_BIN", ROOT / "export" / "build" / "lsr_detect"))

if not BIN.is_file():
    if os.environ.get("LSR_REQUIRE_CPP_RUNTIME") == "1":
        raise RuntimeError(f"{BIN}: the C++ runtime is not built (LSR_REQUIRE_CPP_RUNTIME=1); see README")
    pytest.skip(f"{BIN} not built (cmake -S export -B export/build; see README)", allow_module_level=True)
if not ops.native_available():
    pytest.skip("the native extension is not built", allow_module_level=True)


def run_bin(*args, check=True):
    p = subprocess.run([str(BIN), *map(str, args)], capture_output=True, text=True, timeout=300)
    if check:
        assert p.returncode == 0, p.stderr
    return p


@pytest.fixture(scope="module")
def ts_bundle(tiny_run, tmp_path_factory):
    from lsr.deploy.export import export_bundle

    out = tmp_path_factory.mktemp("bundles") / "grass-ts"
    export_bundle(tiny_run, out, "torchscript", log=lambda *_: None)
    return out


@pytest.fixture(scope="module")
def images(tiny_dataset):
    return sorted((tiny_dataset / "test").rglob("*.png"))


@pytest.fixture(scope="module")
def ts_feature_bundle(tiny_feature_run, tmp_path_factory):
    from lsr.deploy.export import export_bundle

    out = tmp_path_factory.mktemp("bundles") / "grass-features-ts"
    export_bundle(tiny_feature_run, out, "torchscript", log=lambda *_: None)
    return out


@pytest.mark.parametrize("mode,tau", [("pixels", None), ("pixels", 0.05), ("features", None), ("features", 0.3)])
def test_cpp_runtime_equals_python(request, images, tmp_path, mode, tau):
    """Both modes: the feature mode's encoder graph holds the backbone (and, as the feature
    presets do, the bundle draws from the posterior: version 4); the fused score uses the
    bundle's held-out statistics (null, as in Python, when tau is changed); the configured
    score (the pooled max of the map) needs none and is always a number."""
    ts_bundle = request.getfixturevalue("ts_bundle" if mode == "pixels" else "ts_feature_bundle")
    tiny_run = request.getfixturevalue("tiny_run" if mode == "pixels" else "tiny_feature_run")
    extra = [] if tau is None else ["--tau", str(tau)]
    run_bin(ts_bundle, *images, "--out", tmp_path / "cpp", "--save-codes", "--threads", "1", *extra)
    cpp = [json.loads(line) for line in (tmp_path / "cpp" / "results.jsonl").read_text().splitlines()]
    py = {}
    for m in ("native", "fast"):
        assert main(["detect", str(tiny_run), *map(str, images), "--out", str(tmp_path / m), "--resampler", m,
                     "--tiff", "--no-panels", "--no-progress", *extra]) == 0
        py[m] = [json.loads(line) for line in (tmp_path / m / "results.jsonl").read_text().splitlines()]
    from lsr.detect import Detector
    import torch

    det = Detector.load(tiny_run, "cpu").with_options(**({} if tau is None else {"tau": tau}))
    x, _ = det.load_batch(images)
    res = det.detect(x)
    assert len(cpp) == len(images) and sum(r["prior_passes"] > 1 for r in cpp) >= 2   # the loop ran
    for i, (c, p) in enumerate(zip(cpp, py["native"])):
        assert c["image"] == p["image"] == str(images[i])
        assert c["resampled_codes"] == res.resampled_codes[i].flatten().tolist()
        for key in ("prior_passes", "positions_evaluated", "n_codes"):
            assert c[key] == p[key], key
        assert py["fast"][i]["n_resampled"] == c["n_resampled"]
        for key in ("score", "nll_score", "direct_score", "n_resampled", "fused_score"):
            fused = key == "fused_score"
            if p[key] is None or (fused and tau is not None):
                # another tau: a bundle has no held-out statistics for it (null, as the Python
                # bundle path; `lsr detect RUN` sets them again from the run's held-out images)
                assert c[key] is None, key
            else:
                tol = 1e-5 if mode == "pixels" else 1e-3         # the backbone's convolutions round differently
                assert c[key] == pytest.approx(p[key], rel=tol, abs=tol), key
        if mode == "features":
            assert (c["fused_score"] is None) == (tau is not None) and c["score"] is not None
        raw = np.fromfile(c["map_raw"], dtype=np.float32).reshape(c["map_shape"])
        np.testing.assert_allclose(raw, tifffile.imread(p["map_tiff"]), atol=1e-5 if mode == "pixels" else 1e-3)
        assert Path(c["map_png"]).is_file()
    assert torch.equal(res.resampled_codes,
                       torch.tensor([c["resampled_codes"] for c in cpp]).view_as(res.resampled_codes))
    if tau is None:     # the run's operating point is the bundle's (another tau: the run sets it again)
        for c, p in zip(cpp, py["native"]):
            for key in ("anomalous", "threshold", "false_alarm_rate", "pixel_threshold", "pixel_fpr", "n_regions"):
                assert c[key] == p[key], key
            assert c["threshold"] is not None and c["pixel_threshold"] is not None


def test_cpp_runtime_posterior_draw_equals_python(tiny_feature_run, images, tmp_path):
    """A version-4 bundle (the posterior draw): the runtime's codes are the run's, and a
    bundle without its code_distances graph is refused."""
    from lsr.deploy.export import export_bundle
    from lsr.detect import Detector

    out = tmp_path / "post-ts"
    export_bundle(tiny_feature_run, out, "torchscript", options={"posterior": 2.0, "tau": 0.3}, log=lambda *_: None)
    run_bin(out, *images, "--out", tmp_path / "cpp", "--save-codes", "--threads", "1")
    cpp = [json.loads(line) for line in (tmp_path / "cpp" / "results.jsonl").read_text().splitlines()]
    det = Detector.load(tiny_feature_run, "cpu").with_options(posterior=2.0, tau=0.3)
    x, _ = det.load_batch(images)
    res = det.detect(x)
    assert int(res.n_resampled.sum()) >= 4                                  # the draw ran
    assert [c["resampled_codes"] for c in cpp] == res.resampled_codes.flatten(1).tolist()
    prior_draw = Detector.load(tiny_feature_run, "cpu").with_options(tau=0.3, posterior=0.0).detect(x)
    assert prior_draw.resampled_codes.flatten(1).tolist() != [c["resampled_codes"] for c in cpp]
    meta = json.loads((out / "bundle.json").read_text())
    del meta["graphs"]["code_distances"]
    (out / "bundle.json").write_text(json.dumps(meta))
    p = run_bin(out, images[0], "--out", tmp_path / "cpp2", check=False)
    assert p.returncode == 2 and "the bundle has no code_distances graph" in p.stderr, p.stderr


def test_cpp_runtime_resizes_like_python(ts_bundle, tiny_run, images, tmp_path):
    """An image at another size goes through the same (Pillow-style) resize; the map
    comes back at the image's own size."""
    from PIL import Image

    big = tmp_path / "big.png"
    Image.open(images[-1]).convert("RGB").resize((45, 51), Image.Resampling.NEAREST).save(big)
    run_bin(ts_bundle, big, "--out", tmp_path / "cpp", "--save-codes")
    assert main(["detect", str(tiny_run), str(big), "--out", str(tmp_path / "py"), "--resampler", "native",
                 "--tiff", "--no-panels", "--no-progress"]) == 0
    c = json.loads((tmp_path / "cpp" / "results.jsonl").read_text())
    p = json.loads((tmp_path / "py" / "results.jsonl").read_text())
    assert c["map_shape"] == [51, 45]
    assert c["prior_passes"] == p["prior_passes"]
    assert c["score"] == pytest.approx(p["score"], rel=1e-4, abs=1e-6)
    raw = np.fromfile(c["map_raw"], dtype=np.float32).reshape(51, 45)
    np.testing.assert_allclose(raw, tifffile.imread(p["map_tiff"]), atol=1e-4)


def _copy(bundle, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(bundle, dst)
    return dst


def test_cpp_runtime_bad_bundles_and_images(ts_bundle, images, tmp_path):
    b = _copy(ts_bundle, tmp_path)
    (b / "prior.pt").unlink()
    p = run_bin(b, images[0], "--out", tmp_path / "o", check=False)
    assert p.returncode == 2 and "prior.pt" in p.stderr and "missing" in p.stderr

    b = _copy(ts_bundle, tmp_path / "2")
    with open(b / "decoder.pt", "ab") as f:
        f.write(b"x")
    p = run_bin(b, images[0], "--out", tmp_path / "o", check=False)
    assert p.returncode == 2 and "decoder.pt" in p.stderr and "sha256" in p.stderr

    b = _copy(ts_bundle, tmp_path / "3")
    meta = json.loads((b / "bundle.json").read_text())
    meta["bundle_version"] = 99
    (b / "bundle.json").write_text(json.dumps(meta))
    p = run_bin(b, images[0], "--out", tmp_path / "o", check=False)
    assert p.returncode == 2 and "bundle.json" in p.stderr and "version 99" in p.stderr

    meta["bundle_version"] = 2                      # before the one graph contract of version 3
    (b / "bundle.json").write_text(json.dumps(meta))
    p = run_bin(b, images[0], "--out", tmp_path / "o", check=False)
    assert p.returncode == 2 and "version 2" in p.stderr and "re-export" in p.stderr

    meta["bundle_version"], meta["format"] = 3, "onnx"
    (b / "bundle.json").write_text(json.dumps(meta))
    p = run_bin(b, images[0], "--out", tmp_path / "o", check=False)
    assert p.returncode == 2 and "TorchScript" in p.stderr

    (b / "bundle.json").write_text("{not json")
    p = run_bin(b, images[0], "--out", tmp_path / "o", check=False)
    assert p.returncode == 2 and "bundle.json" in p.stderr and "invalid JSON" in p.stderr

    p = run_bin(tmp_path / "nope", images[0], "--out", tmp_path / "o", check=False)
    assert p.returncode == 2 and "nope" in p.stderr

    bad = tmp_path / "broken.png"
    bad.write_bytes(images[0].read_bytes()[:60])
    p = run_bin(ts_bundle, bad, "--out", tmp_path / "o", check=False)
    assert p.returncode == 2 and "broken.png" in p.stderr
    assert not (tmp_path / "o" / "results.jsonl").exists()        # nothing half-written

    p = run_bin(ts_bundle, "--out", tmp_path / "o", check=False)
    assert p.returncode == 2 and "usage" in p.stderr


def test_cpp_runtime_keeps_finished_work(ts_bundle, images, tmp_path):
    """Every input is decoded once before any work (a missing or cut image fails with
    nothing written, see test_cpp_runtime_refuses_bad_input). A failure during the work (here
    a map that cannot be written: a folder is in the way of its temporary file) keeps what is
    finished: the maps and rows of the images before it, the rows in results.partial.jsonl;
    the results.jsonl of an earlier command is left as it was. No temporary files are left."""
    out = tmp_path / "o"
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    shutil.copy(images[0], a)
    shutil.copy(images[1], b)
    out.mkdir()
    (out / "results.jsonl").write_text('{"image": "earlier"}\n')
    (out / "b_map.f32.tmp").mkdir()                                # blocks the map of b.png
    p = run_bin(ts_bundle, a, b, "--out", out, "--batch-size", "1", check=False)
    assert p.returncode == 2 and "b_map.f32" in p.stderr and "cannot write" in p.stderr, p.stderr
    assert "results of the 1 images before it written to" in p.stderr and "results.partial.jsonl" in p.stderr
    _no_crash(p.stderr)
    assert (out / "results.jsonl").read_text() == '{"image": "earlier"}\n'
    rows = [json.loads(line) for line in (out / "results.partial.jsonl").read_text().splitlines()]
    assert [r["image"] for r in rows] == [str(a)]
    assert all(Path(r["map_png"]).is_file() and Path(r["map_raw"]).is_file() for r in rows)
    assert not [f for f in out.glob("*.tmp") if f.is_file()]
    # the next command that succeeds replaces results.jsonl and removes the stale partial rows
    (out / "b_map.f32.tmp").rmdir()
    run_bin(ts_bundle, a, b, "--out", out, "--batch-size", "1")
    assert [json.loads(line)["image"] for line in (out / "results.jsonl").read_text().splitlines()] == [str(a), str(b)]
    assert not (out / "results.partial.jsonl").exists()


# ---- bad input: every value the runtime reads follows lsr.config.RULES ----------------

def test_cpp_runtime_rules_match_python():
    """The runtime's rules (lsr_detect --rules) are lsr.config's, word for word; the pixel
    limit is Pillow's default, as the Python path's."""
    from PIL import Image

    from lsr.config import BUNDLE_RULES, OPTION_RULES, RULES

    lines = [line.split("\t") for line in run_bin("--rules").stdout.splitlines()]
    assert len(lines) >= 14
    seen = set()
    for key, py_key, rule in lines:
        if key == "image pixels":
            from lsr import data
            assert rule == f"at most {getattr(data, 'MAX_PIXELS', Image.MAX_IMAGE_PIXELS)}" == "at most 89478485"
            assert Image.MAX_IMAGE_PIXELS == 89478485
            continue
        py = (RULES.get(py_key) or OPTION_RULES.get(py_key) or BUNDLE_RULES[py_key]).describe()
        # tau is optional in a run (null before calibration); a bundle always has one
        assert rule == (py.removesuffix(" (or null)") if key in ("detect.tau", "--tau") else py), key
        seen.add(key)
    assert {"--batch-size", "--threads", "--tau", "--seed", "--restorations", "detect.tau", "detect.temperature",
            "detect.seed", "detect.restorations", "model.image_size", "model.channels", "model.grid_size",
            "model.codebook_size", "detect.false_alarm_rate", "detect.pixel_fpr", "detect.image_threshold",
            "detect.pixel_threshold", "detect.score_mean", "detect.nll_std", "model.seen_channels",
            "model.seen_size"} <= seen


def _no_crash(stderr):
    for bad in ("terminate called", "what():", "Traceback", "Exception raised from", "frame #", "Aborted"):
        assert bad not in stderr, stderr


def _snapshot(folder):
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))} if folder.is_dir() else (
        folder.read_bytes() if folder.exists() else None)


def _edited_bundle(ts_bundle, tmp_path, edit):
    """A copy of the bundle with bundle.json edited by ``edit(meta, folder)`` (which may
    return the file's new text instead); written by Python's json, so NaN is the literal
    ``NaN``."""
    b = tmp_path / "bundle"
    shutil.copytree(ts_bundle, b)
    meta = json.loads((b / "bundle.json").read_text())
    text = edit(meta, b)
    (b / "bundle.json").write_text(text if isinstance(text, str) else json.dumps(meta))
    return b


def _raw(old, new):
    """An edit of bundle.json's text (a literal Python's json would not write)."""
    def edit(meta, _):
        text = json.dumps(meta)
        assert old in text
        return text.replace(old, new)
    return edit


def _set(dotted, value):
    def edit(meta, _):
        *parents, last = dotted.split(".")
        d = meta
        for k in parents:
            d = d[k]
        d[last] = value
    return edit


def _drop(dotted):
    def edit(meta, _):
        *parents, last = dotted.split(".")
        d = meta
        for k in parents:
            d = d[k]
        del d[last]
    return edit


def _symlink_out(meta, b):
    """graphs.encoder.file: a symbolic link to a copy of the encoder outside the bundle
    (same bytes, so the sha256 matches: only the link is wrong)."""
    outside = b.parent / "outside.pt"
    shutil.copy(b / "encoder.pt", outside)
    (b / "link.pt").symlink_to(outside)
    meta["graphs"]["encoder"]["file"] = "link.pt"


def _image(kind, tmp_path, images):
    if kind == "huge":                       # 20000 x 20000 pixels, a few hundred KB on disk
        from PIL import Image

        path = tmp_path / "huge.png"
        old = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            Image.new("1", (20000, 20000)).save(path)
        finally:
            Image.MAX_IMAGE_PIXELS = old
        assert path.stat().st_size < 2_000_000
        return path
    if kind == "cut":                        # header intact, pixels cut short
        data = images[0].read_bytes()
        path = tmp_path / "cut.png"
        path.write_bytes(data[:data.index(b"IDAT") + 20])
        return path
    if kind == "text":
        path = tmp_path / "notes.png"
        path.write_text("not an image")
        return path
    return tmp_path / "missing.png"


_FLAG = "must be an integer in [1, 4096]"
_TAU = "--tau: must be a finite number in (0, 1), got"
_SEED = "--seed: must be an integer in [0, 9223372036854775806], got"
_REST = "--restorations: must be an integer in [1, 64], got"
_RATE = "must be a finite number in (0, 0.5], got"
_THR = "must be a finite number in [-1000000000000, 1000000000000] (or null), got"

# (id, extra flags, bundle.json edit, image kind, text the error must hold)
BAD_INPUTS = [
    ("batch-size-0", ["--batch-size", "0"], None, None, [f"--batch-size: {_FLAG}, got 0"]),
    ("batch-size-neg", ["--batch-size", "-1"], None, None, [f"--batch-size: {_FLAG}, got -1"]),
    ("batch-size-abc", ["--batch-size", "abc"], None, None, [f"--batch-size: {_FLAG}, got 'abc'"]),
    ("batch-size-float", ["--batch-size", "1.5"], None, None, [f"--batch-size: {_FLAG}, got '1.5'"]),
    ("batch-size-suffix", ["--batch-size", "12abc"], None, None, [f"--batch-size: {_FLAG}, got '12abc'"]),
    ("batch-size-huge", ["--batch-size", "99999999999999999999"], None, None, ["--batch-size: must be"]),
    ("batch-size-no-value", ["--batch-size"], None, None, ["--batch-size: needs a value"]),
    ("threads-abc", ["--threads", "abc"], None, None, ["--threads: must be an integer in [0, 4096], got 'abc'"]),
    ("threads-neg", ["--threads", "-2"], None, None, ["--threads: must be an integer in [0, 4096], got -2"]),
    ("tau-nan", ["--tau", "nan"], None, None, [f"{_TAU} nan"]),
    ("tau-neg", ["--tau", "-1"], None, None, [f"{_TAU} -1"]),
    ("tau-0", ["--tau", "0"], None, None, [f"{_TAU} 0"]),
    ("tau-1", ["--tau", "1"], None, None, [f"{_TAU} 1"]),
    ("tau-inf", ["--tau", "inf"], None, None, [f"{_TAU} inf"]),
    ("tau-abc", ["--tau", "abc"], None, None, [f"{_TAU} 'abc'"]),
    ("tau-hex", ["--tau", "0x1p-3"], None, None, [f"{_TAU} '0x1p-3'"]),
    ("seed-neg", ["--seed", "-5"], None, None, [f"{_SEED} -5"]),
    ("seed-abc", ["--seed", "abc"], None, None, [f"{_SEED} 'abc'"]),
    ("seed-2^63", ["--seed", str(2 ** 63)], None, None, [f"{_SEED} {2 ** 63}"]),
    ("restorations-0", ["--restorations", "0"], None, None, [f"{_REST} 0"]),
    ("restorations-65", ["--restorations", "65"], None, None, [f"{_REST} 65"]),
    ("restorations-abc", ["--restorations", "abc"], None, None, [f"{_REST} 'abc'"]),
    ("device-foo", ["--device", "foo"], None, None, ["--device: must be one of cpu, cuda"]),
    ("unknown-option", ["--frobnicate"], None, None, ["unknown option --frobnicate"]),
    ("json-tau-nan", [], _set("detect.tau", float("nan")), None,
     ["bundle.json: detect.tau: must be a finite number in (0, 1), got NaN"]),
    ("json-tau-inf", [], _set("detect.tau", float("inf")), None, ["bundle.json: detect.tau: must be", "Infinity"]),
    ("json-tau-1", [], _set("detect.tau", 1.0), None, ["bundle.json: detect.tau: must be"]),
    ("json-tau-null", [], _set("detect.tau", None), None, ["bundle.json: detect.tau: must be", "got None"]),
    ("json-temperature-0", [], _set("detect.temperature", 0), None,
     ["bundle.json: detect.temperature: must be a finite number in (0, 1000], got 0"]),
    ("json-seed-neg", [], _set("detect.seed", -5), None,
     ["bundle.json: detect.seed: must be an integer in [0, 9223372036854775806], got -5"]),
    ("json-seed-float", [], _set("detect.seed", 1.5), None, ["bundle.json: detect.seed: must be an integer"]),
    ("json-restorations-1e12", [], _set("detect.restorations", 1e12), None,
     ["bundle.json: detect.restorations: must be an integer in [1, 64], got 1000000000000.0"]),
    ("json-restorations-1e12-literal", [], _raw('"restorations": 1,', '"restorations": 1e12,'), None,
     ["bundle.json: detect.restorations: must be an integer in [1, 64], got 1e12"]),
    ("json-restorations-1.0", [], _raw('"restorations": 1,', '"restorations": 1.0,'), None,
     ["bundle.json: detect.restorations: must be an integer in [1, 64], got 1.0"]),
    ("json-seed-hex", [], _raw('"seed": 0,', '"seed": 0x10,'), None, ["bundle.json: invalid JSON at byte"]),
    ("json-tau-nan-lowercase", [], _raw('"tau": ', '"tau": nan, "x": '), None, ["bundle.json: invalid JSON at byte"]),
    ("json-restorations-0", [], _set("detect.restorations", 0), None,
     ["bundle.json: detect.restorations: must be an integer in [1, 64], got 0"]),
    ("json-no-image-size", [], _drop("model.image_size"), None, ["bundle.json: missing key model.image_size"]),
    ("json-false-alarm-rate-0", [], _set("detect.false_alarm_rate", 0), None,
     [f"bundle.json: detect.false_alarm_rate: {_RATE} 0"]),
    ("json-false-alarm-rate-0.6", [], _set("detect.false_alarm_rate", 0.6), None,
     [f"bundle.json: detect.false_alarm_rate: {_RATE} 0.6"]),
    ("json-false-alarm-rate-null", [], _set("detect.false_alarm_rate", None), None,
     [f"bundle.json: detect.false_alarm_rate: {_RATE} None"]),
    ("json-false-alarm-rate-str", [], _set("detect.false_alarm_rate", "0.01"), None,
     [f"bundle.json: detect.false_alarm_rate: {_RATE} '0.01'"]),
    ("json-pixel-fpr-nan", [], _set("detect.pixel_fpr", float("nan")), None,
     [f"bundle.json: detect.pixel_fpr: {_RATE} NaN"]),
    ("json-pixel-fpr-neg", [], _set("detect.pixel_fpr", -0.001), None,
     [f"bundle.json: detect.pixel_fpr: {_RATE} -0.001"]),
    ("json-pixel-fpr-true", [], _set("detect.pixel_fpr", True), None, [f"bundle.json: detect.pixel_fpr: {_RATE} True"]),
    ("json-image-threshold-nan", [], _set("detect.image_threshold", float("nan")), None,
     [f"bundle.json: detect.image_threshold: {_THR} NaN"]),
    ("json-image-threshold-inf", [], _set("detect.image_threshold", float("-inf")), None,
     [f"bundle.json: detect.image_threshold: {_THR} -Infinity"]),
    ("json-image-threshold-huge", [], _raw('"image_threshold": ', '"image_threshold": 1e13, "x": '), None,
     [f"bundle.json: detect.image_threshold: {_THR} 1e13"]),
    ("json-image-threshold-str", [], _set("detect.image_threshold", "0.4"), None,
     [f"bundle.json: detect.image_threshold: {_THR} '0.4'"]),
    ("json-pixel-threshold-array", [], _set("detect.pixel_threshold", [0.2]), None,
     [f"bundle.json: detect.pixel_threshold: {_THR} an array"]),
    ("json-pixel-threshold-false", [], _set("detect.pixel_threshold", False), None,
     [f"bundle.json: detect.pixel_threshold: {_THR} False"]),
    ("json-posterior-claimed", [], _set("detect.posterior", 1.0), None,
     ["bundle.json: detect.posterior is 1", "in a version-3 bundle, which draws from the prior alone"]),
    ("json-posterior-scale-0", [], _set("detect.posterior_scale", 0.0), None,
     ["bundle.json: detect.posterior_scale: must be a finite number in (0, 1000000000000] (or null), got 0"]),
    ("json-posterior-negative", [], _set("detect.posterior", -1.0), None,
     ["bundle.json: detect.posterior: must be a finite number in [0, 1000], got -1"]),
    ("json-image-size-str", [], _set("model.image_size", "32"), None,
     ["bundle.json: model.image_size: must be an integer in [8, 4096], got '32'"]),
    ("json-image-size-0", [], _set("model.image_size", 0), None, ["bundle.json: model.image_size: must be"]),
    ("json-channels-2", [], _set("model.channels", 2), None, ["bundle.json: model.channels: must be 1 or 3"]),
    ("json-grid-0", [], _set("model.grid_size", 0), None, ["bundle.json: model.grid_size: must be"]),
    ("json-codebook-1", [], _set("model.codebook_size", 1), None, ["bundle.json: model.codebook_size: must be"]),
    ("json-seen-size-str", [], _set("model.seen_size", "32"), None,
     ["bundle.json: model.seen_size: must be an integer in [1, 65536], got '32'"]),
    ("json-seen-channels-wrong", [], _set("model.seen_channels", 3), None,
     ["bundle.json: model.seen_channels/seen_size (3, 32) do not match the encoder graph"]),
    ("json-model-array", [], _set("model", []), None, ["bundle.json: model: must be a JSON object"]),
    ("json-no-detect", [], _drop("detect"), None, ["bundle.json: missing key detect"]),
    ("json-graphs-empty", [], _set("graphs", []), None, ["bundle.json: graphs: must be a JSON object"]),
    ("json-graphs-no-prior", [], _drop("graphs.prior"), None, ["bundle.json: missing key graphs.prior"]),
    ("json-graph-dotdot", [], _set("graphs.encoder.file", "../x.pt"), None,
     ["bundle.json: graphs.encoder.file: must be a plain file name inside the bundle folder, got '../x.pt'"]),
    ("json-graph-absolute", [], _set("graphs.decoder.file", "/etc/passwd"), None,
     ["bundle.json: graphs.decoder.file: must be a plain file name", "'/etc/passwd'"]),
    ("json-graph-subfolder", [], _set("graphs.prior.file", "sub/prior.pt"), None,
     ["bundle.json: graphs.prior.file: must be a plain file name"]),
    ("json-graph-symlink-out", [], _symlink_out, None,
     ["bundle.json: graphs.encoder.file: must be a plain file name", "symbolic link"]),
    ("json-graph-file-number", [], _set("graphs.encoder.file", 3), None,
     ["bundle.json: graphs.encoder.file: must be a string, got 3"]),
    ("json-not-object", [], lambda m, b: (m.clear()), None, ["bundle.json: missing key bundle_version"]),
    ("image-20000x20000", [], None, "huge", ["huge.png: image too large (20000 x 20000 = 400000000 pixels; the limit is 89478485"]),
    ("image-truncated", [], None, "cut", ["cut.png: cannot decode PNG, the file is truncated or corrupt"]),
    ("image-not-png", [], None, "text", ["notes.png: not a PNG file"]),
    ("image-missing", [], None, "missing", ["missing.png: cannot open"]),
]


@pytest.fixture(scope="module")
def earlier_out(ts_bundle, images, tmp_path_factory):
    """An output folder of a finished lsr_detect (results.jsonl, maps) plus a bystander file."""
    out = tmp_path_factory.mktemp("earlier") / "out"
    run_bin(ts_bundle, images[0], images[1], "--out", out)
    (out / "notes.txt").write_text("someone else's file\n")
    return out


@pytest.mark.parametrize("flags, edit, image, expect", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_cpp_runtime_refuses_bad_input(ts_bundle, images, earlier_out, tmp_path, flags, edit, image, expect):
    """Each bad flag, bundle.json value or image: exit 2, a one-line error naming the option
    or the file and the rule (lsr.config's wording), no C++ exception dump, and the output
    folder of an earlier command byte-identical (nothing written, not even a temporary)."""
    out = tmp_path / "out"
    shutil.copytree(earlier_out, out)
    before = _snapshot(out)
    bundle = _edited_bundle(ts_bundle, tmp_path, edit) if edit else ts_bundle
    inputs = [images[0], _image(image, tmp_path, images)] if image else [images[0]]
    p = run_bin(bundle, *inputs, "--out", out, *flags, check=False)
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert p.stderr.startswith("lsr_detect: error: "), p.stderr
    for text in expect:
        assert text in p.stderr, (text, p.stderr)
    _no_crash(p.stderr)
    assert p.stdout == ""
    assert _snapshot(out) == before


def test_cpp_runtime_out_is_a_file(ts_bundle, images, tmp_path):
    out = tmp_path / "results.txt"
    out.write_text("keep me\n")
    p = run_bin(ts_bundle, images[0], "--out", out, check=False)
    assert p.returncode == 2 and "--out" in p.stderr and "not a folder" in p.stderr, p.stderr
    _no_crash(p.stderr)
    assert out.read_text() == "keep me\n"


def test_cpp_runtime_accepts_edge_values(ts_bundle, images, tmp_path):
    """The bounds themselves are valid; "+3" and "007" are integers, as for Python's int()."""
    b = _edited_bundle(ts_bundle, tmp_path, _set("detect.seed", 2 ** 63 - 2))
    p = run_bin(b, images[0], "--out", tmp_path / "o", "--batch-size", "4096", "--threads", "0",
                "--restorations", "+1", "--tau", "0.5", check=False)
    assert p.returncode == 0, p.stderr
    p = run_bin(ts_bundle, images[0], "--out", tmp_path / "o2", "--seed", "9223372036854775806",
                "--restorations", "002", "--batch-size", "1", check=False)
    assert p.returncode == 0, p.stderr
    assert len((tmp_path / "o2" / "results.jsonl").read_text().splitlines()) == 1


@pytest.mark.parametrize("seed", [5, 2 ** 63 - 2])
def test_cpp_runtime_seed_equals_python(ts_bundle, tiny_run, images, tmp_path, seed):
    """--seed N draws the noise of Python's seed N (negative seeds are refused by both)."""
    import torch

    from lsr.detect import Detector

    some = images[:3]
    run_bin(ts_bundle, *some, "--out", tmp_path / "cpp", "--save-codes", "--seed", str(seed), "--threads", "1")
    cpp = [json.loads(line) for line in (tmp_path / "cpp" / "results.jsonl").read_text().splitlines()]
    det = Detector.load(tiny_run, "cpu").with_options(seed=seed)
    x, _ = det.load_batch(some)
    res = det.detect(x)
    for i, c in enumerate(cpp):
        assert c["resampled_codes"] == res.resampled_codes[i].flatten().tolist()
    seed0 = Detector.load(tiny_run, "cpu").with_options(seed=0).detect(x)
    assert not torch.equal(res.resampled_codes, seed0.resampled_codes)   # the seed mattered


def _png_adam7(path, arr):
    """An interlaced (Adam7) 8-bit grey PNG of ``arr`` (H, W) uint8, written by hand."""
    import struct
    import zlib
    h, w = arr.shape
    raw = b""
    for x0, y0, dx, dy in ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2),
                           (0, 1, 1, 2)):
        sub = arr[y0::dy, x0::dx]
        if sub.size:
            raw += b"".join(b"\x00" + row.tobytes() for row in sub)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 1))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_cpp_runtime_reads_interlaced_pngs(ts_bundle, images, tmp_path):
    """An interlaced PNG is checked and read (de-interlaced) as the same image saved plainly."""
    from PIL import Image

    arr = np.asarray(Image.open(images[2]).convert("L").resize((37, 29)), dtype=np.uint8)
    _png_adam7(tmp_path / "adam7.png", arr)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "adam7.png")), arr)
    Image.fromarray(arr).save(tmp_path / "plain.png")
    a, b = ({}, {})
    for name, row in (("adam7", a), ("plain", b)):     # each as image 0: the same noise
        run_bin(ts_bundle, tmp_path / f"{name}.png", "--out", tmp_path / name, "--save-codes")
        row.update(json.loads((tmp_path / name / "results.jsonl").read_text()))
    assert a["map_shape"] == b["map_shape"] == [29, 37]
    for key in ("score", "nll_score", "prior_passes", "resampled_codes"):
        assert a[key] == b[key], key
    np.testing.assert_array_equal(np.fromfile(a["map_raw"], dtype=np.float32),
                                  np.fromfile(b["map_raw"], dtype=np.float32))


def test_cpp_runtime_rejects_deeply_nested_bundle_json(ts_bundle, images, tmp_path):
    b = _copy(ts_bundle, tmp_path)
    (b / "bundle.json").write_text("[" * 100000 + "]" * 100000)
    p = run_bin(b, images[0], "--out", tmp_path / "o", check=False)
    assert p.returncode == 2 and "bundle.json" in p.stderr and "nested deeper than 64" in p.stderr
    (b / "bundle.json").write_text('{"a": "\\uZZZZ"}')
    p = run_bin(b, images[0], "--out", tmp_path / "o", check=False)
    assert p.returncode == 2 and "bad \\u escape" in p.stderr


def test_native_prior_of_a_bundle_is_checked(ts_bundle, images, tmp_path):
    """prior_native.pt (used by the C++ runtime and by Python's TorchScript runner when the
    extension is loaded) is hash-checked like the four graphs."""
    from lsr.deploy import Inferencer
    from lsr.deploy.bundle import BundleError

    meta = json.loads((ts_bundle / "bundle.json").read_text())
    assert "prior_native" in meta["graphs"]
    assert "native prior" in Inferencer(ts_bundle).providers[0]
    b = _copy(ts_bundle, tmp_path)
    with open(b / "prior_native.pt", "ab") as f:
        f.write(b"x")
    p = run_bin(b, images[0], "--out", tmp_path / "o", check=False)
    assert p.returncode == 2 and "prior_native.pt" in p.stderr and "sha256" in p.stderr
    with pytest.raises(BundleError, match="prior_native.pt"):
        Inferencer(b)


def _png16(path, arr):
    """A 16-bit PNG (grey (H, W) or RGB (H, W, 3) uint16), written by hand (Pillow cannot)."""
    import struct
    import zlib
    h, w = arr.shape[:2]
    colour = 2 if arr.ndim == 3 else 0
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("colour", [False, True], ids=["grey16", "rgb16"])
def test_cpp_runtime_reads_16bit_pngs_like_python(ts_bundle, tiny_run, tmp_path, colour):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 65536, size=(32, 32, 3) if colour else (32, 32), dtype=np.uint16)
    img = tmp_path / "x16.png"
    _png16(img, arr)
    run_bin(ts_bundle, img, "--out", tmp_path / "cpp")
    assert main(["detect", str(tiny_run), str(img), "--out", str(tmp_path / "py"), "--resampler", "native",
                 "--tiff", "--no-panels", "--no-progress"]) == 0
    c = json.loads((tmp_path / "cpp" / "results.jsonl").read_text())
    p = json.loads((tmp_path / "py" / "results.jsonl").read_text())
    assert c["prior_passes"] == p["prior_passes"] and c["n_resampled"] == p["n_resampled"]
    assert c["score"] == pytest.approx(p["score"], rel=1e-5, abs=1e-6)


# ---- verdicts, regions and masks (lsr.decision, issue 13) -------------------------------

def _rows(folder):
    return [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]


def _cpp_map(row):
    return np.fromfile(row["map_raw"], dtype=np.float32).reshape(row["map_shape"])


def _gap_threshold(maps, q):
    """A pixel threshold near the q-quantile of the maps' pixels, in the middle of the widest
    gap between neighbouring values there (so maps that agree to well within half the gap
    give the same regions); (threshold, half the gap)."""
    v = np.unique(np.concatenate([m.ravel() for m in maps]).astype(np.float64))
    lo, hi = int((q - 0.02) * v.size), int((q + 0.02) * v.size)
    k = lo + int(np.argmax(np.diff(v[lo:hi + 1])))
    return float((v[k] + v[k + 1]) / 2), float((v[k + 1] - v[k]) / 2)


def _expect_verdict(c, want, regions_exact=True):
    """The verdict fields of a C++ row ``c`` against ``want`` (lsr.decision.verdict or a
    Python row)."""
    for key in ("anomalous", "threshold", "false_alarm_rate", "pixel_threshold", "pixel_fpr"):
        assert c[key] == want[key], (key, c[key], want[key])
    if want["normalised_score"] is None:
        assert c["normalised_score"] is None
    else:
        assert c["normalised_score"] == pytest.approx(want["normalised_score"], rel=1e-6)
    assert ("regions" in c) == ("regions" in want) == (want["pixel_threshold"] is not None)
    if "regions" in want:
        assert c["n_regions"] == want["n_regions"] and len(c["regions"]) == len(want["regions"])
        for rc, rw in zip(c["regions"], want["regions"]):
            assert set(rc) == {"area", "bbox", "peak", "peak_xy"}
            assert (rc["area"], rc["bbox"], rc["peak_xy"]) == (rw["area"], rw["bbox"], rw["peak_xy"])
            if regions_exact:          # the same float32 map: the same float32 peak
                assert rc["peak"] == rw["peak"]
            else:
                assert rc["peak"] == pytest.approx(rw["peak"], rel=1e-5, abs=1e-6)


@pytest.fixture(scope="module")
def verdict_images(images, tmp_path_factory):
    """The test images and one at another size (its map is resized to 51 x 45 pixels)."""
    from PIL import Image

    big = tmp_path_factory.mktemp("sizes") / "big.png"
    Image.open(images[-1]).convert("RGB").resize((45, 51), Image.Resampling.NEAREST).save(big)
    return [*images, big]


@pytest.fixture(scope="module")
def exported_rows(ts_bundle, verdict_images, tmp_path_factory):
    out = tmp_path_factory.mktemp("verdicts") / "exported"
    run_bin(ts_bundle, *verdict_images, "--out", out, "--threads", "1")
    return _rows(out)


@pytest.mark.parametrize("case", ["exported", "lowered", "zero"])
def test_cpp_runtime_verdicts_equal_python(ts_bundle, verdict_images, exported_rows, tmp_path, case):
    """Each C++ row's verdict is lsr.decision.verdict of its own map and score (so regions,
    labels and their order follow the one definition exactly) and the Python bundle path's
    (``lsr detect BUNDLE --masks``: the maps agree end to end); --masks writes
    lsr.decision.mask of the map. ``exported``: the bundle's operating point (on these
    images, typically nothing rejected and no region); ``lowered``: the pixel threshold near the 90th
    percentile of the maps and the image threshold at the median score, so images are
    rejected and passed and have several regions; ``zero``: image threshold 0 (no
    normalised score) and a pixel threshold below every map value (one region, the whole
    image)."""
    from PIL import Image

    from lsr import decision

    maps = [_cpp_map(r) for r in exported_rows]
    margin = None
    if case == "exported":
        bundle = ts_bundle
    else:
        if case == "lowered":
            pt, margin = _gap_threshold(maps, 0.9)
            it = float(np.median([r["score"] for r in exported_rows]))
        else:
            pt, it = float(min(m.min() for m in maps)) - 1.0, 0.0

        def edit(meta, _):
            meta["detect"].update(pixel_threshold=pt, image_threshold=it)
        bundle = _edited_bundle(ts_bundle, tmp_path, edit)
    detect = json.loads((bundle / "bundle.json").read_text())["detect"]
    run_bin(bundle, *verdict_images, "--out", tmp_path / "cpp", "--masks", "--threads", "1")
    cpp = _rows(tmp_path / "cpp")
    assert main(["detect", str(bundle), *map(str, verdict_images), "--out", str(tmp_path / "py"), "--masks",
                 "--tiff", "--no-panels", "--no-progress"]) == 0
    py = _rows(tmp_path / "py")
    assert len(cpp) == len(py) == len(verdict_images)
    for c, p in zip(cpp, py):
        raw = _cpp_map(c)
        # the score as the runtime had it (float32, written with 9 digits)
        want = decision.verdict(float(np.float32(c["score"])), raw, detect)
        _expect_verdict(c, want)
        py_map = tifffile.imread(p["map_tiff"])
        assert c["score"] == pytest.approx(p["score"], rel=1e-6)
        np.testing.assert_allclose(raw, py_map, atol=1e-5)
        if margin is not None:       # the maps agree well within the threshold's gap
            assert np.abs(raw.astype(np.float64) - py_map).max() < margin / 4
        _expect_verdict(c, p, regions_exact=False)
        mask = np.asarray(Image.open(c["mask"]))
        assert Path(c["mask"]).parent == tmp_path / "cpp" / "masks" and Path(c["mask"]).name == Path(p["mask"]).name
        assert mask.dtype == np.uint8 and mask.shape == raw.shape
        np.testing.assert_array_equal(mask, decision.mask(raw, detect["pixel_threshold"]))
        np.testing.assert_array_equal(mask, np.asarray(Image.open(p["mask"])))
    rejected = [c["anomalous"] for c in cpp]
    n_regions = [c["n_regions"] for c in cpp]
    if case == "exported":
        assert None not in rejected
    elif case == "lowered":
        assert True in rejected and False in rejected
        assert max(n_regions) >= 2 and sum(n_regions) >= 4
        assert any(0 < mask.mean() < 255 for mask in (np.asarray(Image.open(c["mask"])) for c in cpp))
    else:
        assert rejected == [True] * len(cpp) and all(c["normalised_score"] is None for c in cpp)
        for c in cpp:
            H, W = c["map_shape"]
            assert c["n_regions"] == 1 and c["regions"][0]["area"] == H * W
            assert c["regions"][0]["bbox"] == [0, 0, W - 1, H - 1]


def _edge_maps():
    """(name, float32 map, thresholds): maps the model would not make."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:40, :40]
    rings = np.zeros((40, 40), np.float32)
    for k in range(0, 20, 4):                         # nested square rings with one gap each
        ring = (np.maximum(abs(yy - 19.5), abs(xx - 19.5)) // 1 == 19 - k)
        rings[ring] = 1.0 + k
        rings[39 - k, 19] = 0.0                     # the gap in the ring's bottom row
    nan = rng.random((9, 11)).astype(np.float32)
    nan[::3, ::2] = np.nan
    return [
        ("noise-ties", (rng.integers(0, 5, (37, 53)) / 4).astype(np.float32), (0.0, 0.25, 0.5, 0.75, -1.0)),
        ("noise-fine", rng.random((64, 48)).astype(np.float32), (0.5, 0.9, 0.99)),   # hundreds of regions
        ("checkerboard", ((yy + xx) % 2).astype(np.float32), (0.5,)),               # one 8-connected region
        ("diagonals", (((yy - xx) % 7 == 0) * (1 + (yy % 3))).astype(np.float32), (0.5, 1.5)),
        ("u-shapes", np.tile(np.array([[1, 0, 1, 0], [1, 0, 1, 0], [1, 1, 1, 0], [0, 0, 0, 0]], np.float32), (6, 5)),
         (0.5,)),
        ("rings", rings, (0.5, 6.0)),
        ("flat", np.ones((5, 7), np.float32), (1.0, 0.99999999, 1.00000001, 0.9999999)),  # float32 compare
        ("row", rng.random((1, 300)).astype(np.float32), (0.3,)),
        ("column", rng.random((300, 1)).astype(np.float32), (0.3,)),
        ("pixel", np.full((1, 1), 2.0, np.float32), (1.0, 2.0)),
        ("nan", nan, (0.2, -1e12)),
    ]


def test_cpp_runtime_regions_follow_decision_on_edge_maps(tmp_path):
    """The runtime's regions (``lsr_detect --regions``, the code behind each row's
    ``regions``) are lsr.decision.regions exactly on maps with ties, diagonal chains,
    nested rings, NaN, single rows and hundreds of components: labels, order (peak, then
    label), the first pixel at the peak, the list cut at 50, and the comparison in float32
    (a threshold of 0.99999999 on a map of ones finds nothing, as numpy)."""
    from lsr import decision

    seen_many = seen_ties = False
    for name, m, thresholds in _edge_maps():
        path = tmp_path / f"{name}.f32"
        m.tofile(path)
        for t in thresholds:
            p = run_bin("--regions", path, m.shape[0], m.shape[1], repr(t))
            got = json.loads(p.stdout)
            regs, n = decision.regions(m, t)
            assert (got["n_regions"], got["regions"]) == (n, regs), (name, t)
            seen_many |= n > decision.MAX_REGIONS
            seen_ties |= len({r["peak"] for r in regs}) < len(regs)
    assert seen_many and seen_ties
    flat = json.loads(run_bin("--regions", tmp_path / "flat.f32", 5, 7, "0.9999999").stdout)
    assert flat["n_regions"] == 1 and flat["regions"][0]["peak_xy"] == [0, 0]     # the first of the ties
    assert json.loads(run_bin("--regions", tmp_path / "flat.f32", 5, 7, "0.99999999").stdout)["n_regions"] == 0
    assert json.loads(run_bin("--regions", tmp_path / "checkerboard.f32", 40, 40, "0.5").stdout)["n_regions"] == 1
    p = run_bin("--regions", tmp_path / "flat.f32", 5, 8, "0.5", check=False)
    assert p.returncode == 2 and "not a float32 map of 5 x 8" in p.stderr


@pytest.mark.parametrize("flags, kept", [
    (["--tau", "0.05"], False),
    (["--seed", "3"], False),
    (["--restorations", "2"], False),
    ("same", True),                   # the exported values given again: the thresholds hold
], ids=["tau", "seed", "restorations", "same-values"])
def test_cpp_runtime_overrides_drop_thresholds(ts_bundle, images, tmp_path, flags, kept):
    """--tau, --seed or --restorations other than the exported values: the thresholds were
    set for the exported settings only, so the verdict fields are null and --masks writes
    nothing (as lsr.deploy.Inferencer)."""
    detect = json.loads((ts_bundle / "bundle.json").read_text())["detect"]
    if flags == "same":
        flags = ["--tau", repr(detect["tau"]), "--seed", str(detect["seed"]), "--restorations",
                 str(detect["restorations"])]
    p = run_bin(ts_bundle, images[0], "--out", tmp_path / "o", "--masks", *flags)
    (row,) = _rows(tmp_path / "o")
    assert row["false_alarm_rate"] == detect["false_alarm_rate"] and row["pixel_fpr"] == detect["pixel_fpr"]
    if kept:
        assert row["threshold"] == detect["image_threshold"] and row["pixel_threshold"] == detect["pixel_threshold"]
        assert row["anomalous"] is not None and "n_regions" in row and Path(row["mask"]).is_file()
        return
    assert row["threshold"] is row["pixel_threshold"] is row["anomalous"] is row["normalised_score"] is None
    assert "regions" not in row and "n_regions" not in row and "mask" not in row
    assert not (tmp_path / "o" / "masks").exists()
    assert "no masks are written" in p.stderr
    if flags[0] == "--tau":          # the Python bundle path says the same
        assert main(["detect", str(ts_bundle), str(images[0]), "--out", str(tmp_path / "py"), "--masks",
                     "--no-panels", "--no-progress", *flags]) == 0
        (py,) = _rows(tmp_path / "py")
        _expect_verdict(row, py)
        assert "mask" not in py


def test_cpp_runtime_older_bundle_has_no_verdict(ts_bundle, images, tmp_path):
    """A bundle of lsr-export before the operating point (no thresholds nor rates in
    bundle.json) still runs: null verdict fields and rates (as the Python bundle path), no
    regions."""
    def edit(meta, _):
        for k in ("image_threshold", "pixel_threshold", "false_alarm_rate", "pixel_fpr"):
            del meta["detect"][k]
    b = _edited_bundle(ts_bundle, tmp_path, edit)
    run_bin(b, images[0], "--out", tmp_path / "o", "--masks")
    (row,) = _rows(tmp_path / "o")
    assert row["threshold"] is row["pixel_threshold"] is row["anomalous"] is row["normalised_score"] is None
    assert row["false_alarm_rate"] is row["pixel_fpr"] is None
    assert "regions" not in row and not (tmp_path / "o" / "masks").exists()


def test_cpp_runtime_refuses_a_locked_folder(ts_bundle, images, tmp_path):
    """The runtime takes the same folder lock as the Python commands (lsr.io.folder_lock)."""
    from lsr.io import folder_lock

    out = tmp_path / "o"
    out.mkdir()
    (out / "results.jsonl").write_text("earlier\n")
    with folder_lock(out):
        p = run_bin(ts_bundle, images[0], "--out", out, check=False)
    assert p.returncode == 2 and "another lsr command is writing into this folder" in p.stderr, p.stderr
    assert (out / "results.jsonl").read_text() == "earlier\n"
    run_bin(ts_bundle, images[0], "--out", out)                      # released: runs
