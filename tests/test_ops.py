"""Tests for lsr.ops: the pure-PyTorch references, kept honest by naive float64 loops,
the SDPA path, and the dispatch (backend forcing, clear errors for what is not built).
"""
import math
import random

import pytest
import torch

import lsr.ops as ops
from lsr.ops import reference as R


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- vq_nearest


def naive_sq_dist(z, e):
    """Full squared distances ||z_n - e_k||^2 in float64 by a loop over rows: (N, K)."""
    z, e = z.double(), e.double()
    out = torch.empty(z.shape[0], e.shape[0], dtype=torch.float64)
    for n in range(z.shape[0]):
        out[n] = ((e - z[n]) ** 2).sum(dim=1)
    return out


def check_vq(z, e, idx):
    """idx is a nearest index per row; where the nearest is clear it is *the* index."""
    N, K = z.shape[0], e.shape[0]
    assert idx.shape == (N,) and idx.dtype == torch.int64
    if N == 0:
        return
    assert int(idx.min()) >= 0 and int(idx.max()) < K
    d = naive_sq_dist(z, e)
    best, arg = d.min(dim=1)
    chosen = d[torch.arange(N), idx]
    # float32 accumulation of ||e||^2 - 2 z.e: error ~ eps32 * (||e||^2 + 2 |z||e|)
    scale = (z.double() ** 2).sum(1, keepdim=True) + (e.double() ** 2).sum(1).max()
    tol = 1e-5 * scale.squeeze(1) + 1e-6
    assert (chosen <= best + tol).all(), (chosen - best).max()
    # rows without a near tie must pick exactly the naive argmin
    if K > 1:
        second = d.topk(2, dim=1, largest=False).values[:, 1]
        clear = (second - best) > 2 * tol
        assert torch.equal(idx[clear], arg[clear])


VQ_SHAPES = [(0, 4, 3), (1, 1, 1), (5, 1, 3), (7, 3, 1), (50, 8, 16), (300, 16, 64), (257, 33, 5)]
VQ_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", VQ_DTYPES, ids=str)
@pytest.mark.parametrize("N,K,D", VQ_SHAPES)
def test_vq_nearest_vs_naive_loop(N, K, D, dtype):
    g = torch.Generator().manual_seed(N * 1000 + K * 10 + D)
    z = torch.randn(N, D, generator=g).to(dtype)
    e = torch.randn(K, D, generator=g).to(dtype)
    idx = R.vq_nearest(z, e)
    check_vq(z, e, idx)
    if K == 1:
        assert torch.equal(idx, torch.zeros(N, dtype=torch.long))
    if dtype == torch.float64:                              # no near ties in random float64 data
        assert torch.equal(idx, naive_sq_dist(z, e).argmin(dim=1)) if N else idx.numel() == 0
    # the dispatch point gives the same answer (reference without the extension)
    if not ops.native_available():
        assert torch.equal(ops.vq_nearest(z, e), idx)


@pytest.mark.parametrize("dtype", VQ_DTYPES, ids=str)
def test_vq_nearest_non_contiguous(dtype):
    g = torch.Generator().manual_seed(3)
    N, K, D = 40, 12, 6
    zt = torch.randn(D, N, generator=g).to(dtype).t()           # transposed
    zs = torch.randn(N, 2 * D, generator=g).to(dtype)[:, ::2]   # strided columns
    zr = torch.randn(2 * N, D, generator=g).to(dtype)[::2]      # strided rows
    et = torch.randn(D, K, generator=g).to(dtype).t()
    es = torch.randn(2 * K, D, generator=g).to(dtype)[::2]
    for z in (zt, zs, zr):
        assert not z.is_contiguous()
        for e in (et, es):
            assert not e.is_contiguous()
            idx = R.vq_nearest(z, e)
            assert torch.equal(idx, R.vq_nearest(z.contiguous(), e.contiguous()))
            check_vq(z, e, idx)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_vq_nearest_half_accumulates_in_float32(dtype):
    # ||e||^2 = 4 * 200^2 = 160000 overflows float16 (max 65504): half accumulation gives inf-inf
    z = torch.full((3, 4), 200.0, dtype=dtype)
    e = torch.stack([torch.full((4,), 200.0), torch.zeros(4), torch.full((4,), -200.0)]).to(dtype)
    assert torch.equal(R.vq_nearest(z, e), torch.tensor([0, 0, 0]))
    # tiny differences that half precision would round away in the products, not in the inputs
    e2 = torch.tensor([[1.0, 1.0], [1.0, 1.0 + 2 ** -7]], dtype=dtype)
    z2 = torch.tensor([[1.0, 1.0 + 2 ** -7]], dtype=dtype)
    assert torch.equal(R.vq_nearest(z2, e2), torch.tensor([1]))


def test_vq_nearest_ties_and_chunking():
    # more rows than one chunk (chunk = 2^22 // K rows): K large makes the chunk small
    K, D = 1 << 16, 2
    e = torch.zeros(K, D)
    e[K - 1] = torch.tensor([1.0, 1.0])
    z = torch.zeros(200, D)
    z[150] = torch.tensor([1.0, 1.0])
    idx = R.vq_nearest(z, e)                                  # every row but 150 ties over K-1 zeros
    expected = torch.zeros(200, dtype=torch.long)
    expected[150] = K - 1
    assert torch.equal(idx, expected)


def test_vq_nearest_errors():
    with pytest.raises(ValueError, match="K >= 1"):
        R.vq_nearest(torch.zeros(3, 2), torch.zeros(0, 2))
    with pytest.raises(ValueError, match="D="):
        R.vq_nearest(torch.zeros(3, 2), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="expects"):
        R.vq_nearest(torch.zeros(3), torch.zeros(4, 3))


# ---------------------------------------------------------------- causal attention


def naive_attention(q, k, v):
    """Loop over t in float64: query t attends to keys s < t; row 0 is zeros."""
    q, k, v = q.double(), k.double(), v.double()
    B, h, T, d = q.shape
    out = torch.zeros(B, h, T, d, dtype=torch.float64)
    for t in range(1, T):
        s = (q[:, :, t:t + 1] @ k[:, :, :t].transpose(-1, -2)) / math.sqrt(d)   # (B, h, 1, t)
        out[:, :, t] = (torch.softmax(s, dim=-1) @ v[:, :, :t])[:, :, 0]
    return out


_rng = random.Random(1234)
ATT_T = [1, 2, 3] + sorted(_rng.sample(range(4, 301), 4))
ATT_TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2)}


@pytest.mark.parametrize("dtype", list(ATT_TOL), ids=str)
@pytest.mark.parametrize("d", [16, 64])
@pytest.mark.parametrize("T", ATT_T)
def test_causal_attention_reference_and_sdpa_vs_naive(T, d, dtype):
    g = torch.Generator().manual_seed(T * 100 + d)
    q, k, v = (torch.randn(2, 2, T, d, generator=g).to(dtype) for _ in range(3))
    expected = naive_attention(q, k, v)
    rtol, atol = ATT_TOL[dtype]
    for fn in (R.causal_attention, R.causal_attention_sdpa):
        out = fn(q, k, v)
        assert out.shape == q.shape and out.dtype == dtype
        assert not torch.isnan(out).any()
        assert torch.equal(out[:, :, 0], torch.zeros_like(out[:, :, 0]))
        torch.testing.assert_close(out.double(), expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("fn", [R.causal_attention, R.causal_attention_sdpa], ids=["reference", "sdpa"])
def test_causal_attention_row0_zero_never_nan(fn):
    g = torch.Generator().manual_seed(0)
    for T in (1, 2, 5):
        q, k, v = (torch.randn(1, 3, T, 8, generator=g) * 100 for _ in range(3))   # huge scores
        out = fn(q, k, v)
        assert torch.isfinite(out).all()
        assert torch.equal(out[:, :, 0], torch.zeros(1, 3, 8))
    # T = 2: row 1 sees key 0 only, so it is exactly v[0]
    q, k, v = (torch.randn(2, 1, 2, 4, generator=g) for _ in range(3))
    torch.testing.assert_close(fn(q, k, v)[:, :, 1], v[:, :, 0])


def test_causal_attention_future_keys_do_not_matter():
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 9, 4, generator=g, dtype=torch.float64) for _ in range(3))
    base = R.causal_attention(q, k, v)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 5:] += 10.0
    v2[:, :, 5:] -= 10.0
    out = R.causal_attention(q, k2, v2)
    assert torch.equal(out[:, :, :6], base[:, :, :6])        # query t <= 5 sees keys < t <= 4 only
    assert not torch.equal(out[:, :, 6:], base[:, :, 6:])


@pytest.mark.parametrize("T", [1, 2, 5])
def test_causal_attention_reference_gradcheck(T):
    g = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(1, 2, T, 3, generator=g, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    assert torch.autograd.gradcheck(R.causal_attention, (q, k, v))
    out = R.causal_attention(q, k, v)
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(q.grad[:, :, 0], torch.zeros(1, 2, 3))    # row 0 does not depend on q[0]


def test_causal_attention_shape_errors():
    with pytest.raises(ValueError, match="same shape"):
        R.causal_attention(torch.zeros(1, 1, 3, 2), torch.zeros(1, 1, 4, 2), torch.zeros(1, 1, 3, 2))
    with pytest.raises(ValueError, match="same shape"):
        R.causal_attention_sdpa(torch.zeros(1, 3, 2), torch.zeros(1, 3, 2), torch.zeros(1, 3, 2))


# ---------------------------------------------------------------- dispatch


def test_backend_reference_forces_reference(monkeypatch):
    calls = []
    real = R.causal_attention

    def spy(*a):
        calls.append(1)
        return real(*a)

    def boom(*a):
        raise AssertionError("the SDPA path must not run under backend('reference')")

    monkeypatch.setattr(R, "causal_attention", spy)
    monkeypatch.setattr(R, "causal_attention_sdpa", boom)
    # even if a native extension were loaded, 'reference' must not use it
    monkeypatch.setattr(ops, "native_available", lambda: True)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 4, generator=g) for _ in range(3))
    assert ops.current_backend() == "auto"
    with ops.backend("reference"):
        assert ops.current_backend() == "reference"
        assert not ops._use_native()
        out = ops.causal_attention(q, k, v)
        idx = ops.vq_nearest(torch.randn(5, 4, generator=g), torch.randn(3, 4, generator=g))
    assert ops.current_backend() == "auto"
    assert calls == [1]
    assert torch.equal(out, real(q, k, v))
    assert idx.shape == (5,)


def test_backend_fast_uses_sdpa_and_restores_after_error(monkeypatch):
    monkeypatch.setattr(ops, "native_available", lambda: False)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 4, generator=g) for _ in range(3))
    with ops.backend("fast"):
        assert torch.equal(ops.causal_attention(q, k, v), R.causal_attention_sdpa(q, k, v))
    with pytest.raises(KeyError):
        with ops.backend("reference"):
            raise KeyError("x")
    assert ops.current_backend() == "auto"
    # auto without the extension is the fast path
    assert torch.equal(ops.causal_attention(q, k, v), R.causal_attention_sdpa(q, k, v))


def test_backend_unknown_name():
    with pytest.raises(ValueError, match="backend must be one of"):
        with ops.backend("cuda"):
            pass


def test_backend_native_missing_raises_clear_error(monkeypatch):
    monkeypatch.setattr(ops, "native_available", lambda: False)
    with pytest.raises(RuntimeError, match="native extension lsr._C is not built") as e:
        with ops.backend("native"):
            pass
    assert "pip install" in str(e.value)
    assert ops.current_backend() == "auto"


def test_backend_native_real_state():
    if ops.native_available():
        with ops.backend("native"):
            assert ops.current_backend() == "native"
    else:
        with pytest.raises(RuntimeError, match="not built"):
            with ops.backend("native"):
                pass


def test_resample_native_without_extension_mentions_fast(monkeypatch):
    codes = torch.zeros(1, 2, 2, dtype=torch.long)
    noise = ops.gumbel_noise(1, 4, 3, [0])

    def prior(c):
        return torch.zeros(c.shape[0], 3, *c.shape[1:])

    monkeypatch.setattr(ops, "native_available", lambda: False)
    with pytest.raises(RuntimeError, match="--resampler fast"):
        ops.resample(prior, codes, noise, 0.5, method="native")
    with pytest.raises(ValueError, match="resampler must be one of"):
        ops.resample(prior, codes, noise, 0.5, method="slow")
