"""What a computation cost, against what the machine can do: FLOPs and bytes of the
operators that actually ran, and the machine's measured matrix rate and copy bandwidth.

:func:`count_cost` runs a function under a ``TorchDispatchMode``, which sees every ATen
and lsr operator dispatched on the calling thread, including those called from C++ (the
native resampling loop and its TorchScript prior). It sums

* FLOPs: PyTorch's formulas (``torch.utils.flop_counter``: matrix products,
  convolutions, attention) plus lsr's ops (``vq_nearest``: 2 N K D; causal attention:
  4 d per (query, visible key) pair forward, 10 d backward);
* bytes: each operator reading its tensor inputs and writing its outputs once (views
  and reshapes of fresh tensors move nothing; an expanded input counts its distinct
  elements; an in-place update counts what it reads and writes, e.g. the rows an
  index_copy_ writes, not the whole buffer). This is the traffic of unfused execution
  (TorchScript's fusers are switched off while counting), an estimate, not a hardware
  counter.

:func:`measure_limits` times a large matrix product and a large copy on the device, and
:func:`roofline` turns a cost and a measured time into the fraction of the machine's
limit reached: (the larger of FLOPs / matrix rate and bytes / copy bandwidth) / time.
The benchmarks use these for "fraction of the GPU's (or CPU's) limit".

Example:
    >>> import torch
    >>> a, b = torch.ones(64, 32), torch.ones(32, 16)
    >>> _, cost = count_cost(torch.mm, a, b)
    >>> cost.flops, cost.bytes
    (65536.0, 14336.0)
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable, NamedTuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class Cost(NamedTuple):
    flops: float          # floating-point operations (a multiply-add is 2)
    bytes: float          # bytes read and written, unfused (see the module docstring)
    ops: int              # operators dispatched (views included)
    uncounted: tuple      # names of operators with no FLOP formula that may do arithmetic at scale


class Limits(NamedTuple):
    device: str
    matmul_flops_per_s: float     # measured: the faster of the two float32 matrix products below
    copy_bytes_per_s: float       # measured: read + write of a large contiguous copy
    tf32: bool = False            # the matrix rates were measured with TF32
    mm_flops_per_s: float = 0.0   # torch.mm (BLAS: MKL / cuBLAS)
    conv_flops_per_s: float = 0.0  # the same product as a 1x1 convolution (oneDNN / cuDNN)


def _dense_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements of ``t`` (an expanded dim counts once)."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size() if t.numel() else 0


def _attention_pairs(T: int, q0: int = 0, Tq: int | None = None) -> int:
    """Visible (query, key) pairs of strictly causal attention for queries [q0, q0 + Tq)."""
    Tq = T - q0 if Tq is None else Tq
    return Tq * q0 + Tq * (Tq - 1) // 2


def _lsr_flops(name: str, args: tuple) -> float | None:
    if name == "lsr::vq_nearest":
        z, e = args[0], args[1]
        return 2.0 * z.shape[0] * e.shape[0] * z.shape[1]
    if name in ("lsr::causal_attention_fwd", "lsr::causal_attention_bwd"):
        q = args[0] if name.endswith("fwd") else args[1]
        B, h, T, d = q.shape
        per_pair = 4 if name.endswith("fwd") else 10          # fwd: QK^T, PV; bwd: 5 products
        return float(per_pair * d * B * h * _attention_pairs(T))
    if name == "lsr::causal_attention_rows":
        q, q0 = args[0], int(args[3])
        B, h, Tq, d = q.shape
        return float(4 * d * B * h * _attention_pairs(q0 + Tq, q0, Tq))
    return None


# operator names that do arithmetic at scale: reported in Cost.uncounted when no formula
# covers them (everything else is O(bytes) work whose traffic is counted)
_HEAVY = ("mm", "matmul", "conv", "attention", "linear", "einsum", "addmm", "baddbmm", "bmm")
# not views by schema, but move no data (a reshape of a fresh tensor) or only allocate
_NO_TRAFFIC = {"aten::_unsafe_view", "aten::lift_fresh", "aten::alias", "aten::detach", "aten::empty",
               "aten::empty_like", "aten::empty_strided", "aten::new_empty", "aten::new_empty_strided"}
_WRITE_ONLY = {"aten::fill_", "aten::zero_"}
# in-place updates that write data read from their other inputs, not from the target
_SCATTER = {"aten::index_copy_", "aten::index_put_", "aten::_index_put_impl_", "aten::scatter_",
            "aten::masked_scatter_", "aten::index_fill_"}


def _sdpa_cpu_flops(args: tuple) -> float | None:
    """aten::_scaled_dot_product_flash_attention_for_cpu (no formula in torch): 4 d per
    (query, key) pair, every pair (a mask is applied, not skipped)."""
    q, k = args[0], args[1]
    if q.dim() != 4:
        return None
    B, h, L, d = q.shape
    return 4.0 * B * h * L * k.shape[-2] * d


class _Counter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        from torch.utils.flop_counter import flop_registry
        self.registry = flop_registry
        self.flops = 0.0
        self.bytes = 0.0
        self.ops = 0
        self.uncounted: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.ops += 1
        name = func._schema.name            # without the overload: aten::empty, not aten::empty.memory_format
        packet = func._overloadpacket
        flops = _lsr_flops(name, args)
        if flops is None and name == "aten::_scaled_dot_product_flash_attention_for_cpu":
            flops = _sdpa_cpu_flops(args)
        if flops is None and packet in self.registry:
            flops = float(self.registry[packet](*args, **kwargs, out_val=out))
        if flops is not None:
            self.flops += flops
        elif any(h in name.split("::")[-1] for h in _HEAVY):
            self.uncounted.add(name)
        if not func.is_view and name not in _NO_TRAFFIC:
            self.bytes += self._traffic(func, args, kwargs, out)
        return out

    @staticmethod
    def _traffic(func, args, kwargs, out) -> float:
        schema = func._schema
        mutated = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
        read = 0
        written_in_place = False
        target = 0                                       # bytes of the tensor updated in place
        for a, v in zip(schema.arguments, args):
            if a.name in mutated:
                written_in_place = True
                if isinstance(v, torch.Tensor):
                    target += _dense_bytes(v)
                continue
            for t in (v if isinstance(v, (list, tuple)) else (v,)):
                if isinstance(t, torch.Tensor):
                    read += _dense_bytes(t)
        for k, v in kwargs.items():
            if isinstance(v, torch.Tensor) and k not in mutated:
                read += _dense_bytes(v)
        if written_in_place:
            if func._schema.name in _WRITE_ONLY or func._schema.name == "aten::copy_":
                return float(read + target)          # fill_, zero_, copy_: the whole target written
            if func._schema.name in _SCATTER:
                return 2.0 * read                    # index_copy_, index_put_: the data written
            return float(read + 2 * target)          # mul_(2), clamp_, add_(other): target read and written
        written = 0
        for t in (out if isinstance(out, (list, tuple)) else (out,)):
            if isinstance(t, torch.Tensor):
                written += _dense_bytes(t)
        return float(read + written)


def count_cost(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, Cost]:
    """Run ``fn(*args, **kwargs)`` and count its FLOPs and bytes (see the module
    docstring). Returns (its result, :class:`Cost`). Slower than a plain call: time the
    function separately."""
    fuser = torch._C._jit_texpr_fuser_enabled()
    torch._C._jit_set_texpr_fuser_enabled(False)   # TorchScript's fuser would hide ops from the mode
    try:
        with _Counter() as c:
            result = fn(*args, **kwargs)
    finally:
        torch._C._jit_set_texpr_fuser_enabled(fuser)
    return result, Cost(c.flops, c.bytes, c.ops, tuple(sorted(c.uncounted)))


def _median_time(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def measure_limits(device: str | torch.device = "cpu", repeats: int = 5) -> Limits:
    """The device's float32 matrix-product rate and copy bandwidth, best-effort medians
    after a warm-up.

    The rate is the faster of two ways to multiply n x n by n x n (n = 4096 on a GPU,
    2048 on a CPU): ``torch.mm`` (MKL or cuBLAS) and the same product as a 1x1 convolution
    (oneDNN or cuDNN, which run the model's convolutions; on some CPUs the two differ
    several-fold, e.g. a BLAS that takes a narrower vector path). On a GPU both run with
    TF32 when the current settings let matrix products or cuDNN convolutions use it
    (cuDNN's default), so the limit is the fastest rate the model's float32 work may
    reach. The copy: 256 MiB on a GPU, 64 MiB on a CPU, read + write counted."""
    dev = torch.device(device)
    gpu = dev.type == "cuda"
    n = 4096 if gpu else 2048
    a = torch.randn(n, n, device=dev)
    b = torch.randn(n, n, device=dev)
    out = torch.empty(n, n, device=dev)
    x = torch.randn(1, n, 32, n // 32, device=dev)                  # n channels, n positions
    w = torch.randn(n, n, 1, 1, device=dev)
    old_mm, old_cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    tf32 = bool(gpu and (old_mm or old_cudnn))
    try:
        if gpu:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
        torch.mm(a, b, out=out)
        t_mm = _median_time(lambda: torch.mm(a, b, out=out), dev, repeats)
        torch.nn.functional.conv2d(x, w)
        t_conv = _median_time(lambda: torch.nn.functional.conv2d(x, w), dev, repeats)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old_mm, old_cudnn
    rate_mm, rate_conv = 2.0 * n ** 3 / t_mm, 2.0 * n ** 3 / t_conv
    elems = (256 if gpu else 64) * 2 ** 20 // 4
    src = torch.randn(elems, device=dev)
    dst = torch.empty_like(src)
    dst.copy_(src)
    t_cp = _median_time(lambda: dst.copy_(src), dev, repeats)
    return Limits(str(dev), max(rate_mm, rate_conv), 2.0 * src.numel() * 4 / t_cp, tf32, rate_mm, rate_conv)


def roofline(cost: Cost, seconds: float, limits: Limits) -> dict[str, Any]:
    """How close ``seconds`` for ``cost`` came to the machine's limits: achieved rates,
    the lower bound max(FLOPs / matrix rate, bytes / bandwidth), what bounds it, and
    ``fraction_of_limit`` = bound / seconds (1.0 = at the roofline)."""
    t_flops = cost.flops / limits.matmul_flops_per_s
    t_bytes = cost.bytes / limits.copy_bytes_per_s
    bound = max(t_flops, t_bytes)
    return {
        "gflop": cost.flops / 1e9, "gbyte": cost.bytes / 1e9,
        "achieved_gflop_per_s": cost.flops / seconds / 1e9 if seconds > 0 else math.nan,
        "achieved_gbyte_per_s": cost.bytes / seconds / 1e9 if seconds > 0 else math.nan,
        "limit_gflop_per_s": limits.matmul_flops_per_s / 1e9, "limit_gbyte_per_s": limits.copy_bytes_per_s / 1e9,
        "bound_by": "compute" if t_flops >= t_bytes else "memory",
        "fraction_of_limit": bound / seconds if seconds > 0 else math.nan,
    }


__all__ = ["Cost", "Limits", "count_cost", "measure_limits", "roofline"]
