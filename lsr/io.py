"""Small I/O helpers: atomic writes, JSON, safetensors weights, images.

Every file the package writes goes through :func:`atomic_write` (write to a
temporary file in the same folder, then ``os.replace``), so a failure half-way
never destroys a file that was already there.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
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
        _honour_umask(tmp)
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
        _honour_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _honour_umask(tmp: str) -> None:
    """mkstemp creates 0600 files; a written file gets 0666 less the umask, as open() gives."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None: JSON has no NaN or Infinity,
    and a file holding them is not valid JSON for other readers."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (np.floating,)):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def dumps(obj: Any, **kw: Any) -> str:
    """JSON text of ``obj``; never NaN or Infinity (:func:`json_safe`)."""
    return json.dumps(json_safe(obj), default=_json_default, allow_nan=False, **kw)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    text = dumps(obj, indent=2, sort_keys=False)
    with atomic_write(path, "w") as f:
        f.write(text + "\n")


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: is a folder, expected a JSON file") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a JSON file (binary content)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot be read ({e.strerror or e})") from None


def append_jsonl(path: str | os.PathLike, obj: Mapping[str, Any]) -> None:
    """Append one JSON line (a log or results file grows; earlier lines are never rewritten)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = dumps(obj) + "\n"
    with open(path, "a") as f:
        f.write(line)
        f.flush()


def output_folder(path: str | os.PathLike, option: str = "--out", create: bool = True) -> Path:
    """``path`` as an output folder, created if missing (``create``; else an error); a
    clear error when it is a file (or below one) or cannot be created."""
    path = Path(path)
    if not create and not path.is_dir():
        raise FileNotFoundError(f"{option} {path}: folder not found")
    for p in (path, *path.parents):
        if p.exists() and not p.is_dir():
            raise ValueError(f"{option} {path}: {p} is a file, not a folder")
        if p.exists():
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{option} {path}: cannot create the folder ({e.strerror or e})") from None
    return path


@contextlib.contextmanager
def folder_lock(path: str | os.PathLike, option: str = "--out", create: bool = True) -> Iterator[Path]:
    """Hold an exclusive lock on the output folder ``path`` (created if missing) while a
    command writes into it: a second lsr command on the same folder refuses at once instead
    of mixing its files with the first one's. The lock is ``flock`` on the folder itself
    (no lock file; released by the kernel when the process ends, even on a crash)."""
    path = output_folder(path, option, create)
    try:
        import fcntl
    except ImportError:                                  # pragma: no cover - not POSIX
        yield path
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"{option} {path}: another lsr command is writing into this folder; wait for it "
                             f"to finish or choose another {option}") from None
        yield path
    finally:
        os.close(fd)


def locks_output(param: str = "out", option: str = "--out", create: bool = True):
    """Decorator: the function's output folder (argument ``param``) is checked, created and
    locked (:func:`folder_lock`) for the duration of the call; under torchrun only rank 0
    locks (the other ranks write into the folder rank 0 holds)."""
    import functools
    import inspect

    def wrap(fn):
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def inner(*args, **kwargs):
            bound = sig.bind_partial(*args, **kwargs)
            out = bound.arguments.get(param)
            if out is None or int(os.environ.get("RANK", "0")) != 0:
                return fn(*args, **kwargs)
            with folder_lock(out, option, create):
                return fn(*args, **kwargs)
        return inner
    return wrap


def plain_name(name: Any, folder: str | os.PathLike, source: str) -> Path:
    """``folder / name`` for a file reference read from ``source`` (a run's or bundle's
    JSON): the name must be a plain file name inside that folder — no path separators, no
    ``..``, not absolute, not a symlink leading out of the folder."""
    folder = Path(folder)
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name
            or "\0" in name or os.path.isabs(name)):
        raise ValueError(f"{source}: file reference {name!r} must be a plain file name inside {folder}")
    path = folder / name
    if path.is_symlink():
        target = path.resolve()
        if folder.resolve() not in target.parents:
            raise ValueError(f"{source}: {name!r} is a symlink to {target}, outside {folder}")
    return path


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


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
