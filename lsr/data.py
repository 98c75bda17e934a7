"""Dataset layout: MVTec AD category folders, plain image folders, the train/validation split.

MVTec AD layout (``root`` is one category folder, e.g. ``mvtec/bottle``)::

    <root>/train/good/*.png                 normal training images
    <root>/test/good/*.png                  normal test images
    <root>/test/<defect>/*.png              anomalous test images
    <root>/ground_truth/<defect>/<stem>_mask.png

Nothing here decodes pixels except through :mod:`lsr.images` (whose loaders this module
re-exports). Every problem with the data raises :class:`DataError` whose message starts
with the offending file or folder.

File listings are sorted by file name and ignore hidden files (names starting
with ``.``) and files whose extension is not an image extension, so results are
deterministic across machines.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

from .images import (IMAGE_EXTENSIONS, MAX_PIXELS, DataError, check_readable, detect_channels, image_size,  # noqa: F401 (re-exported)
                     load_image, load_images, load_mask)

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_PIXELS",
    "DataError",
    "TestSample",
    "MVTecCategory",
    "load_image",
    "load_mask",
    "image_size",
    "detect_channels",
    "scan_mvtec",
    "check_mask_sizes",
    "list_images",
    "split_train_val",
    "load_images",
]


class TestSample(NamedTuple):
    """One test image of an MVTec AD category.

    Attributes:
        path: The image file.
        defect: Name of its ``test/<defect>`` folder; ``"good"`` for normal images.
        label: 0 for normal (``good``) images, 1 for anomalous ones.
        mask_path: The ground-truth mask, or None for normal images.
    """

    __test__ = False  # not a pytest test class despite the name

    path: Path
    defect: str
    label: int
    mask_path: Path | None


class MVTecCategory(NamedTuple):
    """The file listing of one MVTec AD category folder.

    Attributes:
        root: The category folder.
        name: The category name (the folder's name).
        train: Training images (``train/good``), sorted by name.
        test: Test samples sorted by defect folder, then by file name.
    """

    root: Path
    name: str
    train: list[Path]
    test: list[TestSample]


# --------------------------------------------------------------------------- listing


def _is_image_file(p: Path) -> bool:
    return not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()


def _images_in(folder: Path) -> list[Path]:
    """Image files directly inside ``folder`` (not recursive), sorted by name."""
    try:
        entries = list(folder.iterdir())
    except OSError as e:
        raise DataError(f"{folder}: cannot list folder ({e})") from None
    return sorted((p for p in entries if _is_image_file(p)), key=lambda p: p.name)


def _subfolders(folder: Path) -> list[Path]:
    try:
        entries = list(folder.iterdir())
    except OSError as e:
        raise DataError(f"{folder}: cannot list folder ({e})") from None
    return sorted((p for p in entries if not p.name.startswith(".") and p.is_dir()), key=lambda p: p.name)


def _ext_list() -> str:
    return ", ".join(sorted(IMAGE_EXTENSIONS))


def _pick_mask(candidates: list[Path]) -> Path:
    """Prefer a .png mask when several files share the same ``<stem>_mask`` name."""
    pngs = [c for c in candidates if c.suffix.lower() == ".png"]
    return sorted(pngs or candidates, key=lambda p: p.name)[0]


def scan_mvtec(root: str | os.PathLike, require_test: bool = True, require_train: bool = True) -> MVTecCategory:
    """List the images of one MVTec AD category folder (nothing is decoded).

    Args:
        root: The category folder, e.g. ``mvtec/bottle``.
        require_test: If True, the ``test`` folder must exist and hold images.
            If False, a missing ``test`` folder gives an empty test list (an
            existing one is still scanned and checked).

    Returns:
        The category listing; test samples are sorted by defect folder, then
        file name. Every defective image has a mask; ``good`` images have none.

    Raises:
        DataError: ``root`` is missing or not a folder; ``train/good`` is
            missing or holds no images; (with ``require_test``) ``test`` is
            missing or holds no images; a defective test image has no mask
            ``ground_truth/<defect>/<stem>_mask.png``; or a mask in
            ``ground_truth`` has no matching test image.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root}: dataset folder not found")
    if not root.is_dir():
        raise DataError(f"{root}: not a folder (expected an MVTec AD category folder)")

    train_dir = root / "train" / "good"
    if not train_dir.is_dir() and require_train:
        raise DataError(
            f"{train_dir}: training folder missing (expected MVTec AD layout <root>/train/good/*.png)"
        )
    train = _images_in(train_dir) if train_dir.is_dir() else []
    if not train and require_train:
        raise DataError(f"{train_dir}: no training images found (extensions {_ext_list()})")

    test_dir = root / "test"
    gt_dir = root / "ground_truth"
    test: list[TestSample] = []
    if test_dir.exists() and not test_dir.is_dir():
        raise DataError(f"{test_dir}: not a folder (expected <root>/test/<defect>/*.png)")
    if test_dir.is_dir():
        test_stems: dict[str, set[str]] = {}
        for defect_dir in _subfolders(test_dir):
            defect = defect_dir.name
            images = _images_in(defect_dir)
            test_stems[defect] = {p.stem for p in images}
            if defect == "good":
                test.extend(TestSample(p, "good", 0, None) for p in images)
                continue
            masks_dir = gt_dir / defect
            by_stem: dict[str, list[Path]] = {}
            if masks_dir.is_dir():
                for m in _images_in(masks_dir):
                    by_stem.setdefault(m.stem, []).append(m)
            for p in images:
                candidates = by_stem.get(f"{p.stem}_mask")
                if not candidates:
                    raise DataError(
                        f"{p}: defective test image has no ground-truth mask "
                        f"(expected {masks_dir / (p.stem + '_mask.png')})"
                    )
                test.append(TestSample(p, defect, 1, _pick_mask(candidates)))

        if gt_dir.is_dir():
            for masks_dir in _subfolders(gt_dir):
                defect = masks_dir.name
                stems = test_stems.get(defect)
                for m in _images_in(masks_dir):
                    base = m.stem[: -len("_mask")] if m.stem.endswith("_mask") else None
                    if stems is None:
                        raise DataError(
                            f"{m}: ground-truth mask has no matching test image "
                            f"(test folder {test_dir / defect} does not exist)"
                        )
                    if base is None:
                        raise DataError(
                            f"{m}: ground-truth mask has no matching test image "
                            f"(mask names must be <image stem>_mask.png)"
                        )
                    if base not in stems:
                        raise DataError(
                            f"{m}: ground-truth mask has no matching test image "
                            f"(expected {test_dir / defect / (base + '.png')})"
                        )
    elif require_test:
        raise DataError(f"{test_dir}: test folder missing (expected <root>/test/<defect>/*.png)")

    if require_test and not test:
        raise DataError(
            f"{test_dir}: no test images found (expected <root>/test/<defect>/*.png, "
            f"extensions {_ext_list()})"
        )
    return MVTecCategory(root=root, name=root.resolve().name or root.name, train=train, test=test)


def check_mask_sizes(category: MVTecCategory) -> None:
    """Check that every mask has the same size as its test image (headers only).

    Raises:
        DataError: Naming the image and mask files and both sizes (H x W) for
            the mismatching pairs (up to 5 listed), or an unreadable file.
    """
    problems: list[str] = []
    for s in category.test:
        if s.mask_path is None:
            continue
        ih, iw = image_size(s.path)
        mh, mw = image_size(s.mask_path)
        if (ih, iw) != (mh, mw):
            problems.append(f"{s.mask_path}: mask size {mh}x{mw} differs from image {s.path} size {ih}x{iw}")
    if problems:
        more = f"\n... and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise DataError("\n".join(problems[:5]) + more)


def list_images(inputs: Sequence[str | os.PathLike] | str | os.PathLike) -> list[Path]:
    """Resolve files and folders into a list of image files.

    Args:
        inputs: Image files and/or folders. A folder contributes its image
            files (non-recursive, sorted by name, hidden files ignored). Input
            order is kept; duplicates are dropped.

    Returns:
        The image paths.

    Every file's header is opened (:func:`lsr.images.check_readable`), so a command
    that lists its inputs here names every unreadable one before it does any work.

    Raises:
        DataError: An input does not exist, is a file without an image
            extension, or is a folder with no images; or ``inputs`` is empty;
            or images cannot be opened (all of them named, the first one first).
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    out: list[Path] = []
    seen: set[Path] = set()
    for item in inputs:
        p = Path(item)
        if not p.exists():
            raise DataError(f"{p}: input path not found")
        if p.is_dir():
            found = _images_in(p)
            if not found:
                raise DataError(f"{p}: folder contains no images (extensions {_ext_list()})")
        elif p.suffix.lower() in IMAGE_EXTENSIONS:
            found = [p]
        else:
            raise DataError(f"{p}: not an image file (supported extensions {_ext_list()})")
        for f in found:
            key = f.resolve()
            if key not in seen:
                seen.add(key)
                out.append(f)
    if not out:
        raise DataError("list_images: no input files or folders given")
    check_readable(out)
    return out


def split_train_val(
    paths: Sequence[str | os.PathLike], val_fraction: float, seed: int
) -> tuple[list[Path], list[Path]]:
    """Split images into training and validation parts, deterministically.

    The images are shuffled with ``numpy.random.default_rng(seed)``;
    ``round(n * val_fraction)`` of them (at least 1, at most n - 1) go to
    validation. Each part keeps the input order.

    Args:
        paths: Image paths.
        val_fraction: Fraction for validation, strictly between 0 and 1.
        seed: Random seed.

    Returns:
        (train, val) lists of paths, both non-empty.

    Raises:
        DataError: Fewer than 2 images.
        ValueError: ``val_fraction`` outside (0, 1).
    """
    paths = [Path(p) for p in paths]
    n = len(paths)
    if not 0.0 < float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction!r}")
    if n < 2:
        where = f"{paths[0]}: " if paths else ""
        raise DataError(f"{where}need at least 2 images to split off a validation set, got {n}")
    n_val = min(max(int(round(n * float(val_fraction))), 1), n - 1)
    order = np.random.default_rng(seed).permutation(n)
    val_idx = set(order[:n_val].tolist())
    train = [p for i, p in enumerate(paths) if i not in val_idx]
    val = [p for i, p in enumerate(paths) if i in val_idx]
    return train, val
