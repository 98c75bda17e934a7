"""Ops with a native kernel (when the ``lsr._C`` extension is built) and a pure-PyTorch
reference with the same signature.

Each op here is a dispatch point: it calls the native kernel when the extension is
loaded and the backend allows it, else the reference. :func:`backend` forces a path,
e.g. ``with lsr.ops.backend("reference"):`` during ONNX export or in tests.

CUDA kernels (``LSR_CUDA_KERNELS``): the ``auto`` backend uses the native CUDA kernels
for CUDA tensors according to the environment variable ``LSR_CUDA_KERNELS``, read once,
at the first op on a CUDA tensor:

* ``verify`` (the default; also when unset or empty): the first time a kernel
  (``vq_nearest``, ``causal_attention_fwd``, ``causal_attention_bwd`` when a gradient is
  needed, ``causal_attention_rows``) is to run on a CUDA device, it is run once against
  its reference (in float64) on a small fixed input on that device; the verdict is kept
  per kernel and device for the process. On a mismatch, or an error raised by the
  kernel, lsr warns once (``RuntimeWarning``, naming the kernel, the device and the
  largest difference) and uses the pure-PyTorch path for that op on that device from
  then on (for the native resampling loop: the ``fast`` loop, see
  :func:`resolve_resampler`);
* ``on``: use the CUDA kernels without the check;
* ``off``: never use them (CUDA tensors take the pure-PyTorch path).

Any other value is a ``ValueError``. CPU tensors always use the CPU kernels, and
``backend("native")`` always uses the kernel (it is how the kernels are tested).
:func:`cuda_kernel_status` reports the verdicts, :func:`verify_cuda_kernels` runs every
check on a device now.

Example:
    >>> import torch, lsr.ops as ops
    >>> ops.vq_nearest(torch.zeros(2, 3), torch.eye(3))
    tensor([0, 0])
"""
from __future__ import annotations

import contextlib
import math
import threading
import warnings
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Optional, Sequence

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


def _native_op(name: str) -> Callable:
    """The native callable ``name`` of :mod:`lsr.ops._native` (``vq_nearest``,
    ``causal_attention``, ``causal_attention_rows``); a seam the tests replace."""
    from . import _native
    return getattr(_native, name)


def vq_nearest(z: Tensor, codebook: Tensor) -> Tensor:
    """Nearest codebook index per row: z (Tensor[N, D]), codebook (Tensor[K, D]) ->
    Tensor[N] int64. Ties go to the lower index. See :func:`reference.vq_nearest`."""
    if _use_native() and _kernels_allowed(("vq_nearest",), z):
        return _native_op("vq_nearest")(z, codebook)
    return reference.vq_nearest(z, codebook)


def causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Strictly causal attention: q, k, v (Tensor[B, h, T, d]) -> Tensor[B, h, T, d];
    query t sees keys s < t, row 0 is zeros. See :func:`reference.causal_attention`."""
    if _use_native():
        grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        kernels = ("causal_attention_fwd", "causal_attention_bwd") if grad else ("causal_attention_fwd",)
        if _kernels_allowed(kernels, q):
            return _native_op("causal_attention")(q, k, v)
    if current_backend() == "reference" or torch.onnx.is_in_onnx_export():
        return reference.causal_attention(q, k, v)
    return reference.causal_attention_sdpa(q, k, v)


def causal_attention_rows(q: Tensor, k: Tensor, v: Tensor, q0: int) -> Tensor:
    """Rows [q0, q0 + Tq) of strictly causal attention (inference only): q
    (Tensor[B, h, Tq, d]), k, v (Tensor[B, h, q0 + Tq, d]) -> Tensor[B, h, Tq, d]. The
    scripted incremental prior calls ``lsr::causal_attention_rows`` itself; this is the
    same op from Python. See :func:`reference.causal_attention_rows`."""
    if _use_native() and _kernels_allowed(("causal_attention_rows",), q):
        return _native_op("causal_attention_rows")(q, k, v, q0)
    return reference.causal_attention_rows(q, k, v, q0)


# ---------------------------------------------------------------- CUDA kernels: LSR_CUDA_KERNELS

from ..config import CUDA_KERNELS_ENV, CUDA_KERNELS_MODES, read_cuda_kernels_mode  # noqa: E402 (torch-free)
#: the native kernels with a CUDA implementation, each checked on its own
CUDA_KERNELS = ("vq_nearest", "causal_attention_fwd", "causal_attention_bwd", "causal_attention_rows")
#: the check's tolerance: |kernel - reference| <= ATOL + RTOL |reference|, elementwise,
#: against a float64 reference of float32 inputs of magnitude ~1 (the kernels' float32
#: error there is ~1e-6; a real bug is far above it)
CHECK_ATOL = CHECK_RTOL = 1e-4
#: head dims of the attention checks: one per kernel template (16, 32, 64, 128; 12 is padded to 16)
CHECK_HEAD_DIMS = (12, 32, 64, 128)

_cuda_lock = threading.RLock()
_cuda_mode: Optional[str] = None
_verdicts: dict = {}      # (kernel, device key) -> _Verdict


@dataclass(frozen=True)
class _Verdict:
    ok: bool
    max_diff: Optional[float]     # the largest difference found (None: the kernel raised)
    detail: str


class _CannotCheckNow(Exception):
    """The check cannot run at this moment (CUDA graph capture, tracing by torch.compile,
    fake tensors, out of memory): the op takes the pure-PyTorch path this time and the
    check is tried again at the next call."""


def cuda_kernels_mode() -> str:
    """``LSR_CUDA_KERNELS`` (``verify``, ``on`` or ``off``; ``verify`` when unset or
    empty), read once per process (:func:`reset_cuda_kernel_checks` reads it again).
    Raises ValueError for any other value."""
    global _cuda_mode
    if _cuda_mode is None:
        _cuda_mode = read_cuda_kernels_mode()
    return _cuda_mode


def reset_cuda_kernel_checks() -> None:
    """Forget every verdict and the mode read from ``LSR_CUDA_KERNELS`` (for tests)."""
    global _cuda_mode
    with _cuda_lock:
        _verdicts.clear()
        _cuda_mode = None


def cuda_kernel_status() -> dict:
    """The mode and the verdicts so far: ``{"mode": "verify", "devices": {"cuda:0":
    {"vq_nearest": {"ok": True, "max_diff": 2.4e-07, "detail": "..."}, ...}}}`` (a
    kernel not yet checked on a device is absent)."""
    with _cuda_lock:
        devices: dict = {}
        for (kernel, dev), v in sorted(_verdicts.items()):
            devices.setdefault(dev, {})[kernel] = asdict(v)
        return {"mode": cuda_kernels_mode(), "devices": devices}


def verify_cuda_kernels(device="cuda") -> dict:
    """Run the check of every CUDA kernel on ``device`` now, whatever ``LSR_CUDA_KERNELS``
    says (verdicts already known are kept), and return ``{kernel: verdict}`` for it (as
    in :func:`cuda_kernel_status`); a failing kernel warns as at first use. For GPU check
    scripts and for a command that wants the checks done before its work starts."""
    if not native_available():
        raise RuntimeError(f"the native extension lsr._C is not available ({_native_error or 'not built'})")
    probe = torch.empty(0, device=device)
    if not _is_cuda(probe):
        raise ValueError(f"verify_cuda_kernels needs a CUDA device, got {probe.device}")
    for kernel in CUDA_KERNELS:
        _verified(kernel, probe)
    key = _device_key(probe)
    with _cuda_lock:
        return {k: asdict(_verdicts[(k, key)]) for k in CUDA_KERNELS if (k, key) in _verdicts}


def cuda_kernels_allowed(device, kernels: Sequence[str] = CUDA_KERNELS) -> bool:
    """Whether the ``auto`` backend would run the native ``kernels`` on ``device`` (running
    their first-use checks there if needed): True off CUDA, else as ``LSR_CUDA_KERNELS``
    and the checks say. For code that calls the kernels without the dispatch points here,
    e.g. a TorchScript prior on the native kernels or :func:`resample_native` on CUDA."""
    probe = torch.empty(0, device=device)
    return native_available() and _kernels_allowed(tuple(kernels), probe)


def _is_cuda(t: Tensor) -> bool:
    """Whether ``t`` lives on a CUDA device (a seam the CPU tests replace)."""
    return t.device.type == "cuda"


def _device_key(t: Tensor) -> str:
    """The device a verdict is kept for, e.g. ``cuda:0`` (a seam for the tests)."""
    d = t.device
    if d.type == "cuda" and d.index is None:
        d = torch.device("cuda", torch.cuda.current_device())
    return str(d)


def _kernels_allowed(kernels: Sequence[str], t: Tensor) -> bool:
    """Whether the native kernels ``kernels`` may run on ``t``'s device: always for a
    tensor that is not on CUDA and under ``backend("native")``; on CUDA as
    ``LSR_CUDA_KERNELS`` says."""
    if not _is_cuda(t) or current_backend() == "native":
        return True
    mode = cuda_kernels_mode()
    if mode == "off":
        return False
    if mode == "on":
        return True
    return all(_verified(k, t) for k in kernels)


def _verified(kernel: str, t: Tensor) -> bool:
    """The verdict of ``kernel`` on ``t``'s device, from its check the first time."""
    key = (kernel, _device_key(t))
    v = _verdicts.get(key)
    if v is not None:
        return v.ok
    with _cuda_lock:
        v = _verdicts.get(key)
        if v is not None:
            return v.ok
        try:
            v = _run_check(kernel, t)
        except _CannotCheckNow:
            return False
        _verdicts[key] = v                    # before the warning, which may be an error filter
        if not v.ok:
            _warn_mismatch(kernel, key[1], v)
        return v.ok


def _run_check(kernel: str, t: Tensor) -> _Verdict:
    device = t.device
    if torch.compiler.is_compiling() or _is_fake(t) or _capturing(device):
        raise _CannotCheckNow
    state = torch._C._get_tracing_state() if torch.jit.is_tracing() else None
    if state is not None:
        torch._C._set_tracing_state(None)     # the check is no part of a traced graph
    try:
        with torch.autocast(device.type, enabled=False), torch.inference_mode(False):
            return _CHECKS[kernel](device)
    except torch.OutOfMemoryError:
        raise _CannotCheckNow from None
    finally:
        if state is not None:
            torch._C._set_tracing_state(state)


def _is_fake(t: Tensor) -> bool:
    try:
        from torch._subclasses.fake_tensor import is_fake
        return bool(is_fake(t))
    except Exception:  # noqa: BLE001 - a private torch module; without it, no fake tensors
        return False


def _capturing(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        return bool(torch.cuda.is_current_stream_capturing())
    except Exception:  # noqa: BLE001 - no CUDA runtime: nothing is being captured
        return False


def _sync(device: torch.device) -> None:
    """Wait for the kernels queued on ``device``: their errors surface here, not later."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _KernelError(Exception):
    pass


def _call_kernel(device: torch.device, fn: Callable, *args):
    """``fn(*args)`` and a synchronisation; an error of the kernel becomes _KernelError."""
    try:
        out = fn(*args)
        _sync(device)
        return out
    except torch.OutOfMemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure of the kernel is a failed check
        raise _KernelError(f"{type(e).__name__}: {str(e).strip()[:300]}") from e


def _check_inputs(*shapes: tuple, seed: int) -> list:
    """Fixed float32 normal inputs, drawn on the CPU (the same numbers on every device)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in shapes]


def _compare(got, want: Tensor, what: str) -> tuple:
    """(ok, max |got - want|, detail) for a kernel output against a float64 reference."""
    if not isinstance(got, Tensor) or got.shape != want.shape:
        shape = tuple(got.shape) if isinstance(got, Tensor) else type(got).__name__
        return False, math.inf, f"{what}: shape {shape} instead of {tuple(want.shape)}"
    if got.dtype != torch.float32:
        return False, math.inf, f"{what}: dtype {got.dtype} instead of torch.float32"
    diff = (got.detach().double() - want).abs()
    if diff.numel() == 0:
        return True, 0.0, ""
    bad = ~(diff <= CHECK_ATOL + CHECK_RTOL * want.abs())          # NaN counts as bad
    max_diff = float(diff.nan_to_num(nan=math.inf).max())
    return not bool(bad.any()), max_diff, f"{what}: {int(bad.sum())} of {diff.numel()} values off"


def _attention_verdict(results: list) -> _Verdict:
    """One verdict from the (ok, max_diff, detail) of each compared tensor."""
    worst = max(r[1] for r in results)
    failed = [r[2] for r in results if not r[0]]
    tol = f"tolerance {CHECK_ATOL:g} + {CHECK_RTOL:g} |reference|"
    if failed:
        return _Verdict(False, worst, f"max abs difference {worst:.3g} ({tol}); " + "; ".join(failed[:3]))
    dims = ", ".join(str(d) for d in CHECK_HEAD_DIMS)
    return _Verdict(True, worst, f"max abs difference {worst:.3g} ({tol}), head dims {dims}")


def _check_vq_nearest(device: torch.device) -> _Verdict:
    # 3 tiles of 64 rows, 2 of 64 codes, 2 of 32 dims, each of them partial
    z, e = (x.to(device) for x in _check_inputs((150, 40), (100, 40), seed=1201))
    z64, e64 = z.double(), e.double()
    dist = ((z64[:, None, :] - e64[None, :, :]) ** 2).sum(-1)            # (N, K), float64
    best = dist.min(1).values
    try:
        idx = _call_kernel(device, _native_op("vq_nearest"), z, e)
    except _KernelError as err:
        return _Verdict(False, None, f"raised {err}")
    N, K = dist.shape
    if not isinstance(idx, Tensor) or idx.shape != (N,) or idx.dtype != torch.int64:
        got = (tuple(idx.shape), idx.dtype) if isinstance(idx, Tensor) else type(idx).__name__
        return _Verdict(False, math.inf, f"returned {got} instead of ({N},) torch.int64")
    idx = idx.to(device)
    if bool(((idx < 0) | (idx >= K)).any()):
        return _Verdict(False, math.inf, f"indices outside [0, {K})")
    # a chosen code may differ from the exact nearest only at a near tie
    excess = dist[torch.arange(N, device=device), idx] - best
    bad = ~(excess <= CHECK_ATOL + CHECK_RTOL * best)
    ref = reference.vq_nearest(z64, e64)
    max_diff = float(excess.max())
    detail = (f"{int((idx != ref).sum())} of {N} indices differ from the reference; max difference "
              f"{max_diff:.3g} between the squared distances of the chosen and the nearest code "
              f"(tolerance {CHECK_ATOL:g} + {CHECK_RTOL:g} |nearest|)")
    return _Verdict(not bool(bad.any()), max_diff, detail)


def _check_attention_fwd(device: torch.device) -> _Verdict:
    # 2 blocks of 64 query rows, 4 key tiles of 32 (partial), each head-dim template
    results = []
    with torch.no_grad():
        for i, d in enumerate(CHECK_HEAD_DIMS):
            q, k, v = (x.to(device) for x in _check_inputs(*[(1, 2, 100, d)] * 3, seed=1300 + i))
            want = reference.causal_attention(q.double(), k.double(), v.double())
            try:
                got = _call_kernel(device, _native_op("causal_attention"), q, k, v)
            except _KernelError as err:
                return _Verdict(False, None, f"raised {err} (head dim {d})")
            results.append(_compare(got, want, f"output, head dim {d}"))
    return _attention_verdict(results)


def _check_attention_bwd(device: torch.device) -> _Verdict:
    results = []
    with torch.enable_grad():
        for i, d in enumerate(CHECK_HEAD_DIMS):
            q, k, v, g = (x.to(device) for x in _check_inputs(*[(1, 2, 100, d)] * 4, seed=1400 + i))
            ins64 = [x.double().requires_grad_(True) for x in (q, k, v)]
            want = torch.autograd.grad(reference.causal_attention(*ins64), ins64, g.double())
            ins = [x.clone().requires_grad_(True) for x in (q, k, v)]

            def native_grads(*xs):
                return torch.autograd.grad(_native_op("causal_attention")(*xs), xs, g)

            try:
                got = _call_kernel(device, native_grads, *ins)
            except _KernelError as err:
                return _Verdict(False, None, f"forward and backward raised {err} (head dim {d})")
            results += [_compare(a, b, f"grad of {n}, head dim {d}") for a, b, n in zip(got, want, "qkv")]
    return _attention_verdict(results)


def _check_attention_rows(device: torch.device) -> _Verdict:
    q0 = 40                                     # rows 40..99: no tile boundary at q0
    results = []
    with torch.no_grad():
        for i, d in enumerate(CHECK_HEAD_DIMS):
            q, k, v = (x.to(device) for x in _check_inputs(*[(1, 2, 100, d)] * 3, seed=1500 + i))
            want = reference.causal_attention(q.double(), k.double(), v.double())[:, :, q0:]
            try:
                got = _call_kernel(device, _native_op("causal_attention_rows"), q[:, :, q0:].contiguous(), k, v, q0)
            except _KernelError as err:
                return _Verdict(False, None, f"raised {err} (head dim {d})")
            results.append(_compare(got, want, f"rows {q0}.., head dim {d}"))
    return _attention_verdict(results)


_CHECKS: dict = {
    "vq_nearest": _check_vq_nearest,
    "causal_attention_fwd": _check_attention_fwd,
    "causal_attention_bwd": _check_attention_bwd,
    "causal_attention_rows": _check_attention_rows,
}


def _warn_mismatch(kernel: str, device: str, v: _Verdict) -> None:
    what = "raised an error" if v.max_diff is None else "does not match its reference"
    name = ""
    if device.startswith("cuda"):
        try:
            name = f" ({torch.cuda.get_device_name(torch.device(device))}, CUDA {torch.version.cuda})"
        except Exception:  # noqa: BLE001 - the name is a courtesy
            name = ""
    op = {"causal_attention_fwd": "causal_attention", "causal_attention_bwd": "causal_attention with gradients",
          "causal_attention_rows": "causal_attention_rows and the native resampling loop"}.get(kernel, kernel)
    warnings.warn(f"lsr: the CUDA kernel lsr::{kernel} {what} on {device}{name} in its first-use check on a "
                  f"small input: {v.detail}. lsr uses the pure-PyTorch path for {op} on {device} from now on "
                  f"(correct, slower). Set {CUDA_KERNELS_ENV}=on to use the kernel anyway, or "
                  f"{CUDA_KERNELS_ENV}=off to skip the CUDA kernels and this check.",
                  RuntimeWarning, stacklevel=5)


def _native_loop_allowed(prior) -> bool:
    """Whether the native resampling loop may run ``prior``: on CUDA it runs the kernels
    ``causal_attention_fwd`` and ``causal_attention_rows``, so both must be allowed there."""
    params = getattr(prior, "parameters", None)
    p = next(iter(params()), None) if callable(params) else None
    if p is None or not native_available():
        return True                  # not a loop lsr can run natively: resample_native says why
    return _kernels_allowed(("causal_attention_fwd", "causal_attention_rows"), p)


__all__ = ["vq_nearest", "causal_attention", "causal_attention_rows", "backend", "current_backend",
           "native_available", "reference", "cuda_kernels_mode", "cuda_kernel_status", "verify_cuda_kernels",
           "reset_cuda_kernel_checks", "cuda_kernels_allowed", "CUDA_KERNELS_ENV", "CUDA_KERNELS_MODES", "CUDA_KERNELS"]


from .resampling import (ResampleResult, code_distances, flag_positions, gumbel_noise,  # noqa: E402
                         posterior_noise, posterior_scale, register_scriptable, resample_fast, resample_naive, resample_native, scripter)

from ..config import RESAMPLERS  # noqa: E402  (the one list; config imports no torch)


def resolve_resampler(method: str, prior) -> str:
    """``auto`` -> ``native`` when the extension is built and ``prior`` can be scripted for
    the C++ loop (a PixelSNAIL, or a scripted incremental prior), else ``fast``. ``auto``
    and ``native`` give ``fast`` for a prior on a CUDA device whose attention kernels
    ``LSR_CUDA_KERNELS`` does not allow (``off``, or a failed first-use check); any other
    method is returned as it is."""
    if method == "auto":
        scripted = isinstance(prior, torch.jit.ScriptModule) and hasattr(prior, "partial")
        method = "native" if (scripter(prior) is not None or scripted) and native_available() else "fast"
    if method == "native" and not _native_loop_allowed(prior):
        return "fast"
    return method


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


__all__ += ["resample", "ResampleResult", "flag_positions", "gumbel_noise", "code_distances", "posterior_noise",
            "posterior_scale", "resample_fast",
            "resample_naive", "resample_native", "resolve_resampler", "RESAMPLERS"]
