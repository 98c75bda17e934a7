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
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..config import PriorConfig


def background_grid(B: int, H: int, W: int, like: Tensor) -> Tensor:
    """Normalised row and column coordinates in [-1, 1]: (B, 2, H, W) (the background
    channels; also used by :mod:`lsr.models.incremental`, which slices rows of it)."""
    rows = torch.linspace(-1.0, 1.0, H, dtype=like.dtype, device=like.device)
    cols = torch.linspace(-1.0, 1.0, W, dtype=like.dtype, device=like.device)
    grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"))      # (2, H, W)
    return grid.unsqueeze(0).expand(B, -1, -1, -1)


def down_shift(x: Tensor) -> Tensor:
    """Move every row one down (row 0 becomes zeros): (B, C, H, W)."""
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1, :]


def right_shift(x: Tensor) -> Tensor:
    """Move every column one right (column 0 becomes zeros): (B, C, H, W)."""
    return F.pad(x, (1, 0, 0, 0))[:, :, :, :-1]


class DownConv(nn.Conv2d):
    """Output (i, j) sees input rows i-kh+1..i, columns j-k//2..j+k//2 (kh = ceil(k/2))."""

    def __init__(self, cin: int, cout: int, k: int):
        super().__init__(cin, cout, ((k + 1) // 2, k))
        self.pad = (k // 2, k // 2, (k + 1) // 2 - 1, 0)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(F.pad(x, self.pad))


class DownRightConv(nn.Conv2d):
    """Output (i, j) sees input rows i-kh+1..i, columns j-kw+1..j (kh = kw = ceil(k/2))."""

    def __init__(self, cin: int, cout: int, k: int, rows: int | None = None):
        kh = (k + 1) // 2 if rows is None else rows
        kw = (k + 1) // 2
        super().__init__(cin, cout, (kh, kw))
        self.pad = (kw - 1, 0, kh - 1, 0)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(F.pad(x, self.pad))


class GatedResBlock(nn.Module):
    """x + GLU(conv(dropout(elu(conv(elu(x)) + aux_proj(elu(aux)))))) with causal convs."""

    def __init__(self, channels: int, conv, aux_channels: int = 0, dropout: float = 0.0):
        super().__init__()
        self.conv1 = conv(channels, channels)
        self.aux = nn.Conv2d(aux_channels, channels, 1) if aux_channels else None
        self.drop = nn.Dropout(dropout)
        self.conv2 = conv(channels, 2 * channels)

    def forward(self, x: Tensor, aux: Tensor | None = None) -> Tensor:
        t = self.conv1(F.elu(x))
        if self.aux is not None and aux is not None:
            t = t + self.aux(F.elu(aux))
        t = self.conv2(self.drop(F.elu(t)))
        a, g = t.chunk(2, dim=1)
        return x + a * torch.sigmoid(g)


class CausalAttention(nn.Module):
    """Multi-head attention over raster positions, query t sees keys s < t."""

    def __init__(self, q_in: int, kv_in: int, channels: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.q = nn.Conv2d(q_in, channels, 1)
        self.kv = nn.Conv2d(kv_in, 2 * channels, 1)

    def forward(self, q_in: Tensor, kv_in: Tensor) -> Tensor:
        B, _, H, W = q_in.shape
        nh = self.n_heads

        def heads(t: Tensor) -> Tensor:              # (B, C, H, W) -> (B, nh, H*W, C/nh)
            return t.reshape(B, nh, -1, H * W).transpose(2, 3)

        q = heads(self.q(q_in))
        k, v = (heads(t) for t in self.kv(kv_in).chunk(2, dim=1))
        out = ops.causal_attention(q, k, v)          # (B, nh, T, d)
        return out.transpose(2, 3).reshape(B, -1, H, W)


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

    def forward(self, v: Tensor, h: Tensor, emb: Tensor, bg: Tensor) -> tuple[Tensor, Tensor]:
        for vr, hr in zip(self.v_res, self.h_res):
            v = vr(v)
            h = hr(h, v)
        if self.attn is not None:
            a = self.attn(torch.cat([h, bg], 1), torch.cat([h, emb, bg], 1))
            h = self.out(h, a)
        return v, h


class PixelSNAIL(nn.Module):
    """Autoregressive prior p(c) = prod_t p(c_t | c_<t) over (H, W) code grids.

    ``forward(codes (B, H, W) int64) -> logits (B, K, H, W)``.

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

    @staticmethod
    def background(B: int, H: int, W: int, like: Tensor) -> Tensor:
        """Normalised row and column coordinates in [-1, 1]: (B, 2, H, W)."""
        return background_grid(B, H, W, like)

    def forward(self, codes: Tensor) -> Tensor:
        B, H, W = codes.shape
        emb = self.embed(codes).permute(0, 3, 1, 2)                        # (B, C, H, W)
        bg = self.background(B, H, W, emb)
        x = torch.cat([emb, bg], 1)
        v = down_shift(self.v_in(x))                                       # rows < i
        h = right_shift(self.h_in(x)) + v                                  # row i, cols < j; rows < i
        for block in self.blocks:
            v, h = block(v, h, emb, bg)
        return self.head(F.elu(h))                                         # (B, K, H, W)

    def log_likelihood(self, codes: Tensor) -> Tensor:
        """log p(c_t | c_<t) per position: (B, H, W)."""
        logp = F.log_softmax(self.forward(codes), dim=1)
        return logp.gather(1, codes.unsqueeze(1)).squeeze(1)
