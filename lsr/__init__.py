"""lsr: image anomaly detection by Latent Space Resampling.

Train on normal images only: a VQ-VAE turns an image into a grid of discrete codes, a
PixelSNAIL prior learns which code grids are normal; at detection, unlikely codes are
resampled from the prior, the grid is decoded into a restored image, and the
difference marks the anomaly.

Where things are:

* :mod:`lsr.config`   – every hyperparameter (dataclasses, presets, JSON)
* :mod:`lsr.models`   – the VQ-VAE and the PixelSNAIL prior (pure nn.Module)
* :mod:`lsr.ops`      – ops with a pure-PyTorch reference and a native dispatch point:
  nearest-codebook search, strictly causal attention, the resampling loop
* :mod:`lsr.training`    – training, resume, tau calibration          (``lsr train``)
* :mod:`lsr.detect`   – :class:`Detector`, :class:`DetectionResult` (``lsr detect``)
* :mod:`lsr.anomaly`  – anomaly maps and image scores
* :mod:`lsr.evaluation` – MVTec AD evaluation                         (``lsr eval``)
* :mod:`lsr.metrics`  – AUROC, AUPRO, F1-max
* :mod:`lsr.data`     – image and MVTec AD folder loading, clear errors
* :mod:`lsr.report`   – panels, report pictures, tables
* :mod:`lsr.demo`, :mod:`lsr.demo_data` – ``lsr demo``
* :mod:`lsr.cli`      – the command line

Example:
    >>> import lsr
    >>> cfg = lsr.preset("tiny", in_channels=1)
    >>> cfg.grid_size
    8
"""
from .config import DetectConfig, PriorConfig, RunConfig, TrainConfig, VQVAEConfig, preset
from .data import DataError
from .detect import DetectionResult, Detector, detect_images
from .evaluation import evaluate
from .training import TrainResult, train

__version__ = "0.1.0"

__all__ = ["RunConfig", "VQVAEConfig", "PriorConfig", "TrainConfig", "DetectConfig", "preset", "train",
           "TrainResult", "Detector", "DetectionResult", "detect_images", "evaluate", "DataError",
           "__version__"]
