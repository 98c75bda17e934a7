"""VQ-VAE: convolutional encoder, vector quantiser with an EMA codebook, decoder.

Reads bottom-up: residual block, encoder, decoder, quantiser, model. Every
hyperparameter comes from :class:`lsr.config.VQVAEConfig`. The model's ``forward`` is
pure: codebook EMA updates and dead-code restarts are separate methods the training
loop calls, so no weight is edited inside ``forward``.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..config import VQVAEConfig


class ResBlock(nn.Module):
    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, hidden, 3, padding=1)
        self.conv2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


def _level_channels(cfg: VQVAEConfig) -> list[int]:
    """Channels after each stride-2 step: ramps up to ``cfg.channels`` (light at high res)."""
    n = int(math.log2(cfg.downsample))
    return [max(8, cfg.channels >> (n - 1 - i)) for i in range(n)]


class Encoder(nn.Module):
    """(B, C, S, S) in [0, 1] -> z_e (B, D, S/f, S/f)."""

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        chs = _level_channels(cfg)
        layers: list[nn.Module] = []
        cin = cfg.in_channels
        for i, c in enumerate(chs):
            layers.append(nn.Conv2d(cin, c, 4, stride=2, padding=1))
            layers.append(nn.ReLU())
            cin = c
        layers.append(nn.Conv2d(cin, cfg.channels, 3, padding=1))
        layers += [ResBlock(cfg.channels, cfg.res_channels) for _ in range(cfg.n_res_blocks)]
        layers += [nn.ReLU(), nn.Conv2d(cfg.channels, cfg.embed_dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x * 2.0 - 1.0)


class Decoder(nn.Module):
    """z_q (B, D, S/f, S/f) -> image (B, C, S, S), roughly in [0, 1] (not clamped)."""

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        chs = _level_channels(cfg)[::-1]
        layers: list[nn.Module] = [nn.Conv2d(cfg.embed_dim, cfg.channels, 3, padding=1)]
        layers += [ResBlock(cfg.channels, cfg.res_channels) for _ in range(cfg.n_res_blocks)]
        layers.append(nn.ReLU())
        cin = cfg.channels
        for i, c in enumerate(chs[1:] + [cfg.in_channels]):
            layers.append(nn.ConvTranspose2d(cin, c, 4, stride=2, padding=1))
            if i < len(chs) - 1:
                layers.append(nn.ReLU())
            cin = c
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z) * 0.5 + 0.5


class QuantizerOutput(NamedTuple):
    quantized: Tensor   # (B, D, H, W), straight-through in training
    indices: Tensor     # (B, H, W) int64
    loss: Tensor        # scalar: commitment (+ codebook loss without EMA)


class VectorQuantizer(nn.Module):
    """Nearest-codebook quantisation with a straight-through gradient.

    Args:
        codebook_size: K.
        dim: D.
        commitment_weight: beta in ``beta * ||z_e - sg(e)||^2``.
        ema_decay: > 0 keeps the codebook as an exponential moving average of the
            encoder outputs assigned to each code (updated by :meth:`ema_update`);
            0 makes the codebook a parameter trained by the codebook loss.
        dead_code_after: a code not chosen in this many consecutive training batches
            is restarted from a random encoder output of the current batch (0: never).

    Example:
        >>> vq = VectorQuantizer(8, 4).eval()
        >>> out = vq(torch.randn(2, 4, 3, 3))
        >>> torch.equal(out.quantized, vq.decode_indices(out.indices))
        True
    """

    def __init__(self, codebook_size: int, dim: int, commitment_weight: float = 0.25,
                 ema_decay: float = 0.99, dead_code_after: int = 20, eps: float = 1e-5):
        super().__init__()
        self.codebook_size, self.dim = codebook_size, dim
        self.commitment_weight, self.ema_decay = commitment_weight, ema_decay
        self.dead_code_after, self.eps = dead_code_after, eps
        init = torch.randn(codebook_size, dim) * 0.1
        if ema_decay > 0:
            self.register_buffer("codebook", init)
            self.register_buffer("cluster_size", torch.ones(codebook_size))
            self.register_buffer("embed_sum", init.clone())
        else:
            self.codebook = nn.Parameter(init)
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))
        self.register_buffer("unused_steps", torch.zeros(codebook_size, dtype=torch.long))

    def forward(self, z: Tensor) -> QuantizerOutput:
        B, D, H, W = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, D)                  # (B*H*W, D)
        idx = ops.vq_nearest(flat.detach(), self.codebook.detach())  # (B*H*W,)
        q = F.embedding(idx, self.codebook)                          # (B*H*W, D)
        q = q.view(B, H, W, D).permute(0, 3, 1, 2)                   # (B, D, H, W)
        loss = self.commitment_weight * F.mse_loss(z, q.detach())
        if self.ema_decay <= 0:
            loss = loss + F.mse_loss(q, z.detach())
        if self.training and z.requires_grad:
            q = z + (q - z).detach()                                 # straight-through
        return QuantizerOutput(q, idx.view(B, H, W), loss)

    def decode_indices(self, indices: Tensor) -> Tensor:
        """indices (B, H, W) -> quantized vectors (B, D, H, W)."""
        return F.embedding(indices, self.codebook).permute(0, 3, 1, 2)

    @torch.no_grad()
    def init_from(self, z: Tensor, generator: torch.Generator | None = None) -> None:
        """Initialise the codebook from random encoder outputs z (B, D, H, W)."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, self.dim)
        pick = torch.randint(0, flat.shape[0], (self.codebook_size,), generator=generator)
        self.codebook.data.copy_(flat[pick])
        if self.ema_decay > 0:
            self.embed_sum.copy_(flat[pick])
            self.cluster_size.fill_(1.0)
        self.initialised.fill_(True)

    @torch.no_grad()
    def ema_update(self, z: Tensor, indices: Tensor, generator: torch.Generator | None = None,
                   reduce: Callable[[Tensor], Tensor] | None = None,
                   gather: Callable[[Tensor], Tensor] | None = None) -> int:
        """EMA codebook update from a training batch, then restart dead codes.

        Args:
            z (Tensor[B, D, H, W]): encoder outputs.
            indices (Tensor[B, H, W]): their codes.
            reduce: sums a tensor over the processes of a distributed job (the batch is
                split across them); default: this process's batch is the whole batch.
            gather: concatenates the processes' flattened encoder outputs in batch order
                (used only when codes are restarted).

        Returns:
            Number of codes restarted.
        """
        flat = z.permute(0, 2, 3, 1).reshape(-1, self.dim).float()
        onehot = F.one_hot(indices.reshape(-1), self.codebook_size).type_as(flat)  # (N, K)
        counts = onehot.sum(0)                                                 # (K,)
        sums = onehot.t() @ flat if self.ema_decay > 0 else None               # (K, D)
        if reduce is not None:
            counts = reduce(counts)
            sums = reduce(sums) if sums is not None else None
        if self.ema_decay <= 0:
            return self.restart_dead_codes(flat, counts, generator, gather)
        d = self.ema_decay
        self.cluster_size.mul_(d).add_(counts, alpha=1 - d)
        self.embed_sum.mul_(d).add_(sums, alpha=1 - d)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.codebook_size * self.eps) * n
        self.codebook.copy_(self.embed_sum / smoothed.unsqueeze(1))
        return self.restart_dead_codes(flat, counts, generator, gather)

    @torch.no_grad()
    def restart_dead_codes(self, flat: Tensor, counts: Tensor, generator: torch.Generator | None = None,
                           gather: Callable[[Tensor], Tensor] | None = None) -> int:
        """Restart codes unused for ``dead_code_after`` batches from random encoder outputs
        of this batch; flat (N, D) encoder outputs, counts (K,) of this batch."""
        self.unused_steps.add_(1).masked_fill_(counts > 0, 0)
        if self.dead_code_after <= 0:
            return 0
        dead = self.unused_steps >= self.dead_code_after
        n_dead = int(dead.sum())
        if n_dead == 0:
            return 0
        if gather is not None:
            flat = gather(flat)
        pick = torch.randint(0, flat.shape[0], (n_dead,), generator=generator)
        self.codebook.data[dead] = flat[pick]
        if self.ema_decay > 0:
            self.embed_sum[dead] = flat[pick]
            self.cluster_size[dead] = 1.0
        self.unused_steps[dead] = 0
        return n_dead


class VQVAEOutput(NamedTuple):
    reconstruction: Tensor  # (B, C, S, S)
    quantized: Tensor       # (B, D, h, w)
    indices: Tensor         # (B, h, w)
    loss: Tensor            # quantiser loss (commitment, + codebook loss without EMA)
    z_e: Tensor             # (B, D, h, w) encoder output


class VQVAE(nn.Module):
    """Encoder + quantiser + decoder. ``forward(x)`` returns a :class:`VQVAEOutput`."""

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quantizer = VectorQuantizer(cfg.codebook_size, cfg.embed_dim, cfg.commitment_weight,
                                         cfg.ema_decay, cfg.dead_code_after)
        self.decoder = Decoder(cfg)

    def forward(self, x: Tensor) -> VQVAEOutput:
        z = self.encoder(x)
        q = self.quantizer(z)
        return VQVAEOutput(self.decoder(q.quantized), q.quantized, q.indices, q.loss, z)

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """Image (B, C, S, S) in [0, 1] -> codes (B, S/f, S/f)."""
        return self.quantizer(self.encoder(x)).indices

    def decode_indices(self, indices: Tensor) -> Tensor:
        """Codes (B, h, w) -> image (B, C, S, S)."""
        return self.decoder(self.quantizer.decode_indices(indices))
