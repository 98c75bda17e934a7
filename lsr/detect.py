"""Detection: a trained run (VQ-VAE + prior + calibrated tau) applied to images.

:class:`Detector` is the Python API; :func:`lsr.commands.detect_images` is what ``lsr detect``
runs with it. One call returns one fixed :class:`DetectionResult`, whatever the options.

Example:
    >>> det = Detector.load("runs/bottle")                       # doctest: +SKIP
    >>> res = det.detect(torch.rand(2, 3, 128, 128))              # doctest: +SKIP
    >>> res.score.shape, res.anomaly_map.shape                    # doctest: +SKIP
    (torch.Size([2]), torch.Size([2, 128, 128]))
"""
from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from . import anomaly, ops, pipeline
from .checkpoint import load_into
from .config import HELD_OUT_STATS, RunConfig
from .contract import chain_seed, recomputed_fraction, unique_stems  # noqa: F401 (re-exported)
from .contract import result_row as contract_row
from .data import DataError, image_size, load_image, load_images
from .distributed import resolve_device
from .io import locks_output, read_json, write_json
from .models import VQVAE, PixelSNAIL, build_vqvae


#: the result of every backend's pipeline (:mod:`lsr.pipeline`); here its fields are tensors
DetectionResult = pipeline.DetectionResult


class _TorchStages:
    """The stages of :mod:`lsr.pipeline` on a detector's torch modules."""

    def __init__(self, det: "Detector"):
        self.det = det
        self.features = det.space == "features"
        self.z: Tensor | None = None                                   # the encoder's outputs (posterior draw)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        v = self.det.vqvae
        seen = v.features(x) if self.features else x                   # the image, or its features
        z = v.encoder(seen)
        self.z = z if self.det.config.detect.posterior > 0 else None
        return v.quantizer(z).indices, seen

    def decode(self, codes: Tensor) -> tuple[Tensor, Tensor | None]:
        if self.features:                                              # pictures: the pixel decoder
            return self.det.vqvae.decode_features(codes), None
        picture = self.picture(codes)
        return picture, picture

    def picture(self, codes: Tensor) -> Tensor:
        return self.det.decode_image(codes)

    def repeat(self, codes: Tensor, n: int) -> Tensor:
        return codes.repeat_interleave(n, dim=0)

    def resample(self, chains: Tensor, seeds: Sequence[int], tau: float, temperature: float) -> ops.ResampleResult:
        K = self.det.config.prior.codebook_size
        noise = ops.gumbel_noise(chains.shape[0], chains.shape[1] * chains.shape[2], K, seeds)
        d = self.det.config.detect
        if d.posterior > 0:                                            # the posterior draw (docs/method.md 3)
            noise = ops.posterior_noise(noise, self.z, self.det.vqvae.quantizer.codebook, d.posterior,
                                        posterior_scale_of(self.det.config))
        return ops.resample(self.det.prior, chains, noise, tau, temperature, self.det.resampler)

    def nll_score(self, likelihood: Tensor, tau: float) -> Tensor:
        return anomaly.nll_score(likelihood, tau)

    def postprocess(self, seen: Tensor, direct: Tensor, restored: Tensor, resampled: Tensor, nll: Tensor
                    ) -> dict[str, Tensor]:
        d = self.det.config.detect
        post = anomaly.postprocess(seen, direct, restored, resampled, nll, anomaly.held_out_tensor(d, nll.device),
                                   anomaly.MapSettings.of(self.det.config))
        return post._asdict()

    def as_float(self, a: Tensor) -> Tensor:
        return a.float()


def posterior_scale_of(config: RunConfig) -> float:
    """The run's ``detect.posterior_scale``, or a clear error when the posterior draw needs it
    and the run has none (a run trained before it existed whose held-out images are gone)."""
    s = config.detect.posterior_scale
    if s is None:
        raise ValueError("detect.posterior > 0 needs detect.posterior_scale, which training sets from the "
                         "held-out normal images (and Detector.load from the images of the run's split.json); "
                         "this run has neither: retrain it, or set detect.posterior=0")
    return float(s)


def held_out_posterior_scale(vqvae: VQVAE, images: Tensor, batch_size: int = 8) -> float:
    """``detect.posterior_scale`` from normal images (N, C, S, S): the mean squared distance
    from the encoder's outputs to their nearest code (:func:`lsr.ops.posterior_scale`)."""
    with torch.no_grad():
        dev = vqvae.quantizer.codebook.device
        seen = (lambda x: vqvae.features(x)) if vqvae.cfg.space == "features" else (lambda x: x)
        z = torch.cat([vqvae.encoder(seen(images[i:i + batch_size].to(dev, torch.float32))).cpu()
                       for i in range(0, images.shape[0], batch_size)])
    return ops.posterior_scale(z, vqvae.quantizer.codebook.cpu())


class NonFiniteError(ValueError):
    """Detection gave a non-finite anomaly map (damaged weights or input): an error, never a
    NaN score. ``image_ids`` are the affected images of the batch."""

    def __init__(self, image_ids: Sequence[int]):
        self.image_ids = list(image_ids)
        super().__init__(f"non-finite anomaly map for image id(s) {self.image_ids}: the model's weights or "
                         f"the input hold non-finite values")


def load_run(run: str | os.PathLike) -> tuple[RunConfig, VQVAE, PixelSNAIL]:
    """Config and trained models of a run folder written by ``lsr train`` (CPU, eval
    mode); clear errors for a missing folder or an unfinished training."""
    run = Path(run)
    if not run.is_dir():
        raise FileNotFoundError(f"{run}: run folder not found")
    from .runfolder import MANIFEST, read_manifest, verify_weights

    manifest = read_manifest(run)
    if manifest is not None and not manifest.get("finished"):   # the run's own record, not a config value
        raise ValueError(f"{run / MANIFEST}: training did not finish; re-run `lsr train` with the same "
                         f"--out to resume")
    config = RunConfig.from_dict(read_json(run / "config.json", "run config"), str(run / "config.json"))
    if config.detect.tau is None:
        raise ValueError(f"{run / 'config.json'}: detect.tau is null: the run is not calibrated; re-run "
                         f"`lsr train` with the same --out, or set a tau")
    verify_weights(run)
    vqvae, prior = build_vqvae(config.vqvae, pretrained=False), PixelSNAIL(config.prior)
    load_into(vqvae, run / "vqvae.safetensors")
    load_into(prior, run / "prior.safetensors")
    vqvae, prior = vqvae.eval(), prior.eval()
    if config.detect.posterior_scale is None:         # a run trained before the posterior draw
        config = _scale_from_split(config, vqvae, run)
    return config, vqvae, prior


def held_out_images(run: str | os.PathLike, channels: int, size: int) -> Tensor | None:
    """The held-out normal images listed in the run's split.json (never test images), at the
    model's channels and size, or None when the list or any of its files is gone."""
    try:
        val = [Path(p) for p in read_json(Path(run) / "split.json")["val"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not val or not all(p.is_file() for p in val):
        return None
    return torch.from_numpy(load_images(val, channels, size))


def _scale_from_split(config: RunConfig, vqvae: VQVAE, run: Path) -> RunConfig:
    """``config`` with ``detect.posterior_scale`` measured on the run's held-out normal images
    (as training measures it), when they are still there; else as it is."""
    x = held_out_images(run, config.vqvae.in_channels, config.vqvae.image_size)
    if x is None:
        return config
    return dataclasses.replace(config, detect=dataclasses.replace(
        config.detect, posterior_scale=held_out_posterior_scale(vqvae, x)))


class Detector:
    """A trained LSR model ready to detect.

    Args:
        vqvae: trained :class:`lsr.models.VQVAE`.
        prior: trained :class:`lsr.models.PixelSNAIL`.
        config: the run's :class:`lsr.config.RunConfig` (``config.detect.tau`` set).
        device: where to run.
    """

    def __init__(self, vqvae: VQVAE, prior: PixelSNAIL, config: RunConfig,
                 device: str | torch.device | None = None):
        self.device = resolve_device(device)
        self.vqvae = vqvae.to(self.device).eval()
        self.prior = prior.to(self.device).eval()
        self.config = config

    @classmethod
    def load(cls, run: str | os.PathLike, device: str | torch.device | None = None) -> "Detector":
        """Load a run folder written by ``lsr train`` (config.json + safetensors weights)."""
        config, vqvae, prior = load_run(run)
        return cls(vqvae, prior, config, device)

    def with_options(self, **options: Any) -> "Detector":
        """A detector sharing the models, with detect options replaced (e.g. resampler).
        Options that change the image score drop the held-out score statistics (the fused
        score is then NaN until :func:`score_stats` is run again for them)."""
        options = {k: v for k, v in options.items() if v is not None}
        d = self.config.detect
        if any(k in SCORE_OPTIONS + THRESHOLD_OPTIONS and v != getattr(d, k) for k, v in options.items()):
            options.update({k: None for k in HELD_OUT_FIELDS if k not in options})
        cfg = dataclasses.replace(self.config, detect=dataclasses.replace(d, **options))
        cfg.validate()
        return Detector(self.vqvae, self.prior, cfg, self.device)

    @property
    def space(self) -> str:
        return self.config.vqvae.space

    @property
    def resampler(self) -> str:
        """The resampling loop detection runs (``auto`` resolved: ``native`` when the
        extension is built, else ``fast``)."""
        return ops.resolve_resampler(self.config.detect.resampler, self.prior)

    @property
    def image_size(self) -> int:
        return self.config.vqvae.image_size

    @property
    def channels(self) -> int:
        return self.config.vqvae.in_channels

    @torch.no_grad()
    def detect(self, x: Tensor, image_ids: Sequence[int] | None = None) -> DetectionResult:
        """Detect anomalies in a batch.

        Args:
            x (Tensor[B, C, S, S]): images in [0, 1] at the model's size and channels.
            image_ids: one integer per image selecting its noise stream (default
                0..B-1); the same id and seed give the same codes in any batch.
        """
        d = self.config.detect
        B = x.shape[0]
        S, C = self.image_size, self.channels
        if x.dim() != 4 or tuple(x.shape[1:]) != (C, S, S):
            raise ValueError(f"expected images (B, {C}, {S}, {S}), got {tuple(x.shape)}")
        ids = list(range(B)) if image_ids is None else [int(i) for i in image_ids]
        if len(ids) != B:
            raise ValueError(f"got {len(ids)} image ids for {B} images")
        x = x.to(self.device, torch.float32)
        res = pipeline.detect(_TorchStages(self), x, ids, d.seed, d.restorations, float(d.tau), d.temperature)
        bad = ~torch.isfinite(res.anomaly_map.flatten(1)).all(dim=1) | ~torch.isfinite(res.map_direct.flatten(1)).all(dim=1)
        if bool(bad.any()):
            raise NonFiniteError([ids[i] for i in bad.nonzero().flatten().tolist()])
        return res

    def decode_image(self, codes: Tensor) -> Tensor:
        """Codes -> image in [0, 1] (the VQ-VAE's decoder, or the pixel decoder in features mode)."""
        return self.vqvae.decode_indices(codes).clamp(0, 1)

    def load_batch(self, paths: Sequence[Path]) -> tuple[Tensor, list[tuple[int, int]]]:
        """Images at the model's size and channels, plus each file's own (H, W)."""
        sizes = [image_size(p) for p in paths]
        arr = np.stack([load_image(p, self.channels, self.image_size) for p in paths])
        return torch.from_numpy(arr), sizes

    def detect_paths(self, paths: Sequence[Path], batch_size: int = 8, first_id: int = 0,
                     progress: bool = False, shard: tuple[int, int] = (0, 1)
                     ) -> Iterator[tuple[int, list[Path], list[tuple[int, int]], Tensor, DetectionResult, float]]:
        """Detect files in batches; yields (index of the first image, paths, sizes, images,
        result, ms per image). The image id of ``paths[i]`` is ``first_id + i``.

        ``shard=(rank, world)`` takes every world-th batch starting at the rank-th: the
        batches are the same as in one process, so the results are identical too."""
        from tqdm.auto import tqdm

        rank, world = shard
        starts = list(range(0, len(paths), batch_size))[rank::world]
        total = sum(min(batch_size, len(paths) - s) for s in starts)
        bar = tqdm(total=total, desc="detect", unit="img", disable=not progress, dynamic_ncols=True)
        for start in starts:
            chunk = list(paths[start:start + batch_size])
            x, sizes = self.load_batch(chunk)
            t0 = time.perf_counter()
            try:
                res = self.detect(x, range(first_id + start, first_id + start + len(chunk)))
            except NonFiniteError as e:
                names = ", ".join(str(chunk[i - first_id - start]) for i in e.image_ids)
                raise ValueError(f"{names}: the anomaly map is not finite (NaN or inf): the run's weights or "
                                 f"the image hold non-finite values") from None
            ms = (time.perf_counter() - t0) * 1000.0 / len(chunk)
            bar.update(len(chunk))
            bar.set_postfix(ms_per_img=f"{ms:.0f}")
            yield start, chunk, sizes, x, res, ms
        bar.close()


#: detect options that change an image score (the held-out statistics belong to them)
SCORE_OPTIONS = ("tau", "temperature", "map_kind", "distance", "score_distance", "smoothing", "sigma", "score", "topk", "pool",
                 "gate_dilate", "restorations", "weighting", "seed", "posterior")
#: options that change the operating point only (the thresholds are set again for them)
THRESHOLD_OPTIONS = ("false_alarm_rate", "pixel_fpr")
#: what calibration on held-out normal images sets (dropped when the options it depends on change)
HELD_OUT_FIELDS = HELD_OUT_STATS + ("image_threshold", "pixel_threshold")


restoration_weights = anomaly.restoration_weights
map_score_kind = anomaly.score_reduction


def fused_score(score: Tensor, nll: Tensor, d: Any) -> Tensor:
    """Map score and NLL score, each standardised by the held-out normal images'
    statistics of DetectConfig ``d``, summed; NaN where the statistics are missing
    (:func:`lsr.anomaly.fuse`)."""
    return anomaly.fuse(score, nll, anomaly.held_out_tensor(d, score.device))


@torch.no_grad()
def score_stats(det: "Detector", x: Tensor, batch_size: int = 8, first_id: int = 1_000_000) -> dict[str, Any]:
    """Calibration on normal images x (N, C, S, S), e.g. the held-out part of train/good
    (never test images): mean and standard deviation of the map score and the NLL score
    (for the fused score), and the operating point (:mod:`lsr.decision`): the image
    threshold at ``detect.false_alarm_rate`` over these images' scores and the pixel
    threshold at ``detect.pixel_fpr`` over their maps' pixels. Their noise streams use
    ids from ``first_id`` on, apart from the test images' ids."""
    from . import decision

    d = det.config.detect
    # the map part of the score as the postprocess computes it (its reduction, under
    # score_distance): the score of the same detector with the map reduction as its score
    probe = det.with_options(score=map_score_kind(d.score)) if d.score != map_score_kind(d.score) else det
    scores, nlls, maps = [], [], []
    for s in range(0, x.shape[0], batch_size):
        xs = x[s:s + batch_size]
        res = probe.detect(xs, range(first_id + s, first_id + s + xs.shape[0]))
        scores.append(res.score.double().cpu())
        nlls.append(res.nll_score.double().cpu())
        maps.append(res.anomaly_map.float().cpu().numpy())
    sc, nl = torch.cat(scores), torch.cat(nlls)
    std = (lambda t: float(t.std()) if t.numel() > 1 else 0.0)
    out: dict[str, Any] = {"score_mean": float(sc.mean()), "score_std": std(sc), "nll_mean": float(nl.mean()),
                           "nll_std": std(nl), "n_images": int(sc.numel())}
    held = torch.tensor([out[k] for k in HELD_OUT_STATS], dtype=torch.float64)
    final = {"nll": nl, "fused": anomaly.fuse(sc, nl, held)}.get(d.score, sc)
    if sc.numel() >= 2:
        img = decision.image_threshold(final.numpy(), d.false_alarm_rate)
        pix = decision.pixel_threshold(np.concatenate([m.ravel() for m in maps]), d.pixel_fpr)
        out.update(image_threshold=img["threshold"], pixel_threshold=pix["threshold"],
                   image_threshold_info=img, pixel_threshold_info=pix)
    else:
        out.update(image_threshold=None, pixel_threshold=None)
    return out


def apply_held_out(config: RunConfig, stats: dict[str, Any]) -> RunConfig:
    """``config`` with the held-out statistics and thresholds of :func:`score_stats`."""
    return dataclasses.replace(config, detect=dataclasses.replace(
        config.detect, **{k: stats.get(k) for k in HELD_OUT_FIELDS}))


def with_held_out_stats(det: "Detector", run: str | os.PathLike) -> "Detector":
    """The detector with held-out score statistics for its current options, computed on
    the held-out normal images listed in the run's ``split.json`` (never test images);
    returned unchanged when it has them already or those images are gone."""
    d = det.config.detect
    if all(getattr(d, k) is not None for k in HELD_OUT_FIELDS):
        return det
    x = held_out_images(run, det.channels, det.image_size)
    if x is None:
        return det
    stats = score_stats(det, x)
    det.config = apply_held_out(det.config, stats)
    return det


@locks_output("run", "RUN", create=False)
def calibrate_thresholds(run: str | os.PathLike, false_alarm_rate: float | None = None,
                         pixel_fpr: float | None = None, device: str | None = None) -> dict[str, Any]:
    """``lsr calibrate``: set the run's operating point again, without retraining, on the
    held-out normal images listed in its split.json (never test images), at new rates if
    given; config.json and calibration.json are rewritten only once everything is
    computed. Returns the thresholds' records (:mod:`lsr.decision`)."""
    from .config import check_value

    run = Path(run)
    opts = {k: check_value(f"detect.{k}", v, f"--{k.replace('_', '-')}")
            for k, v in (("false_alarm_rate", false_alarm_rate), ("pixel_fpr", pixel_fpr)) if v is not None}
    # everything set on the held-out images is set again (None is not an option value, so
    # the fields are cleared on the config rather than through with_options)
    det = Detector.load(run, device).with_options(**opts)
    det.config = dataclasses.replace(det.config, detect=dataclasses.replace(
        det.config.detect, **{k: None for k in HELD_OUT_FIELDS}))
    try:
        val = [Path(p) for p in read_json(run / "split.json", "split file")["val"]]
    except (KeyError, TypeError):
        raise ValueError(f"{run / 'split.json'}: no list of held-out images (val)") from None
    missing = [p for p in val if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{missing[0]}: held-out image listed in {run / 'split.json'} is gone; the "
                                f"thresholds can only be set on the run's own held-out normal images")
    stats = score_stats(det, torch.from_numpy(load_images(val, det.channels, det.image_size)))
    if stats.get("image_threshold") is None:
        raise ValueError(f"{run / 'split.json'}: {len(val)} held-out image(s); thresholds need at least 2")
    cfg = apply_held_out(det.config, stats)
    calib_path = run / "calibration.json"
    calib = read_json(calib_path) if calib_path.is_file() else {}
    calib["held_out_scores"] = {k: v for k, v in stats.items() if not k.endswith("_info")}
    calib["thresholds"] = {"image": stats["image_threshold_info"], "pixel": stats["pixel_threshold_info"]}
    write_json(calib_path, calib)
    write_json(run / "config.json", cfg.to_dict())
    return calib["thresholds"]


def result_row(res: DetectionResult, i: int, restorations: int = 1) -> dict[str, Any]:
    """The JSON fields of image i of a batch result (:func:`lsr.contract.result_row`)."""
    return contract_row(float(res.score[i]), float(res.nll_score[i]), float(res.direct_score[i]),
                        float(res.fused_score[i]), float(res.n_resampled[i]), int(res.prior_passes[i]),
                        int(res.positions_evaluated[i]), int(res.codes[i].numel()), restorations)


__all__ = ["Detector", "DetectionResult", "resolve_device", "chain_seed", "score_stats",
           "fused_score", "restoration_weights", "DataError"]
