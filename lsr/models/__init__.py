"""Models: the VQ-VAE (:mod:`lsr.models.vqvae`) and the PixelSNAIL prior
(:mod:`lsr.models.pixelsnail`). Pure ``nn.Module`` code; training lives in
:mod:`lsr.training`."""
from .pixelsnail import PixelSNAIL
from .vqvae import VQVAE, QuantizerOutput, VectorQuantizer, VQVAEOutput

__all__ = ["VQVAE", "VQVAEOutput", "VectorQuantizer", "QuantizerOutput", "PixelSNAIL"]
