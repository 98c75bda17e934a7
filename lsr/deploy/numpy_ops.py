"""The resampling loop and its pieces in numpy, for running a bundle without torch.

Each function mirrors a torch one and is tested against it:

* :func:`chain_seed`      == :func:`lsr.detect.chain_seed`
* :func:`gumbel_noise`    == :func:`lsr.ops.gumbel_noise` (bit for bit: the uniforms are
  torch's CPU Mersenne Twister stream, the transform is done in float64 by both)
* :func:`flag_positions`  == :func:`lsr.ops.flag_positions`
* :func:`resample_fast`   == :func:`lsr.ops.resample_fast` (same codes from the same noise)
* :func:`resample_incremental` == :func:`lsr.ops.resample_native` (the lazy loop of
  csrc/resample over a row-range prior graph: the codes of the fast loop)
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

from ..contract import call_overhead, chain_seed  # noqa: F401 (chain_seed re-exported)

#: prior(codes (A, H, W) int64) -> (logits (A, K, H, W) float32, likelihood (A, H, W) float32)
PriorFn = Callable[[np.ndarray], "tuple[np.ndarray, np.ndarray]"]
#: rows(codes (A, ctx + n, W), row_ids (ctx + n,), state [per entry]) -> (logits (A, K, n, W),
#: likelihood (A, n, W), new state rows [per entry]): see lsr.deploy.graphs.PriorRowsGraph
RowsFn = Callable[[np.ndarray, np.ndarray, "list[np.ndarray]"],
                  "tuple[np.ndarray, np.ndarray, list[np.ndarray]]"]

_TINY = float(np.finfo(np.float32).tiny)
_U_MAX = 1.0 - 1e-7
_MASK24 = np.uint64((1 << 24) - 1)


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


def posterior_factor(strength: float, scale: float) -> np.float32:
    """:func:`lsr.ops.resampling.posterior_factor`: strength / scale in float64, rounded to float32."""
    return np.float32(float(strength) / float(scale))


class PosteriorNoise:
    """The noise of the posterior draw (:func:`lsr.ops.posterior_noise`), lazily: a chain's
    Gumbel noise (a :class:`LazyNoise` or an array (N, T, K)) minus ``factor`` times the
    squared distances (B, T, K) of its image (chains ``r`` of image ``r // n``), float32.
    Values equal the torch function's."""

    def __init__(self, noise: "np.ndarray | LazyNoise", distances: np.ndarray, factor: np.float32, n: int):
        self.noise, self.d, self.factor, self.n = noise, np.asarray(distances, dtype=np.float32), factor, int(n)

    def __len__(self) -> int:
        return len(self.noise)

    def at(self, rows: np.ndarray, ts: np.ndarray) -> np.ndarray:
        rows, ts = np.asarray(rows), np.asarray(ts)
        return _noise_at(self.noise, rows, ts) - self.d[rows // self.n, ts] * self.factor

    def full(self) -> np.ndarray:
        """All of it, (N, T, K) float32 (for loops that take the whole array)."""
        g = self.noise if isinstance(self.noise, np.ndarray) else None
        if g is None:
            raise TypeError("full() needs the array form of the Gumbel noise")
        return g - np.repeat(self.d, self.n, axis=0) * self.factor


class ResampleResult(NamedTuple):
    """As :class:`lsr.ops.ResampleResult`, in numpy."""
    codes: np.ndarray          # (B, H, W) int64, the resampled grid c'
    resampled: np.ndarray      # (B, H, W) bool, positions whose code was redrawn
    likelihood: np.ndarray     # (B, H, W) p_t of the original codes (first prior pass)
    prior_passes: np.ndarray   # (B,) int64: prior calls (whole passes, or row ranges)
    positions_evaluated: "np.ndarray | None" = None   # (B,) int64 over all calls (None: passes x H*W)


def flag_positions(p: np.ndarray, tau: float) -> np.ndarray:
    """The resampling rule (docs/method.md, section 3) on likelihoods p (B, H, W) -> bool (B, H, W):
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
    if isinstance(noise, (LazyNoise, PosteriorNoise)):
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


def split_groups(r0: Sequence[int], r1: Sequence[int], H: int, overhead: float | None = None) -> list[list[int]]:
    """Groups of row requests [r0[i], r1[i]) for one step, each served by one call over
    rows [its smallest r0, its largest r1): the cost model of csrc/resample's split_groups
    (a call costs ``overhead`` image-rows, default 15% of a full pass, plus images x rows),
    optimal over contiguous groups of the requests sorted by r0."""
    n = len(r0)
    order = sorted(range(n), key=lambda i: r0[i])
    over = call_overhead(H) if overhead is None else float(overhead)
    best = [0.0] + [float("inf")] * n
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        hi = 0
        for i in range(j, 0, -1):
            hi = max(hi, r1[order[i - 1]])
            cost = best[i - 1] + over + (j - i + 1) * (hi - r0[order[i - 1]])
            if cost < best[j]:
                best[j], cut[j] = cost, i - 1
    groups = []
    j = n
    while j > 0:
        groups.append(order[cut[j]:j])
        j = cut[j]
    return groups


def resample_incremental(prior: PriorFn, rows: RowsFn, geometry: Sequence[dict], context_rows: int,
                         codes: np.ndarray, noise: "np.ndarray | LazyNoise", tau: float,
                         temperature: float = 1.0) -> ResampleResult:
    """Exact fast loop with lazy, incremental prior passes: the numpy twin of the C++ loop
    of ``--resampler native`` (csrc/resample/resample.cpp), over an exported row-range
    prior (:class:`lsr.deploy.graphs.PriorRowsGraph`).

    The first pass is ``prior`` (no state kept). A position is decided once its row and
    the row below are evaluated (the neighbour rule); after a change at t the image's
    rows from row(t) on are stale, and ``rows`` evaluates [row(t), row(t) + 3), then
    chunks of doubling size while nothing is flagged, from the state of the rows above
    (kept here per image: each causal convolution's padded input and each attention
    layer's keys and values). Same decisions in the same order as :func:`resample_fast`:
    the same codes (up to float rounding of logits computed on other shapes).

    Args:
        prior: full pass, as for :func:`resample_fast`.
        rows: the row-range pass (see :data:`RowsFn`).
        geometry: the state entries, ``bundle.json`` graphs.prior_rows.state.
        context_rows: rows above r0 the graph reads codes of (graphs.prior_rows.context_rows).
        codes, noise, tau, temperature: as :func:`resample_fast`.
    """
    rows_after_change = 3
    c = np.array(codes, dtype=np.int64, copy=True)
    B, H, W = c.shape
    T = H * W
    flat = c.reshape(B, T)
    resampled = np.zeros((B, T), dtype=bool)
    logits, p = prior(c)
    first = p
    K = logits.shape[1]
    L = np.array(logits).reshape(B, K, T)                             # rows updated in place
    P = np.array(p).reshape(B, T)
    passes = np.ones(B, dtype=np.int64)
    evaluated = np.full(B, T, dtype=np.int64)
    pointer = np.zeros(B, dtype=np.int64)
    valid = np.full(B, H, dtype=np.int64)                             # rows [0, valid) exact
    chunk = np.full(B, rows_after_change, dtype=np.int64)
    state: list[np.ndarray] | None = None
    positions = np.arange(T)
    active = np.arange(B)
    while active.size > 0:
        lo = pointer[active]
        hi = np.where(valid[active] == H, T, (valid[active] - 1) * W)  # decidable positions end
        flag = flag_positions(P[active].reshape(-1, H, W), tau).reshape(-1, T)
        cand = flag & (positions[None, :] >= lo[:, None]) & (positions[None, :] < hi[:, None])
        has = cand.any(axis=1)
        first_t = cand.argmax(axis=1)
        changed, ts, req_b, req_r0, req_r1 = [], [], [], [], []
        for a, b in enumerate(active.tolist()):
            if has[a]:                           # a decision: redraw c[t]; rows from row(t) on are stale
                t = int(first_t[a])
                changed.append(b)
                ts.append(t)
                pointer[b] = t + 1
                valid[b] = t // W
                chunk[b] = rows_after_change
            elif valid[b] == H:
                continue                         # finished
            else:
                pointer[b] = max(pointer[b], hi[a])
            req_b.append(b)
            req_r0.append(int(valid[b]) if passes[b] > 1 else 0)      # cache rows filled by an earlier call
            req_r1.append(int(min(H, valid[b] + chunk[b])))
            chunk[b] *= 2
        if changed:
            rb, tb = np.array(changed), np.array(ts)
            flat[rb, tb] = draw(L[rb, :, tb], _noise_at(noise, rb, tb), temperature)
            resampled[rb, tb] = True
        active = np.array(sorted(req_b), dtype=np.int64)
        if req_b and state is None:
            state = new_state(geometry, B, H, W, L.dtype)
        for group in split_groups(req_r0, req_r1, H):
            imgs = np.array(sorted(req_b[i] for i in group), dtype=np.int64)
            r0, r1 = min(req_r0[i] for i in group), max(req_r1[i] for i in group)
            n = r1 - r0
            ids = np.arange(r0 - context_rows, r1, dtype=np.int64)
            sub_codes = c[imgs][:, np.clip(ids, 0, None)]
            assert state is not None
            lg, lk, new = rows(sub_codes, ids, state_above(state, geometry, imgs, r0, W))
            L[imgs, :, r0 * W:r1 * W] = np.asarray(lg).reshape(len(imgs), K, n * W)
            P[imgs, r0 * W:r1 * W] = np.asarray(lk).reshape(len(imgs), n * W)
            store_rows(state, geometry, imgs, r0, r1, W, new)
            passes[imgs] += 1
            evaluated[imgs] += n * W
            valid[imgs] = r1
    return ResampleResult(c, resampled.reshape(B, H, W), first, passes, evaluated)


def state_above(state: Sequence[np.ndarray], geometry: Sequence[dict], imgs, r0: int, W: int) -> list[np.ndarray]:
    """The ``prior_rows`` state inputs for rows from r0 of images ``imgs`` (an index
    array or a slice): each conv's padded input rows above r0, each attention layer's keys
    or values of positions [0, r0 * W)."""
    return [s[imgs, :, r0:r0 + g["rows"]] if g["kind"] == "conv" else s[imgs, :, :r0 * W]
            for s, g in zip(state, geometry)]


def store_rows(state: Sequence[np.ndarray], geometry: Sequence[dict], imgs, r0: int, r1: int, W: int,
               new: Sequence[np.ndarray]) -> None:
    """Write the ``state_out_i`` rows [r0, r1) of images ``imgs`` into the state buffers."""
    for s, g, v in zip(state, geometry, new):
        if g["kind"] == "conv":
            s[imgs, :, g["rows"] + r0:g["rows"] + r1, g["left"]:g["left"] + W] = v
        else:
            s[imgs, :, r0 * W:r1 * W] = v


def new_state(geometry: Sequence[dict], B: int, H: int, W: int, dtype=np.float32) -> list[np.ndarray]:
    """Zeroed state buffers: a conv input (B, C, rows + H, left + W + right) with its zero
    padding; attention keys or values (B, heads, H * W, d)."""
    out = []
    for g in geometry:
        if g["kind"] == "conv":
            out.append(np.zeros((B, g["channels"], g["rows"] + H, g["left"] + W + g["right"]), dtype))
        elif g["kind"] == "attention":
            out.append(np.zeros((B, g["heads"], H * W, g["head_dim"]), dtype))
        else:
            raise ValueError(f"unknown state entry kind {g.get('kind')!r}")
    return out


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


__all__ = ["chain_seed", "uniform", "gumbel_from_uniform", "gumbel_noise", "LazyNoise", "PosteriorNoise",
           "posterior_factor", "ResampleResult",
           "resample_incremental", "split_groups", "state_above", "store_rows", "new_state",
           "flag_positions", "draw", "likelihood", "resample_fast", "nll_score",
           "resize_maps"]
