"""Graph runners: run a bundle's graphs by name on numpy arrays (no torch at module level).

* :class:`OrtRunner` runs ONNX graphs with onnxruntime; the CUDA provider is chosen
  only when it really loads (:func:`default_providers`), without onnxruntime's error
  noise on machines where it cannot.
* :class:`TorchScriptRunner` runs TorchScript graphs with ``torch.jit.load`` (needs torch).

Both expose ``run(graph, **inputs) -> {output name: array}`` with the names of
:func:`lsr.deploy.bundle.graph_io`; the prior always returns ``logits`` and
``likelihood``.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import warnings
from typing import Any, Iterator, Sequence

import numpy as np

from .bundle import GRAPHS, Bundle, BundleError

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
_ORT_DEFAULT_SEVERITY = 2          # onnxruntime's default logger level: warnings and above
_cuda_probe: dict[str, bool] = {}


@contextlib.contextmanager
def _quiet_onnxruntime() -> Iterator[None]:
    """Silence onnxruntime's process-wide logger and the C-level stderr for the block
    (a CUDA provider that fails to load prints errors there), then restore both."""
    import onnxruntime as ort

    ort.set_default_logger_severity(4)
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)
        ort.set_default_logger_severity(_ORT_DEFAULT_SEVERITY)


def _nvidia_driver_present() -> bool:
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        with contextlib.suppress(OSError):
            ctypes.CDLL(name)
            return True
    return False


def cuda_usable(model_path: str | os.PathLike) -> bool:
    """True when onnxruntime's CUDA provider is compiled in, a driver is present, and a
    session on ``model_path`` actually gets it (probed once per process, quietly)."""
    import onnxruntime as ort

    if "cuda" in _cuda_probe:
        return _cuda_probe["cuda"]
    ok = CUDA in ort.get_available_providers() and _nvidia_driver_present()
    if ok:
        try:
            with _quiet_onnxruntime():
                sess = ort.InferenceSession(str(model_path), providers=[CUDA, CPU])
            ok = CUDA in sess.get_providers()
        except Exception:  # noqa: BLE001 - any failure means: not usable
            ok = False
    _cuda_probe["cuda"] = ok
    return ok


def default_providers(model_path: str | os.PathLike) -> list[str]:
    """``[CUDA, CPU]`` when the CUDA provider loads, else ``[CPU]``."""
    return [CUDA, CPU] if cuda_usable(model_path) else [CPU]


def parse_providers(spec: str | Sequence[str] | None) -> list[str] | None:
    """``"cuda,cpu"`` or ``["CUDAExecutionProvider", ...]`` -> provider names (None: auto)."""
    if spec is None:
        return None
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    short = {"cpu": CPU, "cuda": CUDA, "tensorrt": "TensorrtExecutionProvider"}
    out = [short.get(s.strip().lower(), s.strip()) for s in items if s.strip()]
    if not out:
        raise ValueError("--providers: no provider given")
    return out


def _shape_ok(declared: Sequence[Any], actual: Sequence[Any]) -> bool:
    if len(declared) != len(actual):
        return False
    for d, a in zip(declared, actual):
        if isinstance(d, int) and isinstance(a, int) and d != a:
            return False
        if isinstance(d, int) and not isinstance(a, int):
            return False                   # bundle.json says fixed, the graph says dynamic
    return True


class OrtRunner:
    """The graphs of an ONNX bundle as onnxruntime sessions.

    Args:
        bundle: a checked :class:`lsr.deploy.bundle.Bundle` of format ``onnx``.
        providers: onnxruntime execution providers in order of preference (default:
            CUDA when it loads, else CPU). An explicitly requested provider that is not
            available or does not load is an error.
        threads: intra-op threads per session (default: onnxruntime's choice).
        spin: let idle onnxruntime worker threads spin (onnxruntime's default; lower
            latency for back-to-back runs when nothing else needs the cores).
    """

    def __init__(self, bundle: Bundle, providers: Sequence[str] | None = None, threads: int | None = None,
                 spin: bool = False):
        import onnxruntime as ort

        self.bundle = bundle
        if providers is None:
            self.providers = default_providers(bundle.graphs["encoder"].path)
        else:
            self.providers = list(providers)
            avail = ort.get_available_providers()
            missing = [p for p in self.providers if p not in avail]
            if missing:
                raise ValueError(f"onnxruntime providers {missing} are not available in this onnxruntime "
                                 f"{ort.__version__} (available: {avail})")
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = int(threads)
        if not spin:
            # idle worker threads block instead of spinning: four sessions (and torch or the
            # numpy loop between their runs) then do not steal each other's cores
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.sessions: dict[str, Any] = {}
        for name, spec in bundle.graphs.items():
            try:
                sess = ort.InferenceSession(str(spec.path), so, providers=self.providers)
            except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
                raise BundleError(f"{spec.path}: onnxruntime cannot load this graph ({type(e).__name__}: "
                                  f"{str(e).strip()[:300]})") from None
            if providers is not None and CUDA in self.providers and CUDA not in sess.get_providers():
                raise RuntimeError(f"{spec.path}: CUDAExecutionProvider was requested but did not load "
                                   f"(see onnxruntime's message above); use --providers cpu")
            self._check_io(spec, sess)
            self.sessions[name] = sess
        self.active_providers = self.sessions["encoder"].get_providers()

    @staticmethod
    def _check_io(spec, sess) -> None:
        for kind, declared, actual in (("input", spec.inputs, sess.get_inputs()),
                                       ("output", spec.outputs, sess.get_outputs())):
            names = [a.name for a in actual]
            if names != [d["name"] for d in declared]:
                raise BundleError(f"{spec.path}: graph {kind}s {names} differ from bundle.json "
                                  f"({[d['name'] for d in declared]})")
            for d, a in zip(declared, actual):
                if not _shape_ok(d["shape"], list(a.shape)):
                    raise BundleError(f"{spec.path}: {kind} {a.name!r} has shape {list(a.shape)} but bundle.json "
                                      f"declares {d['shape']}")

    def run(self, graph: str, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        sess = self.sessions[graph]
        outs = sess.run(None, inputs)
        return {o.name: v for o, v in zip(sess.get_outputs(), outs)}


class TorchScriptRunner:
    """The graphs of a TorchScript bundle through ``torch.jit.load`` (needs torch).

    The TorchScript prior returns the logits; the likelihood is computed here with the
    same torch ops as :func:`lsr.ops.resampling.code_likelihood`."""

    def __init__(self, bundle: Bundle, device: str = "cpu"):
        try:
            import torch
        except ImportError:
            raise BundleError(f"{bundle.root / 'bundle.json'}: a TorchScript bundle needs torch; "
                              f"export with --format onnx to run without it") from None
        from ..ops.resampling import code_likelihood

        self.torch = torch
        self.code_likelihood = code_likelihood
        self.bundle = bundle
        self.device = torch.device(device)
        self.providers = [f"torch.jit ({self.device})"]
        self.active_providers = self.providers
        self.modules: dict[str, Any] = {}
        for name in GRAPHS + (("code_distances",) if "code_distances" in bundle.graphs else ()):
            self.modules[name] = self._load(bundle.graphs[name])
        self._prefer_native_prior()

    def _load(self, spec):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)   # TorchScript is the format here
                return self.torch.jit.load(str(spec.path), map_location=self.device).eval()
        except Exception as e:  # noqa: BLE001 - torch.jit raises RuntimeError and others
            raise BundleError(f"{spec.path}: torch.jit.load cannot load this graph "
                              f"({type(e).__name__}: {str(e).strip()[:300]})") from None

    def _prefer_native_prior(self) -> None:
        """Use ``prior_native.pt`` (the prior on lsr's native attention kernels; its hash
        checked by :func:`lsr.deploy.bundle.read_bundle`) when the bundle has it and the
        lsr extension is loaded here."""
        spec = self.bundle.graphs.get("prior_native")
        if spec is None:
            return
        try:
            from lsr import ops
        except ImportError:
            return
        if not ops.native_available():
            return
        self.modules["prior"] = self._load(spec)
        self.providers = self.active_providers = [f"torch.jit ({self.device}, native prior)"]

    def native_loop_available(self) -> bool:
        """Whether lsr's C++ resampling loop can run this bundle's prior here: the lsr
        extension is loaded and the scripted prior has the incremental methods."""
        try:
            from lsr import ops
        except ImportError:
            return False
        return ops.native_available() and hasattr(self.modules["prior"], "partial")

    def resample_native(self, codes: np.ndarray, noise: np.ndarray, tau: float, temperature: float):
        """The C++ loop of ``--resampler native`` over the scripted prior: a
        :class:`lsr.deploy.numpy_ops.ResampleResult`."""
        from lsr import ops
        from .numpy_ops import ResampleResult

        torch = self.torch
        with torch.inference_mode():
            r = ops.resample_native(self.modules["prior"], torch.from_numpy(np.ascontiguousarray(codes)).to(self.device),
                                    torch.from_numpy(np.ascontiguousarray(noise)).to(self.device), tau, temperature)
        return ResampleResult(r.codes.cpu().numpy(), r.resampled.cpu().numpy(), r.likelihood.cpu().numpy(),
                              r.prior_passes.cpu().numpy(), r.positions_evaluated.cpu().numpy())

    def run(self, graph: str, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        torch = self.torch
        spec = self.bundle.graphs[graph]
        args = [torch.from_numpy(np.ascontiguousarray(inputs[d["name"]])).to(self.device) for d in spec.inputs]
        with torch.inference_mode():
            out = self.modules[graph](*args)
            outs = list(out) if isinstance(out, (tuple, list)) else [out]
            if graph == "prior":
                codes = args[0]
                outs = [outs[0], self.code_likelihood(outs[0], codes)]
        names = [d["name"] for d in spec.outputs] + (["likelihood"] if graph == "prior" else [])
        return {n: t.cpu().numpy() for n, t in zip(names, outs)}


def make_runner(bundle: Bundle, providers: Sequence[str] | None = None, threads: int | None = None):
    """The runner for the bundle's format."""
    if bundle.format == "onnx":
        return OrtRunner(bundle, providers, threads)
    device = "cpu"
    if providers:
        device = "cuda" if any(p in (CUDA, "cuda") for p in providers) else "cpu"
    return TorchScriptRunner(bundle, device)


__all__ = ["OrtRunner", "TorchScriptRunner", "make_runner", "default_providers", "cuda_usable",
           "parse_providers", "CPU", "CUDA"]
