"""Small I/O helpers: atomic writes, JSON, safetensors weights, images.

Every file the package writes goes through :func:`atomic_write` (write to a
temporary file in the same folder, then ``os.replace``), so a failure half-way
never destroys a file that was already there.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[Any]:
    """Open a temporary file beside ``path``; on success rename it onto ``path``.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.txt"
        >>> with atomic_write(p, "w") as f:
        ...     _ = f.write("hello")
        >>> p.read_text()
        'hello'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_save(path: str | os.PathLike, save_fn) -> None:
    """Call ``save_fn(tmp_path)`` for a library that insists on writing a path itself,
    then rename the result onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        save_fn(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False, default=_json_default)
        f.write("\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def append_jsonl(path: str | os.PathLike, obj: Mapping[str, Any]) -> None:
    """Append one JSON line (a log or results file grows; earlier lines are never rewritten)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(obj, default=_json_default) + "\n")
        f.flush()


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def save_png(path: str | os.PathLike, array: np.ndarray) -> None:
    """Save a uint8 array (H, W) or (H, W, 3|4) as PNG, atomically."""
    from PIL import Image

    with atomic_write(path, "wb") as f:
        Image.fromarray(np.ascontiguousarray(array)).save(f, format="PNG")


def save_tiff(path: str | os.PathLike, array: np.ndarray) -> None:
    """Save a float32 map (H, W) as a TIFF, atomically (the MVTec AD evaluation format):
    through tifffile, or Pillow where tifffile is not installed (a bundle's runtime)."""
    arr = np.ascontiguousarray(array, dtype=np.float32)
    try:
        import tifffile
    except ImportError:
        from PIL import Image

        with atomic_write(path, "wb") as f:
            Image.fromarray(arr, mode="F").save(f, format="TIFF")
        return
    atomic_save(path, lambda tmp: tifffile.imwrite(tmp, arr))
