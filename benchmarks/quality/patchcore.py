"""PatchCore (Roth et al. 2022), the strong simple peer of the quality benchmark.

A memory bank of normal patch features, thinned by a greedy coreset; a test patch's
anomaly score is the distance to its nearest neighbour in the bank. The patch features
are those of :class:`lsr.models.backbone.FeatureExtractor` (two taps, each averaged over
a 3 x 3 neighbourhood, concatenated at stride 8: PatchCore's locally aware features), so
PatchCore and feature-space LSR see the same representation. The image score is the
largest patch distance, without PatchCore's reweighting by the neighbour's density.

Example:
    >>> pc = PatchCore(build_backbone("efficientnet_lite0"))       # doctest: +SKIP
    >>> pc.fit(train_images)                                       # doctest: +SKIP
    >>> scores, maps = pc.predict(test_images)                     # doctest: +SKIP
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from lsr.anomaly import gaussian_blur, resize_maps

#: query rows per block of the nearest-neighbour search (a block holds rows x bank distances)
NN_CHUNK = 2048
#: images per forward pass of the backbone
BATCH_SIZE = 16
#: upper bound on the memory bank, whatever the coreset fraction
MAX_CORESET = 10_000


def nearest_neighbour_distance(queries: Tensor, bank: Tensor, chunk: int = NN_CHUNK) -> Tensor:
    """Euclidean distance of each query to its nearest row of ``bank``.

    Computed block by block as ``||q||^2 - 2 q.b + ||b||^2``, clamped at 0, then the
    square root, so at most ``chunk`` x M distances are held at once. Both sides are first
    centred on the bank's mean (distances do not change), which keeps the norms small and
    with them the cancellation error of the expansion: about sqrt(eps) x the norm.

    Args:
        queries: (Q, D).
        bank: (M, D), same dtype and device.
        chunk: query rows per block.

    Returns:
        (Q,) distances, in the dtype of ``queries``.
    """
    centre = bank.mean(dim=0)
    bank = bank - centre
    bank_sq = bank.pow(2).sum(dim=1)                                      # (M,)
    out = torch.empty(queries.shape[0], dtype=queries.dtype, device=queries.device)
    for i in range(0, queries.shape[0], chunk):
        q = queries[i:i + chunk] - centre
        d2 = q.pow(2).sum(dim=1, keepdim=True) - 2.0 * (q @ bank.T) + bank_sq    # (chunk, M)
        out[i:i + chunk] = d2.amin(dim=1).clamp_min(0.0).sqrt()
    return out


def greedy_coreset(features: Tensor, n: int, projection_dim: int | None = 128, seed: int = 0) -> Tensor:
    """Indices of ``n`` rows picked by k-center greedy (farthest point first).

    The rows are mapped by a random Gaussian projection to ``projection_dim`` dimensions
    (entries N(0, 1 / projection_dim), which keeps squared distances on average), unless
    ``projection_dim`` is None or not below D, then centred. The first pick is a seeded
    random row; each next pick is the row farthest from all rows picked so far, the
    distances to the chosen set updated exactly with each pick (``torch.minimum``). Chosen
    rows are excluded, so indices never repeat, even among duplicate rows.

    Args:
        features: (N, D).
        n: coreset size; n >= N returns ``arange(N)``, n <= 0 no index.
        projection_dim: dimension of the random projection, None for none.
        seed: seeds the projection and the first pick.

    Returns:
        (n,) int64 indices into ``features``, in the order they were picked, on its device.
    """
    N, D = features.shape
    if n >= N:
        return torch.arange(N, device=features.device)
    if n <= 0:
        return torch.empty(0, dtype=torch.long, device=features.device)
    gen = torch.Generator().manual_seed(int(seed))
    x = features
    if projection_dim is not None and projection_dim < D:
        proj = torch.randn(D, projection_dim, generator=gen, dtype=torch.float64) / projection_dim ** 0.5
        x = features @ proj.to(features.device, features.dtype)                  # (N, projection_dim)
    x = x - x.mean(dim=0)                           # centred: small norms, small cancellation in d2
    x_sq = x.pow(2).sum(dim=1)                                                    # (N,)
    xt = x.T.contiguous()                           # (D', N): c @ xt runs ~2x faster than x @ c on CPU
    picks = torch.empty(n, dtype=torch.long, device=x.device)
    min_d2 = torch.full((N,), float("inf"), dtype=x.dtype, device=x.device)       # to the chosen set
    j = int(torch.randint(N, (1,), generator=gen))
    for i in range(n):
        picks[i] = j
        d2 = (x_sq - 2.0 * (xt[:, j] @ xt) + x_sq[j]).clamp_min(0.0)               # (N,) to the new pick
        min_d2 = torch.minimum(min_d2, d2)
        min_d2[j] = -1.0                                                          # never picked again
        j = torch.argmax(min_d2)
    return picks


class PatchCore:
    """Nearest-neighbour patch distances to a coreset of the training patches.

    Args:
        backbone: frozen feature extractor: images (B, C, S, S) in [0, 1] -> features
            (B, D, S / stride, S / stride); it needs ``out_channels`` and ``stride``.
        coreset_fraction: bank size as a fraction of all training patches.
        max_coreset: upper bound on the bank size.
        seed: seeds the coreset's projection and first pick.
        sigma: Gaussian smoothing (image pixels) of the upsampled maps.
        projection_dim: dimension of the random projection for the coreset search
            (the bank itself keeps the full features); None for none.
        batch_size: images per backbone pass.
    """

    def __init__(self, backbone: nn.Module, coreset_fraction: float = 0.1, max_coreset: int = MAX_CORESET,
                 seed: int = 0, sigma: float = 4.0, projection_dim: int | None = 128,
                 batch_size: int = BATCH_SIZE):
        self.backbone = backbone.eval()
        self.coreset_fraction, self.max_coreset = float(coreset_fraction), int(max_coreset)
        self.seed, self.sigma, self.projection_dim = int(seed), float(sigma), projection_dim
        self.batch_size = int(batch_size)
        self.bank: Tensor | None = None                                # (M, D) once fitted

    @property
    def device(self) -> torch.device:
        p = next(self.backbone.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        """Backbone features of images (N, C, S, S), batch by batch: -> (N, D, h, w) float32."""
        out = [self.backbone(images[i:i + self.batch_size].to(self.device).float())
               for i in range(0, images.shape[0], self.batch_size)]
        return torch.cat(out).float()

    @staticmethod
    def patches(features: Tensor) -> Tensor:
        """Feature maps (N, D, h, w) -> patch rows (N * h * w, D), image by image, row-major."""
        return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])

    @torch.no_grad()
    def fit(self, images: Tensor) -> "PatchCore":
        """Build the memory bank from normal images (N, C, S, S) in [0, 1]: their
        N * h * w patch features thinned to ``coreset_fraction`` (at least one, at most
        ``max_coreset``) by :func:`greedy_coreset`, kept in the original feature space."""
        feats = self.patches(self.features(images))                               # (N*h*w, D)
        n = min(self.max_coreset, max(1, round(self.coreset_fraction * feats.shape[0])))
        idx = greedy_coreset(feats, n, self.projection_dim, self.seed)
        self.bank = feats[idx].contiguous()                                        # (n, D)
        return self

    @torch.no_grad()
    def patch_distances(self, images: Tensor) -> Tensor:
        """Per patch distance to the nearest bank row: images (B, C, S, S) -> (B, h, w)."""
        if self.bank is None:
            raise RuntimeError("PatchCore.predict before fit")
        f = self.features(images)
        B, _, h, w = f.shape
        return nearest_neighbour_distance(self.patches(f), self.bank).view(B, h, w)

    @torch.no_grad()
    def predict(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Image scores and anomaly maps of images (B, C, S, S) in [0, 1].

        Returns:
            scores (B,): the largest patch distance (of the unsmoothed patch map);
            maps (B, S, S): patch distances bilinearly upsampled to the image size and
            Gaussian-smoothed with ``sigma``. Both on the backbone's device.
        """
        d = self.patch_distances(images)                                           # (B, h, w)
        maps = gaussian_blur(resize_maps(d, tuple(images.shape[-2:])), self.sigma)
        return d.flatten(1).amax(dim=1), maps
