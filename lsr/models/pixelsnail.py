"""PixelSNAIL prior over a grid of VQ-VAE codes.

Reads bottom-up: shifts and causal convolutions, the gated residual block, strictly
causal attention, the model. Causality (tested): the logits at raster position t depend
on the codes at positions < t only.

Two convolution stacks avoid the blind spot of a single masked convolution (van den
Oord et al. 2016, Gated PixelCNN):

* the *vertical* stack ``v`` sees the rows strictly above (a down-shifted convolution
  over the rows above, any column in its window);
* the *horizontal* stack ``h`` sees the current row strictly to the left, plus ``v``.

Each block runs gated residual blocks on both stacks, then multi-head attention whose
queries come from ``h`` and whose keys/values come from ``h`` together with the code
embedding; query t attends to keys s < t only, so a key may carry the code at s itself.
Background channels (normalised row and column) are appended to every input.

**One core for every pass.** Each layer's arithmetic is written once, in its ``rows``
method, which evaluates the rows [r0, r1) of the grid given what the rows above left
behind. Three passes read "the rows above" in different ways (``mode``):

* :data:`FULL`: the whole grid at once, nothing above (``forward``, training);
* :data:`CACHE`: in-place padded buffers per image, updated by the pass
  (:class:`lsr.models.incremental.IncrementalPrior`, which the C++ resampling loop and
  the C++ runtime run as TorchScript);
* :data:`STATE`: the rows above come in as tensors and the new rows go out as tensors,
  a pure function (the ONNX row graph, :class:`lsr.deploy.graphs.PriorRowsGraph`).

The state a pass keeps is, for each causal convolution that reaches rows above (its
"slot"), its input rows, and for each attention layer its keys and values; slots are
numbered in the order the layers run (:attr:`PixelSNAIL.state_layout`). A change to a
layer here changes all three passes.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..config import PriorConfig
from ..ops.reference import causal_attention_rows as reference_attention_rows


def _no_rows(like: Tensor) -> Tensor:
    """The (unused) image selection of a pass that is not a CACHE pass."""
    return torch.zeros(0, dtype=torch.long, device=like.device)


def background_grid(B: int, H: int, W: int, like: Tensor) -> Tensor:
    """Normalised row and column coordinates in [-1, 1]: (B, 2, H, W) (the background
    channels; also used by :mod:`lsr.models.incremental`, which slices rows of it)."""
    rows = torch.linspace(-1.0, 1.0, H, dtype=like.dtype, device=like.device)
    cols = torch.linspace(-1.0, 1.0, W, dtype=like.dtype, device=like.device)
    grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"))      # (2, H, W)
    return grid.unsqueeze(0).expand(B, -1, -1, -1)


#: how a pass reads the rows above r0 (see the module docstring)
FULL, CACHE, STATE = 0, 1, 2      # (TorchScript code writes them as literals: it cannot read globals)


def down_shift(x: Tensor) -> Tensor:
    """Move every row one down (row 0 becomes zeros): (B, C, H, W)."""
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1, :]


def right_shift(x: Tensor) -> Tensor:
    """Move every column one right (column 0 becomes zeros): (B, C, H, W)."""
    return F.pad(x, (1, 0, 0, 0))[:, :, :, :-1]


def _extend(cache: List[Tensor], slot: int, rows: Tensor, new: Tensor, r0: int, ctx: int, left: int, right: int,
            whole: bool) -> Tensor:
    """CACHE mode: store rows [r0, r1) of a conv input for images ``rows`` in its padded
    buffer and return what the causal conv reads for output rows [r0, r1): input rows
    [r0 - ctx, r1) with the zero padding of the full pass (ctx rows on top, the columns
    left and right).

    The buffer is (B, C, ctx + H, left + W + right) with zeros in the padding, so the
    returned tensor is a view when ``whole`` (``rows`` is every image of the cache, in
    order) and one gathered copy otherwise. A first pass (r0 = 0, whole) pads ``new`` as
    the full pass does and keeps that tensor as the buffer: no copy, no zero fill."""
    n, W = new.shape[2], new.shape[3]                  # rows [r0, r0 + n) are new
    if whole and r0 == 0 and n == cache[slot].shape[2] - ctx:
        padded = F.pad(new, (left, right, ctx, 0))
        cache[slot] = padded
        return padded
    buf = cache[slot]
    interior = buf.narrow(2, ctx + r0, n).narrow(3, left, W)
    if whole:
        interior.copy_(new)
        return buf.narrow(2, r0, ctx + n)
    interior.index_copy_(0, rows, new)
    return buf.narrow(2, r0, ctx + n).index_select(0, rows)


def causal_conv_rows(x: Tensor, weight: Tensor, bias: Optional[Tensor], ctx: int, left: int, right: int, slot: int,
                     rows: Tensor, r0: int, whole: bool, mode: int, cache: List[Tensor], outs: List[Tensor]) -> Tensor:
    """The one causal convolution of every pass: output rows [r0, r1) from input rows
    ``x`` of [r0, r1), reading ``ctx`` input rows above r0 as ``mode`` says (FULL: zero
    padding; CACHE: the buffer ``cache[slot]``, updated; STATE: ``cache[slot]`` holds those
    rows, ``x`` is appended to ``outs``). ``left`` / ``right``: zero columns each side."""
    if ctx == 0 or mode == 0:  # FULL
        xin = x if ctx == 0 and left == 0 and right == 0 else F.pad(x, (left, right, ctx, 0))
    elif mode == 1:  # CACHE
        xin = _extend(cache, slot, rows, x, r0, ctx, left, right, whole)
    else:
        outs.append(x)
        xin = torch.cat([cache[slot], F.pad(x, (left, right, 0, 0))], 2)
    return F.conv2d(xin, weight, bias)


class DownConv(nn.Conv2d):
    """Output (i, j) sees input rows i-kh+1..i, columns j-k//2..j+k//2 (kh = ceil(k/2))."""

    def __init__(self, cin: int, cout: int, k: int):
        super().__init__(cin, cout, ((k + 1) // 2, k))
        self.pad = (k // 2, k // 2, (k + 1) // 2 - 1, 0)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(F.pad(x, self.pad), self.weight, self.bias)


class DownRightConv(nn.Conv2d):
    """Output (i, j) sees input rows i-kh+1..i, columns j-kw+1..j (kh = kw = ceil(k/2))."""

    def __init__(self, cin: int, cout: int, k: int, rows: int | None = None):
        kh = (k + 1) // 2 if rows is None else rows
        kw = (k + 1) // 2
        super().__init__(cin, cout, (kh, kw))
        self.pad = (kw - 1, 0, kh - 1, 0)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(F.pad(x, self.pad), self.weight, self.bias)


def _geometry(conv: nn.Conv2d) -> Tuple[int, int, int]:
    """(rows above, columns left, columns right) a causal conv reads; a plain conv: none."""
    kh, kw = conv.kernel_size
    pad = getattr(conv, "pad", (kw // 2, kw // 2, kh - 1, 0))
    return int(pad[2]), int(pad[0]), int(pad[1])


class GatedResBlock(nn.Module):
    """x + GLU(conv(dropout(elu(conv(elu(x)) + aux_proj(elu(aux)))))) with causal convs."""

    def __init__(self, channels: int, conv, aux_channels: int = 0, dropout: float = 0.0):
        super().__init__()
        self.conv1 = conv(channels, channels)
        self.aux = nn.Conv2d(aux_channels, channels, 1) if aux_channels else None
        self.drop = nn.Dropout(dropout)
        self.conv2 = conv(channels, 2 * channels)
        self.ctx, self.left, self.right = _geometry(self.conv1)
        self.slot = 0                                  # set by PixelSNAIL (state_layout)

    def n_state(self) -> int:
        """State entries this block keeps: both conv inputs if they reach rows above."""
        return 2 if self.ctx > 0 else 0

    def rows(self, x: Tensor, aux: Optional[Tensor], rows: Tensor, r0: int, whole: bool, mode: int,
             cache: List[Tensor], outs: List[Tensor]) -> Tensor:
        g = (self.ctx, self.left, self.right)
        t = causal_conv_rows(F.elu(x), self.conv1.weight, self.conv1.bias, g[0], g[1], g[2], self.slot,
                             rows, r0, whole, mode, cache, outs)
        if self.aux is not None and aux is not None:
            t = t + self.aux(F.elu(aux))
        t = causal_conv_rows(self.drop(F.elu(t)), self.conv2.weight, self.conv2.bias, g[0], g[1], g[2],
                             self.slot + 1, rows, r0, whole, mode, cache, outs)
        a, gate = t.chunk(2, dim=1)
        return x + a * torch.sigmoid(gate)

    def forward(self, x: Tensor, aux: Optional[Tensor] = None) -> Tensor:
        none: List[Tensor] = []
        return self.rows(x, aux, _no_rows(x), 0, False, 0, none, none)   # a FULL pass


class ReferenceRows(nn.Module):
    """Attention rows in pure PyTorch: the op of the CACHE and STATE passes unless a
    wrapper puts the native one in (:class:`lsr.models.incremental.IncrementalPrior`)."""

    def forward(self, q: Tensor, k: Tensor, v: Tensor, q0: int) -> Tensor:
        return reference_attention_rows(q, k, v, q0)


class CausalAttention(nn.Module):
    """Multi-head attention over raster positions, query t sees keys s < t."""

    def __init__(self, q_in: int, kv_in: int, channels: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.q = nn.Conv2d(q_in, channels, 1)
        self.kv = nn.Conv2d(kv_in, 2 * channels, 1)
        self.rows_op: nn.Module = ReferenceRows()       # no weights: not in the state dict
        self.slot = 0                                   # keys, then values (state_layout)

    def rows(self, q_in: Tensor, kv_in: Tensor, rows: Tensor, r0: int, whole: bool, mode: int,
             cache: List[Tensor], outs: List[Tensor]) -> Tensor:
        A, _, Hr, W = q_in.shape
        nh = self.n_heads
        q = self.q(q_in).reshape(A, nh, -1, Hr * W).transpose(2, 3)           # (A, nh, Tq, d)
        k, v = self.kv(kv_in).chunk(2, dim=1)
        k = k.reshape(A, nh, -1, Hr * W).transpose(2, 3)
        v = v.reshape(A, nh, -1, Hr * W).transpose(2, 3)
        if mode == 0:  # FULL
            if torch.jit.is_scripting():
                out = self.rows_op(q, k, v, 0)
            else:                                       # training: the dispatching op with gradients
                out = ops.causal_attention(q, k, v)
        elif mode == 2:  # STATE
            k_past, v_past = cache[self.slot], cache[self.slot + 1]            # (A, nh, r0 * W, d)
            outs.append(k)
            outs.append(v)
            out = self.rows_op(q, torch.cat([k_past, k], 2), torch.cat([v_past, v], 2), k_past.shape[2])
        else:
            q0, Tq = r0 * W, Hr * W
            K, V = cache[self.slot], cache[self.slot + 1]                      # (B, nh, T, d)
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
            out = self.rows_op(q, k, v, q0)
        return out.transpose(2, 3).reshape(A, -1, Hr, W)

    def forward(self, q_in: Tensor, kv_in: Tensor) -> Tensor:
        none: List[Tensor] = []
        return self.rows(q_in, kv_in, _no_rows(q_in), 0, False, 0, none, none)   # a FULL pass


class Block(nn.Module):
    def __init__(self, cfg: PriorConfig, embed_channels: int):
        super().__init__()
        c, k, p = cfg.channels, cfg.kernel_size, cfg.dropout
        self.v_res = nn.ModuleList(
            GatedResBlock(c, lambda i, o: DownConv(i, o, k), dropout=p) for _ in range(cfg.n_res_blocks))
        self.h_res = nn.ModuleList(
            GatedResBlock(c, lambda i, o: DownRightConv(i, o, k), aux_channels=c, dropout=p)
            for _ in range(cfg.n_res_blocks))
        self.attn = (CausalAttention(c + 2, c + embed_channels + 2, c, cfg.n_heads)
                     if cfg.attention else None)
        self.out = GatedResBlock(c, lambda i, o: nn.Conv2d(i, o, 1), aux_channels=c, dropout=p)

    def rows(self, v: Tensor, h: Tensor, emb: Tensor, bg: Tensor, rows: Tensor, r0: int, whole: bool, mode: int,
             cache: List[Tensor], outs: List[Tensor]) -> Tuple[Tensor, Tensor]:
        for vr, hr in zip(self.v_res, self.h_res):
            v = vr.rows(v, None, rows, r0, whole, mode, cache, outs)
            h = hr.rows(h, v, rows, r0, whole, mode, cache, outs)
        if self.attn is not None:
            a = self.attn.rows(torch.cat([h, bg], 1), torch.cat([h, emb, bg], 1), rows, r0, whole, mode, cache, outs)
            h = self.out.rows(h, a, rows, r0, whole, mode, cache, outs)
        return v, h

    def forward(self, v: Tensor, h: Tensor, emb: Tensor, bg: Tensor) -> Tuple[Tensor, Tensor]:
        none: List[Tensor] = []
        return self.rows(v, h, emb, bg, _no_rows(v), 0, False, 0, none, none)


class PixelSNAIL(nn.Module):
    """Autoregressive prior p(c) = prod_t p(c_t | c_<t) over (H, W) code grids.

    ``forward(codes (B, H, W) int64) -> logits (B, K, H, W)``; ``rows`` is the core every
    pass runs (module docstring).

    Example:
        >>> from lsr.config import PriorConfig
        >>> m = PixelSNAIL(PriorConfig(codebook_size=8, grid_size=4, channels=8, n_heads=2)).eval()
        >>> m(torch.zeros(1, 4, 4, dtype=torch.long)).shape
        torch.Size([1, 8, 4, 4])
    """

    def __init__(self, cfg: PriorConfig):
        super().__init__()
        self.cfg = cfg
        c, k = cfg.channels, cfg.kernel_size
        self.embed = nn.Embedding(cfg.codebook_size, c)   # == a one-hot 1x1 convolution
        self.v_in = DownConv(c + 2, c, k)
        self.h_in = DownRightConv(c + 2, c, k, rows=1)
        self.blocks = nn.ModuleList(Block(cfg, c) for _ in range(cfg.n_blocks))
        self.head = nn.Conv2d(c, cfg.codebook_size, 1)
        #: input rows above r0 the first layer reads (the vertical input conv's kernel height)
        self.context_rows = int(self.v_in.kernel_size[0])
        # state slots in the order the layers run: [rows above, left, right] per conv input,
        # [-1, 0, 0] per attention keys / values
        layout: List[List[int]] = []
        for b in self.blocks:
            gated = [g for pair in zip(b.v_res, b.h_res) for g in pair]
            for g in gated:
                g.slot = len(layout)
                layout += [[g.ctx, g.left, g.right]] * g.n_state()
            if b.attn is not None:
                b.attn.slot = len(layout)
                layout += [[-1, 0, 0], [-1, 0, 0]]
                b.out.slot = len(layout)
                layout += [[b.out.ctx, b.out.left, b.out.right]] * b.out.n_state()
        self.state_layout = layout

    @staticmethod
    def background(B: int, H: int, W: int, like: Tensor) -> Tensor:
        """Normalised row and column coordinates in [-1, 1]: (B, 2, H, W)."""
        return background_grid(B, H, W, like)

    def stacks_in(self, x: Tensor, first: bool, v_mask: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        """The input layers: ``x`` = embedding and background channels -> the vertical and
        horizontal stacks v, h of rows [r0, r1).

        ``first``: ``x`` holds rows [0, r1) (a pass from row 0: the convs pad above, v is
        down-shifted). Otherwise ``x`` holds rows [r0 - context_rows, r1), rows above the
        grid zero, and v of row i is the vertical conv's output at row i - 1; ``v_mask``
        (1, 1, n, 1), if given, zeroes v at grid row 0 (a STATE pass whose r0 is data)."""
        if first:
            v = down_shift(self.v_in(x))                                   # rows < i
        else:
            v = F.conv2d(F.pad(x[:, :, :-1], (self.v_in.pad[0], self.v_in.pad[1], 0, 0)),
                         self.v_in.weight, self.v_in.bias)
            if v_mask is not None:
                v = v * v_mask
            x = x[:, :, self.context_rows:]
        h = right_shift(self.h_in(x)) + v                                  # row i, cols < j; rows < i
        return v, h

    def rows(self, v: Tensor, h: Tensor, emb: Tensor, bg: Tensor, rows: Tensor, r0: int, whole: bool, mode: int,
             cache: List[Tensor], outs: List[Tensor]) -> Tensor:
        """The blocks and the head over rows [r0, r1): stacks (A, C, n, W), the embedding and
        background of those rows -> logits (A, K, n, W). ``rows`` (CACHE: which images of the
        cache), ``r0``, ``whole``, ``mode``, ``cache``, ``outs``: as in
        :func:`causal_conv_rows`."""
        for block in self.blocks:
            v, h = block.rows(v, h, emb, bg, rows, r0, whole, mode, cache, outs)
        return self.head(F.elu(h))

    def forward(self, codes: Tensor) -> Tensor:
        B, H, W = codes.shape
        emb = self.embed(codes).permute(0, 3, 1, 2)                        # (B, C, H, W)
        bg = self.background(B, H, W, emb)
        v, h = self.stacks_in(torch.cat([emb, bg], 1), True, None)
        none: List[Tensor] = []
        return self.rows(v, h, emb, bg, _no_rows(v), 0, False, 0, none, none)   # (B, K, H, W)

    def log_likelihood(self, codes: Tensor) -> Tensor:
        """log p(c_t | c_<t) per position: (B, H, W)."""
        logp = F.log_softmax(self.forward(codes), dim=1)
        return logp.gather(1, codes.unsqueeze(1)).squeeze(1)
