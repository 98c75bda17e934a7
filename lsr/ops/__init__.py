"""Ops with a native kernel (when the ``lsr._C`` extension is built) and a pure-PyTorch
reference with the same signature.

Each op here is a dispatch point: it calls the native kernel when the extension is
loaded and the backend allows it, else the reference. :func:`backend` forces a path,
e.g. ``with lsr.ops.backend("reference"):`` during ONNX export or in tests.

Example:
    >>> import torch, lsr.ops as ops
    >>> ops.vq_nearest(torch.zeros(2, 3), torch.eye(3))
    tensor([0, 0])
"""
from __future__ import annotations

import contextlib
import threading
import warnings
from typing import Iterator

import torch
from torch import Tensor

from . import reference

_BACKENDS = ("auto", "native", "fast", "reference")
_state = threading.local()
_native_checked = False
_native_ok = False
_warned = False


_native_error = ""


def native_available() -> bool:
    """True when the compiled extension ``lsr._C`` was built and loads."""
    global _native_checked, _native_ok, _native_error
    if not _native_checked:
        _native_checked = True
        try:
            from lsr import _C  # noqa: F401  (its static initialisers register torch.ops.lsr.*)
            from . import _native  # noqa: F401  (fake tensors and autograd for those ops)
            _native_ok = True
        except (ImportError, OSError, RuntimeError) as e:
            _native_ok, _native_error = False, f"{type(e).__name__}: {e}"
    return _native_ok


def _warn_missing() -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn("lsr: the native extension lsr._C is not available "
                      f"({_native_error or 'not built'}); using the pure-PyTorch reference ops, which are "
                      "slower. Build it with `pip install --no-build-isolation .` (see README).",
                      RuntimeWarning, stacklevel=4)


def current_backend() -> str:
    return getattr(_state, "backend", "auto")


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Force an implementation: ``auto`` (native if built, else the fast PyTorch path),
    ``native`` (error if not built), ``fast`` (pure PyTorch, fastest form, e.g. SDPA),
    ``reference`` (pure PyTorch, plain form; used for export and as the test oracle)."""
    if name not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {name!r}")
    if name == "native" and not native_available():
        raise RuntimeError("the native extension lsr._C is not built; reinstall with "
                           "`pip install --no-build-isolation .` (see README)")
    old = current_backend()
    _state.backend = name
    try:
        yield
    finally:
        _state.backend = old


def _use_native() -> bool:
    b = current_backend()
    if b == "native":
        return True
    if b == "auto" and not torch.jit.is_scripting() and not torch.onnx.is_in_onnx_export():
        if native_available():
            return True
        _warn_missing()
    return False


def vq_nearest(z: Tensor, codebook: Tensor) -> Tensor:
    """Nearest codebook index per row: z (Tensor[N, D]), codebook (Tensor[K, D]) ->
    Tensor[N] int64. Ties go to the lower index. See :func:`reference.vq_nearest`."""
    if _use_native():
        from ._native import vq_nearest as native
        return native(z, codebook)
    return reference.vq_nearest(z, codebook)


def causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Strictly causal attention: q, k, v (Tensor[B, h, T, d]) -> Tensor[B, h, T, d];
    query t sees keys s < t, row 0 is zeros. See :func:`reference.causal_attention`."""
    if _use_native():
        from ._native import causal_attention as native
        return native(q, k, v)
    if current_backend() == "reference" or torch.onnx.is_in_onnx_export():
        return reference.causal_attention(q, k, v)
    return reference.causal_attention_sdpa(q, k, v)


__all__ = ["vq_nearest", "causal_attention", "backend", "current_backend", "native_available",
           "reference"]


from .resampling import (ResampleResult, flag_positions, gumbel_noise,  # noqa: E402
                       resample_fast, resample_naive, resample_native)

from ..config import RESAMPLERS  # noqa: E402  (the one list; config imports no torch)


def resolve_resampler(method: str, prior) -> str:
    """``auto`` -> ``native`` when the extension is built and ``prior`` can be scripted for
    the C++ loop (a PixelSNAIL, or a scripted incremental prior), else ``fast``; any other
    method is returned as it is."""
    if method != "auto":
        return method
    from lsr.models.pixelsnail import PixelSNAIL
    scripted = isinstance(prior, torch.jit.ScriptModule) and hasattr(prior, "partial")
    return "native" if (isinstance(prior, PixelSNAIL) or scripted) and native_available() else "fast"


def resample(prior, codes: Tensor, noise: Tensor, tau: float, temperature: float = 1.0,
             method: str = "fast") -> ResampleResult:
    """Resample unlikely codes (dispatch point of the resampling loop).

    Args:
        prior: callable, codes (B, H, W) int64 -> logits (B, K, H, W).
        codes (Tensor[B, H, W]): original codes.
        noise (Tensor[B, H*W, K]): pre-drawn Gumbel noise (:func:`gumbel_noise`).
        tau: likelihood threshold.
        temperature: sampling temperature.
        method: ``naive`` (H*W prior passes, the reference), ``fast`` (exact,
            1 + changes passes), ``native`` (the same loop in C++ with incremental,
            lazy prior passes; needs the extension and a PixelSNAIL prior) or ``auto``
            (``native`` when both are there, else ``fast``; all give the same codes).
    """
    method = resolve_resampler(method, prior)
    if method == "naive":
        return resample_naive(prior, codes, noise, tau, temperature)
    if method == "fast":
        return resample_fast(prior, codes, noise, tau, temperature)
    if method == "native":
        return resample_native(prior, codes, noise, tau, temperature)
    raise ValueError(f"resampler must be one of {RESAMPLERS}, got {method!r}")


__all__ += ["resample", "ResampleResult", "flag_positions", "gumbel_noise", "resample_fast",
            "resample_naive", "resample_native", "resolve_resampler", "RESAMPLERS"]
