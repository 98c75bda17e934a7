"""Incremental evaluation of a trained PixelSNAIL prior: passes that recompute only the
rows from the first changed code onward.

The logits at raster position t depend on the codes before t only, and every layer of
:class:`lsr.models.PixelSNAIL` keeps that order (causal convolutions, strictly causal
attention, pointwise layers). So after the code at (i, j) changes, every activation at a
row < i is unchanged. :class:`IncrementalPrior` keeps, per image, what later rows need
from earlier ones: the inputs of every causal convolution (its kernel reaches kh - 1 rows
up) and each attention layer's keys and values. A pass from row r0 then evaluates rows
r0..H-1 only, reading the cached rows above; the first pass is the same code with r0 = 0.

The layers' arithmetic is not here: it is :class:`lsr.models.PixelSNAIL`'s own ``rows``
core, run in its CACHE mode (the padded buffers below are the cache); this module only
builds each pass's input rows and the cache, and puts the native attention-rows op in.

Exactness: each row goes through the same arithmetic as in a full pass (the convolutions
on a row slice and ``lsr::causal_attention_rows`` are bit-identical to the full ops; see
tests/test_native_resample.py), so the native resampling loop built on it gives the codes
of the ``naive`` and ``fast`` loops.

The module is TorchScript: the C++ resampling loop (``csrc/resample``) and the C++
runtime of an exported bundle call its ``full`` and ``partial`` methods without Python.

Example:
    >>> import torch
    >>> from lsr.config import PriorConfig
    >>> from lsr.models import PixelSNAIL
    >>> prior = PixelSNAIL(PriorConfig(codebook_size=8, grid_size=4, channels=8, n_heads=2)).eval()
    >>> inc = IncrementalPrior(prior, native=False)
    >>> codes = torch.randint(0, 8, (2, 4, 4))
    >>> logits, cache = inc.full(codes)
    >>> codes[0, 2, 1] = 3                               # change one code in row 2 of image 0
    >>> rows = inc.partial(codes[:1], torch.tensor([0]), 2, cache)   # rows 2..3 of image 0
    >>> torch.allclose(rows, prior(codes)[:1, :, 2:], atol=1e-5)
    True
"""
from __future__ import annotations

import copy
import warnings
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .pixelsnail import CausalAttention, PixelSNAIL, ReferenceRows, background_grid


class _NativeRows(nn.Module):
    """Attention rows by the native op (the CPU or CUDA kernel of the full op; a composite
    ATen kernel on other devices)."""

    def forward(self, q: Tensor, k: Tensor, v: Tensor, q0: int) -> Tensor:
        if q0 == 0:   # the first pass: the very kernel PixelSNAIL.forward uses
            return torch.ops.lsr.causal_attention_fwd(q, k, v)[0]
        return torch.ops.lsr.causal_attention_rows(q, k, v, q0)


def shared_copy(prior: PixelSNAIL) -> PixelSNAIL:
    """A copy of ``prior``'s modules that shares its parameters and buffers (a wrapper
    can set its own attention-rows op and mode without touching the caller's prior)."""
    memo = {id(t): t for t in [*prior.parameters(), *prior.buffers()]}
    return copy.deepcopy(prior, memo)


class IncrementalPrior(nn.Module):
    """A trained :class:`PixelSNAIL` evaluated incrementally (shares its weights).

    ``full(codes (B, H, W)) -> (logits (B, K, H, W), cache)`` evaluates every row and
    returns the cache; ``partial(codes (A, r1, W), rows (A,), r0, cache) -> logits
    (A, K, r1 - r0, W)`` evaluates rows r0..r1-1 of images ``rows`` of that cache, given
    their codes of rows 0..r1-1 (equal to the cached ones above row r0; ``rows`` distinct
    and ascending), and updates the cache in place for those rows. Rows from r1 on keep
    whatever they held: a later call must evaluate them before they are used.
    ``forward(codes)`` is the plain full pass (no cache); ``new_cache(codes)`` an empty
    cache that partial calls from row 0 fill image by image. Inference only (dropout is
    off).

    Args:
        prior: the trained prior (its own mode is left as it is; this wrapper is in eval).
        native: use the native attention op (needs ``lsr._C``); else pure PyTorch.
    """

    def __init__(self, prior: PixelSNAIL, native: bool = True):
        super().__init__()
        if native:
            from .. import ops
            if not ops.native_available():
                raise RuntimeError("IncrementalPrior(native=True) needs the lsr._C extension; "
                                   "build it with `pip install --no-build-isolation .` (see README)")
        core = shared_copy(prior)
        for m in core.modules():
            if isinstance(m, CausalAttention):
                m.rows_op = _NativeRows() if native else ReferenceRows()
        self.prior = core
        self.channels = prior.cfg.channels
        self.codebook_size = prior.cfg.codebook_size
        self.n_heads = prior.cfg.n_heads
        self.context_rows = core.context_rows
        self.n_cache = len(core.state_layout)
        # the geometry of each cache entry (PixelSNAIL.state_layout): attention keys/values
        # (B, nh, T, d) are [-1, 0, 0]; conv inputs (B, C, ctx + H, left + W + right) carry
        # [ctx, left, right]
        self.cache_geometry = [list(g) for g in core.state_layout] or [[-1, 0, 0]]  # never empty (TorchScript)
        self.eval()

    def train(self, mode: bool = True) -> "IncrementalPrior":
        if mode:
            raise RuntimeError("IncrementalPrior is for inference only; train the PixelSNAIL itself")
        return super().train(False)

    @torch.jit.export
    def new_cache(self, codes: Tensor) -> List[Tensor]:
        B, H, W = codes.shape[0], codes.shape[1], codes.shape[2]
        c = self.channels
        d = c // self.n_heads
        w = self.prior.embed.weight
        cache: List[Tensor] = []
        for i in range(self.n_cache):
            g = self.cache_geometry[i]
            if g[0] < 0:
                cache.append(torch.zeros(B, self.n_heads, H * W, d, dtype=w.dtype, device=w.device))
            else:   # zero padding included (a pass over every image replaces it, see pixelsnail._extend)
                cache.append(torch.zeros(B, c, g[0] + H, g[1] + W + g[2], dtype=w.dtype, device=w.device))
        # last: an empty (B, H, 0) marker carrying the batch and the grid height, so that a
        # prior without cached layers still knows H when given codes only up to row r1
        cache.append(torch.empty(B, H, 0, dtype=w.dtype, device=w.device))
        return cache

    def _grid_height(self, codes: Tensor, cache: List[Tensor]) -> int:
        """The full grid height H (codes may stop at row r1 < H)."""
        if len(cache) == 0:              # the no-cache pass: codes are the whole grid
            return codes.shape[1]
        return cache[-1].shape[1]         # the marker entry (B, H, 0) that new_cache appends

    @torch.jit.export
    def partial(self, codes: Tensor, rows: Tensor, r0: int, cache: List[Tensor]) -> Tensor:
        A, Hc, W = codes.shape[0], codes.shape[1], codes.shape[2]
        H = self._grid_height(codes, cache)
        p = self.prior
        # rows are distinct and ascending (the contract), so A == B means every image of the
        # cache in order: conv inputs are then read in place (views), with no device sync
        whole = A == cache[-1].shape[0] if len(cache) > 0 else False
        if r0 == 0:
            emb = p.embed(codes).permute(0, 3, 1, 2)                        # rows [0, Hc)
            bg = background_grid(A, H, W, emb)[:, :, :Hc]
            v, h = p.stacks_in(torch.cat([emb, bg], 1), True, None)
        else:   # the input layers read context_rows rows above r0 (zero above the grid)
            lo = max(0, r0 - self.context_rows)
            emb_all = p.embed(codes[:, lo:]).permute(0, 3, 1, 2)            # rows [lo, Hc)
            bg_all = background_grid(A, H, W, emb_all)[:, :, lo:Hc]
            x = torch.cat([emb_all, bg_all], 1)
            top = lo - (r0 - self.context_rows)
            if top > 0:
                x = F.pad(x, (0, 0, top, 0))
            v, h = p.stacks_in(x, False, None)
            emb, bg = emb_all[:, :, r0 - lo:], bg_all[:, :, r0 - lo:]
        outs: List[Tensor] = []
        return p.rows(v, h, emb, bg, rows, r0, whole, 1 if len(cache) > 0 else 0, cache, outs)   # CACHE, or FULL

    @torch.jit.export
    def full(self, codes: Tensor) -> Tuple[Tensor, List[Tensor]]:
        cache = self.new_cache(codes)
        rows = torch.arange(codes.shape[0], device=codes.device)
        return self.partial(codes, rows, 0, cache), cache

    def forward(self, codes: Tensor) -> Tensor:
        """The plain full pass, keeping no cache (as cheap as PixelSNAIL.forward)."""
        empty: List[Tensor] = []
        return self.partial(codes, torch.arange(codes.shape[0], device=codes.device), 0, empty)


def script_prior(prior: PixelSNAIL, native: Optional[bool] = None) -> torch.jit.ScriptModule:
    """TorchScript of :class:`IncrementalPrior` for ``prior``: what the C++ resampling loop
    and the C++ runtime call. ``native`` defaults to whether ``lsr._C`` is built (the
    scripted module then needs the lsr ops loaded to run: ``import lsr.ops`` in Python,
    the op library in C++)."""
    from .. import ops
    if native is None:
        native = ops.native_available()
    elif native and not ops.native_available():
        raise RuntimeError("script_prior(native=True) needs the lsr._C extension")
    with warnings.catch_warnings():   # TorchScript is what LibTorch loads; its deprecation is noted
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.script(IncrementalPrior(prior, native=native))
