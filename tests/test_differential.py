"""Differential detection against a reference image (lsr.differential, D-MAD)."""
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import torch.nn.functional as F
from PIL import Image

import lsr
from lsr.cli import main
from lsr.data import MVTecCategory, TestSample
from lsr.differential import (check_differential_inputs, detect_pair, nearest_references, register, seen,
                              shift_image)
from lsr.models.vqvae import VectorQuantizer

pytestmark = pytest.mark.slow


def _det(run, **options):
    return lsr.Detector.load(run, "cpu").with_options(resampler="fast", **options)


def _images(det, data, n=3):
    return det.load_batch([s.path for s in lsr.data.scan_mvtec(data).test[:n]])[0]


class BlockVQ(torch.nn.Module):
    """A VQ-VAE that is exactly local (for the localisation test; the tiny runs' 2-epoch
    VQ-VAEs are not): a cell's code is the nearest of K grey levels to the cell's mean, and
    decoding paints that level over the cell."""

    def __init__(self, K: int, f: int):
        super().__init__()
        self.f = f
        self.encoder = torch.nn.AvgPool2d(f)
        self.quantizer = VectorQuantizer(K, 1)
        self.quantizer.codebook.copy_(torch.linspace(0, 1, K).view(K, 1))
        self.quantizer.initialised.fill_(True)

    def decode_indices(self, idx):
        return F.interpolate(self.quantizer.decode_indices(idx), scale_factor=self.f, mode="nearest")


def test_register_finds_the_shift():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 32, 32, generator=g)
    true = torch.tensor([[3, -2], [0, 0], [-8, 8], [1, 5]])
    ref = shift_image(x, -true)                                 # the reference is x moved away
    shift, cost = register(x, ref, 8)
    assert shift.tolist() == true.tolist()
    assert (cost == 0).all()                                    # the central crop matches exactly
    assert shift_image(x, torch.zeros(4, 2, dtype=torch.long)).equal(x)
    assert register(x, ref, 0)[0].abs().sum() == 0
    with pytest.raises(ValueError, match="--max-shift"):
        register(x, ref, 9)                                     # > S // 4


@pytest.mark.parametrize("fixture", ["tiny_run", "tiny_feature_run"])
def test_against_itself_is_zero(fixture, tiny_dataset, request):
    run = request.getfixturevalue(fixture)
    for tau in (None, 0.1):                                     # 0.1: most codes are resampled
        det = _det(run, tau=tau)
        x = _images(det, tiny_dataset)
        r = detect_pair(det, x, x, image_ids=[5, 6, 7])
        assert r.shift.abs().sum() == 0
        # exactly 0 with L2; with cosine (the feature presets' map) 1 - cos rounds to ~1e-7
        zero = dict(atol=1e-5, rtol=0) if det.config.detect.distance == "cosine" else dict(atol=0, rtol=0)
        for t in (r.anomaly_map, r.score, r.map_direct, r.direct_score):
            torch.testing.assert_close(t, torch.zeros_like(t), **zero)
        assert r.anomaly_map.shape == (3, det.image_size, det.image_size)
        assert torch.equal(r.resampled, r.reference_resampled)
    assert r.resampled.sum() > 10


@pytest.mark.parametrize("fixture", ["tiny_run", "tiny_feature_run"])
def test_shifted_copy_is_registered_back(fixture, tiny_dataset, request):
    det = _det(request.getfixturevalue(fixture))
    S = det.image_size
    # an exact case: a uniform border (reflect padding adds nothing new) around a textured centre
    # that covers the search's central crop [8, S - 8)
    x = torch.full((1, det.channels, S, S), 0.5)
    x[:, :, 7:S - 7, 7:S - 7] = torch.rand(1, det.channels, S - 14, S - 14, generator=torch.Generator().manual_seed(1))
    ref = shift_image(x, torch.tensor([[-3, 2]]))
    r = detect_pair(det, x, ref)
    assert r.shift.tolist() == [[3, -2]]
    assert torch.equal(r.reference, x)
    # exactly 0 with L2; with cosine (the feature presets' map) 1 - cos rounds to ~1e-7
    torch.testing.assert_close(r.anomaly_map, torch.zeros_like(r.anomaly_map),
                               atol=1e-5 if det.config.detect.distance == "cosine" else 0, rtol=0)
    # a real image: the shift is found; only the border band (reflected content) differs
    img = _images(det, tiny_dataset, 1)
    r = detect_pair(det, img, shift_image(img, torch.tensor([[2, -3]])))
    assert r.shift.tolist() == [[-2, 3]]
    assert torch.equal(r.reference[:, :, 4:-4, 4:-4], img[:, :, 4:-4, 4:-4])


def test_defect_shows_up_where_it_is(tiny_run, tiny_dataset):
    base = _det(tiny_run, tau=1e-9)                             # nothing resampled: the map is the codes' difference
    det = lsr.Detector(BlockVQ(base.config.prior.codebook_size, 4), base.prior, base.config, "cpu")
    ref = _images(det, tiny_dataset, 2)
    x = ref.clone()
    x[:, :, 12:20, 12:20] = 1.0                                 # a bright square in the test images only
    box = torch.zeros(32, 32, dtype=torch.bool)
    box[12:20, 12:20] = True
    r = detect_pair(det, x, ref)
    assert r.shift.abs().sum() == 0                             # the median cost ignores the defect
    for m in r.anomaly_map:
        i, j = divmod(int(m.argmax()), 32)
        assert 10 <= i < 22 and 10 <= j < 22
        assert m[box].mean() > 4 * m[~box].mean()
    assert (r.score > detect_pair(det, ref, ref).score).all()
    assert torch.equal(r.map_direct, r.anomaly_map)             # nothing resampled: the direct variant is the same


def test_nearest_reference_is_the_copy(tiny_feature_run, tiny_dataset):
    det = _det(tiny_feature_run)
    x = _images(det, tiny_dataset, 3)
    refs = torch.cat([torch.rand(2, *x.shape[1:], generator=torch.Generator().manual_seed(2)), x.flip(0)])
    idx, dist = nearest_references(det, x, seen(det, refs))
    assert idx.tolist() == [4, 3, 2] and torch.allclose(dist, torch.zeros(3), atol=1e-4)


def test_references_are_never_test_images(tiny_dataset):
    cat = lsr.data.scan_mvtec(tiny_dataset)
    check_differential_inputs("good", cat, None, 32)
    test = cat.test[0]
    bad = MVTecCategory(cat.root, cat.name, [*cat.train, test.path], cat.test)
    with pytest.raises(ValueError, match="also a test image"):
        check_differential_inputs("good", bad, None, 32)
    with pytest.raises(ValueError, match="--reference-from"):
        check_differential_inputs("golden", cat, None, 32)
    with pytest.raises(ValueError, match="train/good"):
        check_differential_inputs("good", MVTecCategory(cat.root, cat.name, [], [TestSample(test.path, "x", 1, None)]),
                                  None, 32)


def test_eval_reference_from_good(tiny_run, tiny_dataset, tmp_path):
    out = tmp_path / "ev"
    assert main(["eval", str(tiny_run), str(tiny_dataset), "--out", str(out), "--reference-from", "good",
                 "--resampler", "fast", "--no-progress"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    for method in ("differential", "differential_direct"):
        row = m["methods"][method]
        for key in ("image_auroc", "pixel_auroc", "aupro"):
            assert 0.0 <= row[key] <= 1.0
        assert set(row["per_defect"]) == {"hole", "stain", "foreign"}
    assert "lsr" in m["methods"] and m["differential"]["reference_from"] == "good"
    cat = lsr.data.scan_mvtec(tiny_dataset)
    pairs = [json.loads(line) for line in (out / "differential" / "pairs.jsonl").read_text().splitlines()]
    assert [p["image"] for p in pairs] == [str(s.path) for s in cat.test]
    train = {str(p) for p in cat.train}
    test = {str(s.path) for s in cat.test}
    assert all(p["reference"] in train and p["reference"] not in test for p in pairs)
    for s in cat.test:
        arr = tifffile.imread(out / "differential_maps" / cat.name / "test" / s.defect / f"{s.path.stem}.tiff")
        assert arr.dtype == np.float32 and arr.shape == Image.open(s.path).size[::-1]
    assert len(list((out / "differential" / "panels").glob("*.png"))) == 4    # a defect type each, one good


def test_detect_cli_reference(tiny_run, tiny_dataset, tmp_path, capsys):
    imgs = [*sorted((tiny_dataset / "test" / "hole").glob("*.png")),
            sorted((tiny_dataset / "test" / "good").glob("*.png"))[0]]
    ref = sorted((tiny_dataset / "train" / "good").glob("*.png"))[0]
    out = tmp_path / "det"
    assert main(["detect", str(tiny_run), *map(str, imgs), "--out", str(out), "--reference", str(ref), "--tiff",
                 "--resampler", "fast", "--no-progress"]) == 0
    assert len((out / "results.jsonl").read_text().splitlines()) == len(imgs)          # the usual output too
    rows = [json.loads(line) for line in (out / "differential" / "results.jsonl").read_text().splitlines()]
    assert [r["image"] for r in rows] == list(map(str, imgs)) and all(r["reference"] == str(ref) for r in rows)
    for r in rows:
        assert Image.open(r["panel"]).format == "PNG" and len(r["shift"]) == 2
        assert r["score"] >= 0 and r["direct_score"] >= 0
        assert tifffile.imread(r["map_tiff"]).shape == Image.open(r["image"]).size[::-1]
    # a folder of references: the nearest one; the image itself when it is there
    folder = tmp_path / "refs"
    folder.mkdir()
    for p in [ref, imgs[-1]]:
        (folder / f"r_{p.parent.name}_{p.name}").write_bytes(Path(p).read_bytes())
    assert main(["detect", str(tiny_run), str(imgs[-1]), "--out", str(tmp_path / "d2"), "--reference", str(folder),
                 "--resampler", "fast", "--no-progress", "--no-panels"]) == 0
    (r,) = [json.loads(line) for line in (tmp_path / "d2" / "differential" / "results.jsonl").read_text().splitlines()]
    assert Path(r["reference"]).name == f"r_good_{imgs[-1].name}" and r["score"] == 0.0
    capsys.readouterr()
    for extra, flag in ((["--reference", str(tmp_path / "missing.png")], "missing.png"),
                        (["--reference", str(ref), "--max-shift", "99"], "--max-shift"),
                        (["--max-shift", "2"], "--max-shift")):
        o = tmp_path / f"bad{len(flag)}"
        assert main(["detect", str(tiny_run), str(imgs[0]), "--out", str(o), "--no-progress", *extra]) == 2
        assert flag in capsys.readouterr().err
        assert not (o / "results.jsonl").exists()
