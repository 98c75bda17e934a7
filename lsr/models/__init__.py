"""Models: the VQ-VAE (:mod:`lsr.models.vqvae`), its feature-space form over a frozen
pretrained backbone (:mod:`lsr.models.feature_vqvae`, :mod:`lsr.models.backbone`) and the
PixelSNAIL prior (:mod:`lsr.models.pixelsnail`). Pure ``nn.Module`` code; training lives
in :mod:`lsr.training`."""
from .backbone import BackboneError, FeatureExtractor, build_backbone
from .feature_vqvae import FeatureVQVAE, FeatureVQVAEOutput, build_vqvae
from .pixelsnail import PixelSNAIL
from .vqvae import VQVAE, QuantizerOutput, VectorQuantizer, VQVAEOutput
from .incremental import script_prior
from .. import ops as _ops

_ops.register_scriptable(PixelSNAIL, script_prior)     # --resampler native runs PixelSNAIL priors

__all__ = ["VQVAE", "VQVAEOutput", "VectorQuantizer", "QuantizerOutput", "PixelSNAIL", "FeatureVQVAE",
           "FeatureVQVAEOutput", "build_vqvae", "FeatureExtractor", "build_backbone", "BackboneError"]
