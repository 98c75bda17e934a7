"""lsr: image anomaly detection by Latent Space Resampling.

Train on normal images only: a VQ-VAE turns an image (by default: a frozen pretrained
backbone's feature map of it) into a grid of discrete codes, a PixelSNAIL prior learns
which code grids are normal; at detection, unlikely codes are resampled from the prior,
the grid is decoded into a restored version, and the difference marks the anomaly. The
method and the resampling contract: ``docs/method.md``.

Where things are:

* :mod:`lsr.config`   – every hyperparameter (dataclasses, presets, JSON)
* :mod:`lsr.models`   – the VQ-VAE, its feature-space form (:mod:`lsr.models.feature_vqvae`)
  over a frozen backbone (:mod:`lsr.models.backbone`, EfficientNet-Lite0) and the
  PixelSNAIL prior (pure nn.Module);
  :mod:`lsr.models.incremental`, the prior evaluated row range by row range (scripted
  for the native resampling loop and the C++ runtime)
* :mod:`lsr.ops`      – ops with a pure-PyTorch reference and a native dispatch point:
  nearest-codebook search, strictly causal attention, the resampling loops
  (naive, fast, native)
* :mod:`lsr.training`    – training, resume, tau calibration          (``lsr train``)
* :mod:`lsr.detect`   – :class:`Detector`, :class:`DetectionResult` (``lsr detect``)
* :mod:`lsr.anomaly`  – anomaly maps and image scores
* :mod:`lsr.pipeline` – the detection steps every backend runs, the result type
* :mod:`lsr.evaluation` – the metrics of an evaluation                 (``lsr eval``)
* :mod:`lsr.commands` – the bodies of ``lsr detect`` and ``lsr eval`` that write files
* :mod:`lsr.metrics`  – AUROC, AUPRO, F1-max
* :mod:`lsr.images`   – image decoding (strict, bounded), clear errors
* :mod:`lsr.data`     – MVTec AD folders, listings, the train/validation split
* :mod:`lsr.report`   – panels, report pictures, tables
* :mod:`lsr.demo`, :mod:`lsr.demo_data` – ``lsr demo``
* :mod:`lsr.deploy`   – ``lsr-export`` (ONNX / TorchScript bundles, parity check) and
  :class:`lsr.deploy.Inferencer`, which runs a bundle with numpy and onnxruntime only
* :mod:`lsr.profiling` – FLOPs and bytes of what ran, the machine's measured limits
* :mod:`lsr.decision` – thresholds from held-out good images, verdicts, regions, masks
* :mod:`lsr.explain`, :mod:`lsr.differential` – the prior's attention maps; detection against a reference
* :mod:`lsr.runfolder`, :mod:`lsr.contract`, :mod:`lsr.report_html` – the run manifest; what every
  port shares; the HTML report
* :mod:`lsr.cli`      – the command line (C++ runtime: ``export/``)

Example:
    >>> import lsr
    >>> cfg = lsr.preset("tiny", in_channels=1)
    >>> cfg.grid_size
    8
"""
from __future__ import annotations

from typing import Any

from .config import DetectConfig, PriorConfig, RunConfig, TrainConfig, VQVAEConfig, preset
from .data import DataError

__version__ = "0.1.0"

# Names that need torch are imported on first use (PEP 562), so that ``import lsr`` and
# :mod:`lsr.deploy` work where only numpy, pillow and onnxruntime are installed.
_LAZY = {
    "Detector": "detect", "DetectionResult": "detect", "detect_images": "commands",
    "evaluate": "commands", "train": "training", "TrainResult": "training",
}
_SUBMODULES = ("anomaly", "checkpoint", "cli", "config", "contract", "data", "decision", "demo", "demo_data",
               "deploy", "detect", "differential", "distributed", "evaluation", "explain", "io", "metrics",
               "models", "ops", "profiling", "report", "report_html", "runfolder", "training")


def __getattr__(name: str) -> Any:
    import importlib

    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'lsr' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_SUBMODULES))


__all__ = ["RunConfig", "VQVAEConfig", "PriorConfig", "TrainConfig", "DetectConfig", "preset", "train",
           "TrainResult", "Detector", "DetectionResult", "detect_images", "evaluate", "DataError",
           "__version__"]
