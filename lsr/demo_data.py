"""A small MVTec-AD-layout demo dataset built from photographs bundled with scikit-image.

``skimage.data.brick()``, ``grass()`` and ``gravel()`` are real CC0 texture photographs
(512x512, 8-bit greyscale) that ship inside scikit-image, so no download is needed.
:func:`build_demo_dataset` cuts them into training crops ("good" only) and test crops
(good and defective), and paints synthetic defects with pixel-exact ground-truth masks::

    <root>/<category>/train/good/000.png ...
    <root>/<category>/test/good/000.png ...
    <root>/<category>/test/<defect>/000.png ...
    <root>/<category>/ground_truth/<defect>/000_mask.png     (uint8, 0 or 255)
    <root>/<category>/demo_params.json                       (written last: "complete")

Train/test separation
    Training crops come only from photo columns ``TRAIN_COLS`` and test crops only from
    ``TEST_COLS``; the two ranges are disjoint with a gap of ``TEST_COLS[0] - TRAIN_COLS[1]``
    pixels, so no test pixel was ever seen in training.  The split is by *columns*, not
    rows, on purpose: the brick photo is taken in perspective (the bricks are ~30% wider at
    the bottom than at the top, and lean by +-8 degrees from left to right).  Splitting by
    rows would give test bricks of a size never seen in training; splitting by columns
    gives both splits every size, and the random left-right flips of training crops cover
    the mirrored lean of the test side.

Defects (see :func:`make_defect`)
    ``scratch`` thin bright or dark anti-aliased curve(s), 1-3 px wide, tapered ends;
    ``crack``   dark, jagged, branching random-walk polyline, tapering to hair-line tips;
    ``hole``    dark irregular pit with shaded inner wall, a soft shadow rim and a lit lip;
    ``stain``   smooth, irregular blotch changing brightness and contrast (dark or light,
                sometimes with a darker "coffee ring" edge);
    ``foreign`` a patch of a different photograph (another texture, ``camera``, ``moon``,
                ``coins``) pasted with an irregular, slightly soft outline.
    Blob-like defects cover about 2-10% of the image, scratches and cracks less.  The
    mask is exactly the set of pixels the defect touched (every soft weight below
    ``MASK_TAU`` is cut to zero, so nothing outside the mask changes).

Everything is deterministic given ``seed``: every image has its own random stream keyed by
(seed, category, split, defect kind, index), so adding a category or a defect kind does not
change the images of the others.
"""
from __future__ import annotations

import functools
import re
import zlib
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage as ndi

from .io import read_json, save_png, write_json

__all__ = [
    "CATEGORIES",
    "DEFECT_KINDS",
    "SOURCE_SIZE",
    "TRAIN_COLS",
    "TEST_COLS",
    "CROP_SCALE",
    "MASK_TAU",
    "MARKER_NAME",
    "GENERATOR_VERSION",
    "build_demo_dataset",
    "make_defect",
    "load_photo",
    "crop_window",
    "cut_crop",
]

#: bump when the generated images change for the same parameters (invalidates old builds)
GENERATOR_VERSION = 1
CATEGORIES = ("brick", "grass", "gravel")
DEFECT_KINDS = ("scratch", "crack", "hole", "stain", "foreign")
#: side of the source photographs
SOURCE_SIZE = 512
#: half-open photo column ranges [start, stop) for training and test crops (disjoint)
TRAIN_COLS = (0, 304)
TEST_COLS = (312, 512)
#: photo pixels per output pixel: a 128 px image shows a 160 px window of the photo
CROP_SCALE = 1.25
#: soft defect weights below this are cut to zero; the mask is "weight > 0"
MASK_TAU = 0.2
MARKER_NAME = "demo_params.json"
_BUILDING_NAME = ".demo_building"

_PHOTO_NAMES = ("brick", "grass", "gravel", "camera", "moon", "coins")
_FOREIGN_POOL = ("brick", "grass", "gravel", "camera", "moon", "coins")
_OUR_FILE = re.compile(r"^\d{3,}(_mask)?\.png$")


# ----------------------------------------------------------------------------- sources
@functools.lru_cache(maxsize=None)
def load_photo(name: str) -> np.ndarray:
    """A bundled scikit-image photograph as a read-only uint8 (H, W) array."""
    if name not in _PHOTO_NAMES:
        raise ValueError(f"unknown photo {name!r}; choose from {_PHOTO_NAMES}")
    import skimage.data

    img = np.asarray(getattr(skimage.data, name)())
    if img.ndim != 2 or img.dtype != np.uint8:
        raise RuntimeError(f"skimage.data.{name}() is not an 8-bit greyscale image")
    img = img.copy()
    img.setflags(write=False)
    return img


def crop_window(image_size: int) -> int:
    """Side of the photo window that is resized to one ``image_size`` image."""
    limit = min(TRAIN_COLS[1] - TRAIN_COLS[0], TEST_COLS[1] - TEST_COLS[0])
    return int(min(round(image_size * CROP_SCALE), limit))


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    if img.shape == (size, size):
        return np.array(img, dtype=np.uint8)
    from PIL import Image

    res = Image.fromarray(np.ascontiguousarray(img)).resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(res, dtype=np.uint8).copy()


def cut_crop(photo: np.ndarray, top: int, left: int, window: int, size: int, flip: bool = False) -> np.ndarray:
    """The ``window`` x ``window`` photo region at (top, left), resized to ``size``, optionally
    mirrored left-right (this is exactly how every demo image is made)."""
    img = _resize(photo[top : top + window, left : left + window], size)
    return np.ascontiguousarray(img[:, ::-1]) if flip else img


def _rng(seed: int, *keys: str) -> np.random.Generator:
    entropy = [int(seed)] + [zlib.crc32(k.encode("utf-8")) for k in keys]
    return np.random.default_rng(np.random.SeedSequence(entropy))


# ----------------------------------------------------------------------------- shapes
def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise scaled to zero mean, unit standard deviation."""
    n = ndi.gaussian_filter(rng.standard_normal(shape), sigma=max(float(sigma), 0.5), mode="wrap")
    n -= n.mean()
    s = n.std()
    return n / s if s > 0 else n


def _blob(
    rng: np.random.Generator,
    shape: tuple[int, int],
    area: float,
    irregularity: float,
    max_elong: float = 2.0,
) -> tuple[np.ndarray, np.ndarray, tuple[float, float], float]:
    """An irregular blob of about ``area`` pixels.

    Returns ``(sd, score, center, radius)``: ``sd`` is an approximate signed distance in pixels
    to the blob outline (positive inside), smooth at sub-pixel level, good for a few pixels
    around the outline; ``radius`` is the radius of the circle of the same area.
    """
    H, W = shape
    S = min(H, W)
    area = float(np.clip(area, 12.0, 0.5 * H * W))
    elong = rng.uniform(1.0, max_elong)
    a = np.sqrt(area / np.pi * elong)  # semi-axes of the envelope ellipse
    b = np.sqrt(area / np.pi / elong)
    ang = rng.uniform(0, np.pi)
    margin = min(0.75 * a + 2.0, 0.45 * S)
    cy = rng.uniform(margin, H - margin)
    cx = rng.uniform(margin, W - margin)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float64)
    dy, dx = yy - cy, xx - cx
    u = (dx * np.cos(ang) + dy * np.sin(ang)) / a
    v = (-dx * np.sin(ang) + dy * np.cos(ang)) / b
    score = 1.0 - (u * u + v * v)
    if irregularity > 0:
        score = score + irregularity * 0.5 * _smooth_noise(rng, shape, sigma=max(1.5, 0.35 * b))
    # threshold at the quantile that gives the requested area
    thr = np.partition(score.ravel(), -int(area))[-int(area)]
    gy, gx = np.gradient(score)
    grad = np.sqrt(gy * gy + gx * gx)
    sd = (score - thr) / np.maximum(grad, 1e-6)
    return sd, score, (cy, cx), float(np.sqrt(area / np.pi))


def _largest_components(weight: np.ndarray, keep_frac: float = 0.25) -> np.ndarray:
    """Zero every connected component of ``weight > 0`` smaller than ``keep_frac`` of the largest."""
    lab, n = ndi.label(weight > 0)
    if n <= 1:
        return weight
    sizes = np.bincount(lab.ravel())[1:]
    keep = np.zeros(n + 1, bool)
    keep[1:] = sizes >= keep_frac * sizes.max()
    return np.where(keep[lab], weight, 0.0)


def _cut(weight: np.ndarray) -> np.ndarray:
    w = np.clip(weight, 0.0, 1.0)
    return np.where(w >= MASK_TAU, w, 0.0)


def _render_strokes(shape: tuple[int, int], strokes: Iterable[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Anti-aliased coverage (0..1) of polylines given as (points (N, 2) row/col, full widths (N,))."""
    from scipy.spatial import cKDTree

    H, W = shape
    alpha = np.zeros(shape, np.float64)
    for pts, widths in strokes:
        pts = _densify(np.asarray(pts, np.float64), np.asarray(widths, np.float64))
        pts, widths = pts[:, :2], pts[:, 2]
        half = widths.max() / 2 + 1.0
        r0 = max(int(np.floor(pts[:, 0].min() - half)), 0)
        r1 = min(int(np.ceil(pts[:, 0].max() + half)) + 1, H)
        c0 = max(int(np.floor(pts[:, 1].min() - half)), 0)
        c1 = min(int(np.ceil(pts[:, 1].max() + half)) + 1, W)
        if r0 >= r1 or c0 >= c1:
            continue
        rr, cc = np.mgrid[r0:r1, c0:c1]
        q = np.stack([rr.ravel(), cc.ravel()], 1).astype(np.float64)
        d, idx = cKDTree(pts).query(q, k=1, distance_upper_bound=half + 0.5)
        ok = np.isfinite(d)
        a = np.zeros(len(q))
        a[ok] = np.clip(widths[idx[ok]] / 2 + 0.5 - d[ok], 0.0, 1.0)
        alpha[r0:r1, c0:c1] = np.maximum(alpha[r0:r1, c0:c1], a.reshape(r1 - r0, c1 - c0))
    return alpha


def _densify(pts: np.ndarray, widths: np.ndarray, step: float = 0.25) -> np.ndarray:
    """Resample a polyline every ``step`` px; returns (M, 3) rows (row, col, width)."""
    seg = np.sqrt((np.diff(pts, axis=0) ** 2).sum(1))
    t = np.concatenate([[0.0], np.cumsum(seg)])
    if t[-1] <= 0:
        return np.column_stack([pts[:1], widths[:1]])
    tt = np.linspace(0.0, t[-1], max(int(t[-1] / step) + 2, 2))
    return np.column_stack([np.interp(tt, t, pts[:, 0]), np.interp(tt, t, pts[:, 1]), np.interp(tt, t, widths)])


# ----------------------------------------------------------------------------- defects
def _scratch(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    H, W = img.shape
    S = min(H, W)
    k = S / 128.0
    n = rng.choice([1, 1, 1, 2, 3])
    L = S * rng.uniform(0.3, 0.75)
    theta = rng.uniform(0, np.pi)
    direction = np.array([np.sin(theta), np.cos(theta)])
    normal = np.array([direction[1], -direction[0]])
    mid = rng.uniform(0.25 * S, 0.75 * S, 2)
    bend = rng.uniform(-0.22, 0.22) * L
    w_full = rng.uniform(1.0, 2.6) * k
    strokes = []
    for i in range(n):
        off = normal * (i - (n - 1) / 2) * rng.uniform(3.0, 6.0) * k
        li = L * rng.uniform(0.6, 1.0) if i else L
        p0 = mid - direction * li / 2 + off + rng.normal(0, 1.5 * k, 2)
        p2 = mid + direction * li / 2 + off + rng.normal(0, 1.5 * k, 2)
        p1 = mid + normal * bend + off
        t = np.linspace(0, 1, max(int(li), 8))[:, None]
        pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
        tt = t[:, 0]
        taper = np.clip(np.sin(np.pi * tt) ** 0.5, 0.25, 1.0)
        w = (w_full * (1.0 if i == 0 else rng.uniform(0.5, 0.9))) * taper
        strokes.append((pts, w))
    alpha = _render_strokes(img.shape, strokes)
    # intensity varies along the scratch (worn / interrupted look)
    along = 0.75 + 0.25 * _smooth_noise(rng, img.shape, sigma=4 * k)
    weight = _cut(alpha * np.clip(along, 0.4, 1.0))
    x = img.astype(np.float64)
    sign = 1.0 if rng.random() < 0.65 else -1.0
    delta = sign * rng.uniform(45, 85) * max(1.0, x.std() / 30.0)  # busier textures need more
    base = 0.5 * x + 0.5 * ndi.uniform_filter(x, size=int(9 * k) | 1)
    target = np.clip(base + delta, 0, 255)
    return x + weight * (target - x), weight


def _crack(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    H, W = img.shape
    S = min(H, W)
    k = S / 128.0
    strokes: list[tuple[np.ndarray, np.ndarray]] = []

    def walk(p, theta, length, w_start, depth):
        step = rng.uniform(2.0, 3.5) * k
        n = max(int(length / step), 3)
        pts, ths = [np.array(p, float)], [theta]
        th = theta
        for _ in range(n):
            th = th + rng.normal(0, 0.45) + 0.25 * (theta - th)
            if rng.random() < 0.07:
                th += rng.normal(0, 0.8)
            pts.append(pts[-1] + step * rng.uniform(0.6, 1.4) * np.array([np.sin(th), np.cos(th)]))
            ths.append(th)
        pts = np.array(pts)
        t = np.linspace(0, 1, len(pts))
        w = w_start * (1 - 0.6 * t ** 1.5)
        strokes.append((pts, w))
        if depth < 2:
            for _ in range(rng.integers(0, 3 if depth == 0 else 2)):
                j = int(rng.integers(max(n // 6, 1), max(n * 5 // 6, 2)))
                side = rng.choice([-1.0, 1.0])
                sub = length * (1 - t[j]) * rng.uniform(0.3, 0.7) + 6 * k
                walk(pts[j], ths[j] + side * rng.uniform(0.4, 1.1), sub, max(w[j] * 0.65, 0.8 * k), depth + 1)

    start = rng.uniform(0.15 * S, 0.85 * S, 2)
    theta = rng.uniform(0, 2 * np.pi)
    walk(start, theta, S * rng.uniform(0.35, 0.8), rng.uniform(1.4, 2.8) * k, 0)
    alpha = _render_strokes(img.shape, strokes)
    weight = _cut(alpha)
    x = img.astype(np.float64)
    depth = rng.uniform(0.45, 0.8)
    target = x * (1 - depth) * (0.9 + 0.1 * _smooth_noise(rng, img.shape, 3 * k))
    return x + weight * (target - x), weight


def _hole(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    H, W = img.shape
    k = min(H, W) / 128.0
    sd, _, (cy, cx), R = _blob(rng, img.shape, rng.uniform(0.013, 0.055) * H * W, rng.uniform(0.25, 0.6), 1.6)
    x = img.astype(np.float64)
    mu = ndi.gaussian_filter(x, sigma=6 * k)
    light = rng.uniform(0, 2 * np.pi)
    ly, lx = np.sin(light), np.cos(light)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float64)
    # +1 on the side of the hole towards the light, -1 on the far side
    shade = np.clip(((yy - cy) * ly + (xx - cx) * lx) / max(R, 1.0), -1.0, 1.0)
    core = np.clip(0.5 + sd / 1.2, 0, 1)  # anti-aliased outline of the pit
    # inside: a dark floor; the inner wall on the far side faces the light and is brighter,
    # the floor just below the near edge lies in the deepest shadow
    wall_w = rng.uniform(0.25, 0.5) * R
    wall = np.clip(1 - sd / wall_w, 0, 1)  # 1 at the outline, 0 on the floor
    floor_level = rng.uniform(0.25, 0.55)
    lit = np.clip(-shade, 0, 1) * wall
    shadowed = np.clip(shade, 0, 1) * np.clip(1 - sd / (1.5 * wall_w), 0, 1)
    level = floor_level + rng.uniform(0.2, 0.45) * lit - 0.5 * floor_level * shadowed
    floor = mu * level + 0.12 * (x - mu) + 5 * _smooth_noise(rng, img.shape, 1.0 * k)
    # outside: a soft darker halo of crushed material, a lit lip on the side towards the light
    rim_w = rng.uniform(2.0, 5.0) * k
    rim = np.clip(1 + np.minimum(sd, 0) / rim_w, 0, 1) * (sd > -rim_w)
    lip = rng.uniform(10, 30) * np.clip(shade, 0, 1) * np.clip(1 + np.minimum(sd, 0) / 1.5, 0, 1)
    halo = rng.uniform(0.12, 0.3) * (1 - 0.6 * np.clip(shade, 0, 1))
    rim_target = np.clip(x * (1 - halo) + lip / np.maximum(rim, 1e-3) * (rim > 0), 0, 255)
    w_rim = _cut(rim)
    w_core = _cut(core)
    out = x + w_rim * (rim_target - x)
    out = out + w_core * (np.clip(floor, 0, 255) - out)
    weight = _largest_components(np.maximum(w_rim, w_core))
    out = np.where(weight > 0, out, x)
    return out, weight


def _stain(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    H, W = img.shape
    k = min(H, W) / 128.0
    sd, _, _, R = _blob(rng, img.shape, rng.uniform(0.025, 0.10) * H * W, rng.uniform(0.6, 1.1), 2.2)
    soft = rng.uniform(1.5, 4.0) * k
    body = np.clip(sd / soft, 0, 1)
    strength = np.clip(0.8 + 0.25 * _smooth_noise(rng, img.shape, max(R / 2, 2.0)), 0.55, 1.0)
    weight = _largest_components(_cut(body * strength))
    x = img.astype(np.float64)
    mu = ndi.gaussian_filter(x, sigma=4 * k)
    dark = rng.random() < 0.65
    contrast = rng.uniform(0.4, 0.85)
    shift = (-1 if dark else 1) * rng.uniform(20, 40) * max(1.0, x.std() / 25.0)
    if rng.random() < 0.35:  # "coffee ring": a slightly stronger edge
        ring = np.clip(1 - np.abs(sd - 1.5 * soft) / (1.5 * soft), 0, 1)
        shift = shift * (1 + 0.6 * ring)
    target = np.clip(mu + (x - mu) * contrast + shift, 0, 255)
    out = x + weight * (target - x)
    return out, weight


def _foreign(
    img: np.ndarray, rng: np.random.Generator, exclude: Sequence[str] = ()
) -> tuple[np.ndarray, np.ndarray]:
    H, W = img.shape
    k = min(H, W) / 128.0
    pool = [p for p in _FOREIGN_POOL if p not in set(exclude)]
    src = load_photo(pool[int(rng.integers(len(pool)))])
    # a region of the other photo at a random scale, with enough structure
    win = int(np.clip(round(max(H, W) * CROP_SCALE * rng.uniform(0.6, 1.5)), 16, min(src.shape)))
    patch = None
    for _ in range(20):
        top = int(rng.integers(0, src.shape[0] - win + 1))
        left = int(rng.integers(0, src.shape[1] - win + 1))
        cand = src[top : top + win, left : left + win]
        if cand.std() > 25:
            patch = cand
            break
        patch = cand if patch is None or cand.std() > patch.std() else patch
    p = _resize(patch, max(H, W))[:H, :W].astype(np.float64)
    if rng.random() < 0.5:
        p = p[:, ::-1]
    x = img.astype(np.float64)
    sd, _, _, _ = _blob(rng, img.shape, rng.uniform(0.02, 0.09) * H * W, rng.uniform(0.3, 0.8), 2.0)
    soft = rng.uniform(1.0, 2.0) * k
    weight = _largest_components(_cut(np.clip(0.5 + sd / soft, 0, 1)))
    inside = weight > 0.5
    if not inside.any():
        inside = weight > 0
    # bring the patch roughly to the brightness and contrast of the surface it lies on
    pm, ps = p[inside].mean(), p[inside].std() + 1e-6
    xm, xs = x[inside].mean(), x[inside].std() + 1e-6
    target = xm + rng.uniform(-25, 25) + (p - pm) * (xs / ps) * rng.uniform(0.7, 1.3)
    out = x + weight * (np.clip(target, 0, 255) - x)
    return out, weight


_DEFECTS = {"scratch": _scratch, "crack": _crack, "hole": _hole, "stain": _stain, "foreign": _foreign}


def make_defect(
    image: np.ndarray, kind: str, rng: np.random.Generator, *, exclude_sources: Sequence[str] = ()
) -> tuple[np.ndarray, np.ndarray]:
    """Paint one synthetic defect of ``kind`` onto a uint8 (H, W) image.

    Returns ``(defective, mask)``: a new uint8 (H, W) image and a bool (H, W) mask that is
    True exactly where the defect was painted (never empty).  Pixels outside the mask are
    bit-identical to ``image``.  ``exclude_sources`` names photos the ``foreign`` defect must
    not take its patch from (the builder passes the image's own category).

    Example:
        >>> img = np.full((64, 64), 120, np.uint8)
        >>> out, mask = make_defect(img, "hole", np.random.default_rng(0))
        >>> bool(mask.any()), bool((out[~mask] == img[~mask]).all())
        (True, True)
    """
    if kind not in _DEFECTS:
        raise ValueError(f"unknown defect kind {kind!r}; choose from {tuple(_DEFECTS)}")
    image = np.asarray(image)
    if image.ndim != 2 or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 (H, W), got {image.dtype} {image.shape}")
    if min(image.shape) < 16:
        raise ValueError(f"image too small for a defect: {image.shape}")
    x = image.astype(np.float64)
    best = None
    for _ in range(8):  # retry the rare degenerate draw (tiny or invisible defect)
        if kind == "foreign":
            out, weight = _foreign(image, rng, exclude_sources)
        else:
            out, weight = _DEFECTS[kind](image, rng)
        mask = weight > 0
        out = np.where(mask, np.clip(np.rint(out), 0, 255), x).astype(np.uint8)
        n = int(mask.sum())
        change = float(np.abs(out[mask].astype(np.float64) - x[mask]).mean()) if n else 0.0
        if n >= 12 and change >= 10.0:
            return out, mask
        if n and (best is None or change > best[2]):
            best = (out, mask, change)
    if best is None:  # practically unreachable; keep the "never empty" promise anyway
        out = image.copy()
        mask = np.zeros(image.shape, bool)
        c = (image.shape[0] // 2, image.shape[1] // 2)
        mask[c[0] - 2 : c[0] + 3, c[1] - 2 : c[1] + 3] = True
        out[mask] = np.where(image[mask] > 127, 0, 255)
        return out, mask
    return best[0], best[1]


# ----------------------------------------------------------------------------- dataset
def _params(category: str, image_size: int, n_train: int, n_test_good: int, n_test_per_defect: int, seed: int,
            defects: Sequence[str]) -> dict:
    return {
        "generator_version": GENERATOR_VERSION,
        "category": category,
        "source": f"skimage.data.{category}()",
        "image_size": int(image_size),
        "crop_window": crop_window(image_size),
        "train_cols": list(TRAIN_COLS),
        "test_cols": list(TEST_COLS),
        "n_train": int(n_train),
        "n_test_good": int(n_test_good),
        "n_test_per_defect": int(n_test_per_defect),
        "defects": list(defects),
        "seed": int(seed),
    }


def _name(i: int, n: int) -> str:
    return f"{i:0{max(3, len(str(max(n - 1, 0))))}d}"


def _expected_files(params: dict) -> list[str]:
    files = [f"train/good/{_name(i, params['n_train'])}.png" for i in range(params["n_train"])]
    files += [f"test/good/{_name(i, params['n_test_good'])}.png" for i in range(params["n_test_good"])]
    n = params["n_test_per_defect"]
    for d in params["defects"]:
        for i in range(n):
            files.append(f"test/{d}/{_name(i, n)}.png")
            files.append(f"ground_truth/{d}/{_name(i, n)}_mask.png")
    return files


def _is_complete(cat_dir: Path, params: dict) -> bool:
    marker = cat_dir / MARKER_NAME
    if not marker.is_file() or (cat_dir / _BUILDING_NAME).exists():
        return False
    try:
        old = read_json(marker)
    except (OSError, ValueError):
        return False
    if not isinstance(old, dict) or old.get("params") != params:
        return False
    return all((cat_dir / f).is_file() for f in _expected_files(params))


def _crop_box(rng: np.random.Generator, split: str, window: int, flip: bool) -> dict:
    cols = TRAIN_COLS if split == "train" else TEST_COLS
    top = int(rng.integers(0, SOURCE_SIZE - window + 1))
    left = int(rng.integers(cols[0], cols[1] - window + 1))
    return {"top": top, "left": left, "window": window, "flip": bool(flip and rng.random() < 0.5)}


def _remove_stale(cat_dir: Path, written: set[str]) -> None:
    for sub in ("train", "test", "ground_truth"):
        base = cat_dir / sub
        if not base.is_dir():
            continue
        for f in sorted(base.glob("*/*")):
            rel = f.relative_to(cat_dir).as_posix()
            if f.is_file() and _OUR_FILE.match(f.name) and rel not in written:
                f.unlink()
        for d in sorted(base.glob("*")):
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()


def _build_category(cat_dir: Path, params: dict) -> None:
    cat = params["category"]
    marker = cat_dir / MARKER_NAME
    building = cat_dir / _BUILDING_NAME
    ours = marker.is_file() or building.is_file()
    if cat_dir.exists() and not ours and any(cat_dir.iterdir()):
        raise FileExistsError(
            f"{cat_dir} exists, is not empty and was not made by build_demo_dataset; refusing to overwrite it"
        )
    cat_dir.mkdir(parents=True, exist_ok=True)
    write_json(building, {"params": params})
    marker.unlink(missing_ok=True)

    photo = load_photo(cat)
    size, window, seed = params["image_size"], params["crop_window"], params["seed"]
    crops: dict[str, dict] = {}
    areas: dict[str, float] = {}

    def crop(rel: str, rng: np.random.Generator, split: str) -> np.ndarray:
        box = _crop_box(rng, split, window, flip=(split == "train"))
        crops[rel] = box
        return cut_crop(photo, box["top"], box["left"], window, size, box["flip"])

    n = params["n_train"]
    for i in range(n):
        rel = f"train/good/{_name(i, n)}.png"
        save_png(cat_dir / rel, crop(rel, _rng(seed, cat, "train", "good", str(i)), "train"))
    n = params["n_test_good"]
    for i in range(n):
        rel = f"test/good/{_name(i, n)}.png"
        save_png(cat_dir / rel, crop(rel, _rng(seed, cat, "test", "good", str(i)), "test"))
    n = params["n_test_per_defect"]
    for d in params["defects"]:
        for i in range(n):
            rng = _rng(seed, cat, "test", d, str(i))
            rel = f"test/{d}/{_name(i, n)}.png"
            img = crop(rel, rng, "test")
            out, mask = make_defect(img, d, rng, exclude_sources=(cat,))
            save_png(cat_dir / rel, out)
            save_png(cat_dir / f"ground_truth/{d}/{_name(i, n)}_mask.png", mask.astype(np.uint8) * 255)
            areas[rel] = round(float(mask.mean()), 5)

    if ours:
        _remove_stale(cat_dir, set(_expected_files(params)))
    write_json(marker, {"params": params, "crops": crops, "defect_area_fraction": areas})
    building.unlink(missing_ok=True)


def build_demo_dataset(
    root,
    categories: Sequence[str] = CATEGORIES,
    image_size: int = 128,
    n_train: int = 90,
    n_test_good: int = 16,
    n_test_per_defect: int = 6,
    seed: int = 0,
    defects: Sequence[str] = DEFECT_KINDS,
) -> list[Path]:
    """Write an MVTec-AD-layout demo dataset under ``root``; return the category folders.

    Every requested category folder is returned, in order, whether it was built now or
    found complete for the same parameters (its ``demo_params.json`` marker matches and
    every file is present) and skipped.  An incomplete or outdated folder made by an
    earlier call is rebuilt (files it no longer needs are removed); a non-empty folder of
    the same name not made by this function raises :class:`FileExistsError`.

    Example:
        >>> import tempfile
        >>> [p.name for p in build_demo_dataset(tempfile.mkdtemp(), ("grass",), 32, 2, 1, 1)]
        ['grass']
    """
    if isinstance(categories, str):
        categories = (categories,)
    if isinstance(defects, str):
        defects = (defects,)
    categories, defects = tuple(categories), tuple(defects)
    for c in categories:
        if c not in CATEGORIES:
            raise ValueError(f"unknown category {c!r}; choose from {CATEGORIES}")
    for d in defects:
        if d not in DEFECT_KINDS:
            raise ValueError(f"unknown defect kind {d!r}; choose from {DEFECT_KINDS}")
    if len(set(categories)) != len(categories) or len(set(defects)) != len(defects):
        raise ValueError("categories and defects must not repeat")
    if not 16 <= int(image_size) <= 1024:
        raise ValueError(f"image_size must be in [16, 1024], got {image_size}")
    for name, v in (("n_train", n_train), ("n_test_good", n_test_good), ("n_test_per_defect", n_test_per_defect)):
        if int(v) < 0:
            raise ValueError(f"{name} must be >= 0, got {v}")
    if int(seed) < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    root = Path(root)
    out = []
    for c in categories:
        params = _params(c, image_size, n_train, n_test_good, n_test_per_defect, seed, defects)
        cat_dir = root / c
        if not _is_complete(cat_dir, params):
            _build_category(cat_dir, params)
        out.append(cat_dir)
    return out
