"""Tests for lsr.demo_data: the MVTec-layout demo dataset built from scikit-image photos
and procedural textures."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage as ndi

from lsr import demo_data as dd
from lsr.demo_data import (
    BENCHMARK_CATEGORIES,
    CATEGORIES,
    DEFECT_KINDS,
    HARD_DEFECT_KINDS,
    MARKER_NAME,
    MIN_CHANGE,
    REGULAR_CATEGORIES,
    TEXTURE_CATEGORIES,
    TEST_COLS,
    TRAIN_COLS,
    build_demo_dataset,
    crop_window,
    cut_crop,
    load_photo,
    make_defect,
    make_texture,
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


def _crops(n=4, size=96, categories=("brick", "grass", "gravel"), seed=7):
    out = []
    for cat in categories:
        photo = load_photo(cat)
        rng = np.random.default_rng(seed)
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


# ----------------------------------------------------------------------------- procedural textures
def test_constants_keep_the_defaults():
    assert CATEGORIES == ("brick", "grass", "gravel")
    assert DEFECT_KINDS == ("scratch", "crack", "hole", "stain", "foreign")
    assert BENCHMARK_CATEGORIES == CATEGORIES + TEXTURE_CATEGORIES and len(set(BENCHMARK_CATEGORIES)) == 6
    assert not set(HARD_DEFECT_KINDS) & set(DEFECT_KINDS)
    assert set(MIN_CHANGE) == set(DEFECT_KINDS + HARD_DEFECT_KINDS)
    assert all(MIN_CHANGE[k] == 10.0 for k in DEFECT_KINDS)


@pytest.mark.parametrize("name", TEXTURE_CATEGORIES)
def test_texture_is_deterministic_and_structured(name):
    img = load_photo(name)
    assert img.shape == (dd.SOURCE_SIZE, dd.SOURCE_SIZE) and img.dtype == np.uint8 and not img.flags.writeable
    assert load_photo(name) is img  # cached
    np.testing.assert_array_equal(make_texture(name), img)
    other = make_texture(name, seed=1, size=128)
    np.testing.assert_array_equal(make_texture(name, seed=1, size=128), other)
    assert (other != make_texture(name, seed=2, size=128)).mean() > 0.5
    x = img.astype(np.float64)
    assert x.std() > 20, x.std()
    assert (x < 250).mean() > 0.99 and (x > 5).mean() > 0.99  # hardly clipped
    # structure at 4-30 px: a band-pass of the image is far from flat
    band = ndi.gaussian_filter(x, 1.5) - ndi.gaussian_filter(x, 10)
    assert band.std() > 8, band.std()


def test_texture_categories_build(tmp_path):
    kw = dict(categories=TEXTURE_CATEGORIES, seed=3, image_size=32, n_train=2, n_test_good=1,
              n_test_per_defect=1, defects=("hole", "rotated_paste"))
    dirs = build_demo_dataset(tmp_path / "a", **kw)
    assert [d.name for d in dirs] == list(TEXTURE_CATEGORIES)
    for cat in dirs:
        params = json.loads((cat / MARKER_NAME).read_text())["params"]
        assert params["source"] == f"procedural:{cat.name}"
        for p in cat.rglob("*.png"):
            if "ground_truth" not in p.parts:
                assert _png(p).std() > 8, p
    build_demo_dataset(tmp_path / "b", **kw)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")


# ----------------------------------------------------------------------------- hard defects
def _bench_crops(n=3, size=96):
    return _crops(n, size, BENCHMARK_CATEGORIES, seed=11)


def _defect(cat, img, kind, seed):
    return make_defect(img, kind, np.random.default_rng(seed), exclude_sources=(cat,),
                       regular=cat in REGULAR_CATEGORIES)


@pytest.mark.parametrize("kind", HARD_DEFECT_KINDS)
def test_hard_defect_changes_only_the_mask(kind):
    areas = []
    for i, (cat, img) in enumerate(_bench_crops()):
        before = img.copy()
        out, mask = _defect(cat, img, kind, 200 + i)
        np.testing.assert_array_equal(img, before)  # input untouched
        assert out.dtype == np.uint8 and out.shape == img.shape
        assert mask.dtype == bool and mask.shape == img.shape and mask.sum() >= 12
        diff = np.abs(out.astype(np.int16) - img.astype(np.int16))
        assert not diff[~mask].any(), "pixels outside the mask changed"
        assert diff[mask].mean() >= MIN_CHANGE[kind], f"{kind} on {cat}: hardly visible"
        assert (diff[mask] > 0).mean() >= 0.5, f"{kind} on {cat}: mask much larger than the change"
        again = _defect(cat, img, kind, 200 + i)
        np.testing.assert_array_equal(again[0], out)
        np.testing.assert_array_equal(again[1], mask)
        areas.append(mask.mean())
    areas = np.array(areas)
    if kind in ("thin_scratch", "hairline"):
        assert areas.min() >= 0.001 and areas.max() <= 0.04, areas
    else:
        assert areas.min() >= 0.015 and areas.max() <= 0.16, areas
    assert areas.std() > 0


@pytest.mark.parametrize("kind", ["thin_scratch", "hairline"])
def test_lines_are_thin_and_long(kind):
    for i, (cat, img) in enumerate(_bench_crops(1)):
        out, mask = _defect(cat, img, kind, i)
        depth = ndi.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1][mask]  # px to the nearest outside
        assert depth.max() <= 2, (kind, cat, depth.max())
        if kind == "hairline":  # essentially one pixel: at most a few pixels have no outside neighbour
            assert (depth > 1).mean() < 0.1, (cat, (depth > 1).mean())
        ys, xs = np.nonzero(mask)
        assert max(np.ptp(ys), np.ptp(xs)) >= 0.2 * img.shape[0], (kind, cat)
        if kind == "hairline":
            assert (out[mask] <= img[mask]).all()  # dark


def test_faint_stain_is_faint():
    for i, (cat, img) in enumerate(_bench_crops(1)):
        out, mask = _defect(cat, img, "faint_stain", i)
        diff = out.astype(np.int16) - img.astype(np.int16)
        assert np.abs(diff).max() <= 21, cat
        assert (diff[mask] >= 0).all() or (diff[mask] <= 0).all()  # one direction


def _gradient_energy(x, where):
    gy, gx = np.gradient(x.astype(np.float64))
    return float((gy ** 2 + gx ** 2)[where].mean())


def test_smudge_smooths_the_texture():
    for i, (cat, img) in enumerate(_bench_crops()):
        out, mask = _defect(cat, img, "smudge", i)
        core = ndi.binary_erosion(mask, iterations=2)
        assert core.any()
        assert _gradient_energy(out, core) < 0.6 * _gradient_energy(img, core), cat
        assert abs(out[mask].mean() - img[mask].mean()) < 4  # no brightness change on average


def _plane(values, ys, xs):
    """Least-squares plane v = a*y + b*x + c; returns ((a, b), residuals)."""
    A = np.column_stack([ys, xs, np.ones(len(ys))])
    coef, *_ = np.linalg.lstsq(A, values, rcond=None)
    return coef[:2], values - A @ coef


@pytest.mark.parametrize("regular", [False, True])
def test_rotated_paste_comes_from_the_same_image(monkeypatch, regular):
    """On a ramp image a turned copy of the ramp is again a ramp of the same slope, turned:
    the patch is the image itself, rotated (no other photo is even loaded)."""
    monkeypatch.setattr(dd, "load_photo", lambda name: pytest.fail("rotated_paste loaded a photo"))
    yy, xx = np.mgrid[0:96, 0:96]
    img = (20 + yy + xx).astype(np.uint8)
    g = np.array([1.0, 1.0])
    for seed in range(6):
        out, mask = make_defect(img, "rotated_paste", np.random.default_rng(seed), regular=regular)
        core = ndi.binary_erosion(mask, iterations=2)
        ys, xs = np.nonzero(core)
        grad, res = _plane(out[core].astype(np.float64), ys, xs)
        assert abs(np.hypot(*grad) - np.sqrt(2)) < 0.05, grad
        turn = np.degrees(np.arccos(np.clip(grad @ g / (np.hypot(*grad) * np.sqrt(2)), -1, 1)))
        if regular:  # whole pixels: exact (but for the odd pixel of the soft outline)
            assert (np.abs(res) < 0.1).mean() > 0.97 and abs(turn - 90) < 0.5, turn
        else:
            assert np.sqrt(np.mean(res ** 2)) < 0.6 and 19 <= turn <= 71, turn
        assert img.min() <= out[core].min() and out[core].max() <= img.max()


def test_rotated_paste_on_real_textures_is_a_turned_copy():
    """On a grid texture (regular) the patch core is an exact copy of a 90-degree turned
    part of the same image."""
    for cat in REGULAR_CATEGORIES:
        img = cut_crop(load_photo(cat), 40, TEST_COLS[0], crop_window(48), 48)
        out, mask = _defect(cat, img, "rotated_paste", 0)
        core = ndi.binary_erosion(mask, iterations=2)
        ys, xs = np.nonzero(core)
        y0, x0 = ys.min(), xs.min()
        block = out[y0 : ys.max() + 1, x0 : xs.max() + 1]
        sel = core[y0 : ys.max() + 1, x0 : xs.max() + 1]
        found = False
        for k in (1, 3):
            turned = np.rot90(img, k)
            for dy in range(turned.shape[0] - block.shape[0] + 1):
                for dx in range(turned.shape[1] - block.shape[1] + 1):
                    win = turned[dy : dy + block.shape[0], dx : dx + block.shape[1]]
                    if (win[sel] == block[sel]).all():
                        found = True
                        break
                if found:
                    break
        assert found, cat


def test_hard_kinds_are_accepted_by_the_builder(tmp_path):
    (cat,) = build_demo_dataset(tmp_path, categories=("grass",), seed=1, image_size=32, n_train=1,
                                n_test_good=1, n_test_per_defect=1, defects=HARD_DEFECT_KINDS)
    assert sorted(p.name for p in (cat / "test").iterdir()) == sorted(("good",) + HARD_DEFECT_KINDS)
    for d in HARD_DEFECT_KINDS:
        assert (_png(cat / "ground_truth" / d / "000_mask.png") > 0).sum() >= 12


# ----------------------------------------------------------------------------- validation split
def test_val_split_shares_train_but_not_test(tmp_path):
    kw = dict(categories=("gravel", "weave"), seed=5, image_size=32, n_train=3, n_test_good=2,
              n_test_per_defect=2, defects=("hole", "smudge", "rotated_paste"))
    build_demo_dataset(tmp_path / "val", eval_split="val", **kw)
    build_demo_dataset(tmp_path / "test", eval_split="test", **kw)
    build_demo_dataset(tmp_path / "default", **kw)
    val, test = _files(tmp_path / "val"), _files(tmp_path / "test")
    assert _files(tmp_path / "default") == test
    assert val.keys() == test.keys()
    train = [k for k in val if "/train/" in k]
    assert len(train) == 6 and all(val[k] == test[k] for k in train)
    evaluation = [k for k in val if "/train/" not in k]
    assert len(evaluation) == 2 * (2 + 2 * 3 * 2) and all(val[k] != test[k] for k in evaluation)
    for c in kw["categories"]:
        assert json.loads((tmp_path / "val" / c / MARKER_NAME).read_text())["params"]["eval_split"] == "val"
        assert "eval_split" not in json.loads((tmp_path / "test" / c / MARKER_NAME).read_text())["params"]
    # a val build in a test build's place is a rebuild with other parameters
    build_demo_dataset(tmp_path / "test", eval_split="val", **kw)
    assert _files(tmp_path / "test") == val
    with pytest.raises(ValueError):
        build_demo_dataset(tmp_path / "x", eval_split="train", **kw)


def test_default_build_is_the_old_build(tmp_path):
    """The defaults are the photographs, the five classic kinds and the "test" streams."""
    build_demo_dataset(tmp_path / "default", seed=2, **SMALL)
    build_demo_dataset(tmp_path / "explicit", categories=("brick", "grass", "gravel"), seed=2,
                       defects=("scratch", "crack", "hole", "stain", "foreign"), eval_split="test", **SMALL)
    def every_file(root):  # the markers too, not only the images
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    a, b = every_file(tmp_path / "default"), every_file(tmp_path / "explicit")
    assert a == b and len(a) == 3 * (3 + 2 + 2 * 2 * 5 + 1)
