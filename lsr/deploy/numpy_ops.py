"""The resampling loop and its pieces in numpy, for running a bundle without torch.

Each function mirrors a torch one and is tested against it:

* :func:`chain_seed`      == :func:`lsr.detect.chain_seed`
* :func:`gumbel_noise`    == :func:`lsr.ops.gumbel_noise` (bit for bit: the uniforms are
  torch's CPU Mersenne Twister stream, the transform is done in float64 by both)
* :func:`flag_positions`  == :func:`lsr.ops.flag_positions`
* :func:`resample_fast`   == :func:`lsr.ops.resample_fast` (same codes from the same noise)
* :func:`resample_naive`  == :func:`lsr.ops.resample_naive`
* :func:`nll_score`       == :func:`lsr.anomaly.nll_score`
* :func:`resize_maps`     == :func:`lsr.anomaly.resize_maps` (bilinear, half-pixel centres)

Example:
    >>> p = np.array([[[0.0, 0.9], [0.9, 0.0]]], dtype=np.float32)
    >>> flag_positions(p, 0.5)
    array([[[ True, False],
            [False,  True]]])
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import numpy as np

#: prior(codes (A, H, W) int64) -> (logits (A, K, H, W) float32, likelihood (A, H, W) float32)
PriorFn = Callable[[np.ndarray], "tuple[np.ndarray, np.ndarray]"]

_TINY = float(np.finfo(np.float32).tiny)
_U_MAX = 1.0 - 1e-7
_MASK24 = np.uint64((1 << 24) - 1)


def chain_seed(seed: int, image_id: int, restoration: int) -> int:
    """Noise seed of one resampling chain (the formula of :func:`lsr.detect.chain_seed`)."""
    return ((seed * 1_000_003 + image_id) * 1_009 + restoration) % (2 ** 63 - 1)


def uniform(seed: int, n: int) -> np.ndarray:
    """The first ``n`` float32 values of ``torch.rand`` from a CPU generator seeded with
    ``seed`` (``torch.Generator().manual_seed(seed)``), without torch.

    torch seeds a 32-bit Mersenne Twister with the low 32 bits of the seed (the legacy
    ``init_genrand``) and makes a float32 in [0, 1) from the low 24 bits of each 32-bit
    draw times 2**-24."""
    bg = np.random.MT19937()
    bg._legacy_seeding(int(seed) & 0xFFFFFFFF)
    raw = bg.random_raw(int(n))
    return (raw & _MASK24).astype(np.float32) * np.float32(2.0 ** -24)


def gumbel_from_uniform(u: np.ndarray) -> np.ndarray:
    """-log(-log(u)) in float64 after the clamp of :func:`lsr.ops.gumbel_noise`, as float32."""
    u64 = np.clip(np.ascontiguousarray(u, dtype=np.float64), _TINY, _U_MAX)
    return (-np.log(-np.log(u64))).astype(np.float32)


def gumbel_noise(n: int, T: int, K: int, seeds: Sequence[int]) -> np.ndarray:
    """Gumbel(0, 1) noise (n, T, K) equal to ``lsr.ops.gumbel_noise(n, T, K, seeds)``."""
    out = np.empty((n, T, K), dtype=np.float32)
    for i in range(n):
        out[i] = gumbel_from_uniform(uniform(int(seeds[i]), T * K)).reshape(T, K)
    return out


class LazyNoise:
    """The noise of :func:`gumbel_noise`, made only where a draw needs it.

    A chain's uniforms are generated on its first draw (the stream is sequential), the
    Gumbel transform only for the positions drawn. Values equal :func:`gumbel_noise`'s.
    """

    def __init__(self, seeds: Sequence[int], T: int, K: int):
        self.seeds = [int(s) for s in seeds]
        self.T, self.K = T, K
        self._u: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.seeds)

    def at(self, rows: np.ndarray, ts: np.ndarray) -> np.ndarray:
        """Noise of chains ``rows`` at positions ``ts``: (n, K) float32."""
        out = np.empty((len(rows), self.K), dtype=np.float32)
        for i, (r, t) in enumerate(zip(rows.tolist(), ts.tolist())):
            u = self._u.get(r)
            if u is None:
                u = self._u[r] = uniform(self.seeds[r], self.T * self.K).reshape(self.T, self.K)
            out[i] = gumbel_from_uniform(u[t])
        return out


class ResampleResult(NamedTuple):
    """As :class:`lsr.ops.ResampleResult`, in numpy."""
    codes: np.ndarray          # (B, H, W) int64, the resampled grid c'
    resampled: np.ndarray      # (B, H, W) bool, positions whose code was redrawn
    likelihood: np.ndarray     # (B, H, W) p_t of the original codes (first prior pass)
    prior_passes: np.ndarray   # (B,) int64


def flag_positions(p: np.ndarray, tau: float) -> np.ndarray:
    """The resampling rule (METHOD.md section 3) on likelihoods p (B, H, W) -> bool (B, H, W):
    p_t < tau and at least one existing bottom-half neighbour, (i, j+1), (i+1, j-1),
    (i+1, j), (i+1, j+1), below tau too; the last position is judged on its own."""
    low = p < np.float32(tau)
    B, H, W = low.shape
    nb = np.zeros_like(low)
    nb[:, :, :-1] |= low[:, :, 1:]           # (i, j+1)
    nb[:, :-1, 1:] |= low[:, 1:, :-1]        # (i+1, j-1)
    nb[:, :-1, :] |= low[:, 1:, :]           # (i+1, j)
    nb[:, :-1, :-1] |= low[:, 1:, 1:]        # (i+1, j+1)
    nb[:, H - 1, W - 1] = True               # the last position has no neighbour
    return low & nb


def draw(logits_t: np.ndarray, noise_t: np.ndarray, temperature: float) -> np.ndarray:
    """Gumbel-max draw from softmax(logits / T): logits_t, noise_t (n, K) -> (n,) int64."""
    return (logits_t.astype(np.float32) / np.float32(temperature) + noise_t).argmax(axis=-1)


def likelihood(logits: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """p(c_t) per position from logits (B, K, H, W) and codes (B, H, W), float32."""
    z = logits.astype(np.float32)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    p = e / e.sum(axis=1, keepdims=True)
    return np.take_along_axis(p, codes[:, None].astype(np.int64), axis=1)[:, 0]


def _noise_at(noise, rows: np.ndarray, ts: np.ndarray) -> np.ndarray:
    if isinstance(noise, LazyNoise):
        return noise.at(rows, ts)
    return np.asarray(noise)[rows, ts]


def resample_fast(prior: PriorFn, codes: np.ndarray, noise: "np.ndarray | LazyNoise", tau: float,
                  temperature: float = 1.0) -> ResampleResult:
    """Exact fast loop: 1 + (number of changed codes) prior passes per image.

    The numpy twin of :func:`lsr.ops.resample_fast`: one pass gives exact likelihoods
    for every position after the last change, so each image keeps a pointer; each pass
    redraws, per active image, the first flagged position at or after its pointer, and
    only images that changed go through the prior again.

    Args:
        prior: codes (A, H, W) int64 -> (logits (A, K, H, W), likelihood (A, H, W)).
        codes: (B, H, W) original codes.
        noise: (B, H*W, K) Gumbel noise, or a :class:`LazyNoise`.
        tau: likelihood threshold.
        temperature: sampling temperature.
    """
    c = np.array(codes, dtype=np.int64, copy=True)
    B, H, W = c.shape
    T = H * W
    flat = c.reshape(B, T)
    resampled = np.zeros((B, T), dtype=bool)
    passes = np.ones(B, dtype=np.int64)
    pointer = np.zeros(B, dtype=np.int64)
    positions = np.arange(T)
    active = np.arange(B)
    logits, p = prior(c)
    first = p
    while active.size > 0:
        flag = flag_positions(p, tau).reshape(-1, T)                      # (A, T)
        cand = flag & (positions[None, :] >= pointer[active][:, None])
        has = cand.any(axis=1)
        if not has.any():
            break
        t = cand.argmax(axis=1)                                           # first flagged position
        sel = np.flatnonzero(has)
        rows, ts = active[sel], t[sel]
        lt = logits.reshape(logits.shape[0], logits.shape[1], T)[sel, :, ts]   # (n, K)
        flat[rows, ts] = draw(lt, _noise_at(noise, rows, ts), temperature)
        resampled[rows, ts] = True
        pointer[rows] = ts + 1
        active = rows
        passes[active] += 1
        logits, p = prior(c[active])
    return ResampleResult(c, resampled.reshape(B, H, W), first, passes)


def resample_naive(prior: PriorFn, codes: np.ndarray, noise: "np.ndarray | LazyNoise", tau: float,
                   temperature: float = 1.0) -> ResampleResult:
    """Reference loop: the prior re-run before every position (H*W passes), as
    :func:`lsr.ops.resample_naive`."""
    c = np.array(codes, dtype=np.int64, copy=True)
    B, H, W = c.shape
    T = H * W
    flat = c.reshape(B, T)
    resampled = np.zeros((B, T), dtype=bool)
    first = None
    rows_all = np.arange(B)
    for t in range(T):
        logits, p = prior(c)
        if first is None:
            first = p
        flag = flag_positions(p, tau).reshape(B, T)[:, t]
        if flag.any():
            rows = rows_all[flag]
            ts = np.full(rows.shape, t)
            lt = logits.reshape(B, logits.shape[1], T)[rows, :, t]
            flat[rows, t] = draw(lt, _noise_at(noise, rows, ts), temperature)
            resampled[rows, t] = True
    assert first is not None
    return ResampleResult(c, resampled.reshape(B, H, W), first, np.full(B, T, dtype=np.int64))


def nll_score(likelihood_: np.ndarray, tau: float) -> np.ndarray:
    """Sum of -log p_t over codes with p_t < tau: (B, H, W) -> (B,) float32."""
    p = likelihood_.astype(np.float32)
    nll = -np.log(np.maximum(p, np.float32(1e-30)))
    return np.where(p < np.float32(tau), nll, np.float32(0)).reshape(p.shape[0], -1).sum(axis=1,
                                                                                         dtype=np.float32)


def _linear_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    scale = np.float32(n_in) / np.float32(n_out)
    src = np.maximum(scale * (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5),
                     np.float32(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = (src - i0).astype(np.float32)
    return i0, i1, lam


def resize_maps(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of maps (B, H, W) to ``size`` (H', W') with half-pixel centres and
    no antialiasing, as ``torch.nn.functional.interpolate(mode="bilinear",
    align_corners=False)`` (:func:`lsr.anomaly.resize_maps`)."""
    H, W = maps.shape[-2:]
    if (H, W) == tuple(size):
        return maps
    h0, h1, lh = _linear_weights(H, int(size[0]))
    w0, w1, lw = _linear_weights(W, int(size[1]))
    m = maps.astype(np.float32)
    rows = m[:, h0] * (1 - lh)[None, :, None] + m[:, h1] * lh[None, :, None]
    return (rows[:, :, w0] * (1 - lw) + rows[:, :, w1] * lw).astype(np.float32)


__all__ = ["chain_seed", "uniform", "gumbel_from_uniform", "gumbel_noise", "LazyNoise", "ResampleResult",
           "flag_positions", "draw", "likelihood", "resample_fast", "resample_naive", "nll_score",
           "resize_maps"]
