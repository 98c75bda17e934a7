"""Tests for lsr.demo_data: the MVTec-layout demo dataset built from scikit-image photos."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from lsr import demo_data as dd
from lsr.demo_data import (
    DEFECT_KINDS,
    MARKER_NAME,
    TEST_COLS,
    TRAIN_COLS,
    build_demo_dataset,
    crop_window,
    cut_crop,
    load_photo,
    make_defect,
)

SMALL = dict(image_size=64, n_train=3, n_test_good=2, n_test_per_defect=2)


def _png(path) -> np.ndarray:
    im = Image.open(path)
    assert im.mode == "L", f"{path}: mode {im.mode}"
    return np.asarray(im)


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.png"))}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    dirs = build_demo_dataset(root, categories=("brick", "gravel"), seed=3, **SMALL)
    return root, dirs


def test_layout_is_mvtec(small):
    root, dirs = small
    assert dirs == [root / "brick", root / "gravel"]
    for cat in dirs:
        assert sorted(p.name for p in (cat / "train").iterdir()) == ["good"]
        assert sorted(p.name for p in (cat / "test").iterdir()) == sorted(("good",) + DEFECT_KINDS)
        assert sorted(p.name for p in (cat / "ground_truth").iterdir()) == sorted(DEFECT_KINDS)
        assert [p.name for p in sorted((cat / "train/good").iterdir())] == ["000.png", "001.png", "002.png"]
        assert [p.name for p in sorted((cat / "test/good").iterdir())] == ["000.png", "001.png"]
        for p in list((cat / "train/good").iterdir()) + list((cat / "test/good").iterdir()):
            img = _png(p)
            assert img.shape == (64, 64) and img.dtype == np.uint8
        for d in DEFECT_KINDS:
            imgs = sorted((cat / "test" / d).iterdir())
            masks = sorted((cat / "ground_truth" / d).iterdir())
            assert [p.name for p in imgs] == ["000.png", "001.png"]
            assert [p.name for p in masks] == ["000_mask.png", "001_mask.png"]
            for pi, pm in zip(imgs, masks):
                img, mask = _png(pi), _png(pm)
                assert img.shape == mask.shape == (64, 64)
                assert set(np.unique(mask)) <= {0, 255}
                assert (mask > 0).sum() >= 10, f"{pm}: empty mask"
        marker = json.loads((cat / MARKER_NAME).read_text())
        assert marker["params"]["category"] == cat.name
        assert not list(cat.rglob(".*"))  # no temporary or in-progress files left


def test_default_counts(tmp_path):
    (cat,) = build_demo_dataset(tmp_path, categories=("grass",))
    assert len(list((cat / "train/good").glob("*.png"))) == 90
    assert len(list((cat / "test/good").glob("*.png"))) == 16
    for d in DEFECT_KINDS:
        assert len(list((cat / "test" / d).glob("*.png"))) == 6
        assert len(list((cat / "ground_truth" / d).glob("*_mask.png"))) == 6
    assert _png(cat / "train/good/089.png").shape == (128, 128)


def test_deterministic(small, tmp_path):
    root, _ = small
    again = tmp_path / "again"
    build_demo_dataset(again, categories=("brick", "gravel"), seed=3, **SMALL)
    assert _files(again) == _files(root)
    other = tmp_path / "other"
    build_demo_dataset(other, categories=("brick", "gravel"), seed=4, **SMALL)
    a, b = _files(root), _files(other)
    assert a.keys() == b.keys()
    assert sum(a[k] != b[k] for k in a) == len(a)  # every image differs


def test_categories_and_defects_have_own_streams(small, tmp_path):
    root, _ = small
    alone = tmp_path / "alone"
    build_demo_dataset(alone, categories=("gravel",), seed=3, **SMALL)
    assert _files(alone / "gravel") == _files(root / "gravel")
    fewer = tmp_path / "fewer"
    build_demo_dataset(fewer, categories=("gravel",), seed=3, defects=("hole",), **SMALL)
    full = _files(root / "gravel")
    for k, v in _files(fewer / "gravel").items():
        assert full[k] == v, k


def test_train_and_test_regions_are_disjoint(small):
    assert 0 <= TRAIN_COLS[0] < TRAIN_COLS[1] < TEST_COLS[0] < TEST_COLS[1] <= dd.SOURCE_SIZE
    root, dirs = small
    window = crop_window(64)
    for cat in dirs:
        photo = load_photo(cat.name)
        crops = json.loads((cat / MARKER_NAME).read_text())["crops"]
        assert len(crops) == 3 + 2 + 2 * len(DEFECT_KINDS)
        for rel, box in crops.items():
            assert box["window"] == window
            assert 0 <= box["top"] and box["top"] + window <= photo.shape[0]
            cols = TRAIN_COLS if rel.startswith("train/") else TEST_COLS
            assert cols[0] <= box["left"] and box["left"] + window <= cols[1], (rel, box)
            if rel.startswith("test/"):
                assert not box["flip"]
            # the record is honest: the written image is this crop (outside any defect)
            expect = cut_crop(photo, box["top"], box["left"], window, 64, box["flip"])
            got = _png(cat / rel)
            parts = rel.split("/")
            if parts[1] == "good":
                np.testing.assert_array_equal(got, expect)
            else:
                mask = _png(cat / "ground_truth" / parts[1] / rel.split("/")[-1].replace(".png", "_mask.png")) > 0
                np.testing.assert_array_equal(got[~mask], expect[~mask])


def _crops(n=4, size=96):
    out = []
    for cat in ("brick", "grass", "gravel"):
        photo = load_photo(cat)
        rng = np.random.default_rng(7)
        w = crop_window(size)
        for _ in range(n):
            top = int(rng.integers(0, 512 - w + 1))
            left = int(rng.integers(TEST_COLS[0], TEST_COLS[1] - w + 1))
            out.append((cat, cut_crop(photo, top, left, w, size)))
    return out


@pytest.mark.parametrize("kind", DEFECT_KINDS)
def test_make_defect_changes_only_the_mask(kind):
    areas = []
    for i, (cat, img) in enumerate(_crops()):
        before = img.copy()
        out, mask = make_defect(img, kind, np.random.default_rng(100 + i), exclude_sources=(cat,))
        np.testing.assert_array_equal(img, before)  # input untouched
        assert out.dtype == np.uint8 and out.shape == img.shape
        assert mask.dtype == bool and mask.shape == img.shape
        assert mask.sum() >= 12
        diff = np.abs(out.astype(np.int16) - img.astype(np.int16))
        assert not diff[~mask].any(), "pixels outside the mask changed"
        assert diff[mask].mean() >= 10, f"{kind} on {cat}: hardly visible"
        assert (diff[mask] > 0).mean() >= 0.5, f"{kind} on {cat}: mask much larger than the change"
        areas.append(mask.mean())
    areas = np.array(areas)
    if kind in ("hole", "stain", "foreign"):
        assert areas.min() >= 0.015 and areas.max() <= 0.12, areas
    else:  # thin defects
        assert areas.min() >= 0.001 and areas.max() <= 0.05, areas
    assert areas.std() > 0  # sizes vary


def test_make_defect_is_deterministic_and_validates():
    img = _crops(1)[0][1]
    a = make_defect(img, "crack", np.random.default_rng(5))
    b = make_defect(img, "crack", np.random.default_rng(5))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    with pytest.raises(ValueError):
        make_defect(img, "dent", np.random.default_rng(0))
    with pytest.raises(ValueError):
        make_defect(img.astype(np.float32), "hole", np.random.default_rng(0))


def test_foreign_patch_not_from_own_photo(monkeypatch):
    used = []
    real = dd.load_photo

    def spy(name):
        used.append(name)
        return real(name)

    monkeypatch.setattr(dd, "load_photo", spy)
    img = _crops(1)[0][1]
    for i in range(12):
        make_defect(img, "foreign", np.random.default_rng(i), exclude_sources=("brick",))
    assert used and "brick" not in used


def test_skip_if_complete_and_rebuild(tmp_path, monkeypatch):
    kw = dict(categories=("grass",), seed=1, **SMALL)
    (cat,) = build_demo_dataset(tmp_path, **kw)
    before = _files(tmp_path)

    def boom(*a, **k):
        raise AssertionError("a complete category must not be rewritten")

    # same parameters: nothing is written
    monkeypatch.setattr(dd, "save_png", boom)
    monkeypatch.setattr(dd, "write_json", boom)
    assert build_demo_dataset(tmp_path, **kw) == [cat]
    monkeypatch.undo()
    assert _files(tmp_path) == before

    # a missing file makes it incomplete: rebuilt identically
    (cat / "test/hole/001.png").unlink()
    build_demo_dataset(tmp_path, **kw)
    assert _files(tmp_path) == before

    # a build interrupted half-way leaves no marker; the next call rebuilds it
    calls = []
    real_save = dd.save_png

    def flaky(path, arr):
        calls.append(path)
        if len(calls) > 5:
            raise KeyboardInterrupt
        real_save(path, arr)

    monkeypatch.setattr(dd, "save_png", flaky)
    with pytest.raises(KeyboardInterrupt):
        build_demo_dataset(tmp_path, **dict(kw, seed=2))
    monkeypatch.undo()
    assert not (cat / MARKER_NAME).exists()
    build_demo_dataset(tmp_path, **kw)
    assert (cat / MARKER_NAME).is_file() and _files(tmp_path) == before
    assert not list(cat.rglob(".*"))

    # other parameters: rebuilt, files no longer part of the set removed
    kw2 = dict(kw, n_train=2, defects=("stain", "hole"))
    build_demo_dataset(tmp_path, **kw2)
    assert not (cat / "train/good/002.png").exists()
    assert not (cat / "test/scratch").exists() and not (cat / "ground_truth/scratch").exists()
    assert sorted(p.name for p in (cat / "test").iterdir()) == ["good", "hole", "stain"]
    assert json.loads((cat / MARKER_NAME).read_text())["params"]["n_train"] == 2


def test_refuses_foreign_folder(tmp_path):
    (tmp_path / "brick" / "train" / "good").mkdir(parents=True)
    (tmp_path / "brick" / "train" / "good" / "000.png").write_bytes(b"not ours")
    with pytest.raises(FileExistsError):
        build_demo_dataset(tmp_path, categories=("brick",), **SMALL)
    assert (tmp_path / "brick" / "train" / "good" / "000.png").read_bytes() == b"not ours"


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        build_demo_dataset(tmp_path, categories=("carpet",), **SMALL)
    with pytest.raises(ValueError):
        build_demo_dataset(tmp_path, categories=("grass",), defects=("dent",), **SMALL)
    assert not any(tmp_path.iterdir())
