"""Differential detection (D-MAD): an image under test against a trusted reference image.

``lsr detect RUN IMAGE --reference REF``, ``lsr eval RUN DATA --reference-from good``,
:func:`detect_pair` (``detect_pair(detector, x, reference)``).

Definition. x is the test image, r the reference, both (C, S, S) at the model's size.

1. **Registration** (:func:`register`): the integer translation (dy, dx), |dy|, |dx| <= R
   (``max_shift``, default min(8, S // 4) model pixels), that minimises the median over the
   pixels of the central crop [R, S - R)^2 (the pixels every candidate shift covers with
   real content) of the absolute difference of the two *input images*, mean over channels
   (the median: a defect covering less than half of the crop does not pull the search
   away from the true shift, as it would a mean); ties go to the
   smaller shift (dy^2 + dx^2), then the lower (dy, dx). The input pixels are compared in
   both spaces (feature maps at stride 8 cannot register to a pixel). The reference is then
   shifted (:func:`shift_image`): r'[y, x] = r[y - dy, x - dx], reflect-padded at the
   borders. ``max_shift=0`` skips the search.
2. **Restoration with the same noise**: x and r' pass the same VQ-VAE and prior, and the
   resampling chains of both use the *test image's* noise ids (``chain_seed(seed, id, k)``
   for restoration k), so where x and r' have the same codes and the same likelihoods they
   draw the same codes: what the VQ-VAE and the prior do to a normal image happens to both
   and cancels. With the posterior draw (``detect.posterior`` > 0, the feature presets'
   default) each side adds its own closeness term (its own encoder output), so the two
   draws agree only where the encoder outputs are close too: the cancellation is no longer
   exact.
3. **Map**: D = mean over the n restorations of smooth(d(x_r, r'_r)), where x_r and r'_r are
   what is decoded from each one's resampled codes in the run's space (pixels, or normalised
   features bilinearly upsampled from stride 8 as every map in feature space), d is the run's
   ``detect.distance``, smooth its ``smoothing``/``sigma`` (the single-image maps' own
   post-processing; ``--weighting closeness`` does not apply: the restorations are averaged).
   D(x, x) = 0 exactly.
4. **Image score**: the run's map reduction of D (``max`` for ``--score max``, ``nll`` and
   ``fused``; ``topk_mean`` / ``pooled_max`` when configured).
5. **The direct variant** (always computed beside it, the ``differential_direct`` row):
   D_direct = smooth(d(x_d, r'_d)), the same comparison of what is decoded from the two
   *original* code grids (the same VQ-VAE, no prior, no noise), and its image score.

No threshold is calibrated for D (the run's thresholds belong to the single-image score).

Pairing with ``--reference-from good`` / a folder of references (:func:`nearest_references`):
each test image gets the reference whose *seen* representation is nearest, unshifted: the
mean squared difference of the model-size images (pixel runs) or of the normalised backbone
features (feature runs); ties go to the first in sorted file order. The references of
``lsr eval`` are ``DATA/train/good`` (the run's training images among them: a golden-sample
set); test images are never references.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor

from . import anomaly, ops

DEFAULT_MAX_SHIFT = 8


class DifferentialResult(NamedTuple):
    """Per-batch differential output (leading batch dimension B)."""
    anomaly_map: Tensor          # (B, S, S) D, the differential map
    score: Tensor                # (B,) the image score of D
    map_direct: Tensor           # (B, S, S) D_direct: the direct reconstructions compared (no prior)
    direct_score: Tensor         # (B,) the image score of D_direct
    shift: Tensor                # (B, 2) int64, (dy, dx) applied to the reference
    registration_cost: Tensor    # (B,) the search's cost at that shift (median absolute difference)
    reference: Tensor            # (B, C, S, S) the registered reference r'
    restored: Tensor             # (B, C, S, S) picture of the test image's restoration (first)
    reference_restored: Tensor   # (B, C, S, S) picture of the reference's restoration (first)
    codes: Tensor                # (B, h, w) the test image's codes
    reference_codes: Tensor      # (B, h, w) the registered reference's codes
    resampled: Tensor            # (B, h, w) bool, the test image's redrawn positions (first)
    reference_resampled: Tensor  # (B, h, w) bool, the reference's (first)


def resolve_max_shift(max_shift: int | None, size: int) -> int:
    """``max_shift`` checked against the image size (0 .. S // 4); None -> min(8, S // 4)."""
    hi = size // 4
    if max_shift is None:
        return min(DEFAULT_MAX_SHIFT, hi)
    if isinstance(max_shift, bool) or not isinstance(max_shift, (int, np.integer)) or not 0 <= max_shift <= hi:
        raise ValueError(f"--max-shift: must be an integer in [0, {hi}] (a quarter of the model's image size "
                         f"{size}), got {max_shift!r}")
    return int(max_shift)


def _candidates(R: int) -> list[tuple[int, int]]:
    """Shifts in the order ties are broken: smaller dy^2 + dx^2 first, then (dy, dx)."""
    return sorted(((dy, dx) for dy in range(-R, R + 1) for dx in range(-R, R + 1)),
                  key=lambda s: (s[0] ** 2 + s[1] ** 2, s[0], s[1]))


def _pad(x: Tensor, R: int) -> Tensor:
    return torch.nn.functional.pad(x, (R, R, R, R), mode="reflect") if R else x


def shift_image(x: Tensor, shift: Tensor) -> Tensor:
    """Images (B, C, S, S) translated by integer (dy, dx) per image (B, 2):
    out[y, x] = in[y - dy, x - dx], reflect padding; |dy|, |dx| < S."""
    B, _, H, W = x.shape
    shift = torch.as_tensor(shift, dtype=torch.long).reshape(B, 2)
    R = int(shift.abs().max()) if B else 0
    p = _pad(x, R)
    out = torch.empty_like(x)
    for b in range(B):
        dy, dx = int(shift[b, 0]), int(shift[b, 1])
        out[b] = p[b, :, R - dy:R - dy + H, R - dx:R - dx + W]
    return out


def register(x: Tensor, ref: Tensor, max_shift: int | None = None) -> tuple[Tensor, Tensor]:
    """The integer shift (B, 2) that :func:`shift_image` applies to ``ref`` to align it
    with ``x`` (the module doc, step 1), and its cost (B,)."""
    B, _, S, _ = x.shape
    R = resolve_max_shift(max_shift, S)
    x, ref = x.float(), ref.float()
    if R == 0:
        return torch.zeros(B, 2, dtype=torch.long), _cost(x, ref).cpu()
    p = _pad(ref, R)
    centre = x[:, :, R:S - R, R:S - R]
    cands = _candidates(R)
    costs = torch.stack([_cost(centre, p[:, :, R - dy + R:R - dy + S - R, R - dx + R:R - dx + S - R])
                         for dy, dx in cands], dim=1)                                # (B, n_cands)
    best = costs.argmin(dim=1)                                                       # first minimum
    shift = torch.tensor([cands[int(i)] for i in best], dtype=torch.long).reshape(B, 2)
    return shift, costs.gather(1, best.view(B, 1))[:, 0].cpu()


def _cost(a: Tensor, b: Tensor) -> Tensor:
    """Median over pixels of the channel-mean absolute difference: (B, C, H, W) x2 -> (B,)."""
    return (a - b).abs().mean(dim=1).flatten(1).median(dim=1).values


@torch.no_grad()
def seen(det: Any, x: Tensor) -> Tensor:
    """What the run's VQ-VAE encodes: the images (pixel runs) or their normalised backbone
    features (feature runs)."""
    x = x.to(det.device, torch.float32)
    return det.vqvae.features(x) if det.space == "features" else x


@torch.no_grad()
def nearest_references(det: Any, x: Tensor, ref_seen: Tensor, batch_size: int = 8) -> tuple[Tensor, Tensor]:
    """For each image of x (N, C, S, S): the index of the nearest reference (by mean squared
    difference of :func:`seen`, precomputed as ``ref_seen`` (M, ...)) and that distance;
    ties go to the lower index."""
    idx, dist = [], []
    flat_ref = ref_seen.flatten(1).double()
    for s in range(0, x.shape[0], batch_size):
        f = seen(det, x[s:s + batch_size]).flatten(1).double()
        d = ((f * f).sum(1, keepdim=True) - 2 * f @ flat_ref.T + (flat_ref * flat_ref).sum(1)) / f.shape[1]
        m = d.argmin(dim=1)
        idx.append(m.cpu())
        dist.append(d.gather(1, m.view(-1, 1))[:, 0].clamp_min(0).float().cpu())
    return torch.cat(idx), torch.cat(dist)


@torch.no_grad()
def detect_pair(det: Any, x: Tensor, ref: Tensor, image_ids: Sequence[int] | None = None,
                max_shift: int | None = None) -> DifferentialResult:
    """The differential map of test images x against references ``ref`` (module doc).

    Args:
        det: a :class:`lsr.detect.Detector`.
        x (Tensor[B, C, S, S]): test images in [0, 1] at the model's size and channels.
        ref (Tensor[B or 1, C, S, S]): a reference per test image (or one for all).
        image_ids: the test images' noise ids (default 0..B-1), used for both chains.
        max_shift: registration search radius in model pixels (None: min(8, S // 4); 0: none).
    """
    from .detect import NonFiniteError, chain_seed, map_score_kind

    d = det.config.detect
    S, C = det.image_size, det.channels
    for name, t in (("images", x), ("reference", ref)):
        if t.dim() != 4 or tuple(t.shape[1:]) != (C, S, S):
            raise ValueError(f"expected {name} (B, {C}, {S}, {S}), got {tuple(t.shape)}")
    B = x.shape[0]
    if ref.shape[0] == 1 and B != 1:
        ref = ref.expand(B, -1, -1, -1)
    if ref.shape[0] != B:
        raise ValueError(f"got {ref.shape[0]} references for {B} images")
    ids = list(range(B)) if image_ids is None else [int(i) for i in image_ids]
    if len(ids) != B:
        raise ValueError(f"got {len(ids)} image ids for {B} images")
    x = x.float().cpu()
    shift, cost = register(x, ref.float().cpu(), max_shift)
    ref_reg = shift_image(ref.float().cpu(), shift)
    n = d.restorations
    features = det.space == "features"

    both = torch.cat([x, ref_reg]).to(det.device)                             # (2B, C, S, S)
    s = seen(det, both)
    z = det.vqvae.encoder(s)
    codes = det.vqvae.quantizer(z).indices                                    # (2B, h, w)
    h, w = codes.shape[1:]
    K = det.config.prior.codebook_size
    noise = ops.gumbel_noise(B * n, h * w, K, [chain_seed(d.seed, i, k) for i in ids for k in range(n)])
    noise = torch.cat([noise, noise])                 # the image and its reference share the draws
    if d.posterior > 0:                               # each then drawn given what it shows
        from .detect import posterior_scale_of
        noise = ops.posterior_noise(noise, z, det.vqvae.quantizer.codebook, d.posterior,
                                    posterior_scale_of(det.config))
    rs = ops.resample(det.prior, codes.repeat_interleave(n, dim=0), noise,
                      float(d.tau), d.temperature, det.resampler)
    decode = det.vqvae.decode_features if features else det.decode_image

    def dist(a: Tensor, b: Tensor) -> Tensor:                                 # -> (., S, S), smoothed
        if features:
            m = anomaly.resize_maps(anomaly.feature_distance(a, b, d.distance), (S, S))
        else:
            m = anomaly.distance(a.float(), b.float(), d.distance)
        return anomaly.smooth(m, d.smoothing, d.sigma)

    restored = decode(rs.codes)                                               # (2B*n, C|F, ., .)
    dmap = dist(restored[:B * n], restored[B * n:]).view(B, n, S, S).mean(dim=1)
    direct = decode(codes)                                                    # (2B, C|F, ., .)
    dmap_direct = dist(direct[:B], direct[B:])
    bad = ~torch.isfinite(dmap.flatten(1)).all(dim=1) | ~torch.isfinite(dmap_direct.flatten(1)).all(dim=1)
    if bool(bad.any()):
        raise NonFiniteError([ids[i] for i in bad.nonzero().flatten().tolist()])
    kind = map_score_kind(d.score)
    score = anomaly.image_score(dmap, kind, d.topk, pool=d.pool)
    score_direct = anomaly.image_score(dmap_direct, kind, d.topk, pool=d.pool)
    first = rs.codes[::n]                                                     # (2B, h, w)
    pictures = det.decode_image(first) if features else restored[::n]
    return DifferentialResult(
        anomaly_map=dmap, score=score, map_direct=dmap_direct, direct_score=score_direct, shift=shift,
        registration_cost=cost, reference=ref_reg,
        restored=pictures[:B], reference_restored=pictures[B:], codes=codes[:B], reference_codes=codes[B:],
        resampled=rs.resampled[::n][:B], reference_resampled=rs.resampled[::n][B:])


# --------------------------------------------------------------------------- pictures


def save_panel(path: str | os.PathLike, image: Any, reference: Any, restored: Any, reference_restored: Any,
               dmap: Any, dmap_direct: Any = None, *, title: str = "", mask: Any = None) -> None:
    """One PNG: test image, registered reference, both restorations, the differential map
    and (if given) the direct variant over the test image (ground-truth outline when
    ``mask`` is given, a colour bar each)."""
    from . import report as R

    img = R.to_rgb_uint8(image)
    H, W = img.shape[:2]
    tiles = [("test", img, None), ("reference (registered)", R.to_rgb_uint8(reference), None),
             ("test restored", R.to_rgb_uint8(restored), None),
             ("reference restored", R.to_rgb_uint8(reference_restored), None)]
    for name, mp in (("differential (restored)", dmap), ("differential (direct)", dmap_direct)):
        if mp is not None:
            m = R._resize_map(R._as_map(mp), H, W)
            lo, hi = R._map_range([m], None, None)
            tiles.append((name, R.overlay(img, m, lo, hi, alpha=0.55), (lo, hi)))
    fig = R._new_figure(1.8 * len(tiles) + 0.5 * sum(t[2] is not None for t in tiles),
                        1.8 * H / W + (0.75 if title else 0.45))
    axes = fig.subplots(1, len(tiles), squeeze=False)[0]
    for ax, (name, rgb, scale) in zip(axes, tiles):
        R._tile(ax, rgb, name)
        if scale is not None:
            if mask is not None:
                R._contour(ax, R._mask_bool(mask, H, W))
            R._colorbar(fig, ax, *scale, location="right", fraction=0.05, pad=0.02, shrink=0.9)
    if title:
        fig.suptitle(title, fontsize=11)
    R._save_figure(fig, path)


# --------------------------------------------------------------------------- lsr detect --reference


def _reference_paths(reference: str | os.PathLike) -> list[Path]:
    from .data import list_images

    p = Path(reference)
    if not p.exists():
        raise FileNotFoundError(f"{p}: --reference: reference image or folder not found")
    return list_images([p])


def detect_differential_images(run: str | os.PathLike, inputs: Sequence[str | os.PathLike],
                               reference: str | os.PathLike, out: str | os.PathLike, *, batch_size: int = 8,
                               device: str | None = None, max_shift: int | None = None,
                               save_tiff_maps: bool = False, panels: bool = True, progress: bool = False,
                               **options: Any) -> list[dict[str, Any]]:
    """``lsr detect RUN IMAGES --reference REF``: under ``OUT/differential/``, a line per
    image in ``results.jsonl`` (``image``, ``reference``, ``reference_distance``, ``shift``
    [dy, dx], ``registration_cost`` (the search's cost), ``score``, ``direct_score`` (the
    direct variant)), a panel ``<stem>.png`` per image and, with
    ``save_tiff_maps``, ``maps/<stem>.tiff`` (float32, the image's own size). REF is an image
    (every test image against it) or a folder of references (each test image against the
    nearest, as ``--reference-from good``). Image ids (the noise) as ``lsr detect``."""
    from .config import OPTION_RULES, check_value
    from .data import list_images, load_images
    from .detect import Detector, unique_stems
    from .io import atomic_write, dumps, locks_output, save_tiff

    check_value("batch_size", batch_size, "--batch-size", OPTION_RULES)
    refs = _reference_paths(reference)

    @locks_output("out")
    def _run(out: Path) -> list[dict[str, Any]]:
        det = Detector.load(run, device).with_options(**options)
        shift_r = resolve_max_shift(max_shift, det.image_size)
        paths = list_images(list(inputs))
        stems = unique_stems(paths)
        ref_x = torch.from_numpy(load_images(refs, det.channels, det.image_size))
        ref_seen = torch.cat([seen(det, ref_x[s:s + batch_size]).cpu() for s in range(0, len(refs), batch_size)])
        folder = Path(out) / "differential"
        rows: list[dict[str, Any]] = []
        for start, chunk, sizes, x, _res, _ms in det.detect_paths(paths, batch_size, progress=progress):
            idx, near = nearest_references(det, x, ref_seen, batch_size)
            dr = detect_pair(det, x, ref_x[idx], range(start, start + len(chunk)), shift_r)
            for i, (path, size) in enumerate(zip(chunk, sizes)):
                stem = stems[start + i]
                row = {"image": str(path), "reference": str(refs[int(idx[i])]),
                       "reference_distance": float(near[i]), "shift": [int(v) for v in dr.shift[i]],
                       "registration_cost": float(dr.registration_cost[i]), "score": float(dr.score[i]),
                       "direct_score": float(dr.direct_score[i])}
                if panels:
                    row["panel"] = str(folder / f"{stem}.png")
                    save_panel(folder / f"{stem}.png", x[i].numpy(), dr.reference[i].numpy(),
                               dr.restored[i].cpu().numpy(), dr.reference_restored[i].cpu().numpy(),
                               dr.anomaly_map[i].cpu().numpy(), dr.map_direct[i].cpu().numpy(),
                               title=f"{path.name} vs {refs[int(idx[i])].name}  shift {row['shift']}  "
                                     f"differential score {row['score']:.4f}")
                if save_tiff_maps:
                    full = anomaly.resize_maps(dr.anomaly_map[i:i + 1].cpu(), size)[0].numpy()
                    save_tiff(folder / "maps" / f"{stem}.tiff", full)
                    row["map_tiff"] = str(folder / "maps" / f"{stem}.tiff")
                rows.append(row)
        with atomic_write(folder / "results.jsonl", "w") as f:
            for row in rows:
                f.write(dumps(row) + "\n")
        return rows

    return _run(Path(out))


# --------------------------------------------------------------------------- lsr eval --reference-from good

REFERENCE_SOURCES = ("good",)


def check_reference_from(value: str | None) -> str | None:
    if value is not None and value not in REFERENCE_SOURCES:
        raise ValueError(f"--reference-from: must be one of {', '.join(REFERENCE_SOURCES)} (train/good images "
                         f"as references), got {value!r}")
    return value


def check_differential_inputs(reference_from: str | None, cat: Any, max_shift: int | None, size: int) -> None:
    """What ``lsr eval --reference-from`` needs, checked before any detection: a known
    source, train/good images that are not test images, a valid ``--max-shift``."""
    if reference_from is None:
        raise ValueError("--max-shift: applies to differential detection only (give --reference-from good)")
    check_reference_from(reference_from)
    resolve_max_shift(max_shift, size)
    if not cat.train:
        raise ValueError(f"{cat.root / 'train' / 'good'}: --reference-from good needs train/good images")
    test_files = {Path(s.path).resolve() for s in cat.test}
    both = [p for p in cat.train if Path(p).resolve() in test_files]
    if both:
        raise ValueError(f"{both[0]}: a train/good image is also a test image; references must not be test images")


def evaluate_differential(det: Any, cat: Any, samples: Sequence[Any], masks: Sequence[np.ndarray],
                          labels: np.ndarray, defects: np.ndarray, out: Path, *, batch_size: int = 8,
                          max_shift: int | None = None, progress: bool = False, method_metrics=None
                          ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ``differential`` row of ``lsr eval --reference-from good``: every test image k
    (noise id k, as the single-image rows) against its nearest ``train/good`` image.
    Writes ``OUT/differential_maps/<category>/test/<defect>/<name>.tiff`` (float32, image
    size; the direct variant's maps are not written), ``OUT/differential/pairs.jsonl`` (test
    image, reference, distance, shift, cost, score, direct_score) and a panel per defect type (its first image) and for the first good image in
    ``OUT/differential/panels/``. Returns ({"differential": metrics, "differential_direct":
    metrics of the direct variant}, each as the other rows, and a summary)."""
    import time

    from tqdm.auto import tqdm

    from .data import load_images
    from .io import atomic_write, dumps, save_tiff

    t0 = time.perf_counter()
    check_differential_inputs("good", cat, max_shift, det.image_size)
    refs = list(cat.train)
    R = resolve_max_shift(max_shift, det.image_size)
    ref_x = torch.from_numpy(load_images(refs, det.channels, det.image_size))
    ref_seen = torch.cat([seen(det, ref_x[s:s + batch_size]).cpu() for s in range(0, len(refs), batch_size)])
    first_of = {}
    for k, s in enumerate(samples):
        first_of.setdefault(s.defect, k)
    shown = set(first_of.values())
    scores, maps, pairs, scores_direct, maps_direct = [], [], [], [], []
    bar = tqdm(total=len(samples), desc="differential", unit="img", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(samples), batch_size):
        chunk = list(samples[start:start + batch_size])
        x, sizes = det.load_batch([s.path for s in chunk])
        idx, near = nearest_references(det, x, ref_seen, batch_size)
        dr = detect_pair(det, x, ref_x[idx], range(start, start + len(chunk)), R)
        for i, (s, size) in enumerate(zip(chunk, sizes)):
            k = start + i
            full = anomaly.resize_maps(dr.anomaly_map[i:i + 1].cpu(), size)[0].numpy()
            save_tiff(out / "differential_maps" / cat.name / "test" / s.defect / f"{s.path.stem}.tiff", full)
            maps.append(full)
            maps_direct.append(anomaly.resize_maps(dr.map_direct[i:i + 1].cpu(), size)[0].numpy())
            scores.append(float(dr.score[i]))
            scores_direct.append(float(dr.direct_score[i]))
            pairs.append({"image": str(s.path), "defect": s.defect, "reference": str(refs[int(idx[i])]),
                          "reference_distance": float(near[i]), "shift": [int(v) for v in dr.shift[i]],
                          "registration_cost": float(dr.registration_cost[i]), "score": scores[-1],
                          "direct_score": scores_direct[-1]})
            if k in shown:
                save_panel(out / "differential" / "panels" / f"{s.defect}_{s.path.stem}.png", x[i].numpy(),
                           dr.reference[i].numpy(), dr.restored[i].cpu().numpy(),
                           dr.reference_restored[i].cpu().numpy(), dr.anomaly_map[i].cpu().numpy(),
                           dr.map_direct[i].cpu().numpy(),
                           mask=masks[k] if s.mask_path is not None else None,
                           title=f"{s.defect}/{s.path.name} vs {Path(pairs[-1]['reference']).name}  "
                                 f"differential score {scores[-1]:.4f}")
        bar.update(len(chunk))
    bar.close()
    with atomic_write(out / "differential" / "pairs.jsonl", "w") as f:
        for p in pairs:
            f.write(dumps(p) + "\n")
    _method_metrics = method_metrics                      # lsr.evaluation's
    rows = {"differential": _method_metrics(np.array(scores), labels, maps, list(masks), defects),
            "differential_direct": _method_metrics(np.array(scores_direct), labels, maps_direct, list(masks),
                                                   defects)}
    seconds = time.perf_counter() - t0
    info = {"reference_from": "good", "n_references": len(refs), "max_shift": R,
            "pairs": str(out / "differential" / "pairs.jsonl"),
            "maps": str(out / "differential_maps"), "seconds": seconds,
            "ms_per_image": 1000.0 * seconds / max(1, len(samples)),
            "shifted": int(sum(p["shift"] != [0, 0] for p in pairs))}
    return rows, info


__all__ = ["DifferentialResult", "detect_pair", "register", "shift_image", "nearest_references", "seen",
           "resolve_max_shift", "save_panel", "detect_differential_images", "evaluate_differential",
           "check_reference_from", "check_differential_inputs", "REFERENCE_SOURCES"]
