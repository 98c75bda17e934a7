"""Incremental evaluation of a trained PixelSNAIL prior: passes that recompute only the
rows from the first changed code onward.

The logits at raster position t depend on the codes before t only, and every layer of
:class:`lsr.models.PixelSNAIL` keeps that order (causal convolutions, strictly causal
attention, pointwise layers). So after the code at (i, j) changes, every activation at a
row < i is unchanged. :class:`IncrementalPrior` keeps, per image, what later rows need
from earlier ones: the inputs of every causal convolution (its kernel reaches kh - 1 rows
up) and each attention layer's keys and values. A pass from row r0 then evaluates rows
r0..H-1 only, reading the cached rows above; the first pass is the same code with r0 = 0.

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

import warnings
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.reference import causal_attention_rows as reference_attention_rows  # noqa: F401 (re-export)
from .pixelsnail import Block, CausalAttention, GatedResBlock, PixelSNAIL, background_grid


def _extend(caches: List[Tensor], slot: int, rows: Tensor, new: Tensor, r0: int, ctx: int, left: int, right: int,
            whole: bool) -> Tensor:
    """Store rows [r0, r1) of a conv input for images ``rows`` in its padded cache and return
    what the causal conv reads for output rows [r0, r1): input rows [r0 - ctx, r1) with the
    zero padding of the full pass (ctx rows on top, the columns left and right).

    The cache is (B, C, ctx + H, left + W + right) with zeros in the padding, so the
    returned tensor is a view when ``whole`` (``rows`` is every image of the cache, in
    order) and one gathered copy otherwise. A first pass (r0 = 0, whole) pads ``new`` as
    the full pass does and keeps that tensor as the cache: no copy, no zero fill."""
    n, W = new.shape[2], new.shape[3]                  # rows [r0, r0 + n) are new
    if len(caches) == 0:                               # a pass that keeps no cache (r0 = 0)
        return F.pad(new, (left, right, ctx, 0))
    if whole and r0 == 0 and n == caches[slot].shape[2] - ctx:
        padded = F.pad(new, (left, right, ctx, 0))
        caches[slot] = padded
        return padded
    cache = caches[slot]
    interior = cache.narrow(2, ctx + r0, n).narrow(3, left, W)
    if whole:
        interior.copy_(new)
        return cache.narrow(2, r0, ctx + n)
    interior.index_copy_(0, rows, new)
    return cache.narrow(2, r0, ctx + n).index_select(0, rows)


class _NativeRows(nn.Module):
    """Attention rows by the native op (the CPU or CUDA kernel of the full op; a composite
    ATen kernel on other devices)."""

    def forward(self, q: Tensor, k: Tensor, v: Tensor, q0: int) -> Tensor:
        if q0 == 0:   # the first pass: the very kernel PixelSNAIL.forward uses
            return torch.ops.lsr.causal_attention_fwd(q, k, v)[0]
        return torch.ops.lsr.causal_attention_rows(q, k, v, q0)


class _ReferenceRows(nn.Module):
    """Attention rows in pure PyTorch (no extension needed to load the scripted module)."""

    def forward(self, q: Tensor, k: Tensor, v: Tensor, q0: int) -> Tensor:
        return reference_attention_rows(q, k, v, q0)


class _Gated(nn.Module):
    """:class:`GatedResBlock` over rows [r0, H); caches the inputs of its two convolutions
    (after ELU) when they reach rows above."""

    def __init__(self, block: GatedResBlock, slot: int):
        super().__init__()
        # weights only: the causal conv modules pad for a full pass (and do not script)
        self.w1, self.b1 = block.conv1.weight, block.conv1.bias
        self.w2, self.b2 = block.conv2.weight, block.conv2.bias
        kh, kw = block.conv1.kernel_size
        pad = getattr(block.conv1, "pad", (kw // 2, kw // 2, kh - 1, 0))
        self.left, self.right, self.ctx = int(pad[0]), int(pad[1]), int(pad[2])
        self.has_aux = block.aux is not None
        self.aux = block.aux if block.aux is not None else nn.Identity()
        self.slot = slot

    def n_cache(self) -> int:
        return 2 if self.ctx > 0 else 0

    def forward(self, x: Tensor, aux: Optional[Tensor], rows: Tensor, r0: int, whole: bool,
                cache: List[Tensor]) -> Tensor:
        xe = F.elu(x)
        if self.ctx > 0:
            xe = _extend(cache, self.slot, rows, xe, r0, self.ctx, self.left, self.right, whole)
        else:
            xe = F.pad(xe, (self.left, self.right, 0, 0))
        t = F.conv2d(xe, self.w1, self.b1)
        if self.has_aux and aux is not None:
            t = t + self.aux(F.elu(aux))
        te = F.elu(t)
        if self.ctx > 0:
            te = _extend(cache, self.slot + 1, rows, te, r0, self.ctx, self.left, self.right, whole)
        else:
            te = F.pad(te, (self.left, self.right, 0, 0))
        u = F.conv2d(te, self.w2, self.b2)
        a, g = u.chunk(2, dim=1)
        return x + a * torch.sigmoid(g)


class _Attention(nn.Module):
    """:class:`CausalAttention` for queries in rows [r0, H); caches keys and values."""

    def __init__(self, attn: CausalAttention, slot: int, native: bool):
        super().__init__()
        self.q, self.kv = attn.q, attn.kv
        self.n_heads = attn.n_heads
        self.slot = slot
        self.rows_op = _NativeRows() if native else _ReferenceRows()

    def forward(self, q_in: Tensor, kv_in: Tensor, rows: Tensor, r0: int, whole: bool,
                cache: List[Tensor]) -> Tensor:
        A, _, Hr, W = q_in.shape
        nh = self.n_heads
        q = self.q(q_in)
        q = q.reshape(A, nh, -1, Hr * W).transpose(2, 3)                    # (A, nh, Tq, d)
        k, v = self.kv(kv_in).chunk(2, dim=1)
        k = k.reshape(A, nh, -1, Hr * W).transpose(2, 3)
        v = v.reshape(A, nh, -1, Hr * W).transpose(2, 3)
        q0 = r0 * W
        if len(cache) == 0:                                                 # no cache: r0 = 0
            return self.rows_op(q, k, v, q0).transpose(2, 3).reshape(A, -1, Hr, W)
        K, V = cache[self.slot], cache[self.slot + 1]                       # (B, nh, T, d)
        Tq = Hr * W
        if whole:
            K.narrow(2, q0, Tq).copy_(k)
            V.narrow(2, q0, Tq).copy_(v)
            k, v = K.narrow(2, 0, q0 + Tq), V.narrow(2, 0, q0 + Tq)
        else:
            K.narrow(2, q0, Tq).index_copy_(0, rows, k)
            V.narrow(2, q0, Tq).index_copy_(0, rows, v)
            if q0 > 0:
                k = torch.cat([K.narrow(2, 0, q0).index_select(0, rows), k], 2)
                v = torch.cat([V.narrow(2, 0, q0).index_select(0, rows), v], 2)
        out = self.rows_op(q, k, v, q0)                                     # (A, nh, Tq, d)
        return out.transpose(2, 3).reshape(A, -1, Hr, W)


class _NoAttention(nn.Module):
    """Stands in for the attention layer and its output block when a prior has none."""

    def forward(self, q_in: Tensor, kv_in: Tensor, rows: Tensor, r0: int, whole: bool,
                cache: List[Tensor]) -> Tensor:
        return q_in


class _NoOut(nn.Module):
    def forward(self, x: Tensor, aux: Optional[Tensor], rows: Tensor, r0: int, whole: bool,
                cache: List[Tensor]) -> Tensor:
        return x


class _ResPair(nn.Module):
    """One residual step of both stacks: v = v_res(v), then h = h_res(h, aux=v)."""

    def __init__(self, v: _Gated, h: _Gated):
        super().__init__()
        self.v, self.h = v, h

    def forward(self, v: Tensor, h: Tensor, rows: Tensor, r0: int, whole: bool,
                cache: List[Tensor]) -> Tuple[Tensor, Tensor]:
        v = self.v(v, None, rows, r0, whole, cache)
        return v, self.h(h, v, rows, r0, whole, cache)


class _Block(nn.Module):
    def __init__(self, block: Block, slot: int, native: bool):
        super().__init__()
        self.res = nn.ModuleList()
        self.gated: List[_Gated] = []            # every gated block, for the cache geometry
        for vr, hr in zip(block.v_res, block.h_res):
            gv = _Gated(vr, slot)
            slot += gv.n_cache()
            gh = _Gated(hr, slot)
            slot += gh.n_cache()
            self.res.append(_ResPair(gv, gh))
            self.gated += [gv, gh]
        self.has_attn = block.attn is not None
        if block.attn is not None:
            self.attn = _Attention(block.attn, slot, native)
            slot += 2
            self.out = _Gated(block.out, slot)
            slot += self.out.n_cache()
            self.gated.append(self.out)
        else:
            self.attn = _NoAttention()
            self.out = _NoOut()
        self.end_slot = slot

    def forward(self, v: Tensor, h: Tensor, emb: Tensor, bg: Tensor, rows: Tensor, r0: int, whole: bool,
                cache: List[Tensor]) -> Tuple[Tensor, Tensor]:
        for pair in self.res:
            v, h = pair(v, h, rows, r0, whole, cache)
        if self.has_attn:
            a = self.attn(torch.cat([h, bg], 1), torch.cat([h, emb, bg], 1), rows, r0, whole, cache)
            h = self.out(h, a, rows, r0, whole, cache)
        return v, h


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
        prior: the trained prior; put in eval mode.
        native: use the native attention op (needs ``lsr._C``); else pure PyTorch.
    """

    def __init__(self, prior: PixelSNAIL, native: bool = True):
        super().__init__()
        if native:
            from .. import ops
            if not ops.native_available():
                raise RuntimeError("IncrementalPrior(native=True) needs the lsr._C extension; "
                                   "build it with `pip install --no-build-isolation .` (see README)")
        self.embed, self.head = prior.embed, prior.head
        self.v_w, self.v_b = prior.v_in.weight, prior.v_in.bias
        self.h_w, self.h_b = prior.h_in.weight, prior.h_in.bias
        self.channels = prior.cfg.channels
        self.codebook_size = prior.cfg.codebook_size
        self.n_heads = prior.cfg.n_heads
        kh, kw = prior.v_in.kernel_size
        self.v_pad = (int(prior.v_in.pad[0]), int(prior.v_in.pad[1]), kh - 1)
        self.h_left = int(prior.h_in.pad[0])
        self.blocks = nn.ModuleList()
        slot = 0
        for b in prior.blocks:
            blk = _Block(b, slot, native)
            slot = blk.end_slot
            self.blocks.append(blk)
        self.n_cache = slot
        # the geometry of each cache entry: attention keys/values (B, nh, T, d) are marked
        # [-1, 0, 0]; conv inputs (B, C, ctx + H, left + W + right) carry [ctx, left, right]
        geom: List[List[int]] = [[-1, 0, 0] for _ in range(slot)]
        for blk in self.blocks:
            for g in blk.gated:
                if g.ctx > 0:
                    geom[g.slot] = [g.ctx, g.left, g.right]
                    geom[g.slot + 1] = [g.ctx, g.left, g.right]
        self.cache_geometry = geom if geom else [[-1, 0, 0]]   # never empty (TorchScript typing)
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
        w = self.embed.weight
        cache: List[Tensor] = []
        for i in range(self.n_cache):
            g = self.cache_geometry[i]
            if g[0] < 0:
                cache.append(torch.zeros(B, self.n_heads, H * W, d, dtype=w.dtype, device=w.device))
            else:   # zero padding included (a pass over every image replaces it, see _extend)
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
        # rows are distinct and ascending (the contract), so A == B means every image of the
        # cache in order: conv inputs are then read in place (views), with no device sync
        whole = A == cache[-1].shape[0] if len(cache) > 0 else False
        kh = self.v_pad[2] + 1
        lo = max(0, r0 - kh)                     # x rows the vertical input conv needs
        emb_all = self.embed(codes[:, lo:]).permute(0, 3, 1, 2)            # rows [lo, Hc)
        x = torch.cat([emb_all, background_grid(A, H, W, emb_all)[:, :, lo:Hc]], 1)
        # v0 rows [r0, H) = v_in(x) rows [r0 - 1, H - 1) (down shift; row 0 is zeros)
        a = max(r0 - 1, 0)
        start = a - (kh - 1)
        if start >= lo:
            xs = x[:, :, start - lo:]
            top = 0
        else:
            xs = x
            top = lo - start
        vin = F.conv2d(F.pad(xs, (self.v_pad[0], self.v_pad[1], top, 0)), self.v_w, self.v_b)
        if r0 == 0:
            v = F.pad(vin, (0, 0, 1, 0))[:, :, :-1]
        else:
            v = vin[:, :, :-1]
        xr = x[:, :, r0 - lo:]                                              # rows [r0, H)
        hin = F.conv2d(F.pad(xr, (self.h_left, 0, 0, 0)), self.h_w, self.h_b)
        h = F.pad(hin, (1, 0, 0, 0))[:, :, :, :-1] + v
        emb = emb_all[:, :, r0 - lo:]
        bg = background_grid(A, H, W, emb)[:, :, r0:Hc]
        for blk in self.blocks:
            v, h = blk(v, h, emb, bg, rows, r0, whole, cache)
        return self.head(F.elu(h))                                          # (A, K, Hc - r0, W)

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
