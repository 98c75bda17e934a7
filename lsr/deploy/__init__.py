"""Deployment: export a trained run to a bundle of graphs and run it without the training stack.

* ``lsr-export RUN --format onnx|torchscript --out DIR`` (:func:`export_bundle`) writes a
  bundle: ``encoder``, ``prior``, ``decoder`` and ``postprocess`` graphs plus
  ``bundle.json`` (:mod:`lsr.deploy.bundle`), checked against the PyTorch model
  (:func:`check_bundle`) before it is committed.
* :class:`Inferencer` runs a bundle on images (path, PIL image, numpy array or tensor)
  with onnxruntime, including the exact fast resampling loop in numpy
  (:mod:`lsr.deploy.numpy_ops`); ``lsr detect BUNDLE ...`` runs the same.

Importing :mod:`lsr.deploy` needs numpy and pillow only; onnxruntime is imported when a
bundle is opened, torch only by the export and the parity check (and TorchScript bundles).

Example:
    >>> from lsr.deploy import Inferencer                         # no torch imported
    >>> res = Inferencer("deploy/bottle").predict("img.png")     # doctest: +SKIP
    >>> res.score, res.anomaly_map.shape                         # doctest: +SKIP
    (0.173, (128, 128))
"""
from __future__ import annotations

from typing import Any

from .bundle import BUNDLE_VERSION, Bundle, BundleError, is_bundle, read_bundle
from .inferencer import BatchPrediction, Inferencer, Prediction

_TORCH_NAMES = {
    "export_bundle": "export", "ExportResult": "export", "torchscript_prior": "export",
    "check_bundle": "parity", "ParityReport": "parity", "DEFAULT_TOLERANCE": "parity",
}


def __getattr__(name: str) -> Any:
    """The export and parity-check names, imported on first use (they need torch)."""
    mod = _TORCH_NAMES.get(name)
    if mod is None:
        raise AttributeError(f"module 'lsr.deploy' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"lsr.deploy.{mod}"), name)
    globals()[name] = value
    return value


__all__ = ["Inferencer", "Prediction", "BatchPrediction", "Bundle", "BundleError",
           "read_bundle", "is_bundle", "BUNDLE_VERSION", *_TORCH_NAMES]
