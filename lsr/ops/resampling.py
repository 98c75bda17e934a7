"""Latent-space resampling: the rule, the pre-drawn noise, and the loops.

A position t = (i, j) of the code grid is *flagged* when its likelihood
p_t = p(c_t | c_<t) is below tau AND at least one of its "bottom half" 8-neighbours
that exists, (i, j+1), (i+1, j-1), (i+1, j), (i+1, j+1), is below tau too; a position
with no such neighbour (the last one) is judged on its own likelihood.

Positions are visited in raster order; a flagged position gets a new code drawn from
p(. | c'_<t) with temperature T, using Gumbel noise fixed up front, so every loop gives
identical codes from the same noise:

* :func:`resample_naive` re-runs the prior before every position (H*W passes);
* :func:`resample_fast` re-runs it only after a change (1 + changes passes), which is
  exact because p_t depends on codes before t only (docs/method.md, section 3).
"""
from __future__ import annotations

import weakref
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

PriorFn = Callable[[Tensor], Tensor]   # codes (B, H, W) int64 -> logits (B, K, H, W)


class ResampleResult(NamedTuple):
    codes: Tensor          # (B, H, W) int64, the resampled grid c'
    resampled: Tensor      # (B, H, W) bool, positions whose code was redrawn
    likelihood: Tensor     # (B, H, W) p_t of the original codes (first prior pass)
    prior_passes: Tensor   # (B,) int64, prior passes that included this image
    positions_evaluated: Tensor  # (B,) int64, grid positions those passes evaluated


def flag_positions(p: Tensor, tau: float | Tensor) -> Tensor:
    """The resampling rule on a likelihood grid.

    Args:
        p (Tensor[B, H, W]): likelihood of the current code at each position.
        tau: threshold.

    Returns:
        Tensor[B, H, W] bool: positions meeting the rule.

    Example:
        >>> p = torch.tensor([[[0.0, 0.9], [0.9, 0.9]]])
        >>> flag_positions(p, 0.5)            # (0, 0) is low but no bottom-half neighbour is
        tensor([[[False, False],
                 [False, False]]])
        >>> p[0, 1, 1] = 0.0                  # the diagonal neighbour (1, 1) is now low
        >>> flag_positions(p, 0.5)            # and (1, 1), the last position, counts alone
        tensor([[[ True, False],
                 [False,  True]]])
    """
    low = p < tau                                            # (B, H, W)
    B, H, W = low.shape
    lowf = low.unsqueeze(1).to(torch.float32)                # (B, 1, H, W)
    # pad right by 1 and bottom by 1 (and left by 1 for (i+1, j-1)); missing neighbours are False
    padded = F.pad(lowf, (1, 1, 0, 1))                       # (B, 1, H+1, W+2)
    right = padded[:, :, :H, 2:]                             # (i, j+1)
    below_left = padded[:, :, 1:, :W]                        # (i+1, j-1)
    below = padded[:, :, 1:, 1:W + 1]                        # (i+1, j)
    below_right = padded[:, :, 1:, 2:]                       # (i+1, j+1)
    neighbour_low = (right + below_left + below + below_right).squeeze(1) > 0
    idx_i = torch.arange(H, device=p.device).view(H, 1)
    idx_j = torch.arange(W, device=p.device).view(1, W)
    no_neighbour = (idx_i == H - 1) & (idx_j == W - 1)       # only the last position has none
    return low & (neighbour_low | no_neighbour)


def gumbel_noise(n: int, T: int, K: int, seeds: list[int] | Tensor, device=None) -> Tensor:
    """Gumbel(0, 1) noise (n, T, K), one independent stream per chain from ``seeds[i]``,
    so a chain's draws do not depend on the batch it runs in.

    The uniforms are ``torch.rand(T, K)`` of a CPU generator seeded with ``seeds[i]``
    (float32); the transform ``-log(-log(u))`` is computed in float64 and rounded to
    float32 once, so that :func:`lsr.deploy.numpy_ops.gumbel_noise` (numpy, no torch)
    reproduces this noise bit for bit."""
    out = torch.empty(n, T, K)
    tiny = float(torch.finfo(torch.float32).tiny)
    for i in range(n):
        g = torch.Generator().manual_seed(int(seeds[i]))
        u = torch.rand(T, K, generator=g).double().clamp_(min=tiny, max=1.0 - 1e-7)
        out[i] = (-torch.log(-torch.log(u))).float()
    return out.to(device) if device is not None else out


def code_distances(z: Tensor, codebook: Tensor) -> Tensor:
    """Squared distances (B, H*W, K) from the encoder's outputs z (B, D, H, W) to every code
    of ``codebook`` (K, D): |z|^2 - 2 z.e + |e|^2 in float32, clamped at 0."""
    flat = z.float().flatten(2).transpose(1, 2)                            # (B, T, D)
    e = codebook.float()
    d = flat.pow(2).sum(-1, keepdim=True) - 2.0 * flat @ e.t() + e.pow(2).sum(-1)
    return d.clamp(min=0.0)


def posterior_scale(z: Tensor, codebook: Tensor) -> float:
    """s of the posterior draw: the mean squared distance from encoder outputs z (N, D, H, W)
    of normal images (the held-out part of train/good) to their nearest code."""
    return float(torch.cat([code_distances(z[i:i + 8], codebook).min(-1).values.flatten()
                            for i in range(0, z.shape[0], 8)]).double().mean())


def posterior_noise(noise: Tensor, z: Tensor, codebook: Tensor, strength: float, scale: float) -> Tensor:
    """The draw noise of the posterior draw (``detect.posterior``; docs/method.md section 3).

    Every loop draws argmax(logits_t / T + noise_t). With noise_t = G_t - strength * d_t / s
    (G: the Gumbel noise of :func:`gumbel_noise`, d_t (K,): squared distances from the
    encoder's output at t to each code, s: :func:`posterior_scale`) that is an exact draw from
    softmax(logits_t / T - strength * d_t / s): the prior times exp(-strength * d / s), a
    posterior given what the encoder saw at t. Which positions are redrawn (the rule on the
    prior's likelihoods) does not change. Because the term enters through the noise, the
    naive, fast and native loops give identical codes with it too.

    The noise is ``noise - d * posterior_factor(strength, scale)`` in float32.

    Args:
        noise (Tensor[N, H*W, K]): Gumbel noise of N chains, ``N`` a multiple of B (each
            image's chains together, as :func:`lsr.pipeline.detect` repeats them).
        z (Tensor[B, D, H, W]): the encoder's outputs (before quantisation).
        codebook (Tensor[K, D]).
        strength: >= 0; 0 returns ``noise`` itself (the paper's draw from the prior).
        scale: s > 0.
    """
    if strength == 0:
        return noise
    if not scale > 0:
        raise ValueError(f"the posterior draw needs a scale > 0 (detect.posterior_scale), got {scale!r}")
    d = code_distances(z, codebook).to(noise.device)
    if noise.shape[0] % d.shape[0] or noise.shape[1:] != d.shape[1:]:
        raise ValueError(f"noise {tuple(noise.shape)} does not fit distances {tuple(d.shape)}")
    d = d.repeat_interleave(noise.shape[0] // d.shape[0], dim=0)
    return noise - d * posterior_factor(strength, scale, d.device)


def posterior_factor(strength: float, scale: float, device=None) -> Tensor:
    """strength / scale, divided in float64 and rounded to float32 once: the one factor every
    port (numpy, the C++ runtime) multiplies the float32 distances by, so that the noise of
    the posterior draw is the same number everywhere."""
    return torch.tensor(float(strength) / float(scale), dtype=torch.float32, device=device)


def code_likelihood(logits: Tensor, codes: Tensor) -> Tensor:
    """p(c_t) per position from logits (B, K, H, W) and codes (B, H, W): a softmax over K
    per position (row-wise, so a position gets the same arithmetic in any batch or slice;
    the C++ loop, csrc/resample/resample.cpp code_likelihood, does the same)."""
    lp = torch.softmax(logits.float().movedim(1, -1), dim=-1)          # (B, H, W, K)
    return lp.gather(-1, codes.unsqueeze(-1)).squeeze(-1)


def _draw(logits_t: Tensor, noise_t: Tensor, temperature: float) -> Tensor:
    """Gumbel-max draw from softmax(logits / T): logits_t, noise_t (n, K) -> (n,)."""
    return (logits_t.float() / temperature + noise_t).argmax(dim=-1)


def resample_naive(prior: PriorFn, codes: Tensor, noise: Tensor, tau: float,
                   temperature: float = 1.0) -> ResampleResult:
    """Reference loop: re-run the prior before every position (H*W passes).

    Args:
        prior: codes (B, H, W) -> logits (B, K, H, W).
        codes (Tensor[B, H, W]): original codes.
        noise (Tensor[B, H*W, K]): Gumbel noise per position.
        tau: likelihood threshold.
        temperature: sampling temperature.
    """
    c = codes.clone()
    B, H, W = c.shape
    flat = c.view(B, H * W)
    resampled = torch.zeros(B, H * W, dtype=torch.bool, device=c.device)
    first = None
    for t in range(H * W):
        logits = prior(c)                                             # (B, K, H, W)
        p = code_likelihood(logits, c)
        if first is None:
            first = p
        flag = flag_positions(p, tau).view(B, H * W)[:, t]             # (B,)
        if flag.any():
            lt = logits.flatten(2)[:, :, t]                            # (B, K)
            new = _draw(lt, noise[:, t].to(lt.device), temperature)
            flat[:, t] = torch.where(flag, new, flat[:, t])
            resampled[:, t] |= flag
    assert first is not None
    passes = torch.full((B,), H * W, dtype=torch.long)
    return ResampleResult(c, resampled.view(B, H, W), first, passes, passes * (H * W))


def resample_fast(prior: PriorFn, codes: Tensor, noise: Tensor, tau: float,
                  temperature: float = 1.0) -> ResampleResult:
    """Exact fast loop (docs/method.md, section 3): 1 + (number of changed codes) prior passes per image.

    One pass gives exact likelihoods for every position after the last change, so each
    image keeps a pointer; each pass finds, per active image, the first flagged position
    at or after its pointer, redraws that code, and moves the pointer past it. Only
    images that changed are passed through the prior again.
    """
    c = codes.clone()
    B, H, W = c.shape
    T = H * W
    flat = c.view(B, T)
    resampled = torch.zeros(B, T, dtype=torch.bool, device=c.device)
    passes = torch.ones(B, dtype=torch.long)
    pointer = torch.zeros(B, dtype=torch.long, device=c.device)
    positions = torch.arange(T, device=c.device)
    active = torch.arange(B, device=c.device)
    logits = prior(c)                                                  # (B, K, H, W)
    first = code_likelihood(logits, c)
    p = first
    while active.numel() > 0:
        flag = flag_positions(p, tau).view(-1, T)                      # (A, T)
        cand = flag & (positions.unsqueeze(0) >= pointer[active].unsqueeze(1))
        has = cand.any(dim=1)
        if not bool(has.any()):
            break
        t = cand.to(torch.int8).argmax(dim=1)                          # first flagged position
        sel = has.nonzero().squeeze(1)                                 # rows of the active batch
        rows, ts = active[sel], t[sel]
        lt = logits.flatten(2)[sel, :, ts]                             # (n, K)
        flat[rows, ts] = _draw(lt, noise[rows.cpu(), ts.cpu()].to(lt.device), temperature)
        resampled[rows, ts] = True
        pointer[rows] = ts + 1
        active = rows                                                  # finished images drop out
        passes[active.cpu()] += 1
        logits = prior(c[active])
        p = code_likelihood(logits, c[active])
    return ResampleResult(c, resampled.view(B, H, W), first, passes, passes * T)


def resample_native(prior, codes: Tensor, noise: Tensor, tau: float,
                    temperature: float = 1.0) -> ResampleResult:
    """The exact fast loop run by C++ (``csrc/resample``) with incremental prior passes:
    after a change in row i, only rows i..H-1 of the images that changed are evaluated,
    from cached convolution rows and attention keys/values (:mod:`lsr.models.incremental`).
    Same codes as :func:`resample_fast` and :func:`resample_naive` (up to float32 rounding,
    see README "Exactness").

    Args:
        prior: a :class:`lsr.models.PixelSNAIL` (scripted once and cached), or an already
            scripted :class:`lsr.models.incremental.IncrementalPrior`.
    """
    from . import native_available
    if not native_available():
        raise RuntimeError("--resampler native needs the lsr._C extension; build it with "
                           "`pip install --no-build-isolation .` (see README), or use --resampler fast")
    from lsr import _C
    scripted = _scripted(prior)
    c, resampled, first, passes, evaluated = _C.resample_incremental(
        scripted, codes.long(), noise, float(tau), float(temperature))
    return ResampleResult(c, resampled, first, passes, evaluated)


_SCRIPTED: "weakref.WeakKeyDictionary[object, tuple]" = weakref.WeakKeyDictionary()


#: prior class -> function scripting it for the C++ loop; lsr.models registers PixelSNAIL
#: (the loops sit below the models in the layers, so they learn about them this way)
_SCRIPTERS: dict[type, Callable] = {}


def register_scriptable(cls: type, script_fn: Callable) -> None:
    """Let ``--resampler native`` run priors of class ``cls``: ``script_fn(prior,
    native=True)`` returns a scripted incremental prior (``partial`` method)."""
    _SCRIPTERS[cls] = script_fn


def scripter(prior) -> Callable | None:
    """The registered scripting function for ``prior``, or None."""
    for cls, fn in _SCRIPTERS.items():
        if isinstance(prior, cls):
            return fn
    return None


def _scripted(prior):
    """The TorchScript incremental prior of ``prior`` (cached per prior, device and dtype)."""
    if isinstance(prior, torch.jit.ScriptModule):
        if not hasattr(prior, "partial"):
            raise TypeError("--resampler native: the scripted prior has no `partial` method; script it with "
                            "lsr.models.incremental.script_prior")
        return prior
    script = scripter(prior)
    if script is None:
        raise TypeError(f"--resampler native needs a PixelSNAIL prior (it is scripted for the C++ loop), "
                        f"got {type(prior).__name__}")
    key = tuple((p.device, p.dtype, p.data_ptr()) for p in prior.parameters())
    hit = _SCRIPTED.get(prior)
    if hit is None or hit[0] != key:
        hit = (key, script(prior, native=True))
        _SCRIPTED[prior] = hit
    return hit[1]
