"""Running a bundle: lsr.deploy.Inferencer inputs, `lsr detect BUNDLE`, clear errors for
bad bundles, provider choice, and the whole path in a process where torch, scipy,
scikit-image and the extension cannot be imported."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lsr.cli import main
from lsr.data import load_image, scan_mvtec
from lsr.deploy import BundleError, Inferencer, export_bundle, read_bundle
from lsr.deploy.runtime import CPU, CUDA, cuda_usable, parse_providers

REPO = Path(__file__).resolve().parents[1]

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def onnx_bundle(tiny_run, tmp_path_factory):
    """The session's ONNX bundle of the tiny run (shared with test_export_onnx.py)."""
    out = tmp_path_factory.getbasetemp() / "bundle-onnx"
    if not (out / "bundle.json").is_file():
        export_bundle(tiny_run, out, "onnx")
    return out


@pytest.fixture
def bundle_copy(onnx_bundle, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(onnx_bundle, dst)
    return dst


@pytest.fixture(scope="module")
def test_paths(tiny_dataset):
    return [s.path for s in scan_mvtec(tiny_dataset).test]


# ----------------------------------------------------------------------------- bad bundles

def test_missing_bundle_json(bundle_copy):
    (bundle_copy / "bundle.json").unlink()
    with pytest.raises(BundleError, match=r"b/bundle.json: not an lsr bundle"):
        Inferencer(bundle_copy)


def test_missing_graph_file(bundle_copy):
    (bundle_copy / "prior.onnx").unlink()
    with pytest.raises(BundleError, match=r"prior.onnx: graph file missing"):
        Inferencer(bundle_copy)


@pytest.mark.parametrize("version", [99, 2, 1])
def test_wrong_bundle_version(bundle_copy, version):
    """Bundles of another layout (older ones: before the one graph contract of version 3)
    are refused, saying to export again."""
    meta = json.loads((bundle_copy / "bundle.json").read_text())
    meta["bundle_version"] = version
    (bundle_copy / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=rf"bundle.json: bundle version {version} is not supported .*reads versions 3"
                                          rf".*re-export"):
        Inferencer(bundle_copy)


def test_seen_shape_must_match_the_encoder_graph(bundle_copy):
    """model.seen_channels/seen_size are checked against the encoder's declared output
    (which the runner holds to the graph file), not merely stored."""
    meta = json.loads((bundle_copy / "bundle.json").read_text())
    meta["model"]["seen_channels"] = 3
    (bundle_copy / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=r"bundle.json: model.seen_channels/seen_size \(3, 32\) do not match the "
                                          r"encoder graph's output seen \['batch', 1, 32, 32\]"):
        Inferencer(bundle_copy)


def test_edited_graph_is_detected(bundle_copy):
    with open(bundle_copy / "decoder.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match=r"decoder.onnx: sha256 .* does not match bundle.json"):
        Inferencer(bundle_copy)


def test_graph_shape_differs_from_bundle_json(bundle_copy, onnx_bundle):
    """A graph from another model (its sha256 recorded too) is caught by its input shape."""
    meta = json.loads((bundle_copy / "bundle.json").read_text())
    meta["graphs"]["encoder"]["inputs"][0]["shape"] = ["batch", 1, 64, 64]
    (bundle_copy / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=r"encoder.onnx: input 'image' has shape \['batch', 1, 32, 32\] "
                                          r"but bundle.json declares \['batch', 1, 64, 64\]"):
        Inferencer(bundle_copy, providers=[CPU])


def test_wrong_input_shape_and_options(onnx_bundle):
    inf = Inferencer(onnx_bundle, providers=[CPU])
    with pytest.raises(ValueError, match=r"bundle.json: this bundle takes images \(B, 1, 32, 32\), got \(2, 3, 32, 32\)"):
        inf.predict_batch(np.zeros((2, 3, 32, 32), np.float32))
    with pytest.raises(ValueError, match="numpy image: expected an image array"):
        inf.predict(np.zeros((2, 3, 32, 32), np.float32))
    with pytest.raises(ValueError, match=r"float images must be finite and in \[0, 1\]"):
        inf.predict(np.full((32, 32), 255.0, np.float32))
    with pytest.raises(ValueError, match="sigma is 4.0 in this bundle's postprocess graph"):
        Inferencer(onnx_bundle, sigma=2.0)
    with pytest.raises(ValueError, match="resampler 'turbo' is not available for a bundle"):
        Inferencer(onnx_bundle, resampler="turbo")
    assert (Inferencer(onnx_bundle, resampler="native").loop, Inferencer(onnx_bundle).loop_impl) == ("native", "numpy")


def test_native_resampler_needs_prior_rows(bundle_copy):
    """A bundle without prior_rows (as written before it existed) runs fast under auto and
    refuses native with a clear message."""
    meta = json.loads((bundle_copy / "bundle.json").read_text())
    del meta["graphs"]["prior_rows"]
    (bundle_copy / "prior_rows.onnx").unlink()
    meta["detect"]["resampler"] = "fast"
    (bundle_copy / "bundle.json").write_text(json.dumps(meta))
    assert Inferencer(bundle_copy, providers=[CPU]).loop == "fast"
    meta["detect"]["resampler"] = "auto"
    (bundle_copy / "bundle.json").write_text(json.dumps(meta))
    assert Inferencer(bundle_copy, providers=[CPU]).loop == "fast"
    with pytest.raises(ValueError, match="resampler native needs an ONNX bundle with a prior_rows graph .*grids of 3"):
        Inferencer(bundle_copy, providers=[CPU], resampler="native")
    meta["graphs"]["prior_rows"] = {"file": "prior.onnx", "sha256": "0" * 64, "inputs": [], "outputs": []}
    (bundle_copy / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="prior.onnx: sha256"):
        Inferencer(bundle_copy, providers=[CPU])


def test_providers(onnx_bundle, capfd):
    assert parse_providers("cuda, cpu") == [CUDA, CPU]
    assert parse_providers(None) is None
    inf = Inferencer(onnx_bundle)                                   # auto: CPU here, quietly
    if not cuda_usable(onnx_bundle / "encoder.onnx"):
        assert inf.providers == [CPU]
        assert capfd.readouterr().err == ""                         # no onnxruntime error noise
    with pytest.raises(ValueError, match="NoSuchExecutionProvider.*not available"):
        Inferencer(onnx_bundle, providers=["NoSuchExecutionProvider"])


# ----------------------------------------------------------------------------- inputs and CLI

def test_predict_accepts_path_pil_array_tensor(onnx_bundle, test_paths):
    inf = Inferencer(onnx_bundle, providers=[CPU])
    path = test_paths[0]
    ref = inf.predict(path, image_id=3)
    assert ref.anomaly_map.shape == (32, 32) and isinstance(ref.score, float) and ref.prior_passes >= 1
    assert ref.input_size == (32, 32) and ref.map_at_input_size().shape == (32, 32)
    batch = inf.predict_batch(load_image(path, 1, 32)[None], [3])
    assert ref.score == float(batch.score[0]) and np.array_equal(ref.resampled_codes, batch.resampled_codes[0])
    pil = Image.open(path)
    u8 = np.asarray(pil)
    chw = torch.from_numpy(load_image(path, 1, 32))
    for x in (pil, u8, u8.astype(np.float32) / 255.0, chw, str(path)):
        r = inf.predict(x, image_id=3)
        assert np.array_equal(r.resampled_codes, ref.resampled_codes), type(x)
        np.testing.assert_allclose(r.anomaly_map, ref.anomaly_map, atol=1e-6)
    big = np.asarray(pil.resize((48, 40)))                          # any size: resized, map back to it
    r = inf.predict(big)
    assert r.input_size == (40, 48) and r.map_at_input_size().shape == (40, 48)


@pytest.mark.parametrize("loop", ["fast", "native"])
def test_lsr_detect_bundle_equals_run(onnx_bundle, tiny_run, test_paths, tmp_path, loop):
    """`lsr detect BUNDLE` against `lsr detect RUN` with the matching loop: fast with fast;
    the bundle's default (the numpy incremental loop over prior_rows) with the C++ loop of
    --resampler native (same batches: the same calls, so the same passes and positions)."""
    from lsr import ops
    if loop == "native" and not ops.native_available():
        pytest.skip("--resampler native needs lsr._C")
    imgs = [str(p) for p in test_paths[:4]]
    assert main(["detect", str(tiny_run), *imgs, "--out", str(tmp_path / "run"), "--tiff", "--no-progress",
                 "--resampler", loop, "--batch-size", "3"]) == 0
    assert main(["detect", str(onnx_bundle), *imgs, "--out", str(tmp_path / "bundle"), "--tiff", "--no-progress",
                 "--batch-size", "3", "--providers", "cpu", *(["--resampler", "fast"] if loop == "fast" else [])]) == 0
    rows_run = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    rows_b = [json.loads(line) for line in (tmp_path / "bundle" / "results.jsonl").read_text().splitlines()]
    assert [r["image"] for r in rows_b] == imgs
    assert {r["resampler"] for r in rows_b} == {loop} == {r["resampler"] for r in rows_run}
    for a, b in zip(rows_run, rows_b):
        for k in ("score", "nll_score", "direct_score"):
            assert b[k] == pytest.approx(a[k], abs=1e-4), k
        for k in ("n_resampled", "prior_passes", "n_codes", "positions_evaluated", "recomputed_fraction"):
            assert b[k] == a[k], k
        assert Path(b["panel"]).is_file() and Path(b["map_tiff"]).is_file()
        import tifffile
        np.testing.assert_allclose(tifffile.imread(b["map_tiff"]), tifffile.imread(a["map_tiff"]), atol=1e-4)
    assert main(["detect", str(tiny_run), *imgs, "--out", str(tmp_path / "x"), "--providers", "cpu"]) == 2


# ----------------------------------------------------------------------------- without torch

_BLOCKED = ("torch", "scipy", "skimage", "lsr._C", "matplotlib", "tifffile", "safetensors", "tqdm", "sklearn",
            "onnx", "onnxscript")

_NO_TORCH = """
import json, sys
BLOCKED = {blocked!r}
class Block:
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ModuleNotFoundError("blocked in this test: " + name)
sys.meta_path.insert(0, Block())
import lsr
from lsr.deploy import Inferencer
from lsr.cli import main
res = Inferencer({bundle!r}, providers=["CPUExecutionProvider"]).predict({image!r}, image_id=0)
rc = main(["detect", {bundle!r}, {image!r}, "--out", {out!r}, "--tiff", "--no-progress"])
loaded = sorted(m for m in sys.modules if any(m == b or m.startswith(b + ".") for b in BLOCKED))
print(json.dumps({{"rc": rc, "loaded": loaded, "score": res.score, "codes": res.resampled_codes.tolist(),
                  "version": lsr.__version__}}))
"""


def test_bundle_runs_without_torch(onnx_bundle, tiny_run, test_paths, tmp_path):
    """Inferencer.predict and `lsr detect BUNDLE` with torch, scipy, scikit-image, the
    extension (and matplotlib, tifffile) unimportable: only numpy, pillow, onnxruntime."""
    image = str(test_paths[0])
    out = tmp_path / "out"
    script = _NO_TORCH.format(blocked=_BLOCKED, bundle=str(onnx_bundle), image=image, out=str(out))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["rc"] == 0 and got["loaded"] == []
    assert "panels skipped" in r.stderr                          # no matplotlib: said once, not an error
    from lsr.detect import Detector
    import lsr.ops as ops

    det = Detector.load(tiny_run, "cpu").with_options(resampler="fast")   # as the bundle: same passes
    with ops.backend("reference"), torch.no_grad():
        want = det.detect(torch.from_numpy(load_image(image, 1, 32)[None]))
    assert got["codes"] == want.resampled_codes[0].tolist()
    assert got["score"] == pytest.approx(float(want.score[0]), abs=1e-4)
    row = json.loads((out / "results.jsonl").read_text())
    assert row["score"] == pytest.approx(got["score"], abs=1e-6) and "panel" not in row
    tiff = np.asarray(Image.open(row["map_tiff"]))                # written by Pillow: float32 TIFF
    assert tiff.dtype == np.float32 and tiff.shape == (32, 32)


def test_import_lsr_is_lazy():
    code = ("import sys, lsr, lsr.deploy; assert 'torch' not in sys.modules, 'torch imported'; "
            "from lsr import Detector; assert 'torch' in sys.modules; print(lsr.__version__)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "0.1.0", r.stderr
