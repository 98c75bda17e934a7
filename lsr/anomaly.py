"""Anomaly maps and image scores, apart from the models.

All functions take and return tensors (B, ...) so that they can run on any device and
be exported; the bilateral option alone runs through scikit-image on the CPU.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


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


def distance(a: Tensor, b: Tensor, kind: str = "l2") -> Tensor:
    if kind == "l2":
        return l2_distance(a, b)
    if kind == "ssim":
        return ssim_distance(a, b)
    raise ValueError(f"distance must be 'l2' or 'ssim', got {kind!r}")


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


def image_score(maps: Tensor, kind: str = "max", topk: int = 100) -> Tensor:
    """Image score from maps (B, H, W): their max, or the mean of the top-k pixels."""
    flat = maps.flatten(1)
    if kind == "max":
        return flat.amax(dim=1)
    if kind == "topk_mean":
        return flat.topk(min(topk, flat.shape[1]), dim=1).values.mean(dim=1)
    raise ValueError(f"score must be 'max' or 'topk_mean', got {kind!r}")


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
