"""Pure-PyTorch reference implementations of every op that has (or will get) a native
kernel. They define the exact semantics, serve as the fallback when the extension is
missing, are the path taken during ONNX export, and are the oracle in the tests.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def vq_nearest(z: Tensor, codebook: Tensor) -> Tensor:
    """Index of the nearest codebook vector for every row of ``z``.

    Distances are ``||e_k||^2 - 2 z.e_k`` (``||z||^2`` is the same for every k and is
    left out), accumulated in float32 for half-precision inputs; ties go to the lower
    index, as :func:`torch.argmin`.

    Args:
        z (Tensor[N, D]): vectors to quantise.
        codebook (Tensor[K, D]): codebook, K >= 1.

    Returns:
        Tensor[N] (int64): indices in ``[0, K)``.

    Example:
        >>> vq_nearest(torch.tensor([[0.9, 0.1]]), torch.tensor([[0.0, 0.0], [1.0, 0.0]]))
        tensor([1])
    """
    _check_vq(z, codebook)
    if z.shape[0] == 0:
        return torch.empty(0, dtype=torch.long, device=z.device)
    acc = torch.promote_types(z.dtype, torch.float32)
    z = z.to(acc)
    e = codebook.to(acc)
    e2 = (e * e).sum(dim=1)                                   # (K,)
    out = torch.empty(z.shape[0], dtype=torch.long, device=z.device)
    # chunk over N so that the N x K distance matrix is never held whole
    chunk = max(1, (1 << 22) // max(1, e.shape[0]))
    for start in range(0, z.shape[0], chunk):
        zc = z[start:start + chunk]
        dist = e2.unsqueeze(0) - 2.0 * (zc @ e.t())           # (n, K)
        out[start:start + chunk] = dist.argmin(dim=1)
    return out


def _check_vq(z: Tensor, codebook: Tensor) -> None:
    if z.dim() != 2 or codebook.dim() != 2:
        raise ValueError(f"vq_nearest expects z (N, D) and codebook (K, D), got {tuple(z.shape)} "
                         f"and {tuple(codebook.shape)}")
    if z.shape[1] != codebook.shape[1]:
        raise ValueError(f"vq_nearest: z has D={z.shape[1]} but codebook has D={codebook.shape[1]}")
    if codebook.shape[0] < 1:
        raise ValueError("vq_nearest: codebook must have at least one vector (K >= 1)")


def causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Strictly causal scaled dot-product attention.

    Query ``t`` attends to keys ``s < t`` only (not to itself); query 0 has nothing to
    attend to and outputs zeros. Computed in float32 (or float64) and returned in the
    input dtype. The mask is built from index comparisons.

    Args:
        q (Tensor[B, h, T, d]): queries.
        k (Tensor[B, h, T, d]): keys.
        v (Tensor[B, h, T, d]): values.

    Returns:
        Tensor[B, h, T, d]

    Example:
        >>> q = k = v = torch.ones(1, 1, 3, 2)
        >>> causal_attention(q, k, v)[0, 0]
        tensor([[0., 0.],
                [1., 1.],
                [1., 1.]])
    """
    _check_attention(q, k, v)
    acc = torch.promote_types(q.dtype, torch.float32)
    T = q.shape[-2]
    scale = q.shape[-1] ** -0.5
    scores = (q.to(acc) @ k.to(acc).transpose(-1, -2)) * scale           # (B, h, T, T)
    idx = torch.arange(T, device=q.device)
    allowed = idx.unsqueeze(0) < idx.unsqueeze(1)                        # [t, s]: s < t
    scores = scores.masked_fill(~allowed, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    weights = torch.where(allowed, weights, torch.zeros((), dtype=acc, device=q.device))  # row 0: NaN -> 0
    return (weights @ v.to(acc)).to(q.dtype)


def causal_attention_sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The same op through :func:`torch.nn.functional.scaled_dot_product_attention`
    with a boolean mask (the fast pure-PyTorch path). Row 0 is given key 0 to avoid an
    all-masked row and its output is then set to zero."""
    _check_attention(q, k, v)
    T = q.shape[-2]
    idx = torch.arange(T, device=q.device)
    allowed = (idx.unsqueeze(0) < idx.unsqueeze(1)) | ((idx.unsqueeze(1) == 0) & (idx.unsqueeze(0) == 0))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    keep = (idx > 0).to(out.dtype).view(T, 1)
    return out * keep


def _check_attention(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"causal_attention expects q, k, v of the same shape (B, h, T, d); got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")


def causal_attention_rows(q: Tensor, k: Tensor, v: Tensor, q0: int) -> Tensor:
    """Rows [q0, q0 + Tq) of strictly causal attention, pure PyTorch (the signature of
    ``lsr::causal_attention_rows``): q (B, h, Tq, d), k, v (B, h, q0 + Tq, d).

    Through ``scaled_dot_product_attention`` with a boolean mask from index comparisons;
    a query with no key (position 0) is given key 0 to avoid an all-masked row, and its
    output is then set to zero."""
    Tq, Tk, d = q.shape[2], k.shape[2], q.shape[3]
    if q.numel() == 0 or d == 0:
        return torch.zeros_like(q)
    keys = torch.arange(Tk, device=q.device).view(1, -1)
    t = torch.arange(q0, q0 + Tq, device=q.device).view(-1, 1)
    allowed = (keys < t) | ((t == 0) & (keys == 0))                          # (Tq, Tk): s < t
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    return out * (t > 0).to(out.dtype)
