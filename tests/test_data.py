"""Tests for lsr.data: image decoding, MVTec AD scanning, listing and splitting."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from lsr.data import (
    DataError,
    MVTecCategory,
    TestSample,
    check_mask_sizes,
    detect_channels,
    image_size,
    list_images,
    load_image,
    load_images,
    load_mask,
    scan_mvtec,
    split_train_val,
)

H, W = 12, 16
TOL = 1.0 / 255 + 1e-6


def grey8() -> np.ndarray:
    y, x = np.mgrid[0:H, 0:W]
    return ((x * 16 + y * 5) % 256).astype(np.uint8)


def rgb8() -> np.ndarray:
    g = grey8()
    return np.stack([g, 255 - g, (g // 2 + 60)], axis=-1).astype(np.uint8)


def save(path: Path, img: Image.Image, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)
    return path


# --------------------------------------------------------------------------- load_image


def test_grey_modes_agree(tmp_path):
    g = grey8()
    ref = g.astype(np.float32) / 255
    g16 = g.astype(np.uint16) * 257
    files = {
        "L": save(tmp_path / "l.png", Image.fromarray(g)),
        "LA": save(tmp_path / "la.png", Image.fromarray(g).convert("LA")),
        "I16png": save(tmp_path / "i16.png", Image.fromarray(g16)),
        "I16tif": save(tmp_path / "i16.tif", Image.fromarray(g16)),
        "I32tif": save(tmp_path / "i32.tif", Image.fromarray(g16.astype(np.int32))),
        "I16ppm": save(tmp_path / "i16.pgm", Image.fromarray(g16)),
        "F": save(tmp_path / "f.tif", Image.fromarray(ref)),
        "JPEG": save(tmp_path / "l.jpg", Image.fromarray(g), quality=100),
    }
    with Image.open(files["I16png"]) as im:
        assert im.mode in ("I", "I;16", "I;16B")
    for name, f in files.items():
        x = load_image(f, 1)
        assert x.dtype == np.float32 and x.shape == (1, H, W), name
        assert 0.0 <= x.min() and x.max() <= 1.0, name
        tol = 4 / 255 if name == "JPEG" else TOL
        assert np.abs(x[0] - ref).max() <= tol, name
        x3 = load_image(f, 3)
        assert x3.shape == (3, H, W), name
        assert np.array_equal(x3[0], x3[1]) and np.array_equal(x3[0], x3[2]), name


def test_16bit_full_range_and_8bit_agree(tmp_path):
    rng = np.random.default_rng(0)
    g16 = rng.integers(0, 65536, size=(H, W), dtype=np.uint16)
    g8 = np.round(g16 / 257).astype(np.uint8)
    a = load_image(save(tmp_path / "a16.png", Image.fromarray(g16)), 1)
    b = load_image(save(tmp_path / "a8.png", Image.fromarray(g8)), 1)
    assert np.abs(a - b).max() <= TOL
    assert np.allclose(a[0], g16 / 65535, atol=1e-6)
    c = load_image(save(tmp_path / "i16.tif", Image.new("I;16", (W, H), 65535)), 1)
    assert np.allclose(c, 1.0)


def test_bilevel_palette_rgb_rgba(tmp_path):
    bw = np.zeros((H, W), dtype=bool)
    bw[:, W // 2 :] = True
    x = load_image(save(tmp_path / "b.png", Image.fromarray(bw)), 1)
    assert set(np.unique(x).tolist()) == {0.0, 1.0}
    assert np.array_equal(x[0] > 0.5, bw)

    rgb = rgb8()
    ref = rgb.astype(np.float32).transpose(2, 0, 1) / 255
    x = load_image(save(tmp_path / "c.png", Image.fromarray(rgb)), 3)
    assert x.shape == (3, H, W) and np.allclose(x, ref)
    rgba = np.concatenate([rgb, np.full((H, W, 1), 7, np.uint8)], axis=-1)
    x = load_image(save(tmp_path / "c4.png", Image.fromarray(rgba)), 3)
    assert np.allclose(x, ref)  # alpha dropped, not composited
    lum = load_image(tmp_path / "c.png", 1)
    pil_l = np.asarray(Image.fromarray(rgb).convert("L"), dtype=np.float32) / 255
    assert lum.shape == (1, H, W) and np.abs(lum[0] - pil_l).max() <= TOL

    pal = Image.fromarray(rgb).quantize(colors=16)
    assert pal.mode == "P"
    p = save(tmp_path / "p.png", pal)
    x = load_image(p, 3)
    expect = np.asarray(pal.convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 255
    assert x.shape == (3, H, W) and np.allclose(x, expect)
    pal.info["transparency"] = 0
    x = load_image(save(tmp_path / "pt.png", pal, transparency=0), 3)
    assert np.allclose(x, expect)
    assert load_image(p, 1).shape == (1, H, W)


def test_resize(tmp_path):
    f = save(tmp_path / "c.png", Image.fromarray(rgb8()))
    x = load_image(f, 3, size=8)
    assert x.shape == (3, 8, 8) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert load_image(f, 1, size=32).shape == (1, 32, 32)
    flat = save(tmp_path / "flat.png", Image.new("L", (W, H), 128))
    assert np.allclose(load_image(flat, 3, size=5), 128 / 255, atol=1e-6)
    with pytest.raises(ValueError):
        load_image(f, 2)
    with pytest.raises(ValueError):
        load_image(f, 3, size=0)


def _png_bytes(tmp_path: Path) -> bytes:
    rng = np.random.default_rng(1)
    noise = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    return save(tmp_path / "full.png", Image.fromarray(noise)).read_bytes()


def test_truncated_png(tmp_path):
    data = _png_bytes(tmp_path)
    bad = tmp_path / "trunc_img.png"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="trunc_img.png"):
        load_image(bad, 3)
    with pytest.raises(DataError, match="trunc_img.png"):
        load_mask(bad)


def test_truncated_png_even_if_pillow_flag_set(tmp_path, monkeypatch):
    data = _png_bytes(tmp_path)
    bad = tmp_path / "trunc2.png"
    bad.write_bytes(data[: len(data) // 2])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(DataError, match="trunc2.png"):
        load_image(bad, 3)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored


def test_not_an_image_and_empty_and_missing(tmp_path):
    fake = tmp_path / "fake.png"
    fake.write_text("this is not a png")
    with pytest.raises(DataError, match="fake.png"):
        load_image(fake, 1)
    with pytest.raises(DataError, match="fake.png"):
        image_size(fake)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="empty.png"):
        load_image(empty, 1)
    with pytest.raises(DataError, match="nothere.png"):
        load_image(tmp_path / "nothere.png", 1)


# --------------------------------------------------------------------------- masks / sizes


def test_load_mask_modes_and_resize(tmp_path):
    m = np.zeros((H, W), dtype=np.uint8)
    m[2:5, 3:9] = 255
    ref = m > 0
    files = [
        save(tmp_path / "m_l.png", Image.fromarray(m)),
        save(tmp_path / "m_1.png", Image.fromarray(ref)),
        save(tmp_path / "m_rgb.png", Image.fromarray(np.stack([m, m * 0, m * 0], -1))),
        save(tmp_path / "m_p.png", Image.fromarray(m).convert("P")),
        save(tmp_path / "m_16.png", Image.fromarray(m.astype(np.uint16) * 3)),
    ]
    for f in files:
        x = load_mask(f)
        assert x.dtype == bool and x.shape == (H, W), f.name
        assert np.array_equal(x, ref), f.name
    r = load_mask(files[0], size=(2 * H, 2 * W))
    assert r.shape == (2 * H, 2 * W) and r.dtype == bool
    assert np.array_equal(r[::2, ::2], ref)


def test_image_size_and_detect_channels(tmp_path):
    g = save(tmp_path / "g.png", Image.fromarray(grey8()))
    c = save(tmp_path / "c.png", Image.fromarray(rgb8()))
    grey_rgb = save(tmp_path / "grgb.png", Image.fromarray(grey8()).convert("RGB"))
    g16 = save(tmp_path / "g16.png", Image.fromarray(grey8().astype(np.uint16) * 257))
    assert image_size(c) == (H, W)
    assert detect_channels([g, g16, grey_rgb]) == 1
    assert detect_channels([g, c]) == 3
    with pytest.raises(DataError):
        detect_channels([])


# --------------------------------------------------------------------------- MVTec


def make_mvtec(root: Path, defects=("crack",), n_train=3, mask_size=(H, W)) -> Path:
    img = Image.fromarray(rgb8())
    for i in range(n_train):
        save(root / "train" / "good" / f"{i:03d}.png", img)
    save(root / "test" / "good" / "000.png", img)
    for d in defects:
        for i in range(2):
            save(root / "test" / d / f"{i:03d}.png", img)
            save(root / "ground_truth" / d / f"{i:03d}_mask.png", Image.new("L", mask_size[::-1], 255))
    (root / "train" / "good" / ".hidden.png").write_bytes(b"junk")
    (root / "train" / "good" / "notes.txt").write_text("ignored")
    return root


def test_scan_mvtec_ok(tmp_path):
    root = make_mvtec(tmp_path / "bottle", defects=("crack", "broken"))
    save(root / "train" / "good" / "003.PNG", Image.fromarray(grey8()))
    cat = scan_mvtec(root)
    assert isinstance(cat, MVTecCategory)
    assert cat.name == "bottle" and cat.root == root
    assert [p.name for p in cat.train] == ["000.png", "001.png", "002.png", "003.PNG"]
    assert [(s.defect, s.path.name, s.label) for s in cat.test] == [
        ("broken", "000.png", 1), ("broken", "001.png", 1),
        ("crack", "000.png", 1), ("crack", "001.png", 1),
        ("good", "000.png", 0),
    ]
    for s in cat.test:
        assert isinstance(s, TestSample)
        if s.label:
            assert s.mask_path == root / "ground_truth" / s.defect / f"{s.path.stem}_mask.png"
        else:
            assert s.mask_path is None
    check_mask_sizes(cat)
    assert scan_mvtec(root) == cat  # deterministic


def test_scan_mvtec_missing_things(tmp_path):
    with pytest.raises(DataError, match="nope"):
        scan_mvtec(tmp_path / "nope")
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(DataError, match="file.txt"):
        scan_mvtec(f)
    (tmp_path / "c1").mkdir()
    with pytest.raises(DataError, match=r"train.good"):
        scan_mvtec(tmp_path / "c1")
    (tmp_path / "c2" / "train" / "good").mkdir(parents=True)
    with pytest.raises(DataError, match=r"no training images"):
        scan_mvtec(tmp_path / "c2")
    root = tmp_path / "c3"
    save(root / "train" / "good" / "000.png", Image.fromarray(grey8()))
    with pytest.raises(DataError, match="test"):
        scan_mvtec(root)
    cat = scan_mvtec(root, require_test=False)
    assert cat.test == [] and len(cat.train) == 1
    (root / "test" / "good").mkdir(parents=True)
    with pytest.raises(DataError, match="no test images"):
        scan_mvtec(root)


def test_scan_mvtec_defect_without_mask(tmp_path):
    root = make_mvtec(tmp_path / "cat")
    (root / "ground_truth" / "crack" / "001_mask.png").unlink()
    with pytest.raises(DataError) as e:
        scan_mvtec(root)
    msg = str(e.value)
    assert str(root / "test" / "crack" / "001.png") in msg
    assert str(root / "ground_truth" / "crack" / "001_mask.png") in msg


def test_scan_mvtec_mask_without_image(tmp_path):
    root = make_mvtec(tmp_path / "cat")
    save(root / "ground_truth" / "crack" / "007_mask.png", Image.new("L", (W, H), 255))
    with pytest.raises(DataError, match="007_mask.png"):
        scan_mvtec(root)
    root2 = make_mvtec(tmp_path / "cat2")
    save(root2 / "ground_truth" / "scratch" / "000_mask.png", Image.new("L", (W, H), 255))
    with pytest.raises(DataError, match=r"scratch.000_mask.png"):
        scan_mvtec(root2)


def test_mask_size_mismatch(tmp_path):
    root = make_mvtec(tmp_path / "cat", mask_size=(H + 1, W))
    cat = scan_mvtec(root)  # listing only, no decoding
    with pytest.raises(DataError) as e:
        check_mask_sizes(cat)
    msg = str(e.value)
    assert "000_mask.png" in msg and str(root / "test" / "crack" / "000.png") in msg
    assert f"{H + 1}x{W}" in msg and f"{H}x{W}" in msg


# --------------------------------------------------------------------------- listing / split / batch


def test_list_images(tmp_path):
    d = tmp_path / "imgs"
    for name in ["b.png", "a.JPG", "c.tiff", ".hidden.png"]:
        save(d / name, Image.fromarray(grey8()), format="PNG")
    (d / "readme.txt").write_text("x")
    (d / "sub").mkdir()
    save(d / "sub" / "deep.png", Image.fromarray(grey8()))
    single = save(tmp_path / "single.bmp", Image.fromarray(grey8()))
    out = list_images([single, str(d), d / "b.png"])
    assert out == [single, d / "a.JPG", d / "b.png", d / "c.tiff"]
    with pytest.raises(DataError, match="missing_dir"):
        list_images([tmp_path / "missing_dir"])
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(DataError, match="emptydir"):
        list_images([tmp_path / "emptydir"])
    with pytest.raises(DataError, match="readme.txt"):
        list_images([d / "readme.txt"])


def test_split_train_val(tmp_path):
    paths = [tmp_path / f"{i}.png" for i in range(10)]
    a = split_train_val(paths, 0.2, seed=3)
    assert a == split_train_val(paths, 0.2, seed=3)
    train, val = a
    assert len(val) == 2 and len(train) == 8
    assert sorted(train + val) == sorted(paths)
    assert any(split_train_val(paths, 0.2, seed=s)[1] != val for s in range(4, 10))
    t, v = split_train_val(paths[:2], 0.01, seed=0)
    assert len(t) == 1 and len(v) == 1
    t, v = split_train_val(paths[:3], 0.99, seed=0)
    assert len(t) == 1 and len(v) == 2
    with pytest.raises(DataError):
        split_train_val(paths[:1], 0.2, seed=0)


def test_load_images(tmp_path):
    a = save(tmp_path / "a.png", Image.fromarray(rgb8()))
    b = save(tmp_path / "b.png", Image.fromarray(grey8()))
    x = load_images([a, b], 3, 8, progress=True)
    assert x.shape == (2, 3, 8, 8) and x.dtype == np.float32
    assert np.allclose(x[1], load_image(b, 3, 8))
    assert load_images([], 1, 8).shape == (0, 1, 8, 8)
    c = save(tmp_path / "c.png", Image.new("L", (5, 5)))
    with pytest.raises(DataError, match="c.png"):
        load_images([a, c], 1, None)


def test_check_readable_names_every_unreadable_file_first_one_first(tmp_path):
    from lsr.images import check_readable

    good = save(tmp_path / "good.png", Image.new("RGB", (8, 8)))
    check_readable([good, good])                                 # nothing to say
    (tmp_path / "one.png").write_text("x")
    with pytest.raises(DataError, match=r"one\.png: not a readable image") as e:
        check_readable([good, tmp_path / "one.png"])
    assert "of 2 images" not in str(e.value)                     # one file: its own message only
    bad = []
    for i in range(7):
        bad.append(tmp_path / f"bad{i}.png")
        bad[-1].write_bytes(b"" if i % 2 else b"nope")
    with pytest.raises(DataError) as e:
        check_readable([good, *bad], listed=3)
    msg = str(e.value)
    assert msg.startswith(f"{bad[0]}: not a readable image")
    assert "7 of 8 images cannot be read" in msg and "; and 4 more" in msg
    assert all(str(b) in msg for b in bad[:3]) and str(bad[3]) not in msg
    # a truncated file's header reads: it is found when decoded, not here
    data = _png_bytes(tmp_path)
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    check_readable([tmp_path / "cut.png"])
