"""Tests for lsr.report: figures are valid PNGs of plausible size, tables are aligned."""
from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from lsr import report
from lsr.report import format_table, heatmap, overlay, save_panel, save_report, to_rgb_uint8

H = W = 128


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def _image(rng, c):
    return rng.random((c, H, W)).astype(np.float32)


def _mask():
    m = np.zeros((H, W), bool)
    m[40:70, 50:90] = True
    return m


def _check_png(path, min_w=300, min_h=100, max_side=6000):
    assert os.path.isfile(path)
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.load()
        w, h = im.size
    assert min_w <= w <= max_side and min_h <= h <= max_side, (w, h)
    # nothing left behind by the atomic writer
    assert not [p for p in os.listdir(os.path.dirname(path)) if p.endswith(".tmp")]
    return w, h


# --------------------------------------------------------------------------- arrays


def test_to_rgb_uint8_shapes_and_clipping():
    grey = np.linspace(-0.5, 1.5, H * W, dtype=np.float32).reshape(1, H, W)
    out = to_rgb_uint8(grey)
    assert out.shape == (H, W, 3) and out.dtype == np.uint8
    assert out.min() == 0 and out.max() == 255
    assert np.array_equal(out[..., 0], out[..., 2])

    rgb = np.zeros((3, 8, 6), np.float32)
    rgb[0] = 1.0
    out = to_rgb_uint8(rgb)
    assert out.shape == (8, 6, 3)
    assert (out[..., 0] == 255).all() and (out[..., 1:] == 0).all()

    assert to_rgb_uint8(np.full((5, 7), 0.5)).shape == (5, 7, 3)
    assert to_rgb_uint8(np.full((5, 7), np.nan)).max() == 0
    with pytest.raises(ValueError):
        to_rgb_uint8(np.zeros((2, 3, 4, 5)))


def test_heatmap_and_overlay(rng):
    m = rng.random((H, W)).astype(np.float32)
    hm = heatmap(m)
    assert hm.shape == (H, W, 3) and hm.dtype == np.uint8
    # Fixed scale: values beyond it clip to the end colours.
    lo = heatmap(np.zeros((4, 4)), vmin=0.0, vmax=1.0)
    hi = heatmap(np.full((4, 4), 5.0), vmin=0.0, vmax=1.0)
    assert not np.array_equal(lo, hi)
    assert np.array_equal(hi, heatmap(np.ones((4, 4)), vmin=0.0, vmax=1.0))
    # Constant map and NaN do not crash.
    assert heatmap(np.ones((4, 4))).shape == (4, 4, 3)
    assert heatmap(np.full((4, 4), np.nan)).shape == (4, 4, 3)

    for c in (1, 3):
        ov = overlay(_image(rng, c), m, 0.0, 1.0, alpha=0.5)
        assert ov.shape == (H, W, 3) and ov.dtype == np.uint8
    # alpha=0 is the image, alpha=1 the heat-map.
    img = _image(rng, 3)
    assert np.array_equal(overlay(img, m, 0, 1, alpha=0.0), to_rgb_uint8(img))
    assert np.array_equal(overlay(img, m, 0, 1, alpha=1.0), heatmap(m, 0, 1))
    # A smaller map is resized to the image.
    assert overlay(img, m[::4, ::4], alpha=0.5).shape == (H, W, 3)


# --------------------------------------------------------------------------- panel


@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("with_mask", [False, True])
def test_save_panel(tmp_path, rng, c, with_mask):
    img = _image(rng, c)
    amap = rng.random((H, W)).astype(np.float32)
    grid = rng.random((16, 16)) > 0.8
    path = tmp_path / "sub" / "panel.png"
    save_panel(path, img, _image(rng, c), _image(rng, c), amap, grid,
               title="score 0.734", mask=_mask() if with_mask else None)
    w, h = _check_png(str(path), min_w=700, min_h=150)
    assert w <= 1600 and h <= 500


def test_save_panel_int_grid_and_skipped_tiles(tmp_path, rng):
    img = _image(rng, 3)
    amap = rng.random((H, W))
    p1 = tmp_path / "int.png"
    save_panel(p1, img, img, img, amap, rng.integers(0, 4, (16, 16)), vmin=0.0, vmax=1.0)
    w_full, _ = _check_png(str(p1), min_w=700)
    p2 = tmp_path / "skip.png"
    save_panel(p2, img, None, None, amap, None)
    w_skip, _ = _check_png(str(p2), min_w=250)
    assert w_skip < w_full


# --------------------------------------------------------------------------- report


def _rows(rng, n, c=3):
    rows = []
    for i in range(n):
        good = i % 3 == 0
        rows.append(dict(
            image=_image(rng, c),
            mask=None if good else _mask(),
            maps={"lsr": rng.random((H, W)), "direct": 2 * rng.random((H, W))},
            label=f"{'good' if good else 'crack'}/{i:03d}.png  score {rng.random():.2f}",
        ))
    return rows


def _curves():
    f = np.linspace(0, 1, 20)
    return {
        "lsr": dict(fpr=f, tpr=f ** 0.3, auc=0.91, kind="image"),
        "direct": dict(fpr=f, tpr=f ** 0.6, auc=0.80, kind="image"),
        "lsr px": dict(fpr=f, tpr=f ** 0.2, auc=float("nan"), kind="pixel"),
    }


@pytest.mark.parametrize("c", [1, 3])
def test_save_report(tmp_path, rng, c):
    path = tmp_path / "report.png"
    save_report(path, _rows(rng, 4, c), _curves(), title="bottle")
    w, h = _check_png(str(path), min_w=500, min_h=600)
    assert h > w  # a grid of 4 rows over the ROC axes


def test_save_report_empty_curves_and_many_rows(tmp_path, rng):
    p1 = tmp_path / "nocurves.png"
    save_report(p1, _rows(rng, 3), {})
    _, h_no = _check_png(str(p1), min_w=500, min_h=300)
    p2 = tmp_path / "curves.png"
    save_report(p2, _rows(rng, 3), _curves())
    _, h_yes = _check_png(str(p2), min_w=500, min_h=300)
    assert h_yes > h_no

    p3 = tmp_path / "many.png"
    save_report(p3, _rows(rng, 12), _curves(), scales={"lsr": (0.0, 1.0)})
    _check_png(str(p3), min_w=500, min_h=1500)


def test_save_report_edge_cases(tmp_path, rng):
    # Only good images (no masks at all), a map missing in one row, no rows.
    rows = _rows(rng, 3)
    for r in rows:
        r["mask"] = None
    del rows[1]["maps"]["direct"]
    save_report(tmp_path / "good.png", rows, {"x": dict(fpr=[], tpr=[], auc=float("nan"))})
    _check_png(str(tmp_path / "good.png"), min_w=300)
    save_report(tmp_path / "nothing.png", [], {})
    _check_png(str(tmp_path / "nothing.png"), min_w=300, min_h=50)
    save_report(tmp_path / "curves_only.png", [], _curves())
    _check_png(str(tmp_path / "curves_only.png"), min_w=300, min_h=200)


# --------------------------------------------------------------------------- atomic


def test_failed_save_leaves_existing_file_untouched(tmp_path, rng, monkeypatch):
    from matplotlib.figure import Figure

    img = _image(rng, 3)
    amap = rng.random((H, W))
    grid = np.zeros((16, 16), bool)
    panel, rep = tmp_path / "panel.png", tmp_path / "report.png"
    panel.write_bytes(b"old panel")
    rep.write_bytes(b"old report")

    def boom(self, *a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(Figure, "savefig", boom)
    with pytest.raises(RuntimeError):
        save_panel(panel, img, img, img, amap, grid)
    with pytest.raises(RuntimeError):
        save_report(rep, _rows(rng, 2), _curves())
    assert panel.read_bytes() == b"old panel"
    assert rep.read_bytes() == b"old report"
    assert sorted(os.listdir(tmp_path)) == ["panel.png", "report.png"]

    monkeypatch.undo()
    save_panel(panel, img, img, img, amap, grid)
    _check_png(str(panel), min_w=700)


def test_no_pyplot_state_used():
    with open(report.__file__) as f:
        src = f.read()
    assert "matplotlib.pyplot" not in src and "import pyplot" not in src
    assert report.CMAP in ("turbo", "jet", "inferno")


# --------------------------------------------------------------------------- table


def test_format_table():
    metrics = {
        "lsr": {"image_auroc": 0.91234, "pixel_auroc": float("nan"), "n": 42},
        "direct reconstruction": {"image_auroc": 0.8, "pixel_auroc": 0.95678},
    }
    text = format_table(metrics, ["image_auroc", "pixel_auroc", "n"])
    lines = text.split("\n")
    assert len(lines) == 4
    assert lines[0].split() == ["method", "image_auroc", "pixel_auroc", "n"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert lines[2].split() == ["lsr", "0.912", "n/a", "42"]
    assert lines[3].split() == ["direct", "reconstruction", "0.800", "0.957", "n/a"]
    # Columns are aligned: every value column ends at the same position.
    assert len({len(l) for l in lines}) == 1
    assert "nan" not in text.lower().replace("n/a", "")

    # Default columns: in order of first appearance; subset selection respected.
    assert format_table(metrics).split("\n")[0].split() == ["method", "image_auroc", "pixel_auroc", "n"]
    only = format_table(metrics, ["pixel_auroc"])
    assert "image_auroc" not in only and "0.957" in only
    assert format_table({}, ["a"]).split("\n")[0].split() == ["method", "a"]
