"""Running an exported bundle: :class:`Inferencer` (Python API; ``lsr detect BUNDLE ...``
runs it through :func:`lsr.commands.detect_bundle`). Needs numpy, pillow and onnxruntime only (torch
for TorchScript bundles): no torch, scipy or scikit-image import anywhere on this path.

Example:
    >>> inf = Inferencer("deploy/bottle")                          # doctest: +SKIP
    >>> res = inf.predict("img.png")                                # doctest: +SKIP
    >>> res.score, res.anomaly_map.shape, res.prior_passes          # doctest: +SKIP
    (0.173, (128, 128), 4)
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np

from .. import pipeline
from ..pipeline import DetectionResult
from . import numpy_ops as nops
from .bundle import BAKED_OPTIONS, HELD_OUT_STATS, RUNTIME_OPTIONS, Bundle, read_bundle
from .runtime import make_runner


#: detection output of a batch: the pipeline's one result type (:mod:`lsr.pipeline`), here
#: with numpy arrays
BatchPrediction = DetectionResult


class Prediction(NamedTuple):
    """Detection output of one image: the fields of :class:`BatchPrediction` without the
    batch dimension (scores as Python numbers), plus the input's own size."""
    anomaly_map: np.ndarray             # (S, S) at the model's resolution
    score: float
    nll_score: float
    map_restored_vs_input: np.ndarray
    map_restored_vs_direct: np.ndarray
    map_direct: np.ndarray
    direct_score: float
    direct: np.ndarray                  # (C, S, S)
    restored: np.ndarray                # (C, S, S)
    codes: np.ndarray                   # (h, w)
    resampled_codes: np.ndarray         # (h, w)
    resampled: np.ndarray               # (h, w) bool
    likelihood: np.ndarray              # (h, w)
    n_resampled: float
    prior_passes: int
    positions_evaluated: int
    map_gated: np.ndarray
    fused_score: float
    input_size: tuple[int, int]         # (H, W) of the image given to predict

    def map_at_input_size(self) -> np.ndarray:
        """The anomaly map resized (bilinear) to the input's own size (H, W)."""
        return nops.resize_maps(self.anomaly_map[None], self.input_size)[0]


_SCALAR_FIELDS = {"score": float, "nll_score": float, "direct_score": float, "n_resampled": float,
                  "prior_passes": int, "positions_evaluated": int, "fused_score": float}


def _is_torch_tensor(x: Any) -> bool:
    return type(x).__module__.split(".")[0] == "torch" and hasattr(x, "detach")


def _array_to_hwc(a: np.ndarray, what: str) -> np.ndarray:
    """An image array (H, W) or (H, W, c), c in 1..4, uint8/uint16/bool/float in [0, 1],
    -> float32 (H, W, 1|3) in [0, 1] (alpha dropped)."""
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[2] not in (1, 2, 3, 4):
        raise ValueError(f"{what}: expected an image array (H, W) or (H, W, C) with C in 1..4, "
                         f"got shape {a.shape}")
    if a.dtype == np.uint8:
        f = a.astype(np.float32) / 255.0
    elif a.dtype == np.uint16:
        f = a.astype(np.float32) / 65535.0
    elif a.dtype == bool:
        f = a.astype(np.float32)
    elif np.issubdtype(a.dtype, np.floating):
        f = a.astype(np.float32)
        if f.size and (not np.isfinite(f).all() or f.min() < 0.0 or f.max() > 1.0):
            raise ValueError(f"{what}: float images must be finite and in [0, 1] "
                             f"(got [{np.nanmin(f):.3g}, {np.nanmax(f):.3g}]); pass uint8 for 0..255")
    else:
        raise ValueError(f"{what}: unsupported dtype {a.dtype} (uint8, uint16, bool or float in [0, 1])")
    c = f.shape[2]
    return f[..., :1] if c == 2 else f[..., :3] if c == 4 else f


def to_model_input(image: Any, channels: int, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """One image as the model's input (channels, size, size) float32 in [0, 1], plus its
    own (H, W). Accepts a file path, a PIL image, a numpy array (H, W) / (H, W, C) uint8,
    uint16 or float in [0, 1], or a torch tensor (C, H, W) / (H, W) in [0, 1] (as the
    :class:`lsr.detect.Detector` takes). Preprocessing equals ``lsr detect``'s
    (:func:`lsr.data.load_image`: bilinear resize, antialiased when shrinking; grey by
    ITU-R 601 luma; alpha dropped)."""
    from PIL import Image

    from ..images import decode_fully, image_size, load_image, resize_float, to_channels, to_float

    if isinstance(image, (str, os.PathLike)):
        return load_image(image, channels, size), image_size(image)
    if isinstance(image, Image.Image):
        decode_fully(image, Path("<PIL image>"))
        hwc = to_float(image, Path("<PIL image>"))
    elif _is_torch_tensor(image):
        t = image.detach().cpu()
        a = t.numpy()
        if a.ndim == 3:
            if a.shape[0] not in (1, 2, 3, 4):
                raise ValueError(f"tensor image: expected (C, H, W) with C in 1..4, got {tuple(a.shape)}")
            a = a.transpose(1, 2, 0)
        hwc = _array_to_hwc(a, "tensor image")
    elif isinstance(image, np.ndarray):
        hwc = _array_to_hwc(image, "numpy image")
    else:
        raise TypeError(f"cannot read an image from {type(image).__name__}: pass a path, PIL image, "
                        f"numpy array or torch tensor")
    H, W = hwc.shape[:2]
    return resize_float(to_channels(hwc, channels), size, size), (int(H), int(W))


class Inferencer:
    """Run an exported bundle (``lsr-export``) on images, without the training stack.

    Args:
        bundle: the bundle folder.
        providers: onnxruntime providers (default: CUDA when it loads, else CPU).
        threads: intra-op threads per onnxruntime session (default: onnxruntime's).
        **options: detection settings to change at run time: ``tau``, ``temperature``,
            ``seed``, ``restorations``, ``resampler``: ``auto`` (the default: the
            incremental loop when the bundle can run it, else ``fast``), ``native`` (the
            incremental loop: an ONNX bundle's ``prior_rows`` graph with the numpy loop of
            :func:`lsr.deploy.numpy_ops.resample_incremental`, or, for a TorchScript
            bundle with lsr's extension loaded, its C++ loop), or ``fast``. The map,
            distance, smoothing, sigma, score and top-k are baked into the postprocess
            graph: passing a different value is an error (re-export instead).

    Example:
        >>> res = Inferencer("deploy/bottle").predict("img.png")     # doctest: +SKIP
    """

    def __init__(self, bundle: str | os.PathLike | Bundle, providers: Sequence[str] | None = None,
                 threads: int | None = None, **options: Any):
        self.bundle = bundle if isinstance(bundle, Bundle) else read_bundle(bundle)
        self.options = self._merge_options(options)
        self.runner = make_runner(self.bundle, providers, threads)
        self.loop, self.loop_impl = self._choose_loop(self.options["resampler"])

    def _choose_loop(self, resampler: str) -> tuple[str, str]:
        """(the loop, how it runs): ``native`` (the lazy incremental loop: ``numpy`` over
        the ONNX prior_rows graph, or ``lsr._C``, lsr's C++ loop on a TorchScript prior),
        or ``fast`` (``numpy``, full passes; ``naive`` is the PyTorch oracle only)."""
        if resampler == "fast":
            return resampler, "numpy"
        if "prior_rows" in self.bundle.graphs and hasattr(self.runner, "sessions"):
            return "native", "numpy"
        if getattr(self.runner, "native_loop_available", lambda: False)():
            return "native", "lsr._C"
        if resampler == "native":
            raise ValueError(f"{self.bundle.root / 'bundle.json'}: resampler native needs an ONNX bundle with a "
                             f"prior_rows graph (written by lsr-export since bundle version 2, for grids of 3 "
                             f"rows or more) or a TorchScript bundle with lsr's extension built; use fast")
        return "fast", "numpy"

    def _merge_options(self, options: dict[str, Any]) -> dict[str, Any]:
        d = dict(self.bundle.detect)
        d.setdefault("posterior", 0.0)                     # bundles before the posterior draw: the prior's
        where = self.bundle.root / "bundle.json"
        for k, v in options.items():
            if v is None:
                continue
            if k in BAKED_OPTIONS:
                if v != d.get(k):
                    flag = "--map" if k == "map_kind" else f"--{k}"
                    raise ValueError(f"{where}: {k} is {d.get(k)!r} in this bundle's postprocess graph; "
                                     f"{k}={v!r} needs a bundle exported with it (lsr-export RUN {flag} {v} ...)")
                continue
            if k in ("false_alarm_rate", "pixel_fpr"):
                if v != d.get(k):
                    raise ValueError(f"{where}: the thresholds of a bundle are set at export; for another {k} run "
                                     f"`lsr calibrate RUN --{k.replace('_', '-')} {v}` and export again")
                continue
            if k not in RUNTIME_OPTIONS:
                raise ValueError(f"unknown detection option {k!r}")
            if k != "resampler":                               # checked below, with the bundle's loops
                from ..config import RULES

                try:
                    v = RULES[f"detect.{k}"].check(v)
                except ValueError as e:
                    raise ValueError(f"{k}: {e}") from None
            d[k] = v
        if d["resampler"] == "naive":
            raise ValueError("resampler naive (a prior pass per position) is the PyTorch oracle the loops are "
                             "tested against, not a bundle loop: `lsr detect RUN --resampler naive` runs it; a "
                             "bundle runs auto, native or fast (the same codes)")
        if d["resampler"] not in ("auto", "native", "fast"):
            raise ValueError(f"resampler {d['resampler']!r} is not available for a bundle: use auto, native "
                             f"(incremental passes) or fast (exact, 1 + changes prior passes)")
        if float(d["temperature"]) <= 0 or int(d["restorations"]) < 1:
            raise ValueError(f"temperature must be > 0 and restorations >= 1, got {d['temperature']}, "
                             f"{d['restorations']}")
        if d.get("tau") is None:
            raise ValueError(f"{where}: tau is not set")
        if any(k in options and options[k] is not None and options[k] != self.bundle.detect.get(k)
               for k in ("tau", "temperature", "seed", "restorations")):
            # the exported thresholds and held-out statistics hold for the exported settings
            # only (as lsr.detect.Detector.with_options drops them)
            d["image_threshold"] = d["pixel_threshold"] = None
            d.update({k: None for k in HELD_OUT_STATS})
        return d

    @property
    def held_out(self) -> np.ndarray:
        """(4,) float32 held-out statistics of the fused score, NaN where missing."""
        return np.array([np.nan if self.options.get(k) is None else float(self.options[k]) for k in HELD_OUT_STATS],
                        np.float32)

    @property
    def image_size(self) -> int:
        return self.bundle.image_size

    @property
    def channels(self) -> int:
        return self.bundle.channels

    @property
    def providers(self) -> list[str]:
        """The providers the sessions actually run on."""
        return list(self.runner.active_providers)

    def prior(self, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One prior pass: codes (B, h, w) -> (logits (B, K, h, w), likelihood (B, h, w))."""
        out = self.runner.run("prior", codes=np.ascontiguousarray(codes, dtype=np.int64))
        return out["logits"], out["likelihood"]

    def prior_rows(self, codes: np.ndarray, row_ids: np.ndarray, state: list[np.ndarray]
                   ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """Rows of a prior pass from the state of the rows above (the ``prior_rows`` graph;
        see :class:`lsr.deploy.graphs.PriorRowsGraph`)."""
        feed = {"codes": np.ascontiguousarray(codes, dtype=np.int64),
                "row_ids": np.ascontiguousarray(row_ids, dtype=np.int64)}
        for i, st in enumerate(state):
            feed[f"state_{i}"] = np.ascontiguousarray(st, dtype=np.float32)
        out = self.runner.run("prior_rows", **feed)
        return out["logits"], out["likelihood"], [out[f"state_out_{i}"] for i in range(len(state))]

    def load(self, images: Sequence[Any]) -> tuple[np.ndarray, list[tuple[int, int]]]:
        """Images (paths, PIL images, arrays, tensors) -> (B, C, S, S) float32 and their sizes."""
        pairs = [to_model_input(im, self.channels, self.image_size) for im in images]
        if not pairs:
            return np.zeros((0, self.channels, self.image_size, self.image_size), np.float32), []
        return np.stack([p[0] for p in pairs]), [p[1] for p in pairs]

    def predict(self, image: Any, image_id: int = 0) -> Prediction:
        """Detect anomalies in one image (a path, PIL image, numpy array or torch tensor).

        ``image_id`` selects the noise stream, as the position of the image in the input
        list of ``lsr detect`` (same id and seed: same codes as the PyTorch path)."""
        x, (size,) = self.load([image])
        b = self.predict_batch(x, [image_id])
        fields = {}
        for name in BatchPrediction._fields:
            v = getattr(b, name)[0]
            fields[name] = _SCALAR_FIELDS[name](v) if name in _SCALAR_FIELDS else v
        return Prediction(**fields, input_size=size)

    def predict_batch(self, x: np.ndarray, image_ids: Sequence[int] | None = None) -> BatchPrediction:
        """Detect anomalies in a batch of model inputs.

        Args:
            x: (B, C, S, S) float32 in [0, 1] at the bundle's size and channels
                (:meth:`load` makes it from files).
            image_ids: noise stream per image (default 0..B-1).
        """
        d = self.options
        S, C = self.image_size, self.channels
        x = np.asarray(x)
        if x.ndim != 4 or tuple(x.shape[1:]) != (C, S, S):
            raise ValueError(f"{self.bundle.root / 'bundle.json'}: this bundle takes images (B, {C}, {S}, {S}), "
                             f"got {tuple(x.shape)}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        B = x.shape[0]
        ids = list(range(B)) if image_ids is None else [int(i) for i in image_ids]
        if len(ids) != B:
            raise ValueError(f"got {len(ids)} image ids for {B} images")
        return pipeline.detect(_BundleStages(self), x, ids, int(d["seed"]), int(d["restorations"]), float(d["tau"]),
                               float(d["temperature"]))


class _BundleStages:
    """The stages of :mod:`lsr.pipeline` on a bundle's graphs (numpy arrays)."""

    def __init__(self, inf: Inferencer):
        self.inf = inf
        self.run = inf.runner.run
        self.distances: np.ndarray | None = None       # (B, h*w, K) for the posterior draw

    def encode(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        enc = self.run("encoder", image=x)
        d = self.inf.options
        # the posterior draw (bundle version 4): the encoder's distances to every code
        self.distances = (self.run("code_distances", seen=enc["seen"])["distances"]
                          if float(d.get("posterior", 0.0)) > 0 else None)
        return enc["codes"].astype(np.int64), enc["seen"]

    def decode(self, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        dec = self.run("decoder", codes=np.ascontiguousarray(codes, dtype=np.int64))
        return dec["seen"], dec["picture"]

    def picture(self, codes: np.ndarray) -> np.ndarray:
        return self.decode(codes)[1]

    def repeat(self, codes: np.ndarray, n: int) -> np.ndarray:
        return np.repeat(codes, n, axis=0)

    def resample(self, chains: np.ndarray, seeds, tau: float, temperature: float) -> nops.ResampleResult:
        inf = self.inf
        h, w, K = chains.shape[1], chains.shape[2], inf.bundle.codebook_size
        post = self.posterior_noise
        if inf.loop == "native" and inf.loop_impl == "numpy":
            meta = inf.bundle.meta["graphs"]["prior_rows"]
            return nops.resample_incremental(inf.prior, inf.prior_rows, meta["state"], int(meta["context_rows"]),
                                             chains, post(nops.LazyNoise(seeds, h * w, K), chains), tau, temperature)
        if inf.loop == "native":                          # lsr._C on the TorchScript prior
            g = post(nops.gumbel_noise(len(seeds), h * w, K, seeds), chains)
            return inf.runner.resample_native(chains, g if isinstance(g, np.ndarray) else g.full(), tau,
                                              temperature)
        return nops.resample_fast(inf.prior, chains, post(nops.LazyNoise(seeds, h * w, K), chains), tau, temperature)

    def posterior_noise(self, noise, chains: np.ndarray):
        """``noise`` as it is (the prior draw), or minus the posterior term of
        :func:`lsr.ops.posterior_noise` when the bundle draws from the posterior."""
        if self.distances is None:
            return noise
        d = self.inf.options
        n = chains.shape[0] // self.distances.shape[0]
        return nops.PosteriorNoise(noise, self.distances, nops.posterior_factor(d["posterior"], d["posterior_scale"]), n)

    def nll_score(self, likelihood: np.ndarray, tau: float) -> np.ndarray:
        return nops.nll_score(likelihood, tau)

    def postprocess(self, seen, direct, restored, resampled, nll) -> dict[str, np.ndarray]:
        return self.run("postprocess", seen=seen, direct=direct, restored=np.ascontiguousarray(restored),
                        resampled=np.ascontiguousarray(resampled, dtype=np.float32),
                        nll_score=np.ascontiguousarray(nll, dtype=np.float32), held_out=self.inf.held_out)

    def as_float(self, a: np.ndarray) -> np.ndarray:
        return a.astype(np.float32)


__all__ = ["Inferencer", "Prediction", "BatchPrediction", "to_model_input"]
