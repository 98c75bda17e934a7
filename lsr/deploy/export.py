"""``lsr-export``: a trained run -> a self-contained bundle of ONNX or TorchScript graphs.

:func:`export_bundle` loads the run, builds the four graphs (:mod:`lsr.deploy.graphs`)
on the reference path of every op, writes them and ``bundle.json`` into a temporary
folder beside the destination, runs the parity check (:func:`lsr.deploy.parity.check_bundle`)
on that folder and only then renames it into place: a failed export or check leaves no
bundle behind.

ONNX graphs come from ``torch.onnx.export(dynamo=True)`` (the ``torch.export``-based
exporter, default since torch 2.9; needs onnxscript): standard ONNX ops only, opset 18 by
default, dynamic batch (and restorations) axes. ONNX bundles also hold ``prior_rows``
(:class:`lsr.deploy.graphs.PriorRowsGraph`, dynamic rows and past positions too): the
row-range prior the bundle's incremental resampling loop calls. The legacy TorchScript-based exporter
also works in torch 2.13 but is deprecated and writes a graph five times larger.

TorchScript graphs are traced (encoder, decoder, postprocess) with the batch dimension
checked to stay dynamic; the prior comes from :func:`torchscript_prior`.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import importlib.util
import io
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import torch
from torch import nn

from .. import ops
from ..config import RunConfig
from ..detect import load_run
from ..models import PixelSNAIL
from .bundle import (BUNDLE_VERSION, POSTERIOR_BUNDLE_VERSION, EXTENSIONS, FORMATS, HELD_OUT_STATS, graph_entry, graph_io, prior_rows_io, staged_folder,
                     write_bundle_json)
from .graphs import PriorRowsGraph, build_graphs, fold_weight_norm

DEFAULT_OPSET = 18


class ExportResult(NamedTuple):
    bundle: Path                  # the bundle folder written
    format: str
    parity: Any                   # lsr.deploy.parity.ParityReport, or None with check=False


def torchscript_prior(prior: PixelSNAIL) -> torch.jit.ScriptModule:
    """The prior as TorchScript, ``forward(codes (B, h, w) int64) -> logits (B, K, h, w)``:
    :func:`lsr.models.incremental.script_prior` (with the incremental methods the C++
    runtime calls), on pure-PyTorch ops (``native=False``) so that ``torch.jit.load``
    needs no lsr extension."""
    from ..models.incremental import script_prior
    return script_prior(prior, native=False)


def _trace(module: nn.Module, example: tuple[torch.Tensor, ...], batched: tuple[bool, ...] | None = None
           ) -> torch.jit.ScriptModule:
    """``torch.jit.trace`` on the reference ops, then a check that a different batch size
    gives what the eager module gives (a trace that froze the batch would fail here);
    ``batched`` says which inputs have the batch axis (default: all)."""
    batched = batched or (True,) * len(example)
    with ops.backend("reference"), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)      # TorchScript is what LibTorch loads
        traced = torch.jit.trace(module, example, check_trace=False)
        other = tuple(torch.cat([t, t[:1]], 0) if b else t for t, b in zip(example, batched))   # batch + 1
        want, got = module(*other), traced(*other)
    want = want if isinstance(want, tuple) else (want,)
    got = got if isinstance(got, tuple) else (got,)
    for a, b in zip(want, got):
        if a.shape != b.shape or not torch.allclose(a.float(), b.float(), atol=1e-5, rtol=1e-5, equal_nan=True):
            raise RuntimeError(f"tracing {type(module).__name__} froze a shape: batch {other[0].shape[0]} "
                               f"gives {tuple(b.shape)} instead of {tuple(a.shape)}")
    return traced


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """The dynamo exporter logs progress and optional-dependency notes; keep the CLI clean."""
    names = ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx", "onnxscript", "torch._export")
    levels = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for n, lv in levels.items():
            logging.getLogger(n).setLevel(lv)


def seen_shape(cfg: RunConfig, vqvae: nn.Module) -> tuple[int, int]:
    """(F, H): channels and side of what the VQ-VAE sees (the image, or the features)."""
    if cfg.vqvae.space == "features":
        return int(vqvae.feature_channels), cfg.vqvae.image_size // cfg.vqvae.feature_stride
    return cfg.vqvae.in_channels, cfg.vqvae.image_size


def _examples(cfg: RunConfig, F: int, H: int) -> dict[str, tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(0)
    C, S, h, K = cfg.vqvae.in_channels, cfg.vqvae.image_size, cfg.grid_size, cfg.vqvae.codebook_size
    img = torch.rand(2, C, S, S, generator=g)
    codes = torch.randint(0, K, (2, h, h), generator=g)
    # batch 2, restorations 3: distinct sizes, so that the exporter cannot tie the two axes
    post = (torch.rand(2, F, H, H, generator=g), torch.rand(2, F, H, H, generator=g),
            torch.rand(2, 3, F, H, H, generator=g), (torch.rand(2, 3, h, h, generator=g) < 0.2).float(),
            torch.rand(2, generator=g) * 10, torch.tensor([0.5, 0.1, 5.0, 2.0]))
    return {"encoder": (img,), "prior": (codes,), "decoder": (codes,), "postprocess": post,
            "code_distances": (post[0],)}


def _export_onnx(module: nn.Module, example: tuple[torch.Tensor, ...], path: Path, io_spec, opset: int,
                 dynamic: Any = None) -> None:
    import onnx

    inputs, outputs = io_spec
    named = {"batch": torch.export.Dim("batch", min=1), "restorations": torch.export.Dim("restorations", min=1)}
    dyn: Any = {spec["name"]: {i: named[a] for i, a in enumerate(spec["shape"]) if a in named} or None
                for spec in inputs}
    if dynamic is not None:
        dyn = dynamic
    with ops.backend("reference"), torch.no_grad(), _quiet_export():
        prog = torch.onnx.export(module, example, dynamo=True, opset_version=opset,
                                 input_names=[s["name"] for s in inputs],
                                 output_names=[s["name"] for s in outputs],
                                 dynamic_shapes=dyn, external_data=False, verbose=False)
    model = prog.model_proto
    # the exporter names dynamic axes after the torch.export Dims; name every one for readers
    onnx.checker.check_model(model)
    got_in = [i.name for i in model.graph.input]
    got_out = [o.name for o in model.graph.output]
    if got_in != [s["name"] for s in inputs] or got_out != [s["name"] for s in outputs]:
        raise RuntimeError(f"{path.name}: exported names {got_in} -> {got_out} are not the bundle's")
    non_standard = sorted({n.domain for n in model.graph.node if n.domain not in ("", "ai.onnx")})
    if non_standard:
        raise RuntimeError(f"{path.name}: graph uses non-standard op domains {non_standard}")
    path.write_bytes(model.SerializeToString())


def _prior_rows_example(graph: nn.Module, h: int, K: int) -> tuple[tuple[torch.Tensor, ...], Any]:
    """Example inputs of :class:`PriorRowsGraph` (rows [h // 2, h) of 2 images, so that
    no dynamic size is 0 or 1, which torch.export would specialise: hence grids of 3 rows
    or more) and their dynamic shapes: batch, rows evaluated, positions above them (0
    allowed)."""
    ctx = graph.context_rows
    r0 = h // 2
    g = torch.Generator().manual_seed(0)
    ids = torch.arange(r0 - ctx, h)
    codes = torch.randint(0, K, (2, len(ids), h), generator=g)
    state = []
    for e in graph.state_geometry():
        if e["kind"] == "conv":
            state.append(torch.randn(2, e["channels"], e["rows"], e["left"] + h + e["right"], generator=g))
        else:
            state.append(torch.randn(2, e["heads"], r0 * h, e["head_dim"], generator=g))
    A = torch.export.Dim("batch", min=1)
    R = torch.export.Dim("rows", min=1)
    P = torch.export.Dim("past", min=0)
    dyn: dict[str, Any] = {"codes": {0: A, 1: R + ctx}, "row_ids": {0: R + ctx}}
    if state:            # a prior without state (no cached conv, no attention) has no state inputs
        dyn["state_in"] = tuple({0: A, 2: P} if e["kind"] == "attention" else {0: A}
                                for e in graph.state_geometry())
    return (codes, ids, *state), dyn


def _export_torchscript(name: str, module: nn.Module, example: tuple[torch.Tensor, ...], path: Path,
                        prior: PixelSNAIL, inputs: list[dict[str, Any]]) -> None:
    batched = tuple(s["shape"][:1] == ["batch"] for s in inputs)
    scripted = torchscript_prior(prior) if name == "prior" else _trace(module, example, batched)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(scripted, str(path))


def _versions(fmt: str, opset: int) -> dict[str, Any]:
    from .. import __version__

    v: dict[str, Any] = {"lsr": __version__, "torch": torch.__version__.split("+")[0]}
    if fmt == "onnx":
        import onnx
        v.update(onnx=onnx.__version__, onnx_opset=opset)
        with contextlib.suppress(ImportError):
            import onnxscript
            v["onnxscript"] = onnxscript.__version__
        with contextlib.suppress(ImportError):
            import onnxruntime
            v["onnxruntime"] = onnxruntime.__version__
    return v


def bundle_meta(cfg: RunConfig, fmt: str, run: Path, graphs: dict[str, dict[str, Any]], opset: int,
                seen: tuple[int, int] | None = None) -> dict[str, Any]:
    """The content of ``bundle.json`` for a run's config and written graphs."""
    from .. import __version__

    v, d = cfg.vqvae, cfg.detect
    return {
        "format": fmt,
        "bundle_version": POSTERIOR_BUNDLE_VERSION if d.posterior > 0 else BUNDLE_VERSION,
        "lsr_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(fmt, opset),
        "source_run": str(run.resolve()),
        "model": {"image_size": v.image_size, "channels": v.in_channels, "downsample": v.downsample,
                  "grid_size": cfg.grid_size, "codebook_size": v.codebook_size, "embed_dim": v.embed_dim,
                  "preset": cfg.preset, "space": v.space,
                  # what the VQ-VAE sees: the image, or the normalised backbone features
                  "seen_channels": (seen or (v.in_channels, v.image_size))[0],
                  "seen_size": (seen or (v.in_channels, v.image_size))[1],
                  **({"backbone": v.backbone, "feature_stride": v.feature_stride} if v.space == "features" else {})},
        "preprocessing": {
            "layout": "NCHW", "dtype": "float32", "range": [0.0, 1.0],
            "resize": "bilinear to image_size x image_size, antialiased when shrinking (Pillow), "
                      "values clipped to [0, 1]",
            "channels": "1: ITU-R 601-2 luma of colour images; 3: RGB, grey replicated; alpha dropped",
            "pixel_scale": "8-bit / 255, 16-bit / 65535",
            "in_graph": ("the encoder graph holds the backbone and its ImageNet normalisation (grey images "
                         "replicated to 3 channels)" if v.space == "features"
                         else "the encoder maps [0, 1] to [-1, 1] itself (x * 2 - 1)"),
        },
        "detect": {"tau": float(d.tau), "temperature": float(d.temperature), "restorations": int(d.restorations),
                   "seed": int(d.seed), "resampler": "auto", "map_kind": d.map_kind, "distance": d.distance,
                   "score_distance": d.score_distance, "smoothing": d.smoothing, "sigma": float(d.sigma), "score": d.score, "topk": int(d.topk),
                   "pool": int(d.pool), "gate_dilate": int(d.gate_dilate), "weighting": d.weighting,
                   # the posterior draw (version 4; the code_distances graph); 0: the prior alone
                   "posterior": float(d.posterior), "posterior_scale": d.posterior_scale,
                   # held-out normal images' statistics (the fused score), for the settings above
                   **{k: getattr(d, k) for k in HELD_OUT_STATS},
                   # the operating point (lsr.decision), valid for the settings above as exported
                   "false_alarm_rate": float(d.false_alarm_rate), "pixel_fpr": float(d.pixel_fpr),
                   "image_threshold": d.image_threshold, "pixel_threshold": d.pixel_threshold},
        "noise": {
            "kind": "gumbel-max, noise fixed per chain and position (h*w, K)",
            "uniform": "torch.rand(h*w, K) of torch.Generator().manual_seed(chain_seed): MT19937 seeded with "
                       "the low 32 bits, float32 = (draw & 0xFFFFFF) * 2**-24",
            "transform": "-log(-log(clamp(u, float32 tiny, 1 - 1e-7))) in float64, then float32",
            "chain_seed": "((seed * 1000003 + image_id) * 1009 + restoration) % (2**63 - 1)",
            "draw": "argmax(logits_t / temperature + noise_t), first index on ties",
        },
        "graphs": graphs,
    }


def check_exportable(cfg: RunConfig, run: Path) -> None:
    """Refuse, with the reason, a run whose settings the bundle graphs do not implement
    (bilateral smoothing, which runs through scikit-image): an export must compute what
    ``lsr detect RUN`` computes, or nothing. Both modes (pixels, features) export, with
    every map, distance, score and weighting."""
    if cfg.detect.posterior > 0 and cfg.detect.posterior_scale is None:
        raise ValueError(f"{run}: detect.posterior = {cfg.detect.posterior:g} needs detect.posterior_scale, which "
                         f"training sets; this run has none and its held-out images are gone: retrain it, or "
                         f"export with --posterior 0")
    if cfg.detect.smoothing == "bilateral":
        raise ValueError(f"{run}: smoothing 'bilateral' runs through scikit-image and cannot be exported; "
                         f"export with --smoothing gaussian or none")


def export_bundle(run: str | os.PathLike, out: str | os.PathLike, fmt: str = "onnx", *, check: bool = True,
                  overwrite: bool = False, opset: int = DEFAULT_OPSET, options: dict[str, Any] | None = None,
                  tolerance: dict[str, float] | None = None, check_images: int = 4,
                  log: Callable[[str], None] | None = None) -> ExportResult:
    """Export a trained run to a bundle folder ``out`` (atomically).

    Args:
        run: run folder written by ``lsr train``.
        out: bundle folder to create (must not exist or be empty, unless ``overwrite``
            and it holds a bundle).
        fmt: ``onnx`` or ``torchscript``.
        check: run the parity check and refuse the export beyond tolerance.
        opset: ONNX opset (>= 18 with the dynamo exporter).
        options: detection settings to bake in instead of the run's (``tau``,
            ``map_kind``, ``sigma``, ...).
        tolerance: parity tolerances (see :data:`lsr.deploy.parity.DEFAULT_TOLERANCE`).
        check_images: images from the run's data for the check (2 synthetic ones are added).
    """
    log = log or (lambda msg: None)
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if fmt == "onnx" and opset < 18:
        raise ValueError(f"opset {opset}: the torch.export-based ONNX exporter writes opset 18 or newer")
    if fmt == "onnx":
        missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
        if missing:
            raise ImportError(f"lsr-export --format onnx needs {' and '.join(missing)} "
                              f"(they are lsr's dependencies: reinstall lsr, or pip install onnx onnxscript)")
    run = Path(run)
    cfg, vqvae, prior = load_run(run)
    if options and any(v is not None for v in options.values()):
        from ..detect import Detector, with_held_out_stats

        opts = {k: v for k, v in options.items() if v is not None}
        # other score settings need their own operating point: set again on the run's held-out
        # normal images (when they are still there; else the bundle has no thresholds)
        det = with_held_out_stats(Detector(vqvae, prior, cfg, "cpu").with_options(**opts), run)
        cfg = det.config
        if cfg.detect.image_threshold is None:
            log("lsr-export: note: the held-out images of split.json are gone, so the bundle has no "
                "thresholds for these settings (its results carry no verdict)")
    check_exportable(cfg, run)
    graphs = build_graphs(vqvae, prior, cfg)
    F, H = seen_shape(cfg, vqvae)
    examples = _examples(cfg, F, H)
    io_specs = graph_io(fmt, cfg.vqvae.in_channels, cfg.vqvae.image_size, cfg.grid_size, cfg.vqvae.codebook_size,
                        F, H)
    ext = EXTENSIONS[fmt]
    with staged_folder(out, overwrite) as tmp:
        entries = {}
        for name, module in graphs.items():
            path = tmp / f"{name}{ext}"
            log(f"lsr-export: {name} -> {path.name}")
            if fmt == "onnx":
                _export_onnx(module, examples[name], path, io_specs[name], opset)
            else:
                _export_torchscript(name, module, examples[name], path, prior, io_specs[name][0])
            entries[name] = graph_entry(path, *io_specs[name])
        if fmt == "onnx" and cfg.grid_size >= 3:
            # the incremental loop's row-range prior (the bundle's default resampler)
            rows_graph = PriorRowsGraph(prior).eval()
            fold_weight_norm(rows_graph)
            path = tmp / f"prior_rows{ext}"
            log(f"lsr-export: prior rows (incremental loop) -> {path.name}")
            state = rows_graph.state_geometry()
            io = prior_rows_io(state, rows_graph.context_rows, cfg.grid_size, cfg.vqvae.codebook_size)
            example, dyn = _prior_rows_example(rows_graph, cfg.grid_size, cfg.vqvae.codebook_size)
            _export_onnx(rows_graph, example, path, io, opset, dynamic=dyn)
            entries["prior_rows"] = {**graph_entry(path, *io), "context_rows": rows_graph.context_rows,
                                     "state": state}
        if fmt == "torchscript" and ops.native_available():
            # for runtimes that load the lsr op library (the C++ runtime links it): the same
            # prior on the native attention kernels; prior.pt stays loadable without lsr
            from ..models.incremental import script_prior
            path = tmp / f"prior_native{ext}"
            log(f"lsr-export: prior (native ops, for the C++ runtime) -> {path.name}")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                torch.jit.save(script_prior(prior, native=True), str(path))
            entries["prior_native"] = graph_entry(path, *io_specs["prior"])
        meta = bundle_meta(cfg, fmt, run, entries, opset, (F, H))
        write_bundle_json(tmp, meta)
        report = None
        if check:
            from .parity import check_bundle
            log("lsr-export: parity check")
            report = check_bundle(tmp, run, n_images=check_images, tolerance=tolerance, providers=["CPUExecutionProvider"])
            log(report.summary())
            if not report.passed:
                raise ValueError(f"{run}: parity check of the exported {fmt} graphs failed, no bundle written:\n"
                                 f"{report.summary()}")
            meta["parity"] = report.to_dict()
            write_bundle_json(tmp, meta)
    return ExportResult(Path(out), fmt, report)


__all__ = ["export_bundle", "ExportResult", "torchscript_prior", "load_run", "bundle_meta", "DEFAULT_OPSET"]
