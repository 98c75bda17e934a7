"""Feature-space VQ-VAE: codes over a frozen pretrained backbone's feature map.

The image goes through the frozen backbone (:mod:`lsr.models.backbone`, 152 channels at
stride 8 for EfficientNet-Lite0), the features are normalised per channel with statistics
of the training images, and this VQ-VAE encodes them into a code grid (a code per
``downsample`` x ``downsample`` pixels) and decodes codes back to normalised features.
The PixelSNAIL prior, the resampling rule and its exact loops are those of pixel mode;
the anomaly map compares features (see :class:`lsr.detect.Detector`).

A small pixel decoder (:class:`lsr.models.vqvae.Decoder`) is trained on the same codes to
show what an image "would look like" (panels and reports); its gradient never reaches the
encoder or the codebook, and the map never uses it.

Reads bottom-up: encoder, decoder, model. Same interface as :class:`lsr.models.VQVAE`
where the two meet: ``encode(x)`` (images -> codes), ``decode_indices(codes)`` (codes ->
picture), ``quantizer``; plus ``features(x)`` and ``decode_features(codes)``.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..config import VQVAEConfig
from .backbone import EfficientNetLite0Trunk, FeatureExtractor, _TorchvisionTrunk, build_backbone
from .vqvae import Decoder, ResBlock, VectorQuantizer


def _steps(cfg: VQVAEConfig) -> int:
    """Stride-2 steps between the backbone's grid and the code grid."""
    return int(math.log2(cfg.downsample // cfg.feature_stride))


class FeatureEncoder(nn.Module):
    """Normalised features (B, F, S/8, S/8) -> z_e (B, D, S/f, S/f)."""

    def __init__(self, cfg: VQVAEConfig, feature_channels: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(feature_channels, cfg.channels, 1), nn.ReLU()]
        for _ in range(_steps(cfg)):
            layers += [nn.Conv2d(cfg.channels, cfg.channels, 4, stride=2, padding=1), nn.ReLU()]
        layers.append(nn.Conv2d(cfg.channels, cfg.channels, 3, padding=1))
        layers += [ResBlock(cfg.channels, cfg.res_channels) for _ in range(cfg.n_res_blocks)]
        layers += [nn.ReLU(), nn.Conv2d(cfg.channels, cfg.embed_dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, f: Tensor) -> Tensor:
        return self.net(f)


class FeatureDecoder(nn.Module):
    """z_q (B, D, S/f, S/f) -> normalised features (B, F, S/8, S/8)."""

    def __init__(self, cfg: VQVAEConfig, feature_channels: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(cfg.embed_dim, cfg.channels, 3, padding=1)]
        layers += [ResBlock(cfg.channels, cfg.res_channels) for _ in range(cfg.n_res_blocks)]
        layers.append(nn.ReLU())
        for _ in range(_steps(cfg)):
            layers += [nn.ConvTranspose2d(cfg.channels, cfg.channels, 4, stride=2, padding=1), nn.ReLU()]
        layers.append(nn.Conv2d(cfg.channels, feature_channels, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)


class FeatureVQVAEOutput(NamedTuple):
    reconstruction: Tensor  # (B, F, S/8, S/8) decoded normalised features
    quantized: Tensor       # (B, D, h, w)
    indices: Tensor         # (B, h, w)
    loss: Tensor            # quantiser loss
    z_e: Tensor             # (B, D, h, w)
    picture: Tensor         # (B, C, S, S) the pixel decoder's picture of the codes (detached codes)


def _trunk(cfg: VQVAEConfig) -> nn.Module:
    """The backbone's architecture without weights (they come from the run's file)."""
    return EfficientNetLite0Trunk() if cfg.backbone == "efficientnet_lite0" else _TorchvisionTrunk(cfg.backbone)


class FeatureVQVAE(nn.Module):
    """Backbone + feature normalisation + encoder + quantiser + feature decoder, and a
    pixel decoder for pictures.

    Args:
        cfg: the VQ-VAE config (``space == "features"``).
        pretrained: load the backbone's pretrained weights (training); False builds the
            architecture only, for loading a trained run whose safetensors file holds the
            backbone's weights too (a run is self-contained).
    """

    def __init__(self, cfg: VQVAEConfig, pretrained: bool = True):
        super().__init__()
        if cfg.space != "features":
            raise ValueError(f"FeatureVQVAE needs vqvae.space = 'features', got {cfg.space!r}")
        self.cfg = cfg
        if pretrained:
            self.backbone = build_backbone(cfg.backbone, cfg.backbone_weights or None, pool=cfg.backbone_pool,
                                           taps=cfg.backbone_taps, margin=cfg.backbone_margin)
        else:
            self.backbone = FeatureExtractor(_trunk(cfg), cfg.backbone, cfg.backbone_pool, cfg.backbone_taps,
                                             cfg.backbone_margin)
        F_ = self.backbone.out_channels
        self.register_buffer("feature_mean", torch.zeros(F_))
        self.register_buffer("feature_std", torch.ones(F_))
        self.encoder = FeatureEncoder(cfg, F_)
        self.quantizer = VectorQuantizer(cfg.codebook_size, cfg.embed_dim, cfg.commitment_weight,
                                         cfg.ema_decay, cfg.dead_code_after)
        self.decoder = FeatureDecoder(cfg, F_)
        self.pixel_decoder = Decoder(cfg)

    @property
    def feature_channels(self) -> int:
        return self.backbone.out_channels

    @torch.no_grad()
    def raw_features(self, x: Tensor) -> Tensor:
        """Images (B, C, S, S) in [0, 1] -> backbone features (B, F, S/8, S/8)."""
        return self.backbone(x)

    @torch.no_grad()
    def set_feature_stats(self, features: Tensor) -> None:
        """Per-channel mean and standard deviation of training features (N, F, h, w)."""
        f = features.double().transpose(0, 1).reshape(features.shape[1], -1)
        self.feature_mean.copy_(f.mean(1).float())
        self.feature_std.copy_(f.std(1).clamp_min(1e-6).float())

    def normalise(self, raw: Tensor) -> Tensor:
        return (raw - self.feature_mean.view(1, -1, 1, 1)) / self.feature_std.view(1, -1, 1, 1)

    @torch.no_grad()
    def features(self, x: Tensor) -> Tensor:
        """Images -> normalised features (B, F, S/8, S/8): what the VQ-VAE reconstructs."""
        return self.normalise(self.raw_features(x))

    def forward(self, f: Tensor) -> FeatureVQVAEOutput:
        """Normalised features (B, F, S/8, S/8) -> reconstruction, codes, picture."""
        z = self.encoder(f)
        q = self.quantizer(z)
        return FeatureVQVAEOutput(self.decoder(q.quantized), q.quantized, q.indices, q.loss, z,
                                  self.pixel_decoder(q.quantized.detach()))

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """Images (B, C, S, S) in [0, 1] -> codes (B, S/f, S/f)."""
        return self.quantizer(self.encoder(self.features(x))).indices

    def decode_features(self, indices: Tensor) -> Tensor:
        """Codes (B, h, w) -> normalised features (B, F, S/8, S/8)."""
        return self.decoder(self.quantizer.decode_indices(indices))

    def decode_indices(self, indices: Tensor) -> Tensor:
        """Codes (B, h, w) -> picture (B, C, S, S) from the pixel decoder."""
        return self.pixel_decoder(self.quantizer.decode_indices(indices))


def build_vqvae(cfg: VQVAEConfig, pretrained: bool = True) -> nn.Module:
    """The VQ-VAE of ``cfg.space``: :class:`lsr.models.VQVAE` for pixels,
    :class:`FeatureVQVAE` for features."""
    if cfg.space == "features":
        return FeatureVQVAE(cfg, pretrained)
    from .vqvae import VQVAE
    return VQVAE(cfg)


__all__ = ["FeatureVQVAE", "FeatureVQVAEOutput", "FeatureEncoder", "FeatureDecoder", "build_vqvae"]
