"""The C++ runtime (export/, `lsr_detect`): a TorchScript bundle of the tiny run detected
without Python gives the codes, prior passes, scores and maps of the Python path
(``lsr detect RUN --resampler native``, and the same codes as ``fast``); bad bundles and
bad images give clear errors.

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


@pytest.mark.parametrize("tau", [None, 0.05])
def test_cpp_runtime_equals_python(ts_bundle, tiny_run, images, tmp_path, tau):
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
        for key in ("score", "nll_score", "direct_score", "n_resampled"):
            assert c[key] == pytest.approx(p[key], rel=1e-5, abs=1e-6), key
        raw = np.fromfile(c["map_raw"], dtype=np.float32).reshape(c["map_shape"])
        np.testing.assert_allclose(raw, tifffile.imread(p["map_tiff"]), atol=1e-5)
        assert Path(c["map_png"]).is_file()
    assert torch.equal(res.resampled_codes,
                       torch.tensor([c["resampled_codes"] for c in cpp]).view_as(res.resampled_codes))


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

    meta["bundle_version"], meta["format"] = 1, "onnx"
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
    """Every input's PNG header is checked before any work; an image whose header is fine
    but whose data is cut short fails in libpng's decode (reported through its longjmp
    protocol, not an exception through C), naming the file, after the results of the
    images before it are written. No temporary files are left."""
    out = tmp_path / "o"
    missing = tmp_path / "missing.png"
    p = run_bin(ts_bundle, images[0], missing, "--out", out, check=False)
    assert p.returncode == 2 and "missing.png" in p.stderr and "cannot open" in p.stderr
    assert not out.exists()                                        # failed before any work

    data = images[0].read_bytes()
    cut = tmp_path / "cut.png"
    cut.write_bytes(data[:data.index(b"IDAT") + 20])               # header intact, pixels cut
    p = run_bin(ts_bundle, images[0], images[1], cut, "--out", out, "--batch-size", "1", check=False)
    assert p.returncode == 2 and "cut.png" in p.stderr and "cannot decode PNG (libpng:" in p.stderr
    assert "results of the 2 images before it" in p.stderr
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["image"] for r in rows] == [str(images[0]), str(images[1])]
    assert all(Path(r["map_png"]).is_file() for r in rows)
    assert not list(out.glob("*.tmp"))


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
