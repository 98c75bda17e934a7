"""The four exported graphs as ``nn.Module`` wrappers of a trained run (needs torch).

Every wrapper computes exactly what :meth:`lsr.detect.Detector.detect` computes for its
stage, on the pure-PyTorch reference path (no native op, masks from index
comparisons), with fixed input and output names (:func:`lsr.deploy.bundle.graph_io`):

* :class:`EncodeGraph`       image (B, C, S, S) -> codes (B, h, w)
* :class:`PriorGraph`        codes -> logits (B, K, h, w), likelihood (B, h, w)
* :class:`DecodeGraph`       codes -> image (B, C, S, S), clamped to [0, 1]
* :class:`PostprocessGraph`  image, direct, restored (B, N, C, S, S) -> maps and scores
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import anomaly
from ..config import DetectConfig
from ..models import VQVAE, PixelSNAIL
from ..ops.resampling import _likelihood


class EncodeGraph(nn.Module):
    """Encoder + nearest-codebook quantiser: image (B, C, S, S) in [0, 1] -> codes (B, h, w).

    The quantiser is the formula of :func:`lsr.ops.reference.vq_nearest`
    (argmin of ||e_k||^2 - 2 z.e_k in float32, ties to the lower index) written without
    that function's chunking loop, whose slice bounds a trace would freeze at the
    example batch size."""

    def __init__(self, vqvae: VQVAE):
        super().__init__()
        self.encoder = vqvae.encoder
        self.register_buffer("codebook", vqvae.quantizer.codebook.detach().clone().float())

    def forward(self, image: Tensor) -> Tensor:
        z = self.encoder(image)                                      # (B, D, h, w)
        B, D, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, D).float()
        e = self.codebook
        e2 = (e * e).sum(dim=1)
        dist = e2.unsqueeze(0) - 2.0 * (flat @ e.t())                # (B*h*w, K)
        return dist.argmin(dim=1).reshape(B, h, w)


class PriorGraph(nn.Module):
    """One full teacher-forced prior pass: codes -> (logits, likelihood of each code),
    the likelihood as :func:`lsr.ops.resampling._likelihood` (softmax, then gather)."""

    def __init__(self, prior: nn.Module):
        super().__init__()
        self.prior = prior

    def forward(self, codes: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.prior(codes)
        return logits, _likelihood(logits, codes)


class DecodeGraph(nn.Module):
    """codes (B, h, w) -> image (B, C, S, S), clamped to [0, 1] as the Detector's x_d, x_r."""

    def __init__(self, vqvae: VQVAE):
        super().__init__()
        self.decoder = vqvae.decoder
        self.register_buffer("codebook", vqvae.quantizer.codebook.detach().clone().float())

    def forward(self, codes: Tensor) -> Tensor:
        q = torch.nn.functional.embedding(codes, self.codebook).permute(0, 3, 1, 2)
        return self.decoder(q).clamp(0, 1)


class PostprocessGraph(nn.Module):
    """Anomaly maps and image scores as the Detector makes them, with the run's
    settings (map kind, distance, Gaussian sigma, score kind, top-k) baked in.

    Inputs: image x and direct reconstruction x_d (B, C, S, S); restored images x_r
    (B, N, C, S, S), N restorations per image (maps averaged over them). Outputs:
    ``anomaly_map`` (the configured map), ``score``, ``map_restored_vs_input``,
    ``map_restored_vs_direct``, ``map_direct`` (B, S, S) and ``direct_score`` (B,).
    """

    def __init__(self, detect: DetectConfig):
        super().__init__()
        if detect.smoothing == "bilateral":
            raise ValueError("smoothing 'bilateral' runs through scikit-image and cannot be exported; "
                             "export with --smoothing gaussian or none")
        self.distance, self.smoothing, self.sigma = detect.distance, detect.smoothing, float(detect.sigma)
        self.map_kind, self.score, self.topk = detect.map_kind, detect.score, int(detect.topk)

    def _map(self, a: Tensor, b: Tensor) -> Tensor:
        return anomaly.anomaly_map(a, b, self.distance, self.smoothing, self.sigma)

    def forward(self, image: Tensor, direct: Tensor, restored: Tensor):
        B, N, C, S, S2 = restored.shape
        flat = restored.reshape(B * N, C, S, S2)
        xi = image.unsqueeze(1).expand(B, N, C, S, S2).reshape(B * N, C, S, S2)
        xd = direct.unsqueeze(1).expand(B, N, C, S, S2).reshape(B * N, C, S, S2)
        map_in = self._map(flat, xi).reshape(B, N, S, S2).mean(dim=1)
        map_rd = self._map(flat, xd).reshape(B, N, S, S2).mean(dim=1)
        map_base = self._map(image, direct)
        chosen = map_in if self.map_kind == "restored_vs_input" else map_rd
        return (chosen, anomaly.image_score(chosen, self.score, self.topk), map_in, map_rd, map_base,
                anomaly.image_score(map_base, self.score, self.topk))


def build_graphs(vqvae: VQVAE, prior: PixelSNAIL, detect: DetectConfig) -> dict[str, nn.Module]:
    """The four wrappers of a run, in eval mode, on the CPU."""
    vqvae = vqvae.cpu().eval()
    prior = prior.cpu().eval()
    graphs = {"encoder": EncodeGraph(vqvae), "prior": PriorGraph(prior), "decoder": DecodeGraph(vqvae),
              "postprocess": PostprocessGraph(detect)}
    for g in graphs.values():
        fold_weight_norm(g)
        g.eval()
    return graphs


def fold_weight_norm(module: nn.Module) -> int:
    """Fold weight normalisation (``torch.nn.utils.weight_norm`` hooks or
    ``parametrizations.weight_norm``) into plain weights, in place, so that an exported
    graph holds one constant per weight. Returns the number of weights folded (the
    current models use none; this keeps export correct if one is added)."""
    from torch.nn.utils import parametrize

    n = 0
    for m in module.modules():
        if parametrize.is_parametrized(m):
            for name in list(m.parametrizations.keys()):
                parametrize.remove_parametrizations(m, name, leave_parametrized=True)
                n += 1
        for hook in list(m._forward_pre_hooks.values()):
            if type(hook).__name__ == "WeightNorm":
                torch.nn.utils.remove_weight_norm(m, hook.name)
                n += 1
    return n


__all__ = ["EncodeGraph", "PriorGraph", "DecodeGraph", "PostprocessGraph", "build_graphs", "fold_weight_norm"]
