"""Anomaly maps and image scores, apart from the models.

All functions take and return tensors (B, ...) so that they can run on any device and
be exported; the bilateral option alone runs through scikit-image on the CPU.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import HELD_OUT_STATS, MAP_KINDS, MAP_SCORES


def gaussian_kernel1d(sigma: float, radius: int | None = None, dtype=torch.float32) -> Tensor:
    """Normalised 1-D Gaussian, radius ``int(4 * sigma + 0.5)`` as scipy.ndimage."""
    if radius is None:
        radius = int(4.0 * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).to(dtype)


def gaussian_blur(x: Tensor, sigma: float, truncate: float = 4.0) -> Tensor:
    """Separable Gaussian smoothing of maps (B, H, W) or images (B, C, H, W), mirror
    boundary: equal to scipy.ndimage ``gaussian_filter(mode="mirror", truncate=...)``
    while the kernel radius ``int(truncate * sigma + 0.5)`` is below the map size; on
    smaller maps the radius is capped at size - 1 (and the kernel renormalised)."""
    if sigma <= 0:
        return x
    squeeze = x.dim() == 3
    y = x.unsqueeze(1) if squeeze else x
    B, C, H, W = y.shape
    radius = min(int(truncate * sigma + 0.5), H - 1, W - 1)
    if radius < 1:
        return x
    k = gaussian_kernel1d(sigma, radius, y.dtype).to(y.device)
    y = y.reshape(B * C, 1, H, W)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), k.view(1, 1, -1, 1))
    y = y.reshape(B, C, H, W)
    return y.squeeze(1) if squeeze else y


def l2_distance(a: Tensor, b: Tensor) -> Tensor:
    """Per-pixel Euclidean distance over channels: (B, C, H, W) x2 -> (B, H, W)."""
    return (a - b).pow(2).sum(dim=1).sqrt()


def ssim_distance(a: Tensor, b: Tensor, sigma: float = 1.5, data_range: float = 1.0) -> Tensor:
    """1 - SSIM per pixel (11 x 11 Gaussian window of sigma 1.5 as Wang et al. 2004 and
    scikit-image), averaged over channels: (B, C, H, W) x2 -> (B, H, W)."""
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    t = 3.5                                                   # radius 5 at sigma 1.5: 11 x 11
    mu_a, mu_b = gaussian_blur(a, sigma, t), gaussian_blur(b, sigma, t)
    var_a = gaussian_blur(a * a, sigma, t) - mu_a ** 2
    var_b = gaussian_blur(b * b, sigma, t) - mu_b ** 2
    cov = gaussian_blur(a * b, sigma, t) - mu_a * mu_b
    ssim = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return (1.0 - ssim).mean(dim=1)


_PREWITT = torch.tensor([[1.0, 0.0, -1.0], [1.0, 0.0, -1.0], [1.0, 0.0, -1.0]]) / 3.0


def _gradient_magnitude(g: Tensor) -> Tensor:
    """Prewitt gradient magnitude of grey images (B, 1, H, W), replicate padding."""
    k = _PREWITT.to(g.device, g.dtype)
    gp = F.pad(g, (1, 1, 1, 1), mode="replicate")
    gx = F.conv2d(gp, k.view(1, 1, 3, 3))
    gy = F.conv2d(gp, k.t().contiguous().view(1, 1, 3, 3))
    return (gx * gx + gy * gy).sqrt()


def msgms_distance(a: Tensor, b: Tensor, scales: int = 3, c: float = 0.0026) -> Tensor:
    """Multi-scale gradient magnitude similarity distance (RIAD, Zavrtanik et al. 2021):
    images (B, C, H, W) in [0, 1] -> (B, H, W), the mean over scales 1, 1/2, 1/4, ... of
    1 - GMS, GMS = (2 g_a g_b + c) / (g_a^2 + g_b^2 + c) on grey (channel-mean) images
    average-pooled per scale, each scale's map bilinearly upsampled. 0 where equal."""
    H, W = a.shape[-2:]
    ga, gb = a.float().mean(1, keepdim=True), b.float().mean(1, keepdim=True)
    out = torch.zeros(a.shape[0], H, W, dtype=torch.float32, device=a.device)
    for s in range(scales):
        if s:
            ga, gb = F.avg_pool2d(ga, 2), F.avg_pool2d(gb, 2)
        ma, mb = _gradient_magnitude(ga), _gradient_magnitude(gb)
        gms = (2 * ma * mb + c) / (ma * ma + mb * mb + c)
        d = 1.0 - gms
        if d.shape[-2:] != (H, W):
            d = F.interpolate(d, size=(H, W), mode="bilinear", align_corners=False)
        out += d[:, 0]
    return out / scales


def distance(a: Tensor, b: Tensor, kind: str = "l2") -> Tensor:
    """Per-pixel distance between image batches (B, C, H, W) -> (B, H, W)."""
    if kind == "l2":
        return l2_distance(a, b)
    if kind == "ssim":
        return ssim_distance(a, b)
    if kind == "msgms":
        return msgms_distance(a, b)
    raise ValueError(f"distance must be 'l2', 'ssim' or 'msgms', got {kind!r}")


def feature_distance(a: Tensor, b: Tensor, kind: str = "l2", eps: float = 1e-8) -> Tensor:
    """Per-position distance between feature maps (B, C, h, w) -> (B, h, w): Euclidean
    over channels (``l2``) or 1 - cosine similarity (``cosine``, in [0, 2]: rounding below 0
    is clipped)."""
    a, b = a.float(), b.float()
    if kind == "l2":
        return l2_distance(a, b)
    if kind == "cosine":
        dot = (a * b).sum(1)
        return (1.0 - dot / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(eps)).clamp_min(0.0)
    raise ValueError(f"feature distance must be 'l2' or 'cosine', got {kind!r}")


def code_mask_map(resampled: Tensor, size: tuple[int, int], dilate: int = 1) -> Tensor:
    """Boolean code grids (B, h, w) of resampled positions -> float masks (B, H, W):
    dilated by ``dilate`` cells (a 3 x 3 max per step), nearest-upsampled to ``size``."""
    m = resampled.float().unsqueeze(1)
    for _ in range(int(dilate)):
        m = F.max_pool2d(m, 3, stride=1, padding=1)
    return F.interpolate(m, size=tuple(size), mode="nearest").squeeze(1)


def standardise(x: Tensor, mean: float, std: float, eps: float = 1e-12) -> Tensor:
    """(x - mean) / std, with std floored at eps."""
    return (x - mean) / max(float(std), eps)


def bilateral_smooth(maps: Tensor, sigma_spatial: float) -> Tensor:
    """Edge-preserving smoothing of maps (B, H, W) with scikit-image's bilateral filter
    (on the CPU; each map scaled to [0, 1] for the range kernel and back)."""
    from skimage.restoration import denoise_bilateral

    out = torch.empty_like(maps)
    for i, m in enumerate(maps.detach().cpu().double().numpy()):
        lo, hi = float(m.min()), float(m.max())
        span = hi - lo if hi > lo else 1.0
        sm = denoise_bilateral((m - lo) / span, sigma_color=0.1, sigma_spatial=sigma_spatial,
                               win_size=max(3, int(2 * math.ceil(2 * sigma_spatial) + 1)), mode="reflect")
        out[i] = torch.from_numpy(sm * span + lo).to(maps.dtype)
    return out


def smooth(maps: Tensor, kind: str = "gaussian", sigma: float = 4.0) -> Tensor:
    if kind == "gaussian":
        return gaussian_blur(maps, sigma)
    if kind == "bilateral":
        return bilateral_smooth(maps, sigma)
    if kind == "none":
        return maps
    raise ValueError(f"smoothing must be 'gaussian', 'bilateral' or 'none', got {kind!r}")


def anomaly_map(a: Tensor, b: Tensor, distance_kind: str = "l2", smoothing: str = "gaussian",
                sigma: float = 4.0) -> Tensor:
    """Smoothed per-pixel distance between two image batches: -> (B, H, W)."""
    return smooth(distance(a.float(), b.float(), distance_kind), smoothing, sigma)


def image_score(maps: Tensor, kind: str = "max", topk: int = 100, pool: int = 21) -> Tensor:
    """Image score from maps (B, H, W): their max, the mean of the top-k pixels, or
    (``pooled_max``) the max after a pool x pool mean filter (:func:`pooled_max`)."""
    flat = maps.flatten(1)
    if kind == "max":
        return flat.amax(dim=1)
    if kind == "topk_mean":
        return flat.topk(min(topk, flat.shape[1]), dim=1).values.mean(dim=1)
    if kind == "pooled_max":
        return pooled_max(maps, pool)
    raise ValueError(f"score must be 'max', 'topk_mean' or 'pooled_max', got {kind!r}")


def pooled_max(maps: Tensor, size: int) -> Tensor:
    """Max over maps (B, H, W) of their size x size window means (windows inside the map;
    the whole map's mean when it is smaller than the window), as DSR scores images."""
    k = min(int(size), maps.shape[-2], maps.shape[-1])
    return F.avg_pool2d(maps.unsqueeze(1).float(), k, stride=1).flatten(1).amax(dim=1).to(maps.dtype)


def nll_score(likelihood: Tensor, tau: float) -> Tensor:
    """Sum of -log p_t over codes with p_t < tau: likelihood (B, H, W) -> (B,)."""
    low = likelihood < tau
    nll = -torch.log(likelihood.clamp_min(1e-30))
    return torch.where(low, nll, torch.zeros_like(nll)).flatten(1).sum(dim=1)


def resize_maps(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of maps (B, H, W) to ``size`` (H', W')."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)


# --- the one postprocess: every backend's maps and scores --------------------------------

class MapSettings(NamedTuple):
    """What :func:`postprocess` needs of a run's config (``vqvae.space`` and the detect
    settings of the map and the score); an exported postprocess graph bakes them in."""
    space: str = "pixels"          # pixels | features
    image_size: int = 128          # S: maps are (B, S, S)
    map_kind: str = "restored_vs_input"
    distance: str = "l2"
    smoothing: str = "gaussian"
    sigma: float = 4.0
    score: str = "max"             # max | topk_mean | pooled_max | nll | fused
    topk: int = 100
    pool: int = 21
    gate_dilate: int = 1
    weighting: str = "mean"
    score_distance: str = "map"    # the image score's map distance ("map": the map's own)

    @classmethod
    def of(cls, config) -> "MapSettings":
        """The settings of a :class:`lsr.config.RunConfig`."""
        d = config.detect
        return cls(config.vqvae.space, int(config.vqvae.image_size), d.map_kind, d.distance, d.smoothing,
                   float(d.sigma), d.score, int(d.topk), int(d.pool), int(d.gate_dilate), d.weighting,
                   d.score_distance)


class PostprocessResult(NamedTuple):
    """Maps (B, S, S) and scores (B,) of :func:`postprocess`."""
    anomaly_map: Tensor              # the configured map (map_kind)
    score: Tensor                    # the configured image score
    map_restored_vs_input: Tensor
    map_restored_vs_direct: Tensor
    map_direct: Tensor               # seen vs direct reconstruction (no prior): the baseline
    direct_score: Tensor             # the map score of map_direct
    map_gated: Tensor                # restored vs input where codes were resampled (dilated mask)
    fused_score: Tensor              # standardised map score + standardised NLL score (NaN without stats)
    map_score: Tensor                # the map part of the score (max for nll and fused)


def score_reduction(score: str) -> str:
    """The map reduction behind an image score (``max`` for ``nll`` and ``fused``,
    whose map part is the max of the map)."""
    return score if score in MAP_SCORES else "max"


def restoration_weights(closeness: Tensor, kind: str) -> Tensor:
    """Weights (B, n) of n restorations per image: equal (``mean``), or (``closeness``)
    softmax over the restorations of 3 / (mean distance to the input), so a restoration that
    stayed closer to the input counts more (Marimont & Tarroni 2021). closeness (B, n)."""
    if kind == "mean":
        return torch.full_like(closeness, 1.0 / closeness.shape[1])
    if kind == "closeness":                               # one restoration: softmax of one = 1
        return torch.softmax(3.0 / closeness.clamp_min(1e-6), dim=1)
    raise ValueError(f"weighting must be 'mean' or 'closeness', got {kind!r} (postprocess reduces 'min' itself)")


def fuse(map_score: Tensor, nll: Tensor, held_out: Tensor, eps: float = 1e-12) -> Tensor:
    """Map score and NLL score (B,), each standardised by the held-out normal images'
    statistics ``held_out`` = (score_mean, score_std, nll_mean, nll_std), summed; NaN
    where a statistic is NaN (missing). Standard deviations are floored at eps."""
    h = held_out.to(map_score.dtype)
    return (map_score - h[0]) / h[1].clamp_min(eps) + (nll - h[2]) / h[3].clamp_min(eps)


def postprocess(seen: Tensor, direct: Tensor, restored: Tensor, resampled: Tensor, nll: Tensor,
                held_out: Tensor, s: MapSettings) -> PostprocessResult:
    """Maps and image scores from what the pipeline saw and restored: the one definition
    that :class:`lsr.detect.Detector`, every exported postprocess graph
    (:class:`lsr.deploy.graphs.PostprocessGraph`) and so the C++ runtime compute.

    Args:
        seen: (B, F, H, W) what the VQ-VAE encodes: the image (pixels, H = S) or its
            normalised backbone features (features, H = S / 8).
        direct: (B, F, H, W) the decoding of the image's own codes.
        restored: (B, N, F, H, W) the decodings of N restorations per image.
        resampled: (B, N, h, w) redrawn code positions of each restoration (bool or 0/1).
        nll: (B,) the NLL score (:func:`nll_score` of the first restoration's likelihoods).
        held_out: (4,) score_mean, score_std, nll_mean, nll_std of held-out normal images
            (NaN when missing: the fused score is then NaN).
        s: the settings.

    Maps compare images per pixel (pixels) or features per position, upsampled to S x S
    (features); each restoration's map is smoothed, then the N are averaged (``weighting``
    ``mean``, ``closeness``) or reduced to their per-pixel minimum (``min``).
    The image scores (``score``, ``direct_score``) reduce the same kind of map; where
    ``s.score_distance`` names another distance than the map's, that map is computed
    again under it (e.g. cosine maps to localise, an L2 score for the verdict).
    """
    B, N = restored.shape[0], restored.shape[1]
    S = s.image_size
    flat = restored.reshape((B * N,) + tuple(restored.shape[2:]))
    resampled = resampled.reshape((B * N,) + tuple(resampled.shape[2:]))
    gate = code_mask_map(resampled, (S, S), s.gate_dilate)

    def sm(m: Tensor) -> Tensor:
        return smooth(m, s.smoothing, s.sigma)

    if s.map_kind not in MAP_KINDS:
        raise ValueError(f"map_kind must be one of {MAP_KINDS}, got {s.map_kind!r}")
    # each image's seen and direct once per restoration (expand_as, not repeat_interleave,
    # whose export ties the batch and restoration axes)
    seen_n = seen.unsqueeze(1).expand_as(restored).reshape(flat.shape)
    direct_n = direct.unsqueeze(1).expand_as(restored).reshape(flat.shape)

    def maps(kind: str, variants: tuple[str, ...]) -> tuple[dict[str, Tensor], Tensor]:
        """The map variants named (by map kind) and the direct map, under distance ``kind``."""
        def dist(a: Tensor, b: Tensor) -> Tensor:                 # -> (., S, S), unsmoothed
            if s.space == "features":
                return resize_maps(feature_distance(a, b, kind), (S, S))
            return distance(a.float(), b.float(), kind)

        d_in = dist(flat, seen_n)                                                  # (B*N, S, S)
        if s.weighting == "min":                                  # per pixel, the closest restoration
            def combine(m: Tensor) -> Tensor:                     # (B*N, S, S) -> (B, S, S)
                return sm(m).reshape(B, N, S, S).amin(dim=1)
        else:
            weights = restoration_weights(d_in.reshape(B, N, -1).mean(-1), s.weighting)   # (B, N)

            def combine(m: Tensor) -> Tensor:                     # (B*N, S, S) -> (B, S, S)
                return (sm(m).reshape(B, N, S, S) * weights.reshape(B, N, 1, 1)).sum(dim=1)

        out: dict[str, Tensor] = {}
        if "restored_vs_input" in variants:
            out["restored_vs_input"] = combine(d_in)
        if "restored_vs_direct" in variants:
            out["restored_vs_direct"] = combine(dist(flat, direct_n))
        if "gated" in variants:
            out["gated"] = combine(d_in * gate)
        return out, sm(dist(seen, direct))

    variant, map_base = maps(s.distance, MAP_KINDS)
    chosen = variant[s.map_kind]
    map_in, map_rd, map_gated = variant["restored_vs_input"], variant["restored_vs_direct"], variant["gated"]
    # the image scores reduce the same kind of map, under the score's own distance if it has one
    # (then only that kind and the direct map are computed again)
    if s.score_distance in ("map", s.distance):
        score_map, score_base = chosen, map_base
    else:
        again, score_base = maps(s.score_distance, (s.map_kind,))
        score_map = again[s.map_kind]
    kind = score_reduction(s.score)
    map_score = image_score(score_map, kind, s.topk, pool=s.pool)
    fused = fuse(map_score, nll, held_out)
    score = nll if s.score == "nll" else fused if s.score == "fused" else map_score
    return PostprocessResult(chosen, score, map_in, map_rd, map_base,
                             image_score(score_base, kind, s.topk, pool=s.pool), map_gated, fused, map_score)


def held_out_tensor(detect, device=None, dtype=torch.float32) -> Tensor:
    """(4,) tensor of a DetectConfig's held-out statistics (:data:`lsr.config.HELD_OUT_STATS`),
    NaN where missing."""
    vals = [getattr(detect, k) for k in HELD_OUT_STATS]
    return torch.tensor([float("nan") if v is None else float(v) for v in vals], dtype=dtype, device=device)
