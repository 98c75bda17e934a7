"""Image decoding: one image file (or many) -> float32 arrays, and masks -> bool arrays.

Images are returned as float32 arrays ``(channels, H, W)`` in ``[0, 1]``; masks as bool
arrays ``(H, W)``. Every problem raises :class:`DataError` whose message starts with the
offending file. Decoding is strict (a truncated file is an error, not a partial image)
and bounded (:data:`MAX_PIXELS`). The dataset layout (MVTec AD folders, listings, the
train/validation split) is :mod:`lsr.data`; the bundle path reuses this module's steps
(:func:`decode_fully`, :func:`to_float`, :func:`to_channels`, :func:`resize_float`) for
images given as arrays or PIL images.

Example:
    >>> to_channels(np.ones((2, 2, 3), np.float32), 1).shape
    (1, 2, 2)
"""
from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

__all__ = ["IMAGE_EXTENSIONS", "MAX_PIXELS", "DataError", "load_image", "load_mask", "image_size", "check_readable",
           "detect_channels", "load_images", "decode_fully", "to_float", "to_channels", "resize_float"]

#: Recognised image file extensions (compared case-insensitively).
IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})

# Modes whose pixels are single-channel (grey) by construction.
_GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "F"})
# Modes that may hold grey pixels in several channels (checked pixel by pixel).
_MAYBE_GREY_MODES = frozenset({"P", "PA", "RGB", "RGBA", "RGBX", "RGBa"})

#: Largest image accepted, in pixels (width x height): Pillow's default decompression-bomb
#: limit. The C++ runtime (export/src/image_io.cpp) applies the same number.
MAX_PIXELS = 89_478_485

# ITU-R 601-2 luma weights, as used by Pillow's RGB -> L conversion.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


class DataError(ValueError):
    """A data file or folder is missing, unreadable or inconsistent.

    The message always names the offending file or folder first.
    """


# --------------------------------------------------------------------------- decoding

_TRUNCATION_LOCK = threading.Lock()


@contextlib.contextmanager
def _strict_truncation() -> Iterator[None]:
    """Make sure Pillow rejects truncated files while decoding.

    ``ImageFile.LOAD_TRUNCATED_IMAGES`` is a process-wide switch that other code
    may have turned on; it is forced off for the duration of the block and then
    restored.
    """
    if not ImageFile.LOAD_TRUNCATED_IMAGES:
        yield
        return
    with _TRUNCATION_LOCK:
        old = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            yield
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = old


@contextlib.contextmanager
def _open(path: str | os.PathLike) -> Iterator[Image.Image]:
    """Open an image lazily (header only), turning every failure into a DataError."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except OSError as e:
        raise DataError(f"{path}: cannot access image file ({e})") from None
    if path.is_dir():
        raise DataError(f"{path}: is a folder, expected an image file")
    if st.st_size == 0:
        raise DataError(f"{path}: empty file (0 bytes), not a valid image")
    try:
        img = Image.open(path)
    except UnidentifiedImageError:
        raise DataError(f"{path}: not a readable image (unknown or corrupt format)") from None
    except Image.DecompressionBombError:
        raise DataError(f"{path}: image too large (more than {MAX_PIXELS} pixels)") from None
    except Exception as e:  # noqa: BLE001 - Pillow raises many exception types
        raise DataError(f"{path}: cannot open image ({type(e).__name__}: {e})") from None
    with img:
        if img.width * img.height > MAX_PIXELS:
            raise DataError(f"{path}: image too large ({img.width} x {img.height} = {img.width * img.height} "
                            f"pixels; the limit is {MAX_PIXELS})")
        yield img


def decode_fully(img: Image.Image, path: Path) -> None:
    """Fully decode ``img`` so that truncated or corrupt data is detected now."""
    try:
        with _strict_truncation():
            img.load()
    except Exception as e:  # noqa: BLE001
        raise DataError(
            f"{path}: cannot decode image, the file is truncated or corrupt ({type(e).__name__}: {e})"
        ) from None


def _declared_bits(img: Image.Image, path: Path) -> int | None:
    """Bit depth declared in the file header of an integer ('I' mode) image, if known."""
    try:
        if img.format == "PNG":
            with open(path, "rb") as f:
                head = f.read(25)
            if len(head) == 25 and head[12:16] == b"IHDR":
                return head[24]
        if img.format == "TIFF":
            bits = img.tag_v2.get(258)  # BitsPerSample
            if isinstance(bits, tuple):
                bits = bits[0] if bits else None
            if bits:
                return int(bits)
    except Exception:  # noqa: BLE001 - header sniffing is best effort
        return None
    return None


def to_float(img: Image.Image, path: Path) -> np.ndarray:
    """Convert a decoded image to float32 (H, W, C) in [0, 1], C = 1 (grey) or 3 (colour)."""
    mode = img.mode
    if mode == "1":
        arr = np.asarray(img, dtype=np.float32)
    elif mode == "L":
        arr = np.asarray(img, dtype=np.float32) / 255.0
    elif mode in ("LA", "La"):
        arr = np.asarray(img.convert("LA") if mode == "La" else img)[..., 0].astype(np.float32) / 255.0
    elif mode.startswith("I;16"):
        arr = np.asarray(img).astype(np.float32) / 65535.0
    elif mode.startswith("I"):
        raw = np.asarray(img).astype(np.float64)
        bits = _declared_bits(img, path)
        if bits is None or bits > 16:
            # 32-bit or unknown container (often 16-bit data, e.g. old Pillow 'I'
            # TIFFs or 16-bit PPM): 16-bit scale if the values fit, else int32.
            bits = 16 if raw.size == 0 or (raw.min() >= 0 and raw.max() <= 65535) else 31
        arr = (raw / float(2**min(bits, 31) - 1)).astype(np.float32)
    elif mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        finite_max = float(np.nanmax(arr)) if arr.size else 0.0
        if finite_max > 255.0:
            arr = arr / 65535.0
        elif finite_max > 1.0:
            arr = arr / 255.0
        arr = np.nan_to_num(arr, nan=0.0, posinf=1.0, neginf=0.0)
    elif mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in img.info
        rgb = img.convert("RGBA" if has_alpha else "RGB")
        arr = np.asarray(rgb)[..., :3].astype(np.float32) / 255.0
    elif mode in ("RGB", "RGBA", "RGBX"):
        arr = np.asarray(img)[..., :3].astype(np.float32) / 255.0
    else:  # RGBa, CMYK, YCbCr, LAB, HSV, ...: let Pillow convert
        arr = np.asarray(img.convert("RGB")).astype(np.float32) / 255.0
    if arr.ndim == 2:
        arr = arr[..., None]
    return np.clip(arr, 0.0, 1.0, out=arr)


def to_channels(hwc: np.ndarray, channels: int) -> np.ndarray:
    """float32 (H, W, c), c in {1, 3} -> (channels, H, W): colour to ITU-R 601 luminance
    (clipped) or grey replicated to 3 channels."""
    if hwc.shape[2] == channels:
        return np.ascontiguousarray(hwc.transpose(2, 0, 1))
    if channels == 1:  # colour -> luminance
        chw = (hwc @ _LUMA)[None].astype(np.float32, copy=False)
        return np.clip(chw, 0.0, 1.0, out=chw)
    return np.repeat(hwc.transpose(2, 0, 1), 3, axis=0)  # grey -> 3 identical channels


def resize_float(chw: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear (antialiased when shrinking) resize of a float32 (C, H, W) array."""
    if chw.shape[1:] == (height, width):
        return chw
    out = np.empty((chw.shape[0], height, width), dtype=np.float32)
    for c in range(chw.shape[0]):
        plane = Image.fromarray(np.ascontiguousarray(chw[c], dtype=np.float32))
        out[c] = np.asarray(plane.resize((width, height), Image.Resampling.BILINEAR))
    return np.clip(out, 0.0, 1.0, out=out)


def _check_channels(channels: int) -> None:
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")


def _check_size(size: int | None) -> None:
    if size is not None and (isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1):
        raise ValueError(f"size must be a positive integer or None, got {size!r}")


def load_image(path: str | os.PathLike, channels: int, size: int | None = None) -> np.ndarray:
    """Load an image as a float32 array of shape (channels, H, W) with values in [0, 1].

    Any Pillow mode is accepted. Alpha channels are dropped (not composited);
    palette images are expanded to RGB; 16-bit images are scaled by 65535 so a
    16-bit image and its 8-bit version give (nearly) the same result (32-bit
    'I' images whose values fit in 0..65535 are treated as 16-bit); float
    ('F') images are taken as [0, 1], or [0, 255] / [0, 65535] when their
    values exceed 1 / 255. EXIF orientation is not applied, so masks stay
    aligned with their images.

    Args:
        path: The image file.
        channels: 1 for greyscale (ITU-R 601 luminance, like Pillow's 'L'
            conversion) or 3 for RGB (grey images are replicated).
        size: If given, resize to (size, size) with bilinear resampling
            (antialiased when shrinking).

    Returns:
        float32 array of shape (channels, H, W), or (channels, size, size).

    Raises:
        DataError: The file is missing, empty, truncated, corrupt or not an image.
        ValueError: ``channels`` or ``size`` is invalid.
    """
    _check_channels(channels)
    _check_size(size)
    path = Path(path)
    with _open(path) as img:
        decode_fully(img, path)
        try:
            hwc = to_float(img, path)
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001
            raise DataError(f"{path}: cannot convert image mode {img.mode!r} ({type(e).__name__}: {e})") from None
    chw = to_channels(hwc, channels)
    if size is not None:
        chw = resize_float(chw, int(size), int(size))
    return chw


def load_mask(path: str | os.PathLike, size: tuple[int, int] | int | None = None) -> np.ndarray:
    """Load a ground-truth mask as a bool array (H, W); nonzero pixels are anomalous.

    Any mode is accepted; for colour masks a pixel is anomalous when any colour
    channel is nonzero (alpha is ignored).

    Args:
        path: The mask file.
        size: Optional target size (H, W) (an int means square); resized with
            nearest-neighbour resampling.

    Returns:
        bool array of shape (H, W), or ``size``.

    Raises:
        DataError: The file is missing, empty, truncated, corrupt or not an image.
    """
    path = Path(path)
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        size = (int(size), int(size))
    if size is not None:
        if len(size) != 2 or any(int(s) < 1 for s in size):
            raise ValueError(f"mask size must be (H, W) with positive values, got {size!r}")
        size = (int(size[0]), int(size[1]))
    with _open(path) as img:
        decode_fully(img, path)
        try:
            mode = img.mode
            if mode in ("1", "L", "F") or mode.startswith("I"):
                mask = np.asarray(img) != 0
            elif mode in ("LA", "La"):
                mask = np.asarray(img)[..., 0] != 0
            elif mode in ("RGB", "RGBA", "RGBX"):
                mask = np.any(np.asarray(img)[..., :3] != 0, axis=-1)
            else:  # P, PA, CMYK, ...
                mask = np.any(np.asarray(img.convert("RGB")) != 0, axis=-1)
        except Exception as e:  # noqa: BLE001
            raise DataError(f"{path}: cannot convert mask mode {img.mode!r} ({type(e).__name__}: {e})") from None
    if size is not None and mask.shape != size:
        small = Image.fromarray(mask.astype(np.uint8) * 255)
        mask = np.asarray(small.resize((size[1], size[0]), Image.Resampling.NEAREST)) > 0
    return np.ascontiguousarray(mask, dtype=bool)


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """Return the (H, W) size of an image, reading only its header.

    Raises:
        DataError: The file is missing, empty or not a recognisable image.
    """
    with _open(path) as img:
        return int(img.height), int(img.width)


def check_readable(paths: Sequence[str | os.PathLike], listed: int = 5) -> None:
    """Open every image's header before any work (cheap: no pixels are decoded), so that
    a missing, empty, unknown-format or too large file among many is an error at once,
    not after the images before it were processed, and every such file is named together.

    Raises:
        DataError: one or more images cannot be opened; the message starts with the first
            file's problem and lists up to ``listed`` of them, with how many there are.
            (A file whose header reads but whose pixels are truncated is found later, when
            it is decoded.)
    """
    bad: list[str] = []
    for p in paths:
        try:
            image_size(p)
        except DataError as e:
            bad.append(str(e))
    if len(bad) == 1:
        raise DataError(bad[0])
    if bad:
        more = f"; and {len(bad) - listed} more" if len(bad) > listed else ""
        raise DataError(f"{bad[0]} ({len(bad)} of {len(paths)} images cannot be read, nothing was done: "
                        + "; ".join(bad[:listed]) + more + ")")


def detect_channels(paths: Iterable[str | os.PathLike]) -> int:
    """Decide whether a set of images is greyscale (1) or colour (3).

    Images in modes 1, L, LA, I, I;16 and F are grey. Palette and RGB(A) images
    are decoded and count as grey only if their three colour channels are
    identical everywhere. Any other mode counts as colour. Stops at the first
    colour image.

    Args:
        paths: Image files.

    Returns:
        1 if every image is greyscale, else 3.

    Raises:
        DataError: ``paths`` is empty, or an image cannot be read.
    """
    n = 0
    for p in paths:
        n += 1
        path = Path(p)
        with _open(path) as img:
            mode = img.mode
            if mode in _GREY_MODES or mode.startswith("I;16"):
                continue
            if mode not in _MAYBE_GREY_MODES:
                return 3
            decode_fully(img, path)
            try:
                rgb = np.asarray(img if mode in ("RGB", "RGBA", "RGBX") else img.convert("RGB"))
            except Exception as e:  # noqa: BLE001
                raise DataError(f"{path}: cannot convert image mode {mode!r} ({type(e).__name__}: {e})") from None
            r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
            if not (np.array_equal(r, g) and np.array_equal(r, b)):
                return 3
    if n == 0:
        raise DataError("detect_channels: no image paths given")
    return 1


def load_images(
    paths: Sequence[str | os.PathLike], channels: int, size: int | None, progress: bool = False
) -> np.ndarray:
    """Load several images into one float32 array (N, channels, size, size).

    Args:
        paths: Image files.
        channels: 1 (greyscale) or 3 (RGB); see :func:`load_image`.
        size: Side of the square output; if None all images must already
            share one size.
        progress: Show a tqdm progress bar (if tqdm is installed).

    Returns:
        float32 array of shape (N, channels, H, W) with values in [0, 1].

    Raises:
        DataError: An image cannot be read, or (with ``size=None``) its size
            differs from the first image's.
    """
    _check_channels(channels)
    _check_size(size)
    paths = [Path(p) for p in paths]
    if not paths:
        side = int(size) if size is not None else 0
        return np.zeros((0, channels, side, side), dtype=np.float32)
    iterator: Iterable[Path] = paths
    if progress:
        try:
            from tqdm.auto import tqdm

            iterator = tqdm(paths, desc="loading images", unit="img", leave=False)
        except ImportError:
            pass
    out: np.ndarray | None = None
    for i, p in enumerate(iterator):
        x = load_image(p, channels, size)
        if out is None:
            out = np.empty((len(paths),) + x.shape, dtype=np.float32)
        elif x.shape != out.shape[1:]:
            raise DataError(
                f"{p}: image size {x.shape[1]}x{x.shape[2]} differs from {paths[0]} "
                f"({out.shape[2]}x{out.shape[3]}); pass a size to resize all images"
            )
        out[i] = x
    assert out is not None
    return out
