"""Parity check: a bundle against the PyTorch model it was exported from (needs torch).

The same images go through :class:`lsr.detect.Detector` (on the reference path of every
op, as exported; the bundle's detection settings) and through the bundle
(:class:`lsr.deploy.Inferencer`). Reported: whether the codes, the resampled codes and
the number of prior passes are identical, and the max abs difference of the logits and
likelihoods (the prior graph on the PyTorch codes), the maps, the scores and the decoded
images, all with both sides on the ``fast`` loop; then the bundle's own default loop (the
incremental one when it has a ``prior_rows`` graph) must give the same resampled codes,
and the ``prior_rows`` graph, run over the grid in row ranges, the logits of a full pass.

A code that differs at a near-tie of the encoder's nearest-codebook search (two codes'
distances equal to float rounding: ONNX Runtime's convolutions round differently from
PyTorch's) is accepted and named, and its image left out of the comparisons after the
encoder (which would compare different inputs); any other code difference fails. A
non-finite output fails and is named by graph, output and first index, never printed as
an "inf" difference. When the bundle's tau flags no code of the check images, the loops
are compared again at a tau that flags some (else the report says they went unchecked).
``lsr-export`` runs it before it commits a bundle; ``lsr-export --check BUNDLE`` re-runs it.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch

from .. import ops
from .bundle import EXPORTED_OPTIONS, HELD_OUT_STATS, Bundle, BundleError, read_bundle

#: max abs differences allowed (the codes must be identical in any case, but for near-ties:
#: ``code_tie`` is the largest distance gap, relative to ||z||^2 + ||e||^2, between the
#: PyTorch code and the bundle's at a position where they differ that float rounding is
#: allowed to have flipped; such images are left out of the comparisons after the encoder)
DEFAULT_TOLERANCE = {"logits": 1e-3, "likelihood": 1e-4, "map": 1e-4, "score": 1e-4, "image": 1e-4,
                     "code_tie": 1e-5}


class ParityReport(NamedTuple):
    passed: bool
    n_images: int
    codes_equal: bool              # original codes, every image (near-tie flips allowed: code_ties)
    resampled_codes_equal: bool    # codes after resampling (first restoration)
    prior_passes_equal: bool
    n_resampled: int               # codes the PyTorch path redrew (0 would make the check weak)
    max_abs_logits: float          # NaN: not comparable (see problems)
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
    problems: Sequence[str] = ()   # outputs that could not be compared: non-finite values, shapes (each fails)
    code_differences: Sequence[str] = ()  # positions where the codes differ beyond a near-tie (each fails)
    code_ties: Sequence[str] = ()  # near-tie code flips accepted (their images skip the later comparisons)
    images_compared: int = 0       # images the stages after the encoder were compared on
    loop_tau: float | None = None  # tau the loops were checked at, when the bundle's flagged no code
    n_resampled_loop: int = 0      # codes redrawn in that check

    def _diff(self, name: str, value: float) -> str:
        """A max abs difference as printed; an output that could not be compared says why
        (non-finite values or shapes; the notes below name the graph, output and index)."""
        mine = [p for p in self.problems if p.startswith(name + ":")]
        if mine:
            return "NON-FINITE (below)" if any("non-finite" in p for p in mine) else "SHAPES DIFFER (below)"
        return f"{value:.2e}"

    def summary(self) -> str:
        ok = "PASSED" if self.passed else "FAILED"
        codes = (f"DIFFER at {len(self.code_differences)} position(s)" if not self.codes_equal else
                 f"identical but for {len(self.code_ties)} near-tie flip(s)" if self.code_ties else "identical")
        text = (f"parity {ok} on {self.n_images} images ({self.n_resampled} codes resampled; providers "
                f"{', '.join(self.providers)}): codes {codes}, "
                f"resampled codes {'identical' if self.resampled_codes_equal else 'DIFFER'}, prior passes "
                f"{'identical' if self.prior_passes_equal else 'DIFFER'}; default loop {self.default_loop}: "
                f"codes {'identical' if self.default_loop_codes_equal else 'DIFFER'}, row-range logits "
                f"{self._diff('row-range logits', self.max_abs_rows_logits)}; max abs diff: logits "
                f"{self._diff('logits', self.max_abs_logits)} (tol {self.tolerance['logits']:.0e}), likelihood "
                f"{self._diff('likelihood', self.max_abs_likelihood)}, maps {self._diff('maps', self.max_abs_map)} "
                f"(tol {self.tolerance['map']:.0e}), scores {self._diff('scores', self.max_abs_score)}, images "
                f"{self._diff('images', self.max_abs_image)}")
        notes = list(self.problems) + _first(self.code_differences, "codes: differ at ")
        if self.code_ties:
            notes += _first(self.code_ties, "codes: near-tie flip (float rounding) at ")
            notes.append(f"the stages after the encoder were compared on the {self.images_compared} images "
                         f"whose codes are identical")
        if self.loop_tau is not None:
            notes.append(f"no code was resampled at the bundle's tau: the loops were checked at tau "
                         f"{self.loop_tau:.4g} instead ({self.n_resampled_loop} codes resampled)")
        if (self.n_resampled_loop if self.loop_tau is not None else self.n_resampled) == 0:
            notes.append("WARNING: no code was resampled, so the resampling loops went unchecked")
        return text + "".join(f"\n  {n}" for n in notes)

    def to_dict(self) -> dict[str, Any]:
        return self._asdict()


def _first(items: Sequence[str], prefix: str, n: int = 5) -> list[str]:
    out = [prefix + t for t in items[:n]]
    return out + ([f"{prefix.split(':')[0]}: ... and {len(items) - n} more"] if len(items) > n else [])


def _where(index: Sequence[int], axes: Sequence[str]) -> str:
    """``(0, 3, 0, 0)`` with axes ``("image", "code", "position")`` -> ``image 0, code 3,
    position (0, 0)`` (``position`` and ``pixel`` name the two last axes together)."""
    index = [int(i) for i in index]
    parts, i = [], 0
    for label in axes:
        if label in ("position", "pixel"):
            if i + 2 > len(index):
                break
            parts.append(f"{label} ({index[i]}, {index[i + 1]})")
            i += 2
        elif i < len(index):
            parts.append(f"{label} {index[i]}")
            i += 1
    if i != len(index) or not parts:
        return f"index {tuple(index)}"
    return ", ".join(parts)


def nonfinite_note(name: str, array: Any, source: str, axes: Sequence[str] = ("image",)) -> str | None:
    """None when ``array`` is all finite, else what :class:`ParityReport` prints, e.g.
    ``logits: 12 non-finite values in prior.onnx output logits, first at image 0, code 3,
    position (0, 0) (nan)`` (first in C order; ``axes`` names the dimensions)."""
    a = array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
    if not np.issubdtype(a.dtype, np.floating):
        return None
    bad = ~np.isfinite(a)
    n = int(bad.sum())
    if n == 0:
        return None
    first = np.unravel_index(int(np.argmax(bad)), a.shape)
    return (f"{name}: {n} non-finite value{'s' if n > 1 else ''} in {source}, first at "
            f"{_where(first, axes)} ({a[first]})")


def _compare(problems: list[str], name: str, want: Any, got: Any, want_from: str, got_from: str,
             axes: Sequence[str] = ("image",)) -> float:
    """Max abs difference of two outputs; NaN, with the reason added to ``problems``, when
    they cannot be compared: a shape differs or either holds a non-finite value."""
    a = want.detach().cpu().numpy() if isinstance(want, torch.Tensor) else np.asarray(want)
    b = got.detach().cpu().numpy() if isinstance(got, torch.Tensor) else np.asarray(got)
    if a.shape != b.shape:
        problems.append(f"{name}: shape {b.shape} from {got_from}, {a.shape} from {want_from}")
        return float("nan")
    notes = [m for m in (nonfinite_note(name, b, got_from, axes), nonfinite_note(name, a, want_from, axes)) if m]
    if notes:
        problems.extend(notes)
        return float("nan")
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max()) if a.size else 0.0


def _compare_missing(problems: list[str], name: str, want: Any, got: Any, want_from: str, got_from: str) -> float:
    """:func:`_compare` of scores (B,) where NaN means "missing" (the fused score without
    held-out statistics): both sides must be missing at the same images, which are left
    out; a NaN on one side only is a problem."""
    a = want.detach().cpu().numpy() if isinstance(want, torch.Tensor) else np.asarray(want)
    b = got.detach().cpu().numpy() if isinstance(got, torch.Tensor) else np.asarray(got)
    if a.shape == b.shape and np.issubdtype(a.dtype, np.floating) and np.issubdtype(b.dtype, np.floating):
        na, nb = np.isnan(a), np.isnan(b)
        if na.any() or nb.any():
            if not np.array_equal(na, nb):
                problems.append(f"{name}: missing (NaN) at images {np.flatnonzero(na ^ nb).tolist()} on one side "
                                f"only ({got_from} vs {want_from})")
                return float("nan")
            a, b = a[~na], b[~nb]
    return _compare(problems, name, a, b, want_from, got_from)


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


def _worst(*values: float) -> float:
    """max that keeps a NaN (Python's ``max`` drops or keeps one by argument order)."""
    return float("nan") if any(np.isnan(v) for v in values) else max(values)


def _code_differences(det: Any, x: np.ndarray, want: np.ndarray, got: np.ndarray, rel_tol: float
                      ) -> tuple[list[str], list[str], np.ndarray]:
    """Where the bundle's codes differ from PyTorch's: (near-ties, other differences, the
    images with identical codes as a bool mask). A near-tie is a position where the two
    codes' squared distances to the PyTorch encoder's output z, ||e_k||^2 - 2 z.e_k in
    float64, differ by at most ``rel_tol * (||z||^2 + max ||e_k||^2)``: float rounding of the
    encoder (another convolution algorithm) may pick either code there."""
    if want.shape != got.shape:
        return [], [f"codes of shape {got.shape} from the bundle, {want.shape} from PyTorch"], np.zeros(len(want), bool)
    same = (want == got).reshape(len(want), -1).all(axis=1)
    if same.all():
        return [], [], same
    xt = torch.from_numpy(x)
    with torch.no_grad():
        seen = det.vqvae.features(xt) if getattr(det, "space", "pixels") == "features" else xt
        z = det.vqvae.encoder(seen).double().permute(0, 2, 3, 1).cpu().numpy()      # (B, h, w, D)
    e = det.vqvae.quantizer.codebook.detach().double().cpu().numpy()                # (K, D)
    e2 = (e * e).sum(axis=1)
    ties, other, differing = [], [], set()
    for i, r, c in np.argwhere(want != got):
        differing.add(int(i))
        a, b = int(want[i, r, c]), int(got[i, r, c])
        where = f"image {i}, position ({r}, {c}): PyTorch code {a}, bundle code {b}"
        if not 0 <= b < len(e):
            other.append(f"{where} (not a code of the codebook)")
            continue
        zz = z[i, r, c]
        gap = abs((e2[b] - 2.0 * zz @ e[b]) - (e2[a] - 2.0 * zz @ e[a]))
        scale = float(zz @ zz) + max(e2[a], e2[b])
        note = f"{where}, distance gap {gap:.2e} ({gap / max(scale, 1e-30):.1e} relative)"
        (ties if gap <= rel_tol * scale else other).append(note)
    return ties, other, ~np.isin(np.arange(len(want)), sorted(differing))


def _loop_tau(likelihood: Any, tau: float) -> float | None:
    """A tau at which the resampling rule flags codes of these likelihoods (None when the
    bundle's already does, or none can): halfway between two likelihood values near a low
    quantile, so that no likelihood lies within float rounding of it."""
    p = likelihood if isinstance(likelihood, torch.Tensor) else torch.as_tensor(likelihood)
    if p.numel() == 0 or bool(ops.flag_positions(p, tau).any()):
        return None
    v = np.unique(p.double().cpu().numpy().ravel())
    for q in (0.2, 0.4, 0.6):
        lo, hi = max(0, int(q * len(v)) - 8), min(len(v) - 1, int(q * len(v)) + 8)
        if hi <= lo:
            continue
        k = lo + int(np.argmax(np.diff(v[lo:hi + 1])))
        t = float((v[k] + v[k + 1]) / 2)
        if 0.0 < t < 1.0 and bool(ops.flag_positions(p, t).any()):
            return t
    return None


def _src(b: Bundle, graph: str, output: str) -> str:
    spec = b.graphs.get(graph)
    return f"{spec.path.name if spec is not None else graph} output {output}"


def check_bundle(bundle: str | os.PathLike | Bundle, run: str | os.PathLike | None = None, *,
                 images: np.ndarray | None = None, n_images: int = 4,
                 tolerance: dict[str, float] | None = None, providers: Sequence[str] | None = None,
                 backend: str = "reference") -> ParityReport:
    """Compare a bundle with the PyTorch model of ``run`` (default: the run recorded in
    ``bundle.json``) on ``images`` (B, C, S, S) or on :func:`sample_images`.

    Each stage is compared on the same input where it can be: the prior graph on the
    PyTorch codes of every image; the resampling loops, maps, scores and images on the
    images whose bundle codes equal PyTorch's (an image whose codes differ only by
    near-ties, tolerance ``code_tie``, is left out of those and named in the report; any
    other code difference fails). Any non-finite output fails and is named (graph,
    output, first index). When the bundle's tau flags no code of these images, the loops
    are compared again at a tau that does (``loop_tau``), so that they are never left
    unchecked silently.

    ``backend`` is the :func:`lsr.ops.backend` of the PyTorch side (``reference``: the
    path that was exported; ``auto`` compares with the native kernels, where float
    differences are larger)."""
    from ..detect import Detector
    from ..ops.resampling import code_likelihood
    from .inferencer import Inferencer

    b = bundle if isinstance(bundle, Bundle) else read_bundle(bundle)
    if run is None:
        run = b.meta.get("source_run")
        if not run or not Path(run).is_dir():
            raise BundleError(f"{b.root / 'bundle.json'}: the run it was exported from ({run}) is not here; "
                              f"pass the run folder (lsr-export --check BUNDLE --run RUN)")
    tol = {**DEFAULT_TOLERANCE, **(tolerance or {})}
    det = Detector.load(run, "cpu").with_options(**{k: b.detect[k] for k in EXPORTED_OPTIONS if k in b.detect},
                                                 resampler="fast")
    # the bundle's held-out statistics (set for its settings at export) on the PyTorch side too
    det.config = dataclasses.replace(det.config, detect=dataclasses.replace(
        det.config.detect, **{k: b.detect.get(k) for k in HELD_OUT_STATS},
        posterior_scale=b.detect.get("posterior_scale") or det.config.detect.posterior_scale))
    if (det.image_size, det.channels) != (b.image_size, b.channels):
        raise BundleError(f"{b.root / 'bundle.json'}: bundle is for ({b.channels}, {b.image_size}) images, "
                          f"run {run} for ({det.channels}, {det.image_size})")
    names = ["<given>"] * (0 if images is None else len(images))
    if images is None:
        images, names = sample_images(run, b.channels, b.image_size, n_images)
    x = np.ascontiguousarray(images, dtype=np.float32)
    inf = Inferencer(b, providers=providers, resampler="fast")
    default = Inferencer(b, providers=providers)
    problems: list[str] = []
    torch_side = "the PyTorch model"

    with ops.backend(backend), torch.no_grad():
        rt = det.detect(torch.from_numpy(x))
        codes_t = rt.codes
        logits_t = det.prior(codes_t)
        lik_t = code_likelihood(logits_t, codes_t)
    ro = inf.predict_batch(x)
    # the encoder: identical codes, but for near-ties (whose images skip the later stages)
    ties, differences, keep = _code_differences(det, x, codes_t.numpy(), ro.codes, float(tol["code_tie"]))
    codes_equal = not differences
    if codes_equal and not keep.any():
        problems.append("codes: no image with identical codes is left to compare the stages after the encoder")
    # the prior graph on the very same codes, every image
    logits_o, lik_o = inf.prior(codes_t.numpy())
    d_logits = _compare(problems, "logits", logits_t, logits_o, f"{torch_side}'s prior",
                        _src(b, "prior", "logits"), ("image", "code", "position"))
    d_lik = _compare(problems, "likelihood", lik_t, lik_o, f"{torch_side}'s prior",
                     _src(b, "prior", "likelihood"), ("image", "position"))
    k = torch.from_numpy(keep)

    def downstream(rt: Any, ro: Any, rd: Any) -> dict[str, Any]:
        """The loops and everything after them, on the images with identical codes."""
        t = {f: getattr(rt, f)[k] for f in rt._fields}
        o = {f: getattr(ro, f)[keep] for f in ro._fields}
        res_equal = bool(np.array_equal(t["resampled_codes"].numpy(), o["resampled_codes"]))
        passes_equal = bool(np.array_equal(t["prior_passes"].numpy(), o["prior_passes"]))
        loop_equal = bool(np.array_equal(rd.resampled_codes, ro.resampled_codes))
        lik = _compare(problems, "likelihood", t["likelihood"], o["likelihood"], torch_side,
                       "the bundle's resampling loop (prior graph)", ("image", "position"))
        maps = _worst(*(_compare(problems, "maps", t[f], o[f], torch_side, _src(b, "postprocess", f),
                                 ("image", "pixel"))
                        for f in ("anomaly_map", "map_restored_vs_input", "map_restored_vs_direct", "map_direct",
                                  "map_gated")))
        nll_scale = max(1.0, float(np.abs(np.nan_to_num(t["nll_score"].numpy())).max(initial=0.0)))
        # the fused score divides by the held-out standard deviations: its differences are
        # compared in the units of the raw scores (the score tolerance carried through)
        stds = [b.detect.get(k) for k in ("score_std", "nll_std")]
        fused_scale = max([1.0] + [1.0 / v for v in stds if v])
        score = _worst(_compare_missing(problems, "scores", t["score"], o["score"], torch_side,
                                        _src(b, "postprocess", "score"))
                       / (fused_scale if b.detect.get("score") == "fused" else 1.0),
                       _compare_missing(problems, "scores", t["fused_score"], o["fused_score"], torch_side,
                                        _src(b, "postprocess", "fused_score")) / fused_scale,
                       _compare(problems, "scores", t["direct_score"], o["direct_score"], torch_side,
                                _src(b, "postprocess", "direct_score")),
                       _compare(problems, "scores", t["nll_score"], o["nll_score"], torch_side,
                                "the bundle's nll_score (from the prior graph's likelihood)") / nll_scale)
        img = _worst(_compare(problems, "images", t["direct"], o["direct"], torch_side,
                              _src(b, "decoder", "picture") + " (direct)", ("image", "channel", "pixel")),
                     _compare(problems, "images", t["restored"], o["restored"], torch_side,
                              _src(b, "decoder", "picture") + " (restored)", ("image", "channel", "pixel")))
        return dict(res_equal=res_equal, passes_equal=passes_equal, loop_equal=loop_equal, lik=lik, maps=maps,
                    score=score, img=img, n_resampled=int(t["resampled"].sum()))

    rd = default.predict_batch(x) if default.loop != "fast" else ro
    r = downstream(rt, ro, rd)
    d_lik = _worst(d_lik, r["lik"])
    n_resampled = r["n_resampled"]
    # no code flagged at the bundle's tau: check the loops at one that flags some
    loop_tau = _loop_tau(rt.likelihood[k], float(b.detect["tau"])) if keep.any() else None
    n_loop = 0
    if loop_tau is not None:
        det2 = det.with_options(tau=loop_tau)
        with ops.backend(backend), torch.no_grad():
            rt2 = det2.detect(torch.from_numpy(x))
        inf2 = Inferencer(b, providers=providers, resampler="fast", tau=loop_tau)
        ro2 = inf2.predict_batch(x)
        default2 = Inferencer(b, providers=providers, tau=loop_tau)
        rd2 = default2.predict_batch(x) if default2.loop != "fast" else ro2
        r2 = downstream(rt2, ro2, rd2)
        for key in ("res_equal", "passes_equal", "loop_equal"):
            r[key] = r[key] and r2[key]
        for key in ("maps", "score", "img"):
            r[key] = _worst(r[key], r2[key])
        d_lik = _worst(d_lik, r2["lik"])
        n_loop = r2["n_resampled"]
    d_rows = _rows_vs_full(default, ro.codes, problems, b) if "prior_rows" in b.graphs else 0.0
    seen: set[str] = set()
    problems = [p for p in problems if not (p in seen or seen.add(p))]      # once each, in order
    passed = (codes_equal and not problems and r["res_equal"] and r["passes_equal"] and r["loop_equal"]
              and d_rows <= tol["logits"] and d_logits <= tol["logits"] and d_lik <= tol["likelihood"]
              and r["maps"] <= tol["map"] and r["img"] <= tol["image"] and r["score"] <= tol["score"])
    return ParityReport(passed, len(x), codes_equal, r["res_equal"], r["passes_equal"], n_resampled,
                        d_logits, d_lik, r["maps"], r["score"], r["img"], default.loop, r["loop_equal"], d_rows,
                        tol, inf.providers, names, problems, differences, ties, int(keep.sum()), loop_tau, n_loop)


def _rows_vs_full(inf: Any, codes: np.ndarray, problems: list[str] | None = None, b: Bundle | None = None) -> float:
    """Max abs difference between a full prior pass and the ``prior_rows`` graph run over
    the grid in three row ranges (the first from row 0 with empty state), state carried
    between them by :func:`lsr.deploy.numpy_ops.resample_incremental`'s layout (NaN, with
    the reason in ``problems``, when either holds a non-finite value)."""
    from . import numpy_ops as nops

    meta = inf.bundle.meta["graphs"]["prior_rows"]
    geometry, ctx = meta["state"], int(meta["context_rows"])
    full, _ = inf.prior(codes)
    B, H, W = codes.shape
    state = nops.new_state(geometry, B, H, W)
    cuts = sorted({0, max(1, H // 3), max(1, (2 * H) // 3), H})
    pieces = []
    for r0, r1 in zip(cuts[:-1], cuts[1:]):
        ids = np.arange(r0 - ctx, r1)
        st = nops.state_above(state, geometry, slice(None), r0, W)
        logits, _, new = inf.prior_rows(codes[:, np.clip(ids, 0, None)], ids, st)
        nops.store_rows(state, geometry, slice(None), r0, r1, W, new)
        pieces.append(logits)
    b = b or inf.bundle
    return _compare(problems if problems is not None else [], "row-range logits", full,
                    np.concatenate(pieces, axis=2), _src(b, "prior", "logits"),
                    _src(b, "prior_rows", "logits") + f" (row ranges {cuts})", ("image", "code", "position"))


__all__ = ["check_bundle", "ParityReport", "DEFAULT_TOLERANCE", "sample_images", "synthetic_images", "nonfinite_note"]
