"""The four exported graphs as ``nn.Module`` wrappers of a trained run (needs torch).

Every wrapper computes exactly what :meth:`lsr.detect.Detector.detect` computes for its
stage, on the pure-PyTorch reference path (no native op, masks from index
comparisons), with fixed input and output names (:func:`lsr.deploy.bundle.graph_io`).
"Seen" is what the VQ-VAE encodes: the image itself in pixel mode (F = C, H = S), the
normalised backbone features in feature mode (F = feature channels, H = S / 8):

* :class:`EncodeGraph`       image (B, C, S, S) -> codes (B, h, w), seen (B, F, H, H)
                             (feature mode: the backbone is inside this graph)
* :class:`PriorGraph`        codes -> logits (B, K, h, w), likelihood (B, h, w)
* :class:`DecodeGraph`       codes -> picture (B, C, S, S) in [0, 1], seen (B, F, H, H)
* :class:`PostprocessGraph`  seen, direct, restored (B, N, F, H, H), resampled (B, N, h, w),
                             nll_score (B,), held_out (4,) -> maps and scores: the export of
                             :func:`lsr.anomaly.postprocess`, the one definition

with the posterior draw (``detect.posterior`` > 0, bundle version 4) also
:class:`DistanceGraph` seen -> distances (B, h*w, K) from the encoder's outputs to every
code (:func:`lsr.ops.code_distances`), and, for ONNX bundles, the prior's incremental form :class:`PriorRowsGraph` (rows r0..r1-1
of a pass from explicit state: what the bundle's incremental resampling loop calls).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

import copy
from typing import Any

from .. import anomaly
from ..config import RunConfig
from ..models import PixelSNAIL
from ..models.pixelsnail import STATE, background_grid
from ..ops.resampling import code_distances, code_likelihood


def _nearest_code(z: Tensor, codebook: Tensor) -> Tensor:
    """The quantiser as the formula of :func:`lsr.ops.reference.vq_nearest` (argmin of
    ||e_k||^2 - 2 z.e_k in float32, ties to the lower index), written without that
    function's chunking loop, whose slice bounds a trace would freeze at the example batch
    size: z (B, D, h, w) -> codes (B, h, w)."""
    B, D, h, w = z.shape
    flat = z.permute(0, 2, 3, 1).reshape(-1, D).float()
    e2 = (codebook * codebook).sum(dim=1)
    dist = e2.unsqueeze(0) - 2.0 * (flat @ codebook.t())            # (B*h*w, K)
    return dist.argmin(dim=1).reshape(B, h, w)


class EncodeGraph(nn.Module):
    """image (B, C, S, S) in [0, 1] -> codes (B, h, w) and what was seen (B, F, H, H):
    the image (pixel mode), or the backbone's normalised features (feature mode: the
    frozen backbone, the feature normalisation and the encoder in one graph)."""

    def __init__(self, vqvae: nn.Module):
        super().__init__()
        self.features = getattr(vqvae.cfg, "space", "pixels") == "features"
        if self.features:
            self.backbone = vqvae.backbone
            self.register_buffer("feature_mean", vqvae.feature_mean.detach().clone().float().view(1, -1, 1, 1))
            self.register_buffer("feature_std", vqvae.feature_std.detach().clone().float().view(1, -1, 1, 1))
        self.encoder = vqvae.encoder
        self.register_buffer("codebook", vqvae.quantizer.codebook.detach().clone().float())

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:
        seen = (self.backbone(image) - self.feature_mean) / self.feature_std if self.features else image
        return _nearest_code(self.encoder(seen), self.codebook), seen


class DistanceGraph(nn.Module):
    """seen (B, F, H, H) -> squared distances (B, h*w, K) from the encoder's outputs to every
    code: :func:`lsr.ops.code_distances`, what the posterior draw subtracts from the noise
    (docs/method.md section 3)."""

    def __init__(self, vqvae: nn.Module):
        super().__init__()
        self.encoder = vqvae.encoder
        self.register_buffer("codebook", vqvae.quantizer.codebook.detach().clone().float())

    def forward(self, seen: Tensor) -> Tensor:
        return code_distances(self.encoder(seen), self.codebook)


class PriorGraph(nn.Module):
    """One full teacher-forced prior pass: codes -> (logits, likelihood of each code),
    the likelihood as :func:`lsr.ops.resampling.code_likelihood` (softmax, then gather)."""

    def __init__(self, prior: nn.Module):
        super().__init__()
        self.prior = prior

    def forward(self, codes: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.prior(codes)
        return logits, code_likelihood(logits, codes)


class PriorRowsGraph(nn.Module):
    """Rows [r0, r1) of a prior pass, given the state the rows above left: PixelSNAIL's
    own ``rows`` core in its STATE mode (a pure function), so that it exports to ONNX.

    Inputs (ctx = :attr:`context_rows`, n = r1 - r0):

    * ``codes`` (A, ctx + n, W) int64: the codes of rows [r0 - ctx, r1); rows above the
      grid (negative) are ignored (any value);
    * ``row_ids`` (ctx + n,) int64: those row numbers, r0 - ctx .. r1 - 1;
    * ``state_i`` for each entry of :meth:`state_geometry`, in order: for a causal
      convolution with ``rows`` = kh - 1, the padded input rows it reads above r0,
      (A, C, rows, left + W + right) (cache rows [r0, r0 + rows) of a zero-padded
      (B, C, rows + H, left + W + right) buffer whose interior row y is grid row y - rows);
      for attention, the keys or values of positions [0, r0 * W), (A, heads, r0 * W, d).

    Outputs: ``logits`` (A, K, n, W), ``likelihood`` (A, n, W) of the codes in rows
    [r0, r1) (as :class:`PriorGraph`), and ``state_out_i`` per state entry: the new rows
    [r0, r1) to store (convolutions: the interior (A, C, n, W); attention: (A, heads,
    n * W, d) at positions [r0 * W, r1 * W)). Rows computed this way equal a full pass's
    to float rounding (different convolution shapes; tested); with r0 = 0 and every
    state entry empty above, it is a full pass that also returns the state.
    """

    def __init__(self, prior: PixelSNAIL):
        super().__init__()
        self.prior = copy.deepcopy(prior).cpu().eval()   # the caller's prior keeps its device and mode
        H = W = prior.cfg.grid_size
        self.context_rows = self.prior.context_rows      # x rows above r0 the vertical input conv reads
        self.register_buffer("bg", background_grid(1, H, W, self.prior.embed.weight.detach())[0].clone())  # (2, H, W)

    def state_geometry(self) -> list[dict[str, Any]]:
        """One record per state input: ``{"kind": "conv", "channels", "rows", "left",
        "right"}`` or ``{"kind": "attention", "heads", "head_dim"}`` (keys, then values)."""
        cfg = self.prior.cfg
        out = []
        for g in self.prior.state_layout:
            if g[0] < 0:
                out.append({"kind": "attention", "heads": cfg.n_heads, "head_dim": cfg.channels // cfg.n_heads})
            else:
                out.append({"kind": "conv", "channels": cfg.channels, "rows": g[0], "left": g[1], "right": g[2]})
        return out

    def forward(self, codes: Tensor, row_ids: Tensor, *state_in: Tensor):
        p, ctx = self.prior, self.context_rows
        state, outs = list(state_in), []
        emb_all = p.embed(codes).permute(0, 3, 1, 2)                       # (A, C, ctx + n, W)
        A = codes.shape[0]
        bg_all = self.bg.index_select(1, row_ids.clamp(min=0)).unsqueeze(0).expand(A, -1, -1, -1)
        # rows above the grid are the zero padding of the full pass; v of grid row 0 is zero
        x = torch.cat([emb_all, bg_all], 1) * (row_ids >= 0).to(emb_all.dtype).view(1, 1, -1, 1)
        v, h = p.stacks_in(x, False, (row_ids[ctx:] > 0).to(emb_all.dtype).view(1, 1, -1, 1))
        no_rows = torch.zeros(0, dtype=torch.long)
        logits = p.rows(v, h, emb_all[:, :, ctx:], bg_all[:, :, ctx:], no_rows, 0, False, STATE, state, outs)
        return (logits, code_likelihood(logits, codes[:, ctx:]), *outs)


class DecodeGraph(nn.Module):
    """codes (B, h, w) -> picture (B, C, S, S) clamped to [0, 1] (the Detector's x_d, x_r)
    and the decoded seen (B, F, H, H): the picture itself (pixel mode) or the decoded
    normalised features (feature mode; the picture then comes from the pixel decoder)."""

    def __init__(self, vqvae: nn.Module):
        super().__init__()
        self.features = getattr(vqvae.cfg, "space", "pixels") == "features"
        self.decoder = vqvae.decoder
        if self.features:
            self.pixel_decoder = vqvae.pixel_decoder
        self.register_buffer("codebook", vqvae.quantizer.codebook.detach().clone().float())

    def forward(self, codes: Tensor) -> tuple[Tensor, Tensor]:
        q = torch.nn.functional.embedding(codes, self.codebook).permute(0, 3, 1, 2)
        if self.features:
            return self.pixel_decoder(q).clamp(0, 1), self.decoder(q)
        picture = self.decoder(q).clamp(0, 1)
        return picture, picture.clone()


class PostprocessGraph(nn.Module):
    """:func:`lsr.anomaly.postprocess` with the run's map and score settings baked in.

    Inputs: ``seen``, ``direct`` (B, F, H, H), ``restored`` (B, N, F, H, H) (N restorations
    per image), ``resampled`` (B, N, h, w) float 0/1, ``nll_score`` (B,), ``held_out`` (4,)
    (score_mean, score_std, nll_mean, nll_std; NaN gives a NaN fused score). Outputs: the
    fields of :class:`lsr.anomaly.PostprocessResult` but ``map_score``, in order.
    """

    def __init__(self, settings: anomaly.MapSettings):
        super().__init__()
        if settings.smoothing == "bilateral":
            raise ValueError("smoothing 'bilateral' runs through scikit-image and cannot be exported; "
                             "export with --smoothing gaussian or none")
        self.settings = settings

    def forward(self, seen: Tensor, direct: Tensor, restored: Tensor, resampled: Tensor, nll_score: Tensor,
                held_out: Tensor):
        return tuple(anomaly.postprocess(seen, direct, restored, resampled, nll_score, held_out,
                                         self.settings))[:8]


def build_graphs(vqvae: nn.Module, prior: PixelSNAIL, config: RunConfig) -> dict[str, nn.Module]:
    """The four wrappers of a run (either mode), in eval mode, on the CPU."""
    vqvae = vqvae.cpu().eval()
    prior = prior.cpu().eval()
    graphs = {"encoder": EncodeGraph(vqvae), "prior": PriorGraph(prior), "decoder": DecodeGraph(vqvae),
              "postprocess": PostprocessGraph(anomaly.MapSettings.of(config))}
    if config.detect.posterior > 0:                    # the posterior draw's distances (bundle version 4)
        graphs["code_distances"] = DistanceGraph(vqvae)
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


__all__ = ["EncodeGraph", "PriorGraph", "PriorRowsGraph", "DecodeGraph", "PostprocessGraph", "build_graphs", "fold_weight_norm"]
