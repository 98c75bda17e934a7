"""Python side of the native ops in ``lsr._C``: shape functions for tracing
(``register_fake``) and gradients (``register_autograd``). Imported only once the
extension has loaded (see :func:`lsr.ops.native_available`)."""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _C  # noqa: F401  (registers torch.ops.lsr.*; raises ImportError when not built)


@torch.library.register_fake("lsr::vq_nearest")
def _vq_nearest_fake(z: Tensor, codebook: Tensor) -> Tensor:
    torch._check(z.dim() == 2 and codebook.dim() == 2, lambda: "vq_nearest expects z (N, D), codebook (K, D)")
    torch._check(z.shape[1] == codebook.shape[1], lambda: "vq_nearest: D of z and codebook differ")
    return z.new_empty((z.shape[0],), dtype=torch.long)


@torch.library.register_fake("lsr::causal_attention_fwd")
def _attention_fwd_fake(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    torch._check(q.dim() == 4, lambda: "causal_attention expects (B, h, T, d)")
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.register_fake("lsr::causal_attention_bwd")
def _attention_bwd_fake(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                        lse: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _attention_setup(ctx, inputs, output) -> None:
    q, k, v = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)


def _attention_backward(ctx, grad_out: Tensor, grad_lse: Tensor):
    q, k, v, out, lse = ctx.saved_tensors
    if grad_out is None:
        return None, None, None
    dq, dk, dv = torch.ops.lsr.causal_attention_bwd(grad_out.contiguous(), q, k, v, out, lse)
    return dq, dk, dv


torch.library.register_autograd("lsr::causal_attention_fwd", _attention_backward, setup_context=_attention_setup)


def causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Native strictly causal attention: q, k, v (Tensor[B, h, T, d]) -> Tensor[B, h, T, d]."""
    return torch.ops.lsr.causal_attention_fwd(q, k, v)[0]


def vq_nearest(z: Tensor, codebook: Tensor) -> Tensor:
    """Native nearest-codebook search: z (Tensor[N, D]), codebook (Tensor[K, D]) -> Tensor[N]."""
    return torch.ops.lsr.vq_nearest(z, codebook)


@torch.library.register_fake("lsr::causal_attention_rows")
def _attention_rows_fake(q: Tensor, k: Tensor, v: Tensor, q0: int) -> Tensor:
    torch._check(q.dim() == 4 and k.dim() == 4, lambda: "causal_attention_rows expects (B, h, T, d)")
    return torch.empty_like(q)


def causal_attention_rows(q: Tensor, k: Tensor, v: Tensor, q0: int) -> Tensor:
    """Native rows [q0, q0 + Tq) of strictly causal attention: q (Tensor[B, h, Tq, d]),
    k, v (Tensor[B, h, q0 + Tq, d]) -> Tensor[B, h, Tq, d] (inference only)."""
    return torch.ops.lsr.causal_attention_rows(q, k, v, q0)
