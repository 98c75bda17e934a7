"""Parity check: a bundle against the PyTorch model it was exported from (needs torch).

The same images go through :class:`lsr.detect.Detector` (on the reference path of every
op, as exported; the bundle's detection settings) and through the bundle
(:class:`lsr.deploy.Inferencer`). Reported: whether the codes, the resampled codes and
the number of prior passes are identical, and the max abs difference of the logits
(first prior pass), the likelihoods, the maps, the scores and the decoded images, all with
both sides on the ``fast`` loop; then the bundle's own default loop (the incremental one
when it has a ``prior_rows`` graph) must give the same resampled codes, and the
``prior_rows`` graph, run over the grid in row ranges, the logits of a full pass.
``lsr-export`` runs it before it commits a bundle; ``lsr-export --check BUNDLE`` re-runs it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch

from .. import ops
from .bundle import EXPORTED_OPTIONS, Bundle, BundleError, read_bundle

#: max abs differences allowed (the codes must be identical in any case)
DEFAULT_TOLERANCE = {"logits": 1e-3, "likelihood": 1e-4, "map": 1e-4, "score": 1e-4, "image": 1e-4}


class ParityReport(NamedTuple):
    passed: bool
    n_images: int
    codes_equal: bool              # original codes, every image
    resampled_codes_equal: bool    # codes after resampling (first restoration)
    prior_passes_equal: bool
    n_resampled: int               # codes the PyTorch path redrew (0 would make the check weak)
    max_abs_logits: float
    max_abs_likelihood: float
    max_abs_map: float             # over the four maps
    max_abs_score: float           # score, direct_score; nll_score relative to its size
    max_abs_image: float           # direct and restored images
    default_loop: str              # the loop the bundle runs by default (resampler auto): native or fast
    default_loop_codes_equal: bool  # its resampled codes == the fast loop's
    max_abs_rows_logits: float     # prior_rows in row ranges vs a full pass (0 without prior_rows)
    tolerance: dict[str, float]
    providers: list[str]
    images: list[str]

    def summary(self) -> str:
        ok = "PASSED" if self.passed else "FAILED"
        return (f"parity {ok} on {self.n_images} images ({self.n_resampled} codes resampled; providers "
                f"{', '.join(self.providers)}): codes {'identical' if self.codes_equal else 'DIFFER'}, "
                f"resampled codes {'identical' if self.resampled_codes_equal else 'DIFFER'}, prior passes "
                f"{'identical' if self.prior_passes_equal else 'DIFFER'}; default loop {self.default_loop}: "
                f"codes {'identical' if self.default_loop_codes_equal else 'DIFFER'}, row-range logits "
                f"{self.max_abs_rows_logits:.2e}; max abs diff: logits "
                f"{self.max_abs_logits:.2e} (tol {self.tolerance['logits']:.0e}), likelihood "
                f"{self.max_abs_likelihood:.2e}, maps {self.max_abs_map:.2e} (tol {self.tolerance['map']:.0e}), "
                f"scores {self.max_abs_score:.2e}, images {self.max_abs_image:.2e}")

    def to_dict(self) -> dict[str, Any]:
        return self._asdict()


def synthetic_images(n: int, channels: int, size: int, seed: int = 0) -> np.ndarray:
    """Deterministic test images (n, C, S, S) in [0, 1]: uniform noise and blocky patterns,
    unlike normal data, so that the prior flags codes and resampling is exercised."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, channels, size, size), np.float32)
    for i in range(n):
        if i % 2 == 0:
            out[i] = rng.random((channels, size, size), dtype=np.float32)
        else:
            cells = rng.random((channels, 4, 4), dtype=np.float32)
            out[i] = np.kron(cells, np.ones((size // 4, size // 4), np.float32))[:, :size, :size]
    return out


def sample_images(run: str | os.PathLike, channels: int, size: int, n: int = 4) -> tuple[np.ndarray, list[str]]:
    """Up to ``n`` images of the run's data (half from an MVTec ``test/`` folder when
    there is one, defects first; the rest from the held-out split) plus 2 synthetic ones."""
    from ..data import DataError, load_image, scan_mvtec
    from ..io import read_json

    paths: list[Path] = []
    split = Path(run) / "split.json"
    if split.is_file():
        info = read_json(split)
        data = Path(info.get("data", ""))
        if (data / "test").is_dir():
            try:
                test = sorted(scan_mvtec(data).test, key=lambda s: s.label, reverse=True)
                paths += [s.path for s in test[:n // 2]]
            except DataError:
                pass
        paths += [Path(p) for p in info.get("val", [])][: n - len(paths)]
    arrays, names = [], []
    for p in paths:
        try:
            arrays.append(load_image(p, channels, size))
            names.append(str(p))
        except (DataError, OSError):
            continue
    syn = synthetic_images(2, channels, size)
    arrays += list(syn)
    names += ["<synthetic noise>", "<synthetic blocks>"]
    return np.stack(arrays).astype(np.float32), names


def _maxdiff(a: Any, b: Any) -> float:
    a = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    b = b.detach().cpu().numpy() if isinstance(b, torch.Tensor) else np.asarray(b)
    if a.shape != b.shape:
        return float("inf")
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max()) if a.size else 0.0


def check_bundle(bundle: str | os.PathLike | Bundle, run: str | os.PathLike | None = None, *,
                 images: np.ndarray | None = None, n_images: int = 4,
                 tolerance: dict[str, float] | None = None, providers: Sequence[str] | None = None,
                 backend: str = "reference") -> ParityReport:
    """Compare a bundle with the PyTorch model of ``run`` (default: the run recorded in
    ``bundle.json``) on ``images`` (B, C, S, S) or on :func:`sample_images`.

    ``backend`` is the :func:`lsr.ops.backend` of the PyTorch side (``reference``: the
    path that was exported; ``auto`` compares with the native kernels, where float
    differences are larger)."""
    from ..detect import Detector
    from .inferencer import Inferencer

    b = bundle if isinstance(bundle, Bundle) else read_bundle(bundle)
    if run is None:
        run = b.meta.get("source_run")
        if not run or not Path(run).is_dir():
            raise BundleError(f"{b.root / 'bundle.json'}: the run it was exported from ({run}) is not here; "
                              f"pass the run folder (lsr-export --check BUNDLE --run RUN)")
    tol = {**DEFAULT_TOLERANCE, **(tolerance or {})}
    det = Detector.load(run, "cpu").with_options(**{k: b.detect[k] for k in EXPORTED_OPTIONS}, resampler="fast")
    if (det.image_size, det.channels) != (b.image_size, b.channels):
        raise BundleError(f"{b.root / 'bundle.json'}: bundle is for ({b.channels}, {b.image_size}) images, "
                          f"run {run} for ({det.channels}, {det.image_size})")
    names = ["<given>"] * (0 if images is None else len(images))
    if images is None:
        images, names = sample_images(run, b.channels, b.image_size, n_images)
    x = np.ascontiguousarray(images, dtype=np.float32)
    inf = Inferencer(b, providers=providers, resampler="fast")
    default = Inferencer(b, providers=providers)
    with ops.backend(backend), torch.no_grad():
        rt = det.detect(torch.from_numpy(x))
        logits_t = det.prior(rt.codes)
    ro = inf.predict_batch(x)
    logits_o, _ = inf.prior(ro.codes)
    codes_equal = bool(np.array_equal(rt.codes.numpy(), ro.codes))
    res_equal = bool(np.array_equal(rt.resampled_codes.numpy(), ro.resampled_codes))
    passes_equal = bool(np.array_equal(rt.prior_passes.numpy(), ro.prior_passes))
    d_logits = _maxdiff(logits_t, logits_o) if codes_equal else float("inf")
    d_lik = _maxdiff(rt.likelihood, ro.likelihood)
    d_map = max(_maxdiff(getattr(rt, f), getattr(ro, f)) for f in
                ("anomaly_map", "map_restored_vs_input", "map_restored_vs_direct", "map_direct"))
    nll_scale = max(1.0, float(np.abs(rt.nll_score.numpy()).max(initial=0.0)))
    d_score = max(_maxdiff(rt.score, ro.score), _maxdiff(rt.direct_score, ro.direct_score),
                  _maxdiff(rt.nll_score, ro.nll_score) / nll_scale)
    d_img = max(_maxdiff(rt.direct, ro.direct), _maxdiff(rt.restored, ro.restored))
    rd = default.predict_batch(x) if default.loop != "fast" else ro
    loop_equal = bool(np.array_equal(rd.resampled_codes, ro.resampled_codes))
    d_rows = _rows_vs_full(default, ro.codes) if "prior_rows" in b.graphs else 0.0
    passed = (codes_equal and res_equal and passes_equal and loop_equal and d_rows <= tol["logits"]
              and d_logits <= tol["logits"]
              and d_lik <= tol["likelihood"] and d_map <= tol["map"] and d_img <= tol["image"]
              and d_score <= tol["score"])
    return ParityReport(passed, len(x), codes_equal, res_equal, passes_equal, int(rt.resampled.sum()),
                        d_logits, d_lik, d_map, d_score, d_img, default.loop, loop_equal, d_rows, tol,
                        inf.providers, names)


def _rows_vs_full(inf: Any, codes: np.ndarray) -> float:
    """Max abs difference between a full prior pass and the ``prior_rows`` graph run over
    the grid in three row ranges (the first from row 0 with empty state), state carried
    between them by :func:`lsr.deploy.numpy_ops.resample_incremental`'s layout."""
    from . import numpy_ops as nops

    meta = inf.bundle.meta["graphs"]["prior_rows"]
    geometry, ctx = meta["state"], int(meta["context_rows"])
    full, _ = inf.prior(codes)
    B, H, W = codes.shape
    state = nops.new_state(geometry, B, H, W)
    cuts = sorted({0, max(1, H // 3), max(1, (2 * H) // 3), H})
    worst = 0.0
    for r0, r1 in zip(cuts[:-1], cuts[1:]):
        ids = np.arange(r0 - ctx, r1)
        st = nops.state_above(state, geometry, slice(None), r0, W)
        logits, _, new = inf.prior_rows(codes[:, np.clip(ids, 0, None)], ids, st)
        nops.store_rows(state, geometry, slice(None), r0, r1, W, new)
        worst = max(worst, _maxdiff(logits, full[:, :, r0:r1]))
    return worst


__all__ = ["check_bundle", "ParityReport", "DEFAULT_TOLERANCE", "sample_images", "synthetic_images"]
