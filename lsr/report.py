"""Figures and text tables for LSR results.

Everything here draws with matplotlib's object API (:class:`matplotlib.figure.Figure`
plus the Agg canvas) and never touches ``pyplot``'s global state, so it is
thread-safe and needs no display. Every file is written through
:func:`lsr.io.atomic_write`, so a failure half-way never damages a file that was
already there.

Conventions:
    * Images are float arrays ``(C, H, W)`` (``C`` = 1 or 3) or ``(H, W)`` with
      values in ``[0, 1]``; they are clipped on display.
    * Anomaly maps are float arrays ``(H, W)``; larger means more anomalous.
    * The resampled-code grid is a bool/int array ``(h, w)`` at latent
      resolution (e.g. 16x16 for a 128x128 image); non-zero means "resampled".
"""
from __future__ import annotations

import math
import os
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from lsr.io import atomic_write
from lsr.tables import format_table  # noqa: F401 (re-exported; defined without matplotlib)

__all__ = [
    "CMAP",
    "to_rgb_uint8",
    "heatmap",
    "overlay",
    "save_panel",
    "save_report",
    "format_table",
]

#: Colormap used for every anomaly heat-map (perceptually ordered 'jet' replacement).
CMAP = "turbo"

_DPI = 100
_TILE_FONT = 9


# --------------------------------------------------------------------------- arrays


def _as_numpy(x: Any) -> np.ndarray:
    """Return ``x`` as a NumPy array (accepts torch tensors without importing torch)."""
    if hasattr(x, "detach"):
        x = x.detach()
    if hasattr(x, "cpu"):
        x = x.cpu()
    if hasattr(x, "numpy") and not isinstance(x, np.ndarray):
        x = x.numpy()
    return np.asarray(x)


def to_rgb_uint8(image: Any) -> np.ndarray:
    """Convert an image to an ``(H, W, 3)`` uint8 RGB array.

    Args:
        image: float array ``(C, H, W)`` with ``C`` in {1, 3}, ``(H, W)``, or
            channels-last ``(H, W, C)``, with values in ``[0, 1]`` (values outside
            are clipped, NaN becomes 0). A uint8 array is taken as already being
            in ``[0, 255]``.

    Returns:
        A new C-contiguous ``(H, W, 3)`` uint8 array.

    Raises:
        ValueError: if the shape is not one of the above.
    """
    a = _as_numpy(image)
    if a.ndim == 3:
        if a.shape[0] in (1, 3):
            a = np.moveaxis(a, 0, -1)
        elif a.shape[-1] not in (1, 3):
            raise ValueError(f"expected (C,H,W) or (H,W,C) with C in (1,3), got shape {a.shape}")
    elif a.ndim == 2:
        a = a[..., None]
    else:
        raise ValueError(f"expected a (C,H,W) or (H,W) image, got shape {a.shape}")
    if a.dtype == np.uint8:
        out = a
    else:
        f = np.nan_to_num(a.astype(np.float32), nan=0.0, posinf=1.0, neginf=0.0)
        out = np.rint(np.clip(f, 0.0, 1.0) * 255.0).astype(np.uint8)
    if out.shape[-1] == 1:
        out = np.repeat(out, 3, axis=-1)
    return np.ascontiguousarray(out)


def _map_range(values: Sequence[np.ndarray], vmin: float | None, vmax: float | None) -> tuple[float, float]:
    """Finite min/max over ``values`` unless given; always returns ``vmin < vmax``."""
    if vmin is None or vmax is None:
        finite = [v[np.isfinite(v)] for v in values]
        finite = [v for v in finite if v.size]
        lo = float(min(v.min() for v in finite)) if finite else 0.0
        hi = float(max(v.max() for v in finite)) if finite else 1.0
        vmin = lo if vmin is None else float(vmin)
        vmax = hi if vmax is None else float(vmax)
    vmin, vmax = float(vmin), float(vmax)
    if not vmax > vmin:
        vmax = vmin + 1e-12 if vmin == 0 else vmin + abs(vmin) * 1e-6
    return vmin, vmax


def _as_map(m: Any) -> np.ndarray:
    a = _as_numpy(m).astype(np.float32)
    a = np.squeeze(a)
    if a.ndim != 2:
        raise ValueError(f"expected an (H,W) map, got shape {np.shape(m)}")
    return a


def heatmap(map: Any, vmin: float | None = None, vmax: float | None = None) -> np.ndarray:
    """Colour an anomaly map with the :data:`CMAP` colormap.

    Args:
        map: float array ``(H, W)`` (a leading singleton axis is accepted).
        vmin: value shown as the coldest colour; defaults to the map's finite minimum.
        vmax: value shown as the hottest colour; defaults to the map's finite maximum.

    Returns:
        ``(H, W, 3)`` uint8 RGB array. NaN values are shown as ``vmin``.
    """
    a = _as_map(map)
    lo, hi = _map_range([a], vmin, vmax)
    t = np.clip((np.nan_to_num(a, nan=lo) - lo) / (hi - lo), 0.0, 1.0)
    rgba = colormaps[CMAP](t, bytes=True)
    return np.ascontiguousarray(rgba[..., :3])


def _resize_nearest(a: np.ndarray, h: int, w: int) -> np.ndarray:
    """Nearest-neighbour resize of the first two axes of ``a`` to ``(h, w)``."""
    rows = (np.arange(h) * a.shape[0]) // h
    cols = (np.arange(w) * a.shape[1]) // w
    return a[rows[:, None], cols[None, :]]


def _resize_map(a: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bilinear resize of a float map to ``(h, w)`` (no-op if already that size)."""
    if a.shape == (h, w):
        return a
    from PIL import Image

    return np.asarray(Image.fromarray(a.astype(np.float32), mode="F").resize((w, h), Image.BILINEAR))


def overlay(
    image: Any,
    map: Any,
    vmin: float | None = None,
    vmax: float | None = None,
    alpha: float = 0.5,
) -> np.ndarray:
    """Blend a heat-map over an image.

    Args:
        image: image ``(C, H, W)`` or ``(H, W)`` in ``[0, 1]`` (see :func:`to_rgb_uint8`).
        map: anomaly map ``(H', W')``; resized bilinearly to ``(H, W)`` if it differs.
        vmin: colour-scale minimum (default: the map's minimum).
        vmax: colour-scale maximum (default: the map's maximum).
        alpha: weight of the heat-map, in ``[0, 1]``.

    Returns:
        ``(H, W, 3)`` uint8 RGB array.
    """
    rgb = to_rgb_uint8(image)
    m = _resize_map(_as_map(map), rgb.shape[0], rgb.shape[1])
    heat = heatmap(m, vmin, vmax)
    alpha = float(np.clip(alpha, 0.0, 1.0))
    out = (1.0 - alpha) * rgb.astype(np.float32) + alpha * heat.astype(np.float32)
    return np.rint(np.clip(out, 0, 255)).astype(np.uint8)


def _resampled_rgb(image: Any, grid: Any, faint: float = 0.35) -> tuple[np.ndarray, int, int]:
    """Render the resampled-code grid over a faint grey copy of the image.

    Returns the RGB tile, the number of resampled cells and the number of cells.
    """
    rgb = to_rgb_uint8(image).astype(np.float32)
    H, W = rgb.shape[:2]
    g = np.squeeze(_as_numpy(grid))
    if g.ndim != 2:
        raise ValueError(f"expected an (h,w) resampled-code grid, got shape {np.shape(grid)}")
    g = np.nan_to_num(g.astype(np.float32))
    on = g != 0
    grey = rgb.mean(axis=-1, keepdims=True)
    base = 255.0 * (1.0 - faint) + grey * faint  # light, washed-out input
    base = np.repeat(base, 3, axis=-1)
    # Colour strength: bool grids are fully on; int grids (e.g. resample counts)
    # scale with the value, with a floor so every resampled cell stays visible.
    gmax = float(g.max()) if on.any() else 1.0
    strength = np.where(on, 0.45 + 0.4 * np.clip(g / max(gmax, 1e-12), 0, 1), 0.0)
    strength = _resize_nearest(strength, H, W)[..., None]
    red = np.array([220.0, 20.0, 60.0], dtype=np.float32)
    out = base * (1.0 - strength) + red * strength
    return np.rint(np.clip(out, 0, 255)).astype(np.uint8), int(on.sum()), int(on.size)


# --------------------------------------------------------------------------- figures


def _new_figure(width_in: float, height_in: float) -> Figure:
    fig = Figure(figsize=(width_in, height_in), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save_figure(fig: Figure, path: str | os.PathLike) -> None:
    """Write ``fig`` as PNG to ``path`` atomically."""
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=_DPI, facecolor="white")


def _tile(ax, rgb: np.ndarray, title: str, fontsize: float = _TILE_FONT) -> None:
    ax.imshow(rgb, interpolation="nearest")
    ax.set_title(title, fontsize=fontsize, pad=3)
    ax.set_xticks([])
    ax.set_yticks([])


def _blank_tile(ax, title: str, text: str = "n/a", shape: tuple[int, int] = (1, 1),
                fontsize: float = _TILE_FONT) -> None:
    # An image of the right shape keeps the tile the same size as its neighbours.
    ax.imshow(np.full((*shape, 3), 238, np.uint8), interpolation="nearest")
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=fontsize, color="#777777",
            transform=ax.transAxes)
    ax.set_title(title, fontsize=fontsize, pad=3)
    ax.set_xticks([])
    ax.set_yticks([])


def _mask_bool(mask: Any, h: int, w: int) -> np.ndarray:
    m = np.squeeze(_as_numpy(mask))
    if m.ndim != 2:
        raise ValueError(f"expected an (H,W) mask, got shape {np.shape(mask)}")
    m = m.astype(np.float32) > 0.5 if m.dtype != bool else m
    if m.shape != (h, w):
        m = _resize_nearest(m, h, w)
    return m


def _contour(ax, mask: np.ndarray, color: str = "white") -> None:
    if mask.any() and not mask.all():
        ax.contour(mask.astype(np.float32), levels=[0.5], colors=color, linewidths=0.9)


def _colorbar(fig: Figure, axes, vmin: float, vmax: float, **kw) -> None:
    from matplotlib.cm import ScalarMappable

    sm = ScalarMappable(norm=Normalize(vmin=vmin, vmax=vmax), cmap=colormaps[CMAP])
    cb = fig.colorbar(sm, ax=axes, **kw)
    cb.ax.tick_params(labelsize=7)


def save_panel(
    path: str | os.PathLike,
    image: Any,
    direct: Any,
    restored: Any,
    anomaly_map: Any,
    resampled: Any,
    *,
    title: str = "",
    vmin: float | None = None,
    vmax: float | None = None,
    mask: Any = None,
) -> None:
    """Save a one-image panel PNG (about 1100 px wide) with labelled tiles.

    Tiles, left to right: input, direct reconstruction, restored (after latent
    resampling), heat-map overlay (with the ground-truth outline when ``mask`` is
    given, and a colour bar), resampled-code map, and the ground-truth mask.

    Args:
        path: output PNG path (written atomically; parent folders are created).
        image: input image ``(C, H, W)`` float in ``[0, 1]``, ``C`` in {1, 3}.
        direct: direct VQ-VAE reconstruction, same layout as ``image``, or None to
            skip the tile.
        restored: decoded image after resampling, same layout, or None to skip.
        anomaly_map: anomaly map ``(H, W)`` (resized to the image if it differs).
        resampled: bool/int grid ``(h, w)`` of resampled latent codes (shown
            upscaled with nearest-neighbour over a faint input), or None to skip.
        title: figure title, e.g. ``"bottle/broken_large/000.png  score 0.734"``.
        vmin: heat-map scale minimum (default: the map's minimum).
        vmax: heat-map scale maximum (default: the map's maximum).
        mask: optional ground-truth mask ``(H, W)`` (bool or {0, 1}).
    """
    img_rgb = to_rgb_uint8(image)
    H, W = img_rgb.shape[:2]
    amap = _resize_map(_as_map(anomaly_map), H, W)
    lo, hi = _map_range([amap], vmin, vmax)
    gt = _mask_bool(mask, H, W) if mask is not None else None

    tiles: list[tuple[str, Any]] = [("input", img_rgb)]
    if direct is not None:
        tiles.append(("direct reconstruction", to_rgb_uint8(direct)))
    if restored is not None:
        tiles.append(("restored", to_rgb_uint8(restored)))
    tiles.append(("anomaly map", overlay(img_rgb, amap, lo, hi, alpha=0.55)))
    if resampled is not None:
        res_rgb, n_on, n_all = _resampled_rgb(img_rgb, resampled)
        tiles.append((f"resampled codes {n_on}/{n_all}", res_rgb))
    if gt is not None:
        tiles.append(("ground truth", np.repeat((gt.astype(np.uint8) * 255)[..., None], 3, -1)))

    n = len(tiles)
    tile_in = 1.8
    fig = _new_figure(tile_in * n + 0.5, tile_in * (H / W) + (0.75 if title else 0.45))
    axes = fig.subplots(1, n, squeeze=False)[0]
    for ax, (name, rgb) in zip(axes, tiles):
        _tile(ax, rgb, name)
        if name == "anomaly map":
            if gt is not None:
                _contour(ax, gt)
            _colorbar(fig, ax, lo, hi, location="right", fraction=0.05, pad=0.02, shrink=0.9)
        elif name.startswith("resampled codes"):
            g = np.squeeze(_as_numpy(resampled))
            h, w = g.shape
            if h <= 64 and w <= 64:  # draw cell borders so single cells are visible
                for i in range(1, h):
                    ax.axhline(i * H / h - 0.5, color="#bbbbbb", lw=0.3)
                for j in range(1, w):
                    ax.axvline(j * W / w - 0.5, color="#bbbbbb", lw=0.3)
    if title:
        fig.suptitle(title, fontsize=11)
    _save_figure(fig, path)


def _fmt_auc(x: Any) -> str:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return "n/a"
    return "n/a" if not math.isfinite(v) else f"{v:.3f}"


def save_report(
    path: str | os.PathLike,
    rows: Sequence[Mapping[str, Any]],
    curves: Mapping[str, Mapping[str, Any]],
    *,
    title: str = "",
    scales: Mapping[str, tuple[float, float]] | None = None,
) -> None:
    """Save a summary PNG: an example grid above ROC curves.

    Each grid row shows the image, its ground truth, then every anomaly map as a
    heat-map (with the ground-truth outline). Each map name has one colour scale
    shared by all rows (min/max over the shown rows unless given in ``scales``),
    with a colour bar under its column. Below the grid, ROC curves are drawn in
    one axes per kind present (image-level, pixel-level).

    Args:
        path: output PNG path (written atomically; parent folders are created).
        rows: up to ~12 dicts with keys ``image`` (``(C, H, W)`` float in
            ``[0, 1]``), ``mask`` (``(H, W)`` bool, or None for a defect-free
            image), ``maps`` (dict name -> ``(H, W)`` float map) and optional
            ``label`` (text shown beside the row). May be empty.
        curves: dict name -> dict with ``fpr``, ``tpr`` (arrays), ``auc`` (float,
            NaN allowed) and ``kind`` (``"image"`` or ``"pixel"``; default
            ``"image"``). May be empty.
        title: figure title.
        scales: optional dict map name -> ``(vmin, vmax)`` overriding the shared
            colour scale of that map.
    """
    rows = list(rows)
    curves = dict(curves or {})
    scales = dict(scales or {})

    names: list[str] = []
    for r in rows:
        for k in (r.get("maps") or {}):
            if k not in names:
                names.append(k)
    ranges: dict[str, tuple[float, float]] = {}
    for k in names:
        if k in scales and scales[k] is not None:
            ranges[k] = _map_range([], *scales[k])
        else:
            vals = [_as_map(r["maps"][k]) for r in rows if k in (r.get("maps") or {})]
            ranges[k] = _map_range(vals, None, None)

    kinds = [k for k in ("image", "pixel") if any(c.get("kind", "image") == k for c in curves.values())]
    kinds += sorted({c.get("kind", "image") for c in curves.values()} - set(kinds))

    ncols = 2 + len(names)
    tile_in = 1.7
    width = max(tile_in * ncols + 1.3, 3.6 * max(len(kinds), 1) + 0.6, 7.0)
    aspect = 1.0
    if rows:
        shp = to_rgb_uint8(rows[0]["image"]).shape
        aspect = float(np.clip(shp[0] / shp[1], 0.25, 4.0))
    row_h = tile_in * min(aspect, 1.0) + 0.15
    grid_h = row_h * len(rows) + (0.75 if names else 0.35) if rows else 0.0
    roc_h = 3.6 if kinds else 0.0
    title_h = 0.5 if title else 0.0
    empty = not rows and not kinds
    fig = _new_figure(width, grid_h + roc_h + title_h + (1.5 if empty else 0.2))

    parts = [h for h in (grid_h, roc_h) if h > 0]
    if parts:
        sub = fig.subfigures(len(parts), 1, height_ratios=parts, squeeze=False)[:, 0]
    else:
        sub = []
    i = 0
    if rows:
        _draw_grid(sub[i], rows, names, ranges)
        i += 1
    if kinds:
        _draw_rocs(sub[i], curves, kinds)
    if empty:
        fig.text(0.5, 0.5, "nothing to show", ha="center", va="center", fontsize=12, color="#777777")
    if title:
        fig.suptitle(title, fontsize=12)
    _save_figure(fig, path)


def _draw_grid(sf, rows, names, ranges) -> None:
    ncols = 2 + len(names)
    n = len(rows)
    # One extra thin grid row at the bottom holds the colour bars, so the bars
    # never shrink or shift the tiles above them.
    bar = 0.28 if names else 0.0
    heights = [1.0] * n + ([bar] if names else [])
    axes_all = sf.subplots(len(heights), ncols, squeeze=False, gridspec_kw={"height_ratios": heights})
    axes = axes_all[:n]
    headers = ["image", "ground truth", *names]
    for r, row in enumerate(rows):
        img = to_rgb_uint8(row["image"])
        H, W = img.shape[:2]
        mask = row.get("mask")
        gt = _mask_bool(mask, H, W) if mask is not None else None
        head = (lambda c: headers[c]) if r == 0 else (lambda c: "")
        _tile(axes[r, 0], img, head(0))
        label = row.get("label")
        if label:
            axes[r, 0].set_ylabel(_wrap(str(label), 22), fontsize=8)
        if gt is not None:
            _tile(axes[r, 1], np.repeat((gt.astype(np.uint8) * 255)[..., None], 3, -1), head(1))
        else:
            _blank_tile(axes[r, 1], head(1), "no mask", (H, W))
        maps = row.get("maps") or {}
        for c, k in enumerate(names, start=2):
            ax = axes[r, c]
            if k not in maps or maps[k] is None:
                _blank_tile(ax, head(c), "n/a", (H, W))
                continue
            m = _resize_map(_as_map(maps[k]), H, W)
            _tile(ax, heatmap(m, *ranges[k]), head(c))
            if gt is not None:
                _contour(ax, gt)
    if names:
        for c, ax in enumerate(axes_all[n]):
            ax.set_axis_off()
            if c >= 2:
                cax = ax.inset_axes([0.06, 0.45, 0.88, 0.35])
                _colorbar(sf, None, *ranges[names[c - 2]], cax=cax, orientation="horizontal")


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width, break_long_words=True)) or text


def _draw_rocs(sf, curves, kinds) -> None:
    axes = sf.subplots(1, len(kinds), squeeze=False)[0]
    for ax, kind in zip(axes, kinds):
        ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="#999999")
        for name, c in curves.items():
            if c.get("kind", "image") != kind:
                continue
            fpr = np.asarray(c.get("fpr", []), dtype=float).ravel()
            tpr = np.asarray(c.get("tpr", []), dtype=float).ravel()
            n = min(fpr.size, tpr.size)
            ax.plot(fpr[:n], tpr[:n], lw=1.5, label=f"{name} (AUROC {_fmt_auc(c.get('auc'))})")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
        ax.set_aspect("equal")
        ax.set_xlabel("false positive rate", fontsize=9)
        ax.set_ylabel("true positive rate", fontsize=9)
        ax.set_title(f"{kind}-level ROC", fontsize=10)
        ax.tick_params(labelsize=8)
        ax.grid(True, lw=0.3, alpha=0.5)
        ax.legend(loc="lower right", fontsize=8, frameon=True)
