"""The run folder's own bookkeeping: what lsr wrote there, what it was trained on, and the
hashes its weights must have.

``RUN/lsr_run.json`` (the *manifest*) marks a folder as an lsr run and records:

* ``data``: the training images' fingerprint (their count and one sha256 over their names
  and bytes), so ``lsr train`` into a run trained on other images refuses instead of
  "resuming" with the old weights;
* ``weights``: the sha256 of ``vqvae.safetensors`` and ``prior.safetensors``, written when
  training finishes and checked whenever a run is loaded (a damaged file is an error,
  never a NaN score);
* ``finished``: whether training has finished.

``--overwrite`` removes only the files lsr itself writes (:data:`OWNED`), and only in a
folder that holds a manifest (or, for runs written before manifests existed, a valid
``config.json``); any other folder is refused.

Example:
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> (d / "a.png").write_bytes(b"x") and None
    >>> data_fingerprint([d / "a.png"])["n_images"]
    1
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable, Sequence

from .io import read_json, sha256_file, write_json

MANIFEST = "lsr_run.json"
KIND = "lsr-run"
VERSION = 1
WEIGHTS = ("vqvae.safetensors", "prior.safetensors")
#: files lsr writes at the top of a run folder
OWNED = ("config.json", "split.json", "calibration.json", "train_log.jsonl", MANIFEST) + WEIGHTS
#: name patterns lsr writes in RUN/checkpoints
_CHECKPOINT_PREFIXES = ("vqvae_state", "prior_state", "prior_best")


def data_fingerprint(paths: Sequence[Path]) -> dict[str, Any]:
    """Count and sha256 of the training images (file names and contents, in sorted order),
    independent of where the folder lies."""
    h = hashlib.sha256()
    for p in sorted(Path(p) for p in paths):
        h.update(p.name.encode() + b"\0" + bytes.fromhex(sha256_file(p)))
    return {"n_images": len(paths), "sha256": h.hexdigest()}


def read_manifest(run: Path) -> dict[str, Any] | None:
    """The manifest, or None when the folder has none; a damaged one is an error."""
    path = run / MANIFEST
    if not path.is_file():
        return None
    m = read_json(path)
    if not isinstance(m, dict) or m.get("kind") != KIND:
        raise ValueError(f"{path}: not an lsr run manifest")
    if not isinstance(m.get("weights", {}), dict) or not isinstance(m.get("data", {}), dict):
        raise ValueError(f"{path}: damaged manifest (weights/data must be JSON objects)")
    return m


def _is_legacy_run(run: Path) -> bool:
    """A run written before manifests: a config.json lsr can read."""
    from .config import RunConfig

    try:
        RunConfig.from_dict(read_json(run / "config.json"))
    except (ValueError, FileNotFoundError):
        return False
    return True


def remove_owned(run: Path) -> list[str]:
    """Delete what lsr wrote in ``run`` (never anything else); returns the names removed."""
    removed = []
    for name in OWNED:
        p = run / name
        if p.is_file() and not p.is_symlink():
            p.unlink()
            removed.append(name)
    ck = run / "checkpoints"
    if ck.is_dir() and not ck.is_symlink():
        for p in ck.iterdir():
            if p.is_file() and not p.is_symlink() and p.name.startswith(_CHECKPOINT_PREFIXES):
                p.unlink()
                removed.append(f"checkpoints/{p.name}")
        if not any(ck.iterdir()):
            ck.rmdir()
    return removed


def prepare(run: Path, cfg, fingerprint: dict[str, Any], split: dict[str, Any], overwrite: bool,
            log: Callable[[str], None]) -> bool:
    """Check ``run`` and get it ready for training; returns True when training resumes an
    existing run. Call only after the data and the model have been checked: nothing is
    written or removed before the checks here have passed, and a resumed run keeps its
    config.json (and tau) until the new training has finished.

    Refuses: a file; a non-empty folder that is not an lsr run; a run with another
    configuration or other training images (unless ``overwrite``, which then removes
    only lsr's own files)."""
    if run.exists() and not run.is_dir():
        raise ValueError(f"--out {run}: is a file, not a run folder")
    if run.is_dir() and any(run.iterdir()):
        manifest = read_manifest(run)
        if manifest is None and not _is_legacy_run(run):
            raise ValueError(f"--out {run}: the folder is not empty and is not an lsr run (no {MANIFEST}); "
                             f"lsr trains only into a new or empty folder or one of its own runs; choose "
                             f"another --out")
        if overwrite:
            removed = remove_owned(run)
            log(f"--overwrite: removed the earlier run's {len(removed)} files from {run}")
        else:
            saved = read_json(run / "config.json") if (run / "config.json").is_file() else {}
            if not config_matches(saved, cfg):
                raise ValueError(f"{run}: already holds a run with a different configuration; choose "
                                 f"another --out, or pass --overwrite to replace it")
            if not _same_data(run, manifest, fingerprint, split):
                raise ValueError(f"{run}: was trained on other images than these ({fingerprint['n_images']} "
                                 f"images now); choose another --out, or pass --overwrite to train anew")
            log(f"resuming the run in {run}")
            if manifest is None:                          # a legacy run gains its manifest
                write_manifest(run, fingerprint, finished=False)
            return True
    run.mkdir(parents=True, exist_ok=True)
    write_manifest(run, fingerprint, finished=False)
    write_json(run / "split.json", split)
    fresh = cfg.to_dict()
    fresh["detect"]["tau"] = None                         # not calibrated until training finishes
    write_json(run / "config.json", fresh)
    return False


def config_matches(saved: dict[str, Any], cfg) -> bool:
    """Whether a saved config.json trains the same models as ``cfg`` (detect settings aside)."""
    new = cfg.to_dict()
    return all(saved.get(k) == new[k] for k in ("vqvae", "prior", "train"))


def _same_data(run: Path, manifest: dict[str, Any] | None, fingerprint: dict[str, Any],
               split: dict[str, Any]) -> bool:
    if manifest is not None and manifest.get("data"):
        return manifest["data"].get("sha256") == fingerprint["sha256"]
    try:                                                  # legacy: the recorded file lists
        old = read_json(run / "split.json")
        return sorted(old["train"] + old["val"]) == sorted(split["train"] + split["val"])
    except (ValueError, FileNotFoundError, KeyError, TypeError):
        return False


def write_manifest(run: Path, fingerprint: dict[str, Any], finished: bool) -> None:
    m = {"kind": KIND, "version": VERSION, "finished": finished, "data": fingerprint, "weights": {}}
    if finished:
        m["weights"] = {name: sha256_file(run / name) for name in WEIGHTS}
    write_json(run / MANIFEST, m)


def finish(run: Path, fingerprint: dict[str, Any]) -> None:
    """Record the finished run's weights hashes (after config.json holds tau)."""
    write_manifest(run, fingerprint, finished=True)


def verify_weights(run: Path) -> None:
    """Check each weights file against the manifest's sha256 (runs without a manifest,
    written before it existed, are not checked)."""
    manifest = read_manifest(run)
    if manifest is None:
        return
    for name, digest in manifest.get("weights", {}).items():
        if name not in WEIGHTS:
            raise ValueError(f"{run / MANIFEST}: unexpected weights entry {name!r}")
        path = run / name
        if not path.is_file():
            raise FileNotFoundError(f"{path}: weights file not found")
        if sha256_file(path) != digest:
            raise ValueError(f"{path}: the file has changed since training (sha256 differs from {MANIFEST}); "
                             f"the weights are damaged or were replaced: retrain, or restore the file")


__all__ = ["MANIFEST", "OWNED", "data_fingerprint", "prepare", "finish", "verify_weights", "read_manifest",
           "remove_owned"]
