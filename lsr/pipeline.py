"""The detection pipeline, written once for every backend (no torch import: the bundle
path runs it on numpy arrays).

A backend supplies the stages (:class:`Stages`): encode, decode, resample (the loops of
the resampling contract, docs/method.md section 3), the NLL score and postprocess (maps
and scores: :func:`lsr.anomaly.postprocess`, or its exported graph). :func:`detect` runs
them in the one order every runtime follows and returns a :class:`DetectionResult`:

* :class:`lsr.detect.Detector`: the torch modules (tensors);
* :class:`lsr.deploy.Inferencer`: an exported bundle's graphs on onnxruntime or
  TorchScript (numpy arrays);
* the C++ runtime ``lsr_detect`` runs the same steps over the same graphs
  (``export/``; tests/test_cpp_runtime.py holds it to the Python ones).

Arrays are torch tensors or numpy arrays; the pipeline uses only what both have
(``reshape``, slicing, ``sum``/``mean`` with ``axis``) and asks the backend for the rest.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Protocol, Sequence

from .contract import chain_seed


class DetectionResult(NamedTuple):
    """Per-batch detection output; every field has a leading batch dimension B (torch
    tensors from :class:`lsr.detect.Detector`, numpy arrays from
    :class:`lsr.deploy.Inferencer`).

    In features mode the maps compare features (the backbone's of the input, and those
    decoded from the direct and the restored codes), upsampled to the image; ``direct``
    and ``restored`` are then the pixel decoder's pictures of those codes."""
    anomaly_map: Any             # (B, S, S) the configured map (map_kind)
    score: Any                   # (B,) image score of anomaly_map
    nll_score: Any               # (B,) sum of -log p_t over codes with p_t < tau
    map_restored_vs_input: Any   # (B, S, S)
    map_restored_vs_direct: Any  # (B, S, S)
    map_direct: Any              # (B, S, S) baseline |x - x_d| (no prior)
    direct_score: Any            # (B,) image score of the baseline map
    direct: Any                  # (B, C, S, S) direct reconstruction x_d
    restored: Any                # (B, C, S, S) restored image x_r (first restoration)
    codes: Any                   # (B, h, w) int64 original codes
    resampled_codes: Any         # (B, h, w) int64 codes after resampling (first restoration)
    resampled: Any               # (B, h, w) bool, redrawn positions (first restoration)
    likelihood: Any              # (B, h, w) p_t of the original codes
    n_resampled: Any             # (B,) float, redrawn codes per restoration (mean)
    prior_passes: Any            # (B,) int64, prior passes over all restorations
    positions_evaluated: Any     # (B,) int64, grid positions those passes evaluated
    map_gated: Any               # (B, S, S) restored vs input where codes were resampled (dilated mask)
    fused_score: Any             # (B,) standardised score + standardised nll_score (held-out normal
                                 # images' statistics); NaN when the run has none for these options


class Stages(Protocol):
    """What a backend runs; shapes as in docs/method.md section 4 ("seen" is what the
    VQ-VAE encodes: the image, or its normalised backbone features)."""

    def encode(self, x: Any) -> tuple[Any, Any]:
        """images (B, C, S, S) -> (codes (B, h, w) int64, seen (B, F, H, H))."""

    def decode(self, codes: Any) -> tuple[Any, Any]:
        """codes (N, h, w) -> (seen decoded (N, F, H, H), pictures (N, C, S, S) in [0, 1],
        or None where pictures cost a pass of their own: :meth:`picture` then makes those
        needed)."""

    def picture(self, codes: Any) -> Any:
        """codes (N, h, w) -> pictures (N, C, S, S) in [0, 1] (the pixel decoder)."""

    def repeat(self, codes: Any, n: int) -> Any:
        """(B, h, w) -> (B * n, h, w), each image's n chains together."""

    def resample(self, chains: Any, seeds: Sequence[int], tau: float, temperature: float) -> Any:
        """The resampling contract over chains (N, h, w) with one noise seed each ->
        (codes, resampled, likelihood, prior_passes, positions_evaluated) (N, ...); a
        ``positions_evaluated`` of None means whole passes."""

    def nll_score(self, likelihood: Any, tau: float) -> Any:
        """likelihood (B, h, w) -> (B,) sum of -log p over codes with p < tau."""

    def postprocess(self, seen: Any, direct: Any, restored: Any, resampled: Any, nll: Any) -> dict[str, Any]:
        """seen, direct (B, F, H, H), restored (B, n, F, H, H), resampled (B, n, h, w) bool,
        nll (B,) -> the postprocess outputs by name (docs/method.md section 4)."""

    def as_float(self, a: Any) -> Any:
        """An array as float32."""


def detect(st: Stages, x: Any, ids: Sequence[int], seed: int, restorations: int, tau: float,
           temperature: float) -> DetectionResult:
    """The pipeline: encode; decode the codes (direct); resample ``restorations`` chains per
    image (noise of chain r of image i from ``chain_seed(seed, i, r)``); decode the
    resampled codes; the NLL score from the first restoration's likelihoods; postprocess.

    ``x`` (B, C, S, S) in [0, 1] at the model's size; ``ids``: one noise stream per image."""
    B, n = int(x.shape[0]), int(restorations)
    codes, seen = st.encode(x)
    direct_seen, direct = st.decode(codes)
    direct = st.picture(codes) if direct is None else direct
    h, w = int(codes.shape[1]), int(codes.shape[2])
    seeds = [chain_seed(seed, i, r) for i in ids for r in range(n)]
    rs = st.resample(st.repeat(codes, n), seeds, float(tau), float(temperature))
    restored_seen, pictures = st.decode(rs.codes)
    first = slice(None, None, n)
    restored = st.picture(rs.codes[first]) if pictures is None else pictures[first]
    likelihood = rs.likelihood[first]
    nll = st.nll_score(likelihood, float(tau))
    post = st.postprocess(seen, direct_seen, restored_seen.reshape((B, n) + tuple(restored_seen.shape[1:])),
                          rs.resampled.reshape(B, n, h, w), nll)
    positions = rs.prior_passes * (h * w) if rs.positions_evaluated is None else rs.positions_evaluated
    return DetectionResult(
        anomaly_map=post["anomaly_map"], score=post["score"], nll_score=nll,
        map_restored_vs_input=post["map_restored_vs_input"],
        map_restored_vs_direct=post["map_restored_vs_direct"],
        map_direct=post["map_direct"], direct_score=post["direct_score"],
        direct=direct, restored=restored, codes=codes,
        resampled_codes=rs.codes[first], resampled=rs.resampled[first], likelihood=likelihood,
        n_resampled=st.as_float(rs.resampled.reshape(B, n, h * w).sum(axis=-1)).mean(axis=1),
        prior_passes=rs.prior_passes.reshape(B, n).sum(axis=1),
        positions_evaluated=positions.reshape(B, n).sum(axis=1),
        map_gated=post["map_gated"], fused_score=post["fused_score"],
    )


__all__ = ["DetectionResult", "Stages", "detect"]
