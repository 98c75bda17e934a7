"""The deployment bundle: a folder of graphs plus ``bundle.json`` (no torch needed here).

Layout of a bundle written by ``lsr-export``::

    bundle.json        everything needed to run it (see :func:`read_bundle`)
    encoder.onnx       image (B, C, S, S) float32 in [0, 1] -> codes (B, h, w) int64,
                       seen (B, F, H, H) float32 (the image, or its normalised features)
    prior.onnx         codes (B, h, w) int64 -> logits (B, K, h, w), likelihood (B, h, w)
    decoder.onnx       codes (B, h, w) int64 -> picture (B, C, S, S) float32 in [0, 1],
                       seen (B, F, H, H) float32 (decoded)
    postprocess.onnx   seen, direct (B, F, H, H), restored (B, N, F, H, H), resampled
                       (B, N, h, w), nll_score (B,), held_out (4,) -> maps and scores
    prior_rows.onnx    (optional) rows r0..r1-1 of a prior pass from the state of the rows
                       above (lsr.deploy.graphs.PriorRowsGraph): the incremental loop

(``*.pt`` instead of ``*.onnx`` for the TorchScript format, whose prior returns the logits
only.) ``bundle.json`` records the sha256 of every graph file, so a graph edited or
replaced after export is refused with an error naming the file.

Example:
    >>> import tempfile, pathlib
    >>> read_bundle(pathlib.Path(tempfile.mkdtemp()))        # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    lsr.deploy.bundle.BundleError: .../bundle.json: not an lsr bundle (bundle.json not found)
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, NamedTuple

from ..config import HELD_OUT_STATS  # noqa: F401 (re-exported: the fused score's statistics in bundle.json)
from ..io import plain_name, sha256_file  # noqa: F401 (sha256_file re-exported)

#: Version of the bundle layout written. 2: ``detect.resampler`` may be ``auto`` and an
#: ONNX bundle may hold ``prior_rows``. 3: one graph contract for both modes (pixels and
#: features): encoder and decoder also return what is seen, the postprocess graph is
#: :func:`lsr.anomaly.postprocess` (resampled mask, NLL score and held-out statistics in,
#: gated map and fused score out).
#: 4: version 3 plus the posterior draw (``detect.posterior`` > 0 and ``posterior_scale``, the
#: ``code_distances`` graph); written only for such runs, so that a runtime reading version 3
#: only refuses them instead of drawing from the prior alone.
BUNDLE_VERSION = 3
POSTERIOR_BUNDLE_VERSION = 4
#: Versions this lsr reads (older bundles: export the run again).
READ_VERSIONS = (3, 4)
FORMATS = ("onnx", "torchscript")
GRAPHS = ("encoder", "prior", "decoder", "postprocess")
#: Graphs a bundle may hold besides :data:`GRAPHS` (checked like them when present):
#: ``prior_rows`` (ONNX: the row-range prior of the incremental loop) and ``prior_native``
#: (TorchScript: the prior on lsr's native attention ops, for runtimes that load them).
OPTIONAL_GRAPHS = ("prior_rows", "prior_native", "code_distances")
EXTENSIONS = {"onnx": ".onnx", "torchscript": ".pt"}
#: Detection settings a bundle user may change at run time (the rest are baked into
#: the postprocess graph).
RUNTIME_OPTIONS = ("tau", "temperature", "seed", "restorations", "resampler")
BAKED_OPTIONS = ("map_kind", "distance", "score_distance", "smoothing", "sigma", "score", "topk", "pool",
                 "gate_dilate", "weighting", "posterior")
#: The detection settings a bundle records from its run (all but the loop choice).
EXPORTED_OPTIONS = tuple(k for k in RUNTIME_OPTIONS if k != "resampler") + BAKED_OPTIONS


class BundleError(ValueError):
    """A bundle folder is missing, incomplete, edited or of another version.

    The message starts with the offending file."""


class GraphSpec(NamedTuple):
    """One graph of a bundle, as recorded in ``bundle.json``."""
    name: str                     # encoder | prior | decoder | postprocess
    path: Path
    sha256: str
    inputs: list[dict[str, Any]]  # [{"name", "dtype", "shape"}], shape entries int or "batch"/...
    outputs: list[dict[str, Any]]


class Bundle(NamedTuple):
    """A validated bundle: its folder, ``bundle.json`` as a dict and its graphs."""
    root: Path
    meta: dict[str, Any]
    graphs: dict[str, GraphSpec]

    @property
    def format(self) -> str:
        return self.meta["format"]

    @property
    def image_size(self) -> int:
        return int(self.meta["model"]["image_size"])

    @property
    def channels(self) -> int:
        return int(self.meta["model"]["channels"])

    @property
    def grid_size(self) -> int:
        return int(self.meta["model"]["grid_size"])

    @property
    def codebook_size(self) -> int:
        return int(self.meta["model"]["codebook_size"])

    @property
    def detect(self) -> dict[str, Any]:
        return self.meta["detect"]


def is_bundle(path: str | os.PathLike) -> bool:
    """True when ``path`` is a folder holding a ``bundle.json`` (a bundle, maybe a bad one)."""
    p = Path(path)
    return p.is_dir() and (p / "bundle.json").is_file()


_REQUIRED = ("format", "bundle_version", "lsr_version", "model", "preprocessing", "detect", "noise", "graphs")


def read_bundle(root: str | os.PathLike, verify_hashes: bool = True) -> Bundle:
    """Read and check a bundle folder.

    Checks: ``bundle.json`` exists and is JSON with every required key; the bundle
    version is one of :data:`READ_VERSIONS`; the format is known; every graph file exists and
    (``verify_hashes``) its sha256 equals the recorded one.

    Raises:
        BundleError: naming the file and the problem.
    """
    root = Path(root)
    meta_path = root / "bundle.json"
    if not root.is_dir():
        raise BundleError(f"{root}: bundle folder not found")
    if not meta_path.is_file():
        raise BundleError(f"{meta_path}: not an lsr bundle (bundle.json not found)")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{meta_path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise BundleError(f"{meta_path}: expected a JSON object")
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        raise BundleError(f"{meta_path}: missing keys {missing}; not a bundle written by lsr-export")
    if meta["bundle_version"] not in READ_VERSIONS:
        raise BundleError(f"{meta_path}: bundle version {meta['bundle_version']!r} is not supported "
                          f"(this lsr reads versions {', '.join(map(str, READ_VERSIONS))}); re-export the run with this "
                          f"lsr's lsr-export")
    if meta["format"] not in FORMATS:
        raise BundleError(f"{meta_path}: unknown format {meta['format']!r} (expected one of {FORMATS})")
    _check_values(meta_path, meta)
    graphs: dict[str, GraphSpec] = {}
    if not isinstance(meta["graphs"], dict):
        raise BundleError(f"{meta_path}: graphs must be a JSON object naming {', '.join(GRAPHS)}, "
                          f"got {meta['graphs']!r}")
    for name in GRAPHS + OPTIONAL_GRAPHS:
        g = meta["graphs"].get(name)
        if name in OPTIONAL_GRAPHS and g is None:
            continue
        if not isinstance(g, dict) or not {"file", "sha256", "inputs", "outputs"} <= set(g):
            raise BundleError(f"{meta_path}: graph {name!r} is missing or incomplete")
        if not isinstance(g["inputs"], list) or not isinstance(g["outputs"], list) or not isinstance(g["sha256"], str):
            raise BundleError(f"{meta_path}: graphs.{name}: inputs/outputs must be lists and sha256 a string")
        try:
            path = plain_name(g["file"], root, f"{meta_path}: graphs.{name}.file")
        except ValueError as e:
            raise BundleError(str(e)) from None
        if not path.is_file():
            raise BundleError(f"{path}: graph file missing from the bundle ({name} graph)")
        if verify_hashes:
            digest = sha256_file(path)
            if digest != g["sha256"]:
                raise BundleError(f"{path}: sha256 {digest[:12]}... does not match bundle.json "
                                  f"({g['sha256'][:12]}...): the graph was edited or replaced after export")
        graphs[name] = GraphSpec(name, path, g["sha256"], list(g["inputs"]), list(g["outputs"]))
    if "prior_rows" in graphs:
        _check_rows_meta(meta_path, meta["graphs"]["prior_rows"])
    m = meta["model"]
    want = ["batch", m["seen_channels"], m["seen_size"], m["seen_size"]]
    declared = [o.get("shape") for o in graphs["encoder"].outputs if isinstance(o, dict) and o.get("name") == "seen"]
    if declared != [want]:
        raise BundleError(f"{meta_path}: model.seen_channels/seen_size ({m['seen_channels']}, {m['seen_size']}) do "
                          f"not match the encoder graph's output seen {declared[0] if declared else '(missing)'}")
    return Bundle(root, meta, graphs)


#: bundle.json values and the lsr.config.RULES key each must obey
_VALUE_RULES = {("model", "image_size"): "vqvae.image_size", ("model", "channels"): "vqvae.in_channels",
                ("model", "downsample"): "vqvae.downsample", ("model", "grid_size"): "prior.grid_size",
                ("model", "codebook_size"): "vqvae.codebook_size", ("model", "embed_dim"): "vqvae.embed_dim",
                ("model", "space"): "vqvae.space",
                # what the VQ-VAE sees (lsr.config.BUNDLE_RULES; checked against the encoder graph too)
                ("model", "seen_channels"): "model.seen_channels", ("model", "seen_size"): "model.seen_size",
                **{("detect", k): f"detect.{k}" for k in ("tau", "temperature", "restorations", "seed", "resampler",
                                                          "map_kind", "distance", "score_distance", "smoothing",
                                                          "sigma", "score",
                                                          "topk", "pool", "gate_dilate", "weighting", "posterior", "posterior_scale",
                                                          "false_alarm_rate", "pixel_fpr",
                                                          "image_threshold", "pixel_threshold", *HELD_OUT_STATS)}}
_REQUIRED_VALUES = {("model", "image_size"), ("model", "channels"), ("model", "grid_size"),
                    ("model", "codebook_size"), ("model", "space"), ("model", "seen_channels"),
                    ("model", "seen_size"), ("detect", "tau"), ("detect", "temperature"),
                    ("detect", "restorations"), ("detect", "seed")}


def _check_values(meta_path: Path, meta: dict[str, Any]) -> None:
    """model and detect values of bundle.json against the one rule list (lsr.config.RULES),
    as the C++ runtime checks them too; a bundle with tau NaN, a huge restorations count
    or a missing size is refused naming bundle.json and the key."""
    from ..config import BUNDLE_RULES, RULES, ConfigError, check_value

    rules = {**RULES, **BUNDLE_RULES}

    for section in ("model", "detect"):
        if not isinstance(meta[section], dict):
            raise BundleError(f"{meta_path}: {section} must be a JSON object")
    for (section, key), rule in _VALUE_RULES.items():
        if key not in meta[section]:
            if (section, key) in _REQUIRED_VALUES:
                raise BundleError(f"{meta_path}: {section}.{key} is missing")
            continue
        value = meta[section][key]
        if rule == "detect.tau" and value is None:
            raise BundleError(f"{meta_path}: detect.tau is null (the run was not calibrated)")
        try:
            check_value(rule, value, rules=rules)
        except ConfigError as e:
            raise BundleError(f"{meta_path}: {section}.{key}: {str(e).split(': ', 1)[1]}") from None
    _check_posterior(meta_path, meta)


def _check_posterior(meta_path: Path, meta: dict[str, Any]) -> None:
    """A bundle with the posterior draw is version 4, has its scale and the code_distances
    graph; a version-3 bundle draws from the prior alone."""
    d = meta["detect"]
    if float(d.get("posterior", 0.0)) == 0.0:
        return
    if meta["bundle_version"] < POSTERIOR_BUNDLE_VERSION:
        raise BundleError(f"{meta_path}: detect.posterior is {d['posterior']!r} in a version-"
                          f"{meta['bundle_version']} bundle, which draws from the prior alone; export the run again")
    if d.get("posterior_scale") is None:
        raise BundleError(f"{meta_path}: detect.posterior is {d['posterior']!r} but detect.posterior_scale is missing")
    if not isinstance(meta["graphs"], dict) or "code_distances" not in meta["graphs"]:
        raise BundleError(f"{meta_path}: detect.posterior is {d['posterior']!r} but the bundle has no "
                          f"code_distances graph")


def _check_rows_meta(meta_path: Path, g: dict[str, Any]) -> None:
    """graphs.prior_rows must say how to build and slice its state."""
    state, ctx = g.get("state"), g.get("context_rows")
    ok = isinstance(ctx, int) and ctx >= 1 and isinstance(state, list)
    for e in state if isinstance(state, list) else []:
        if not (isinstance(e, dict) and (
                (e.get("kind") == "conv" and all(isinstance(e.get(k), int) and e[k] >= 0
                                                 for k in ("channels", "rows", "left", "right")))
                or (e.get("kind") == "attention" and all(isinstance(e.get(k), int) and e[k] >= 1
                                                         for k in ("heads", "head_dim"))))):
            ok = False
    if not ok or len(g["inputs"]) != 2 + len(state) or len(g["outputs"]) != 2 + len(state):
        raise BundleError(f"{meta_path}: graphs.prior_rows needs context_rows (>= 1) and a state entry "
                          f"(conv: channels, rows, left, right; attention: heads, head_dim) per state input")


def write_bundle_json(root: str | os.PathLike, meta: dict[str, Any]) -> None:
    """Write ``bundle.json`` atomically."""
    from ..io import write_json

    write_json(Path(root) / "bundle.json", meta)


@contextlib.contextmanager
def staged_folder(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """A temporary folder beside ``out`` that becomes ``out`` only if the block succeeds.

    The block writes the whole bundle into the yielded folder; on success it is renamed
    onto ``out`` (an existing bundle there is replaced only with ``overwrite``; the old
    one is moved aside first and deleted after the rename). On any error the temporary
    folder is removed and ``out`` is untouched: there is never a half bundle at ``out``.
    """
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise FileExistsError(f"{out}: exists and is not a folder")
        if any(out.iterdir()):
            if not overwrite:
                raise FileExistsError(f"{out}: folder exists and is not empty; choose another --out or "
                                      f"pass --overwrite to replace a bundle there")
            if not is_bundle(out):
                raise FileExistsError(f"{out}: not empty and not an lsr bundle; refusing to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        _publish_modes(tmp)
        _fsync_dir(tmp)
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / "bundle")
        try:
            os.replace(tmp, out)
        except BaseException:
            if old is not None:
                os.replace(old / "bundle", out)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _publish_modes(folder: Path) -> None:
    """Temporary folders and files are private (0700/0600); give the bundle the modes a
    normal ``mkdir``/``open`` would (subject to the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for f in folder.iterdir():
        if f.is_file():
            os.chmod(f, 0o666 & ~umask)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def graph_entry(path: Path, inputs: list[dict[str, Any]], outputs: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``bundle.json`` record of one graph file written in a (staged) bundle folder."""
    return {"file": path.name, "sha256": sha256_file(path), "inputs": inputs, "outputs": outputs}


def tensor_spec(name: str, dtype: str, shape: list[Any]) -> dict[str, Any]:
    return {"name": name, "dtype": dtype, "shape": list(shape)}


def prior_rows_io(state: list[dict[str, Any]], context_rows: int, h: int, K: int) -> tuple[list[dict], list[dict]]:
    """Inputs and outputs of ``prior_rows`` for its state entries (``rows`` is the dynamic
    number of rows evaluated, ``past`` the positions above them)."""
    ctx = f"rows + {context_rows}"
    ins = [tensor_spec("codes", "int64", ["batch", ctx, h]), tensor_spec("row_ids", "int64", [ctx])]
    outs = [tensor_spec("logits", "float32", ["batch", K, "rows", h]),
            tensor_spec("likelihood", "float32", ["batch", "rows", h])]
    for i, e in enumerate(state):
        if e["kind"] == "conv":
            ins.append(tensor_spec(f"state_{i}", "float32", ["batch", e["channels"], e["rows"],
                                                             e["left"] + h + e["right"]]))
            outs.append(tensor_spec(f"state_out_{i}", "float32", ["batch", e["channels"], "rows", h]))
        else:
            ins.append(tensor_spec(f"state_{i}", "float32", ["batch", e["heads"], "past", e["head_dim"]]))
            outs.append(tensor_spec(f"state_out_{i}", "float32", ["batch", e["heads"], "rows * " + str(h),
                                                                  e["head_dim"]]))
    return ins, outs


def graph_io(fmt: str, C: int, S: int, h: int, K: int, F: int | None = None, H: int | None = None
             ) -> dict[str, tuple[list[dict], list[dict]]]:
    """Input and output names, dtypes and shapes of every graph ("batch" and "restorations"
    are the dynamic axes); F x H x H is what the VQ-VAE sees (default C x S x S: pixel
    mode). The names are stable: code that runs a bundle may rely on them."""
    F, H = (C if F is None else F), (S if H is None else H)
    img = ["batch", C, S, S]
    seen = ["batch", F, H, H]
    codes = ["batch", h, h]
    grid = ["batch", S, S]
    prior_out = [tensor_spec("logits", "float32", ["batch", K, h, h])]
    if fmt == "onnx":
        prior_out.append(tensor_spec("likelihood", "float32", ["batch", h, h]))
    f32 = (lambda name, shape: tensor_spec(name, "float32", shape))
    return {
        "encoder": ([f32("image", img)], [tensor_spec("codes", "int64", codes), f32("seen", seen)]),
        "prior": ([tensor_spec("codes", "int64", codes)], prior_out),
        "decoder": ([tensor_spec("codes", "int64", codes)], [f32("picture", img), f32("seen", seen)]),
        "code_distances": ([f32("seen", seen)], [f32("distances", ["batch", h * h, K])]),
        "postprocess": (
            [f32("seen", seen), f32("direct", seen), f32("restored", ["batch", "restorations", F, H, H]),
             f32("resampled", ["batch", "restorations", h, h]), f32("nll_score", ["batch"]),
             f32("held_out", [len(HELD_OUT_STATS)])],
            [f32("anomaly_map", grid), f32("score", ["batch"]), f32("map_restored_vs_input", grid),
             f32("map_restored_vs_direct", grid), f32("map_direct", grid), f32("direct_score", ["batch"]),
             f32("map_gated", grid), f32("fused_score", ["batch"])]),
    }


__all__ = ["BUNDLE_VERSION", "POSTERIOR_BUNDLE_VERSION", "READ_VERSIONS", "FORMATS", "GRAPHS", "OPTIONAL_GRAPHS", "prior_rows_io", "Bundle", "BundleError", "GraphSpec", "read_bundle",
           "is_bundle", "sha256_file", "staged_folder", "write_bundle_json", "graph_entry", "graph_io",
           "RUNTIME_OPTIONS", "BAKED_OPTIONS", "EXPORTED_OPTIONS", "HELD_OUT_STATS"]
