"""CUDA kernels of the native ops (``csrc/ops/cuda/*.cu``) against the pure-PyTorch
references and naive float64 loops: vq_nearest (dtypes, ties, empty and one-code
inputs, non-contiguous inputs) and causal attention forward and backward (T up to 4096,
every supported head dim), ``torch.library.opcheck``, and the current CUDA stream.

Skipped unless a GPU is visible and ``lsr._C`` was built with its CUDA kernels
(``pip install --no-build-isolation .`` with a CUDA build of torch and CUDA_HOME set).
"""
import math

import pytest
import torch

import lsr.ops as ops
from lsr.ops import reference as R

OPS = ("vq_nearest", "causal_attention_fwd", "causal_attention_bwd", "causal_attention_rows")


def _cuda_kernels_built() -> bool:
    if not torch.cuda.is_available() or not ops.native_available():
        return False
    try:
        return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"lsr::{op}", "CUDA") for op in OPS)
    except RuntimeError:
        return False


pytestmark = pytest.mark.skipif(not _cuda_kernels_built(),
                                reason="needs a GPU and lsr._C built with its CUDA kernels")

DEVICE = "cuda"


@pytest.fixture(autouse=True)
def _full_fp32_matmul():
    """The float32 oracles below must not run their matrix products in TF32."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def native_vq(z, e):
    return torch.ops.lsr.vq_nearest(z, e)


def native_fwd(q, k, v):
    return torch.ops.lsr.causal_attention_fwd(q, k, v)


def rel_err(actual, expected) -> float:
    """max |actual - expected| / max(max |expected|, 1), in float64. The floor of 1 makes it
    an absolute error where the exact answer is (near) zero, e.g. gradients at T = 2, which
    the kernels reach only up to rounding."""
    actual, expected = actual.double(), expected.double()
    if expected.numel() == 0:
        return 0.0
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1.0))


# ---------------------------------------------------------------- vq_nearest


def sq_dist64(z, e, rows=256):
    """Full squared distances ||z_n - e_k||^2 in float64, straight from the definition,
    a block of rows at a time: (N, K)."""
    z, e = z.double(), e.double()
    out = torch.empty(z.shape[0], e.shape[0], dtype=torch.float64, device=z.device)
    for n in range(0, z.shape[0], rows):
        out[n:n + rows] = ((z[n:n + rows, None, :] - e[None, :, :]) ** 2).sum(-1)
    return out


def check_vq(z, e, idx):
    """idx holds a nearest index per row; where the nearest is clear it is *the* index.
    Returns the mask of rows whose nearest code is clear."""
    N, K = z.shape[0], e.shape[0]
    assert idx.shape == (N,) and idx.dtype == torch.int64 and idx.device == z.device
    if N == 0:
        return torch.zeros(0, dtype=torch.bool, device=z.device)
    assert int(idx.min()) >= 0 and int(idx.max()) < K
    d = sq_dist64(z, e)
    best, arg = d.min(dim=1)
    chosen = d.gather(1, idx[:, None])[:, 0]
    # float32 accumulation of ||e||^2 - 2 z.e: error ~ eps32 * (||z||^2 + ||e||^2)
    scale = (z.double() ** 2).sum(1) + (e.double() ** 2).sum(1).max()
    tol = 1e-5 * scale + 1e-6
    assert (chosen <= best + tol).all(), float((chosen - best).max())
    clear = torch.ones(N, dtype=torch.bool, device=z.device)
    if K > 1:
        second = d.topk(2, dim=1, largest=False).values[:, 1]
        clear = (second - best) > 2 * tol
        assert torch.equal(idx[clear], arg[clear])
    return clear


VQ_SHAPES = [(0, 4, 3), (1, 1, 1), (5, 1, 3), (7, 3, 1), (50, 8, 16), (300, 16, 64), (257, 33, 5),
             (64, 64, 32), (65, 65, 33), (1000, 512, 64), (4099, 100, 70), (130, 1, 200), (3, 2000, 8)]
VQ_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", VQ_DTYPES, ids=str)
@pytest.mark.parametrize("N,K,D", VQ_SHAPES)
def test_vq_nearest_vs_naive_and_reference(N, K, D, dtype):
    g = torch.Generator(device=DEVICE).manual_seed(N * 1000 + K * 10 + D)
    z = torch.randn(N, D, generator=g, device=DEVICE).to(dtype)
    e = torch.randn(K, D, generator=g, device=DEVICE).to(dtype)
    idx = native_vq(z, e)
    clear = check_vq(z, e, idx)
    if K == 1:
        assert torch.equal(idx, torch.zeros(N, dtype=torch.long, device=DEVICE))
    if dtype == torch.float64 and N:                          # no near ties in random float64 data
        assert torch.equal(idx, sq_dist64(z, e).argmin(dim=1))
    ref = R.vq_nearest(z, e)
    assert torch.equal(idx[clear], ref[clear])
    # the dispatch point takes the native kernel
    assert torch.equal(ops.vq_nearest(z, e), idx)


@pytest.mark.parametrize("dtype", VQ_DTYPES, ids=str)
def test_vq_nearest_ties_go_to_lower_index(dtype):
    # small integers: every distance is exact in every dtype, so ties are exact ties
    g = torch.Generator(device=DEVICE).manual_seed(7)
    K, D = 300, 12
    e = torch.randint(-3, 4, (K, D), generator=g, device=DEVICE).to(dtype)
    # one vector at indices 5, 70, 130, 299 (other threads, other codebook tiles),
    # another at 63, 64 (both sides of a tile boundary), a third at 0 and 200
    for group in ((5, 70, 130, 299), (63, 64), (0, 200)):
        e[list(group)] = e[group[0]].clone()
    z = torch.stack([e[5], e[63], e[0], e[299], e[64], e[200]])  # exact copies of code vectors
    expected = torch.tensor([5, 63, 0, 5, 63, 0], device=DEVICE)
    # any other code differs in at least one coordinate by >= 1: strictly farther
    assert torch.equal(native_vq(z, e), expected)
    # all codes equal: every row ties over all K codes
    same = torch.ones(K, D, device=DEVICE, dtype=dtype)
    assert torch.equal(native_vq(torch.randn(77, D, device=DEVICE).to(dtype), same),
                       torch.zeros(77, dtype=torch.long, device=DEVICE))


def test_vq_nearest_ties_large_codebook():
    # as the reference's chunking test: K - 1 equal zero codes and one distinct last code
    K, D = 1 << 16, 2
    e = torch.zeros(K, D, device=DEVICE)
    e[K - 1] = torch.tensor([1.0, 1.0])
    z = torch.zeros(200, D, device=DEVICE)
    z[150] = torch.tensor([1.0, 1.0])
    expected = torch.zeros(200, dtype=torch.long, device=DEVICE)
    expected[150] = K - 1
    assert torch.equal(native_vq(z, e), expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_vq_nearest_half_accumulates_in_float32(dtype):
    # ||e||^2 = 4 * 200^2 = 160000 overflows float16 (max 65504)
    z = torch.full((3, 4), 200.0, dtype=dtype, device=DEVICE)
    e = torch.stack([torch.full((4,), 200.0), torch.zeros(4), torch.full((4,), -200.0)]).to(dtype).to(DEVICE)
    assert torch.equal(native_vq(z, e), torch.tensor([0, 0, 0], device=DEVICE))
    e2 = torch.tensor([[1.0, 1.0], [1.0, 1.0 + 2 ** -7]], dtype=dtype, device=DEVICE)
    z2 = torch.tensor([[1.0, 1.0 + 2 ** -7]], dtype=dtype, device=DEVICE)
    assert torch.equal(native_vq(z2, e2), torch.tensor([1], device=DEVICE))


def test_vq_nearest_empty_and_single_code():
    out = native_vq(torch.zeros(0, 5, device=DEVICE), torch.randn(3, 5, device=DEVICE))
    assert out.shape == (0,) and out.dtype == torch.long and out.device.type == "cuda"
    z = torch.randn(1000, 5, device=DEVICE)
    assert torch.equal(native_vq(z, torch.randn(1, 5, device=DEVICE)),
                       torch.zeros(1000, dtype=torch.long, device=DEVICE))


@pytest.mark.parametrize("dtype", VQ_DTYPES, ids=str)
def test_vq_nearest_non_contiguous(dtype):
    g = torch.Generator(device=DEVICE).manual_seed(3)
    N, K, D = 400, 70, 40

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device=DEVICE).to(dtype)

    zs = [rnd(D, N).t(), rnd(N, 2 * D)[:, ::2], rnd(2 * N, D)[::2]]   # transposed, strided
    es = [rnd(D, K).t(), rnd(2 * K, D)[::2]]
    for z in zs:
        for e in es:
            assert not z.is_contiguous() and not e.is_contiguous()
            idx = native_vq(z, e)
            assert torch.equal(idx, native_vq(z.contiguous(), e.contiguous()))
            check_vq(z, e, idx)


def test_vq_nearest_nan_and_inf_like_the_cpu_kernel():
    """Non-finite inputs: the CUDA kernel picks what the CPU kernel picks (a NaN distance
    wins, the first one; a row of +inf distances gives 0)."""
    g = torch.Generator(device=DEVICE).manual_seed(4)
    z = torch.randn(300, 16, generator=g, device=DEVICE)
    e = torch.randn(70, 16, generator=g, device=DEVICE)
    z[0, 0] = float("nan")
    z[1] = float("inf")
    z[2, 3] = -float("inf")
    assert torch.equal(native_vq(z, e).cpu(), torch.ops.lsr.vq_nearest(z.cpu(), e.cpu()))
    e[9, 2] = float("inf")
    e[40, :] = float("nan")
    assert torch.equal(native_vq(z, e).cpu(), torch.ops.lsr.vq_nearest(z.cpu(), e.cpu()))


def test_vq_nearest_errors():
    with pytest.raises(RuntimeError, match="D="):
        native_vq(torch.zeros(3, 2, device=DEVICE), torch.zeros(4, 3, device=DEVICE))
    with pytest.raises(RuntimeError, match="K >= 1"):
        native_vq(torch.zeros(3, 2, device=DEVICE), torch.zeros(0, 2, device=DEVICE))
    with pytest.raises(RuntimeError, match="same dtype"):
        native_vq(torch.zeros(3, 2, device=DEVICE), torch.zeros(4, 2, device=DEVICE, dtype=torch.float64))
    with pytest.raises(RuntimeError):
        native_vq(torch.zeros(3, 2, device=DEVICE), torch.zeros(4, 2))      # one tensor on the CPU


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_vq_nearest_opcheck(dtype):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    z = torch.randn(100, 16, generator=g, device=DEVICE).to(dtype)
    e = torch.randn(20, 16, generator=g, device=DEVICE).to(dtype)
    torch.library.opcheck(torch.ops.lsr.vq_nearest.default, (z, e))


# ---------------------------------------------------------------- causal attention


def naive_attention(q, k, v):
    """Loop over t in float64: query t attends to keys s < t; row 0 is zeros.
    Returns (out, lse), lse = logsumexp of the scaled scores (-inf for row 0)."""
    q, k, v = q.double(), k.double(), v.double()
    B, h, T, d = q.shape
    out = torch.zeros(B, h, T, d, dtype=torch.float64, device=q.device)
    lse = torch.full((B, h, T), -math.inf, dtype=torch.float64, device=q.device)
    for t in range(1, T):
        s = (q[:, :, t:t + 1] @ k[:, :, :t].transpose(-1, -2))[:, :, 0] / math.sqrt(d)   # (B, h, t)
        out[:, :, t] = (torch.softmax(s, dim=-1).unsqueeze(-2) @ v[:, :, :t])[:, :, 0]
        lse[:, :, t] = torch.logsumexp(s, dim=-1)
    return out, lse


def attention_inputs(B, h, T, d, dtype, seed, requires_grad=False, scale=1.0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return [(torch.randn(B, h, T, d, generator=g, device=DEVICE) * scale).to(dtype).requires_grad_(requires_grad)
            for _ in range(3)]


ATT_T = [1, 2, 64, 65, 255, 1024, 4096]     # 64, 65: a block boundary, a last block of one row
ATT_D = [16, 32, 64, 128]
ATT_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", list(ATT_TOL), ids=str)
@pytest.mark.parametrize("d", ATT_D)
@pytest.mark.parametrize("T", ATT_T)
def test_causal_attention_fwd_vs_naive(T, d, dtype):
    B, h = (1, 2) if T >= 1024 else (2, 3)
    q, k, v = attention_inputs(B, h, T, d, dtype, seed=T * 1000 + d)
    out, lse = native_fwd(q, k, v)
    assert out.shape == q.shape and out.dtype == dtype and out.device == q.device
    assert lse.shape == (B, h, T) and lse.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert torch.equal(out[:, :, 0], torch.zeros_like(out[:, :, 0]))
    assert (lse[:, :, 0] == -math.inf).all()
    expected, expected_lse = naive_attention(q, k, v)
    assert rel_err(out, expected) < ATT_TOL[dtype]
    if T > 1:
        # lse is float32 from the same (exactly converted) inputs, whatever the input dtype
        torch.testing.assert_close(lse[:, :, 1:].double(), expected_lse[:, :, 1:], rtol=1e-5, atol=1e-5)
    # the reference ops agree (the fast SDPA path within its own precision)
    if dtype in (torch.float32, torch.float64):
        assert rel_err(out, R.causal_attention(q, k, v)) < ATT_TOL[dtype]
    with ops.backend("native"):
        assert torch.equal(ops.causal_attention(q, k, v), out)


def test_causal_attention_row0_zero_never_nan():
    for T in (1, 2, 5, 300):
        q, k, v = attention_inputs(1, 3, T, 16, torch.float32, seed=T, scale=100.0)   # huge scores
        out, lse = native_fwd(q, k, v)
        assert torch.isfinite(out).all() and torch.isfinite(lse[:, :, 1:]).all()
        assert torch.equal(out[:, :, 0], torch.zeros(1, 3, 16, device=DEVICE))
    # T = 2: row 1 sees key 0 only, so it is exactly v[0]
    q, k, v = attention_inputs(2, 1, 2, 32, torch.float32, seed=1)
    torch.testing.assert_close(native_fwd(q, k, v)[0][:, :, 1], v[:, :, 0], rtol=0, atol=0)


def test_causal_attention_future_keys_do_not_matter():
    q, k, v = attention_inputs(1, 2, 200, 16, torch.float32, seed=5)
    base = native_fwd(q, k, v)[0]
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 100:] += 10.0
    v2[:, :, 100:] -= 10.0
    out = native_fwd(q, k2, v2)[0]
    assert torch.equal(out[:, :, :101], base[:, :, :101])      # query t <= 100 sees keys < 100
    assert not torch.equal(out[:, :, 101:], base[:, :, 101:])


GRAD_CASES = [(T, d, dtype) for dtype in (torch.float32, torch.bfloat16) for d in ATT_D for T in (1, 2, 255, 1024)]
GRAD_CASES += [(255, d, torch.float16) for d in (16, 64, 128)]
GRAD_CASES += [(4096, 16, torch.float32), (4096, 64, torch.float32), (4096, 64, torch.bfloat16),
               (255, 64, torch.float64), (1024, 128, torch.float64), (255, 32, torch.float16)]
# float64 gradients are limited by lse, which the schema keeps in float32: P = exp(S - lse)
# carries a relative error up to ~5e-7 (an emulation of the kernels gave 1.5e-7 at T = 1024)
GRAD_TOL = {torch.float64: 5e-6, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("T,d,dtype", GRAD_CASES, ids=str)
def test_causal_attention_bwd_vs_reference_autograd(T, d, dtype):
    B, h = (1, 1) if T >= 4096 else (1, 2) if T >= 1024 else (2, 2)
    q, k, v = attention_inputs(B, h, T, d, dtype, seed=T + d, requires_grad=True)
    g = torch.Generator(device=DEVICE).manual_seed(99)
    grad_out = torch.randn(B, h, T, d, generator=g, device=DEVICE).to(dtype)
    out = torch.ops.lsr.causal_attention_fwd(q, k, v)[0]
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    # oracle: the reference's autograd in float64 on the same (rounded) inputs
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    expected = torch.autograd.grad(R.causal_attention(q64, k64, v64), (q64, k64, v64), grad_out.double())
    # yardstick: the reference's autograd in the input dtype (float32 inside), whose own
    # error grows with T through cancellations in sum_s dS_ts
    qr, kr, vr = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    ref = torch.autograd.grad(R.causal_attention(qr, kr, vr), (qr, kr, vr), grad_out)
    for name, got, exp, yard in zip("qkv", grads, expected, ref):
        assert got.dtype == dtype and got.shape == q.shape
        assert torch.isfinite(got).all(), name
        tol = max(GRAD_TOL[dtype], 4 * rel_err(yard, exp))
        assert rel_err(got, exp) < tol, (name, rel_err(got, exp), tol)
    assert torch.equal(grads[0][:, :, 0], torch.zeros_like(grads[0][:, :, 0]))   # row 0 does not depend on q[0]
    assert torch.equal(grads[1][:, :, -1], torch.zeros_like(grads[1][:, :, -1]))  # no query sees the last key
    assert torch.equal(grads[2][:, :, -1], torch.zeros_like(grads[2][:, :, -1]))


@pytest.mark.parametrize("T", [1, 2, 5, 70])
@pytest.mark.parametrize("d", [16, 32])
def test_causal_attention_gradcheck_float64(T, d):
    # T = 70 crosses a 64-row block and several 16-row float64 tiles
    q, k, v = attention_inputs(1, 2 if T < 70 else 1, T, d, torch.float64, seed=T, requires_grad=True)

    def fn(q, k, v):
        return torch.ops.lsr.causal_attention_fwd(q, k, v)[0]

    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=T >= 70)


@pytest.mark.parametrize("d", ATT_D)
def test_causal_attention_non_contiguous(d):
    B, h, T = 2, 3, 130
    g = torch.Generator(device=DEVICE).manual_seed(d)
    # (B, T, h, d) transposed to (B, h, T, d): dense, permuted strides
    q, k, v = (torch.randn(B, T, h, d, generator=g, device=DEVICE).transpose(1, 2) for _ in range(3))
    assert not q.is_contiguous()
    out, lse = native_fwd(q, k, v)
    ref_out, ref_lse = native_fwd(q.contiguous(), k.contiguous(), v.contiguous())
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    assert out.stride() == torch.empty_like(q).stride()          # the layout the fake kernel promises
    # strided (non-dense) views
    qs, ks, vs = (torch.randn(B, h, 2 * T, d, generator=g, device=DEVICE)[:, :, ::2] for _ in range(3))
    torch.testing.assert_close(native_fwd(qs, ks, vs)[0], native_fwd(qs.contiguous(), ks.contiguous(),
                                                                      vs.contiguous())[0], rtol=0, atol=0)
    # backward through permuted inputs
    qg, kg, vg = (t.detach().requires_grad_(True) for t in (q, k, v))
    torch.ops.lsr.causal_attention_fwd(qg, kg, vg)[0].sum().backward()
    qc, kc, vc = (t.detach().contiguous().requires_grad_(True) for t in (q, k, v))
    torch.ops.lsr.causal_attention_fwd(qc, kc, vc)[0].sum().backward()
    for a, b in ((qg, qc), (kg, kc), (vg, vc)):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


def test_causal_attention_empty_inputs():
    for shape in ((0, 2, 5, 16), (2, 0, 5, 16), (2, 3, 0, 16)):
        q = torch.zeros(shape, device=DEVICE)
        out, lse = native_fwd(q, q, q)
        assert out.shape == shape and lse.shape == shape[:3]
        dq, dk, dv = torch.ops.lsr.causal_attention_bwd(q, q, q, q, out, lse)
        assert dq.shape == dk.shape == dv.shape == shape


@pytest.mark.parametrize("d", [1, 8, 12, 20, 48, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_causal_attention_any_head_dim(d, dtype):
    """Head dims other than 16/32/64/128 (the presets use 8 and 12) run on zero-padded
    copies with the scale of the real d: forward and backward."""
    B, h, T = 2, 3, 130
    q, k, v = attention_inputs(B, h, T, d, dtype, seed=d, requires_grad=True)
    out, lse = native_fwd(q, k, v)
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    expected, expected_lse = naive_attention(q, k, v)
    assert rel_err(out, expected) < ATT_TOL[dtype]
    torch.testing.assert_close(lse[:, :, 1:].double(), expected_lse[:, :, 1:], rtol=1e-5, atol=1e-5)
    g = torch.Generator(device=DEVICE).manual_seed(7)
    grad_out = torch.randn(B, h, T, d, generator=g, device=DEVICE).to(dtype)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    ref = torch.autograd.grad(R.causal_attention(q64, k64, v64), (q64, k64, v64), grad_out.double())
    for got, want in zip(grads, ref):
        assert got.shape == want.shape and rel_err(got, want) < GRAD_TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("d", [12, 16, 64])
def test_causal_attention_rows_equal_the_full_kernel_bitwise(d, dtype):
    """lsr::causal_attention_rows on CUDA (the incremental prior's later passes) gives the
    rows of the full forward bit for bit, for any q0 (block-aligned or not)."""
    B, h, T = 2, 2, 300
    q, k, v = attention_inputs(B, h, T, d, dtype, seed=3)
    full = native_fwd(q, k, v)[0]
    for q0, Tq in ((0, 300), (0, 5), (1, 1), (63, 2), (64, 64), (65, 100), (200, 100), (299, 1)):
        rows = torch.ops.lsr.causal_attention_rows(q[:, :, q0:q0 + Tq], k[:, :, :q0 + Tq], v[:, :, :q0 + Tq], q0)
        assert rows.shape == (B, h, Tq, d) and rows.dtype == dtype
        assert torch.equal(rows, full[:, :, q0:q0 + Tq]), (q0, Tq)
    # and the reference (the composite formula other devices use)
    ref = R.causal_attention(q.double(), k.double(), v.double())
    assert rel_err(torch.ops.lsr.causal_attention_rows(q[:, :, 150:], k, v, 150), ref[:, :, 150:]) < ATT_TOL[dtype]
    empty = torch.ops.lsr.causal_attention_rows(q[:, :, :0], k[:, :, :7], v[:, :, :7], 7)
    assert empty.shape == (B, h, 0, d)


def test_causal_attention_errors():
    q = torch.zeros(1, 1, 4, 129, device=DEVICE)
    with pytest.raises(RuntimeError, match="head dims d <= 128"):
        native_fwd(q, q, q)
    q = torch.zeros(1, 1, 4, 16, device=DEVICE)
    with pytest.raises(RuntimeError, match="same shape"):
        native_fwd(q, torch.zeros(1, 1, 5, 16, device=DEVICE), q)
    with pytest.raises(RuntimeError, match="same dtype"):
        native_fwd(q, q.double(), q)
    out, lse = native_fwd(q, q, q)
    with pytest.raises(RuntimeError, match="lse"):
        torch.ops.lsr.causal_attention_bwd(q, q, q, q, out, lse.double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_causal_attention_opcheck(dtype):
    q, k, v = attention_inputs(2, 2, 70, 32, dtype, seed=0, requires_grad=True)
    torch.library.opcheck(torch.ops.lsr.causal_attention_fwd.default, (q, k, v))
    out, lse = (t.detach() for t in native_fwd(q, k, v))
    grad_out = torch.randn_like(out)
    qd, kd, vd = (t.detach() for t in (q, k, v))
    torch.library.opcheck(torch.ops.lsr.causal_attention_bwd.default, (grad_out, qd, kd, vd, out, lse))
    # permuted (B, T, h, d) inputs: real and fake outputs must have the same strides
    qp, kp, vp = (t.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(True) for t in (q, k, v))
    assert not qp.is_contiguous()
    torch.library.opcheck(torch.ops.lsr.causal_attention_fwd.default, (qp, kp, vp))
    # the rows op (inference only; a head dim the kernels pad)
    q, k, v = attention_inputs(2, 2, 70, 12, dtype, seed=1)
    torch.library.opcheck(torch.ops.lsr.causal_attention_rows.default, (q[:, :, 10:].contiguous(), k, v, 10))


# ---------------------------------------------------------------- streams and devices


def test_ops_run_on_the_current_stream():
    """Work queued on a side stream before the op (a long sleep, then a write to its input)
    must be seen by it: an op on the default stream would read the old input."""
    g = torch.Generator(device=DEVICE).manual_seed(0)
    z_old = torch.randn(4096, 64, generator=g, device=DEVICE)
    z_new = torch.randn(4096, 64, generator=g, device=DEVICE)
    e = torch.randn(512, 64, generator=g, device=DEVICE)
    q, k, v = attention_inputs(2, 4, 512, 64, torch.float32, seed=1)
    q_new = torch.randn(q.shape, generator=g, device=DEVICE)
    expected_idx = native_vq(z_new, e)
    expected_out = native_fwd(q_new, k, v)[0]
    z, qq = z_old.clone(), q.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)                        # ~0.1 s of GPU time on the side stream
        z.copy_(z_new)
        qq.copy_(q_new)
        idx = native_vq(z, e)
        out = native_fwd(qq, k, v)[0]
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(idx, expected_idx)
    assert torch.equal(out, expected_out)


def test_ops_capture_in_a_cuda_graph():
    """Graph capture fails if a kernel is launched on any stream but the capturing one."""
    g = torch.Generator(device=DEVICE).manual_seed(0)
    z = torch.randn(1000, 64, generator=g, device=DEVICE)
    e = torch.randn(512, 64, generator=g, device=DEVICE)
    q, k, v = attention_inputs(1, 2, 300, 32, torch.float32, seed=2)
    native_vq(z, e)                                            # warm-up outside the capture
    native_fwd(q, k, v)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        idx = native_vq(z, e)
        out = native_fwd(q, k, v)[0]
    z.copy_(torch.randn(z.shape, generator=g, device=DEVICE))
    q.copy_(torch.randn(q.shape, generator=g, device=DEVICE))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(idx, native_vq(z, e))
    assert torch.equal(out, native_fwd(q, k, v)[0])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_ops_on_a_second_gpu():
    dev = torch.device("cuda", 1)
    g = torch.Generator(device=dev).manual_seed(0)
    z = torch.randn(500, 16, generator=g, device=dev)
    e = torch.randn(40, 16, generator=g, device=dev)
    q, k, v = (torch.randn(1, 2, 100, 16, generator=g, device=dev) for _ in range(3))
    with torch.cuda.device(0):
        idx = native_vq(z, e)
        out = native_fwd(q, k, v)[0]
    assert idx.device == dev and out.device == dev
    check_vq(z, e, idx)
    assert rel_err(out, naive_attention(q, k, v)[0]) < 1e-5


# ---------------------------------------------------------------- native resampling loop on CUDA

def test_native_resampling_loop_on_cuda_equals_fast_and_naive():
    """The C++ loop with incremental passes on the GPU (attention rows by the CUDA kernel;
    the tiny preset's head dim 8 runs padded): the codes of the naive and fast loops, and of
    the same loop on the CPU."""
    from lsr.config import preset
    from lsr.models import PixelSNAIL

    torch.manual_seed(0)
    prior = PixelSNAIL(preset("tiny", 1).prior).double().eval()
    K, G, B = prior.cfg.codebook_size, prior.cfg.grid_size, 4
    codes = torch.randint(0, K, (B, G, G), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        p = torch.softmax(prior(codes).float(), 1).gather(1, codes[:, None])[:, 0]
    tau = float(p.flatten().quantile(0.3))
    noise = ops.gumbel_noise(B, G * G, K, [11, 12, 13, 14])
    with torch.no_grad():
        cpu = ops.resample_native(prior, codes, noise, tau)
        gpu_prior = prior.to(DEVICE)
        n = ops.resample_naive(gpu_prior, codes.to(DEVICE), noise.to(DEVICE), tau)
        f = ops.resample_fast(gpu_prior, codes.to(DEVICE), noise.to(DEVICE), tau)
        x = ops.resample_native(gpu_prior, codes.to(DEVICE), noise.to(DEVICE), tau)
    assert x.codes.device.type == "cuda"
    assert torch.equal(x.codes, n.codes) and torch.equal(x.codes, f.codes)
    assert torch.equal(x.codes.cpu(), cpu.codes)
    assert torch.equal(x.resampled, f.resampled)
    assert (x.resampled.flatten(1).sum(1) >= 3).all()
