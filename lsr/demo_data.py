"""A small MVTec-AD-layout demo dataset built from photographs bundled with scikit-image
and from procedural textures.

``skimage.data.brick()``, ``grass()`` and ``gravel()`` are real CC0 texture photographs
(512x512, 8-bit greyscale) that ship inside scikit-image, so no download is needed.
:func:`build_demo_dataset` cuts them into training crops ("good" only) and test crops
(good and defective), and paints synthetic defects with pixel-exact ground-truth masks::

    <root>/<category>/train/good/000.png ...
    <root>/<category>/test/good/000.png ...
    <root>/<category>/test/<defect>/000.png ...
    <root>/<category>/ground_truth/<defect>/000_mask.png     (uint8, 0 or 255)
    <root>/<category>/demo_params.json                       (written last: "complete")

Categories
    ``CATEGORIES`` (the default) are the three photographs.  ``TEXTURE_CATEGORIES`` are
    three procedural greyscale "photos" of the same size (:func:`make_texture`, numpy and
    scipy only, fixed by ``TEXTURE_SEED``), cut exactly like the photographs:

    ``weave`` plain-woven fabric: interlaced warp and weft threads (12 px pitch) on slightly
              wandering paths, each thread its own shade, with fibre streaks and shading;
    ``tiles`` a square tile grid (44 px pitch, 4 px grout) with per-tile brightness and
              tilt, bevelled edges, mottled glaze and grainy grout;
    ``wood``  flat-sawn wood grain: growth rings (about 16 px apart) bent by warped noise,
              dark latewood bands, long fibre streaks and small pores.

    ``BENCHMARK_CATEGORIES`` lists all six.

Train/test separation
    Training crops come only from photo columns ``TRAIN_COLS`` and test crops only from
    ``TEST_COLS``; the two ranges are disjoint with a gap of ``TEST_COLS[0] - TRAIN_COLS[1]``
    pixels, so no test pixel was ever seen in training.  The split is by *columns*, not
    rows, on purpose: the brick photo is taken in perspective (the bricks are ~30% wider at
    the bottom than at the top, and lean by +-8 degrees from left to right).  Splitting by
    rows would give test bricks of a size never seen in training; splitting by columns
    gives both splits every size, and the random left-right flips of training crops cover
    the mirrored lean of the test side.

Validation split
    ``build_demo_dataset(..., eval_split="val")`` writes the same ``train/good`` images as
    the default ``eval_split="test"`` (same seed), but its evaluation images (still under
    ``test/`` and ``ground_truth/``, so MVTec readers work) come from random streams keyed
    by "val" instead of "test": other crops and other defect instances.  Choose settings
    on a "val" build and report on a "test" build.

Defects (see :func:`make_defect`)
    ``DEFECT_KINDS`` (the default):

    ``scratch`` thin bright or dark anti-aliased curve(s), 1-3 px wide, tapered ends;
    ``crack``   dark, jagged, branching random-walk polyline, tapering to hair-line tips;
    ``hole``    dark irregular pit with shaded inner wall, a soft shadow rim and a lit lip;
    ``stain``   smooth, irregular blotch changing brightness and contrast (dark or light,
                sometimes with a darker "coffee ring" edge);
    ``foreign`` a patch of a different photograph (another texture, ``camera``, ``moon``,
                ``coins``) pasted with an irregular, slightly soft outline.

    ``HARD_DEFECT_KINDS`` (subtler, for quality benchmarks):

    ``thin_scratch``  a long, straight or gently curved line 1-2 px wide, moderate contrast;
    ``hairline``      a dark, jagged crack about 1 px wide, low to moderate contrast;
    ``faint_stain``   a soft-edged smooth blotch changing brightness by only 8-20 grey levels;
    ``smudge``        a soft blob where the texture is blurred (smoother than normal);
    ``tone``          a soft blob with another tone curve (gamma or contrast change);
    ``rotated_paste`` a patch of the same image, from elsewhere, turned by 20-70 degrees
                      (90 on regular grid textures) and pasted with an irregular outline.

    Blob-like defects cover about 2-14% of the image, lines and cracks less.  The
    mask is exactly the set of pixels the defect touched (every soft weight below
    ``MASK_TAU`` is cut to zero, so nothing outside the mask changes).

Everything is deterministic given ``seed``: every image has its own random stream keyed by
(seed, category, split, defect kind, index), so adding a category or a defect kind does not
change the images of the others.
"""
from __future__ import annotations

import functools
import re
import types
import zlib
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage as ndi

from .io import read_json, save_png, write_json

__all__ = [
    "CATEGORIES",
    "TEXTURE_CATEGORIES",
    "BENCHMARK_CATEGORIES",
    "REGULAR_CATEGORIES",
    "TEXTURE_SEED",
    "DEFECT_KINDS",
    "HARD_DEFECT_KINDS",
    "MIN_CHANGE",
    "EVAL_SPLITS",
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
    "make_texture",
    "crop_window",
    "cut_crop",
]

#: bump when the generated images change for the same parameters (invalidates old builds)
GENERATOR_VERSION = 1
#: the default categories: scikit-image photographs
CATEGORIES = ("brick", "grass", "gravel")
#: procedural texture categories (:func:`make_texture`)
TEXTURE_CATEGORIES = ("weave", "tiles", "wood")
BENCHMARK_CATEGORIES = CATEGORIES + TEXTURE_CATEGORIES
#: categories on a regular grid: their ``rotated_paste`` patches are turned by 90 degrees
REGULAR_CATEGORIES = ("weave", "tiles")
#: the seed that fixes the procedural textures (a "photo" does not change with the dataset seed)
TEXTURE_SEED = 0
#: the default defect kinds
DEFECT_KINDS = ("scratch", "crack", "hole", "stain", "foreign")
#: subtler defect kinds for quality benchmarks (never a default)
HARD_DEFECT_KINDS = ("thin_scratch", "hairline", "faint_stain", "smudge", "tone", "rotated_paste")
#: the least mean absolute change (grey levels) inside the mask that :func:`make_defect`
#: accepts before it redraws a defect (it keeps the most visible of 8 draws otherwise)
MIN_CHANGE = types.MappingProxyType({
    "scratch": 10.0, "crack": 10.0, "hole": 10.0, "stain": 10.0, "foreign": 10.0,
    "thin_scratch": 8.0, "hairline": 6.0, "faint_stain": 3.0, "smudge": 3.0, "tone": 4.0, "rotated_paste": 6.0,
})
#: names of the evaluation splits: each draws its own test crops and defect instances
EVAL_SPLITS = ("test", "val")
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
    """A bundled scikit-image photograph, or a procedural texture of
    ``TEXTURE_CATEGORIES`` (made with ``TEXTURE_SEED``), as a read-only uint8 (H, W) array."""
    if name in TEXTURE_CATEGORIES:
        img = make_texture(name)
        img.setflags(write=False)
        return img
    if name not in _PHOTO_NAMES:
        raise ValueError(f"unknown photo {name!r}; choose from {_PHOTO_NAMES + TEXTURE_CATEGORIES}")
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


# ----------------------------------------------------------------------------- textures
def _field(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Like :func:`_smooth_noise` (zero mean, unit std, periodic); a wide ``sigma`` is made
    on a coarse grid and zoomed up, which is much faster."""
    if sigma <= 12:
        return _smooth_noise(rng, shape, sigma)
    f = sigma / 6.0
    small = (max(int(np.ceil(shape[0] / f)), 4), max(int(np.ceil(shape[1] / f)), 4))
    zoom = (shape[0] / small[0], shape[1] / small[1])
    n = ndi.zoom(_smooth_noise(rng, small, 6.0), zoom, order=3, mode="grid-wrap", grid_mode=True)
    return _standardise(n[: shape[0], : shape[1]])


def _streaks(rng: np.random.Generator, shape: tuple[int, int], sigma_y: float, sigma_x: float) -> np.ndarray:
    """Anisotropic smooth noise (zero mean, unit std): streaks along the wider sigma."""
    return _standardise(ndi.gaussian_filter(rng.standard_normal(shape), sigma=(sigma_y, sigma_x), mode="wrap"))


def _standardise(x: np.ndarray) -> np.ndarray:
    x = x - x.mean()
    s = x.std()
    return x / s if s > 0 else x


def _to_uint8(x: np.ndarray, mean: float, std: float) -> np.ndarray:
    return np.clip(np.rint(_standardise(x) * std + mean), 0, 255).astype(np.uint8)


def _weave(rng: np.random.Generator, size: int) -> np.ndarray:
    """Plain weave: vertical warp and horizontal weft threads, each passing over one and
    under the next; thread paths wander by a pixel or so, every thread has its own shade."""
    shape, pitch = (size, size), 12.0
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    u = xx + 1.3 * _field(rng, shape, 28) + 0.35 * _field(rng, shape, 5)  # across the warp threads
    v = yy + 1.3 * _field(rng, shape, 28) + 0.35 * _field(rng, shape, 5)  # across the weft threads
    iu, fu = np.divmod(u / pitch, 1.0)
    iv, fv = np.divmod(v / pitch, 1.0)
    iu, iv = iu.astype(np.int64), iv.astype(np.int64)
    n = size // int(pitch) + 8
    shade_warp = 1.0 + rng.normal(0, 0.07, n)[iu % n]
    shade_weft = 0.92 + rng.normal(0, 0.07, n)[iv % n]
    # thread cross-sections (round) and their arches over the crossing thread
    sw, sf = np.sin(np.pi * fu), np.sin(np.pi * fv)
    h_warp = np.sqrt(sw) * (0.6 + 0.4 * sf)
    h_weft = np.sqrt(sf) * (0.6 + 0.4 * sw)
    warp_on_top = (iu + iv) % 2 == 0
    see_warp = np.where(warp_on_top, h_warp >= 0.45 * h_weft, 0.45 * h_warp > h_weft)
    h = np.where(see_warp, h_warp, h_weft) * np.where(see_warp == warp_on_top, 1.0, 0.45)
    fibres = np.where(see_warp, _streaks(rng, shape, 5, 0.7), _streaks(rng, shape, 0.7, 5))
    gy, gx = np.gradient(ndi.gaussian_filter(h, 0.8))
    val = np.where(see_warp, shade_warp, shade_weft) * (0.3 + 0.7 * h) + 0.05 * fibres + 0.35 * (gx + gy)
    val *= 1 + 0.04 * _field(rng, shape, 90)
    val += 0.02 * rng.standard_normal(shape)
    return _to_uint8(val, 128, 36)


def _grid_edges(rng: np.random.Generator, size: int, pitch: float) -> np.ndarray:
    """Tile edge positions covering [0, size) with a little jitter."""
    n = size // int(pitch) + 5
    return (np.arange(n) - 2) * pitch + rng.normal(0, 0.6, n)


def _tiles(rng: np.random.Generator, size: int) -> np.ndarray:
    """Square tiles in a grid with grout lines; each tile has its own brightness and a slight
    tilt, bevelled edges (lit top-left, shaded bottom-right) and a mottled glaze."""
    shape, pitch, half_grout, bevel = (size, size), 44.0, 2.0, 2.5
    ey, ex = _grid_edges(rng, size, pitch), _grid_edges(rng, size, pitch)
    r = np.arange(size, dtype=np.float64)
    iy = np.searchsorted(ey, r, side="right") - 1
    ix = np.searchsorted(ex, r, side="right") - 1
    top, bottom = (r - ey[iy] - half_grout)[:, None], (ey[iy + 1] - r - half_grout)[:, None]
    left, right = (r - ex[ix] - half_grout)[None, :], (ex[ix + 1] - r - half_grout)[None, :]
    inside = np.clip(np.minimum(np.minimum(top, bottom), np.minimum(left, right)) + 0.5, 0, 1)
    tile = (iy[:, None], ix[None, :])
    level, tilt_y, tilt_x = (rng.normal(0, 1, (len(ey), len(ex)))[tile] for _ in range(3))
    lit = np.clip(1 - np.minimum(top, left) / bevel, 0, 1)
    shaded = np.clip(1 - np.minimum(bottom, right) / bevel, 0, 1)
    surface = (150 + 10 * level + 3 * (tilt_y * (top - bottom) + tilt_x * (left - right)) / pitch
               + 5 * _field(rng, shape, 6) + 4 * _field(rng, shape, 1.0) + 14 * lit - 18 * shaded)
    grout = 80 + 6 * _field(rng, shape, 2.5) + 5 * _field(rng, shape, 0.7)
    val = (grout + inside * (surface - grout)) * (1 + 0.03 * _field(rng, shape, 120))
    return np.clip(np.rint(val), 0, 255).astype(np.uint8)


def _wood(rng: np.random.Generator, size: int) -> np.ndarray:
    """Flat-sawn wood: growth rings along x bent by warped noise, each ring lightest in its
    earlywood and darkening into a sharp latewood edge; fibre streaks and small pores."""
    shape, period = (size, size), 16.0
    yy = np.mgrid[0:size, 0:size][0].astype(np.float64)
    bend = (10 * _streaks(rng, shape, 40, 120) + 5 * _field(rng, shape, 40)
            + 1.5 * _streaks(rng, shape, 4, 16) + 0.3 * _field(rng, shape, 3))
    ring = (yy + bend) / period
    late = ndi.gaussian_filter((ring - np.floor(ring)) ** 3, 0.7)
    fibres = _streaks(rng, shape, 1.0, 24)
    pores = np.clip(_streaks(rng, shape, 0.6, 4) - 2.0, 0, None)
    val = 1 - 0.45 * late + 0.04 * fibres - 0.2 * pores + 0.015 * rng.standard_normal(shape)
    val *= 1 + 0.05 * _field(rng, shape, 100)
    return _to_uint8(val, 140, 30)


_TEXTURES = {"weave": _weave, "tiles": _tiles, "wood": _wood}


def make_texture(name: str, seed: int = TEXTURE_SEED, size: int = SOURCE_SIZE) -> np.ndarray:
    """A procedural greyscale texture of ``TEXTURE_CATEGORIES`` as a new uint8 (size, size)
    array, the same for the same ``seed`` (``load_photo`` caches the ``TEXTURE_SEED`` one).

    Example:
        >>> img = make_texture("tiles", size=128)
        >>> img.shape, img.dtype.name, bool(img.std() > 10)
        ((128, 128), 'uint8', True)
    """
    if name not in _TEXTURES:
        raise ValueError(f"unknown texture {name!r}; choose from {TEXTURE_CATEGORIES}")
    if int(size) < 16:
        raise ValueError(f"size must be >= 16, got {size}")
    return _TEXTURES[name](_rng(seed, "texture", name), int(size))


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


# ----------------------------------------------------------------------------- hard defects
def _soft_blob(rng: np.random.Generator, shape: tuple[int, int], area_frac: tuple[float, float]
               ) -> tuple[np.ndarray, float]:
    """An irregular blob covering a random fraction in ``area_frac`` of the image; returns
    ``(sd, radius)`` as :func:`_blob` does."""
    H, W = shape
    sd, _, _, R = _blob(rng, shape, rng.uniform(*area_frac) * H * W, rng.uniform(0.3, 0.9), 2.0)
    return sd, R


def _soft_weight(sd: np.ndarray, soft: float) -> np.ndarray:
    """A weight rising smoothly from 0 on a blob's outline to 1 at ``soft`` px inside it,
    cut below ``MASK_TAU``."""
    t = np.clip(sd / max(soft, 1e-6), 0, 1)
    return _largest_components(_cut(t * t * (3 - 2 * t)))


def _thin_scratch(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A long, nearly straight line 1-2 px wide, moderately brighter or darker than its
    surroundings, fading a little along its length."""
    S = min(img.shape)
    length = S * rng.uniform(0.45, 0.9)
    theta = rng.uniform(0, np.pi)
    direction = np.array([np.sin(theta), np.cos(theta)])
    normal = np.array([direction[1], -direction[0]])
    mid = rng.uniform(0.3 * S, 0.7 * S, 2)
    p0, p2 = mid - direction * length / 2, mid + direction * length / 2
    p1 = mid + normal * rng.uniform(-0.08, 0.08) * length
    t = np.linspace(0, 1, max(int(length), 8))[:, None]
    pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
    widths = rng.uniform(1.0, 2.0) * np.clip(np.sin(np.pi * t[:, 0]) ** 0.3, 0.5, 1.0)
    alpha = _render_strokes(img.shape, [(pts, widths)])
    weight = _cut(alpha * np.clip(0.85 + 0.2 * _smooth_noise(rng, img.shape, sigma=6.0), 0.5, 1.0))
    x = img.astype(np.float64)
    sign = 1.0 if rng.random() < 0.5 else -1.0
    target = ndi.uniform_filter(x, size=5) + sign * rng.uniform(25, 45) * max(1.0, x.std() / 40.0)
    return x + weight * (np.clip(target, 0, 255) - x), weight


def _hairline(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A dark, jagged crack about 1 px wide (sometimes with one short branch), only
    12-30% darker than the surface around it."""
    S = min(img.shape)
    strokes: list[tuple[np.ndarray, np.ndarray]] = []

    def walk(p: np.ndarray, theta: float, length: float, width: float) -> np.ndarray:
        pts, th = [np.asarray(p, np.float64)], theta
        for _ in range(max(int(length / 2.0), 4)):
            th += rng.normal(0, 0.4) + 0.35 * (theta - th)
            pts.append(pts[-1] + rng.uniform(1.5, 2.5) * np.array([np.sin(th), np.cos(th)]))
        pts = np.array(pts)
        strokes.append((pts, width * (1 - 0.4 * np.linspace(0, 1, len(pts)))))
        return pts

    start = rng.uniform(0.15 * S, 0.85 * S, 2)
    to_centre = np.arctan2(*(np.array(img.shape) / 2 - start))  # so the crack stays in the image
    theta = to_centre + rng.uniform(-1.0, 1.0)
    pts = walk(start, theta, S * rng.uniform(0.35, 0.7), rng.uniform(0.8, 1.2))
    if rng.random() < 0.35:
        j = int(rng.integers(len(pts) // 4, max(3 * len(pts) // 4, len(pts) // 4 + 1)))
        walk(pts[j], theta + rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 1.1), S * rng.uniform(0.1, 0.25), 0.8)
    weight = _cut(_render_strokes(img.shape, strokes))
    x = img.astype(np.float64)
    target = np.minimum(x, ndi.uniform_filter(x, size=5)) * (1 - rng.uniform(0.12, 0.3))
    return x + weight * (target - x), weight


def _faint_stain(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A smooth blotch, lighter or darker by only 8-20 grey levels, with a very soft edge."""
    sd, R = _soft_blob(rng, img.shape, (0.03, 0.12))
    weight = _soft_weight(sd, soft=rng.uniform(0.3, 0.6) * R)
    shift = (1.0 if rng.random() < 0.5 else -1.0) * rng.uniform(8, 20)
    x = img.astype(np.float64)
    return x + weight * (np.clip(x + shift, 0, 255) - x), weight


def _smudge(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A soft blob where the image is blended with a Gaussian blur of itself: the texture
    there is smoother than anywhere else (no brightness change on average)."""
    k = min(img.shape) / 128.0
    weight = _soft_weight(_soft_blob(rng, img.shape, (0.03, 0.10))[0], soft=rng.uniform(2.0, 5.0) * k)
    x = img.astype(np.float64)
    blurred = ndi.gaussian_filter(x, sigma=max(rng.uniform(1.5, 3.0) * k, 1.2))
    return x + weight * (blurred - x), weight


def _tone(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A soft blob with another tone curve: a gamma change, or a contrast change about the
    region's mean, plus a small brightness shift (the greyscale form of a colour shift)."""
    k = min(img.shape) / 128.0
    weight = _soft_weight(_soft_blob(rng, img.shape, (0.04, 0.14))[0], soft=rng.uniform(2.0, 6.0) * k)
    x = img.astype(np.float64)
    up = rng.random() < 0.5
    if rng.random() < 0.5:
        gamma = rng.uniform(1.15, 1.5) if up else 1.0 / rng.uniform(1.15, 1.5)
        target = 255.0 * (x / 255.0) ** gamma
    else:
        m = x[weight > 0].mean() if (weight > 0).any() else x.mean()
        target = m + (x - m) * (rng.uniform(1.25, 1.6) if up else rng.uniform(0.5, 0.75))
    target = target + rng.uniform(-5, 5)
    return x + weight * (np.clip(target, 0, 255) - x), weight


def _rotated_paste(img: np.ndarray, rng: np.random.Generator, regular: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """A patch of the same image, taken from elsewhere in it and turned by 20-70 degrees
    (exactly 90 when ``regular``), pasted with an irregular, slightly soft outline."""
    H, W = img.shape
    k = min(H, W) / 128.0
    sd, _, (cy, cx), R = _blob(rng, img.shape, rng.uniform(0.02, 0.08) * H * W, rng.uniform(0.3, 0.8), 1.8)
    weight = _largest_components(_cut(np.clip(0.5 + sd / (rng.uniform(1.0, 1.5) * k), 0, 1)))
    sign = rng.choice([-1.0, 1.0])
    if regular:  # whole pixels and a right angle: an exact copy of the grid, turned
        angle, cy, cx = sign * np.pi / 2, float(round(cy)), float(round(cx))
    else:
        angle = sign * np.deg2rad(rng.uniform(20, 70))
    sy, sx = _paste_source(rng, weight > 0, (cy, cx), R)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float64)
    c, s = np.round(np.cos(angle), 12), np.round(np.sin(angle), 12)
    src_y = sy + c * (yy - cy) - s * (xx - cx)
    src_x = sx + s * (yy - cy) + c * (xx - cx)
    x = img.astype(np.float64)
    patch = ndi.map_coordinates(x, [src_y, src_x], order=1 if regular else 3, mode="mirror")
    return x + weight * (np.clip(patch, 0, 255) - x), weight


def _paste_source(
    rng: np.random.Generator, mask: np.ndarray, center: tuple[float, float], radius: float
) -> tuple[float, float]:
    """A whole-pixel centre for the source patch: far enough from ``center`` to be another
    location (at least ``radius``) and, where the image allows, with the patch inside it."""
    H, W = mask.shape
    ys, xs = np.nonzero(mask)
    reach = float(np.sqrt(((ys - center[0]) ** 2 + (xs - center[1]) ** 2).max())) + 1.0 if len(ys) else radius
    lo_y, hi_y = (reach, H - 1 - reach) if 2 * reach < H - 1 else (0.0, H - 1.0)
    lo_x, hi_x = (reach, W - 1 - reach) if 2 * reach < W - 1 else (0.0, W - 1.0)
    best, best_d = None, -1.0
    for _ in range(20):
        sy, sx = float(round(rng.uniform(lo_y, hi_y))), float(round(rng.uniform(lo_x, hi_x)))
        d = float(np.hypot(sy - center[0], sx - center[1]))
        if d >= max(radius, 4.0):
            return sy, sx
        if d > best_d:
            best, best_d = (sy, sx), d
    return best


_DEFECTS = {"scratch": _scratch, "crack": _crack, "hole": _hole, "stain": _stain, "foreign": _foreign,
            "thin_scratch": _thin_scratch, "hairline": _hairline, "faint_stain": _faint_stain,
            "smudge": _smudge, "tone": _tone, "rotated_paste": _rotated_paste}


def make_defect(
    image: np.ndarray, kind: str, rng: np.random.Generator, *, exclude_sources: Sequence[str] = (),
    regular: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Paint one synthetic defect of ``kind`` (``DEFECT_KINDS`` or ``HARD_DEFECT_KINDS``)
    onto a uint8 (H, W) image.

    Returns ``(defective, mask)``: a new uint8 (H, W) image and a bool (H, W) mask that is
    True exactly where the defect was painted (never empty).  Pixels outside the mask are
    bit-identical to ``image``.  ``exclude_sources`` names photos the ``foreign`` defect must
    not take its patch from (the builder passes the image's own category).  ``regular``
    says the image is a regular grid texture: ``rotated_paste`` then turns its patch by
    90 degrees (a 20-70 degree turn would be too easy to see there).  A draw whose mean
    absolute change inside the mask is below ``MIN_CHANGE[kind]`` is redrawn.

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
        elif kind == "rotated_paste":
            out, weight = _rotated_paste(image, rng, regular)
        else:
            out, weight = _DEFECTS[kind](image, rng)
        mask = weight > 0
        out = np.where(mask, np.clip(np.rint(out), 0, 255), x).astype(np.uint8)
        n = int(mask.sum())
        change = float(np.abs(out[mask].astype(np.float64) - x[mask]).mean()) if n else 0.0
        if n >= 12 and change >= MIN_CHANGE[kind]:
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
def _source(category: str) -> str:
    """What made a category's source image, as recorded in its params."""
    if category in TEXTURE_CATEGORIES:
        return f"procedural:{category}"
    return f"skimage.data.{category}()"


def _params(category: str, image_size: int, n_train: int, n_test_good: int, n_test_per_defect: int, seed: int,
            defects: Sequence[str], eval_split: str = "test") -> dict:
    params = {
        "generator_version": GENERATOR_VERSION,
        "category": category,
        "source": _source(category),
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
    if eval_split != "test":  # absent means "test": a default build's marker stays as it always was
        params["eval_split"] = eval_split
    return params


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
    split = params.get("eval_split", "test")  # keys the evaluation images' random streams
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
        save_png(cat_dir / rel, crop(rel, _rng(seed, cat, split, "good", str(i)), "test"))
    n = params["n_test_per_defect"]
    for d in params["defects"]:
        for i in range(n):
            rng = _rng(seed, cat, split, d, str(i))
            rel = f"test/{d}/{_name(i, n)}.png"
            img = crop(rel, rng, "test")
            out, mask = make_defect(img, d, rng, exclude_sources=(cat,), regular=cat in REGULAR_CATEGORIES)
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
    eval_split: str = "test",
) -> list[Path]:
    """Write an MVTec-AD-layout demo dataset under ``root``; return the category folders.

    ``categories`` may be any of ``BENCHMARK_CATEGORIES`` and ``defects`` any of
    ``DEFECT_KINDS + HARD_DEFECT_KINDS``.  ``eval_split`` ("test" or "val") picks the
    random streams of the evaluation images (``test/`` and ``ground_truth/``): the same
    seed gives the same ``train/good`` images for both, but other test crops and defect
    instances.  A "val" build records ``"eval_split": "val"`` in its params.

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
        if c not in BENCHMARK_CATEGORIES:
            raise ValueError(f"unknown category {c!r}; choose from {BENCHMARK_CATEGORIES}")
    for d in defects:
        if d not in _DEFECTS:
            raise ValueError(f"unknown defect kind {d!r}; choose from {DEFECT_KINDS + HARD_DEFECT_KINDS}")
    if eval_split not in EVAL_SPLITS:
        raise ValueError(f"eval_split must be one of {EVAL_SPLITS}, got {eval_split!r}")
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
        params = _params(c, image_size, n_train, n_test_good, n_test_per_defect, seed, defects, eval_split)
        cat_dir = root / c
        if not _is_complete(cat_dir, params):
            _build_category(cat_dir, params)
        out.append(cat_dir)
    return out
