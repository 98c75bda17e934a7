"""Tests for the native CPU kernels of lsr._C (csrc/ops/cpu): vq_nearest and strictly causal
attention (forward and backward), against the pure-PyTorch references and naive float64
loops written here; torch.library.opcheck; and the models giving the same results with
``backend("native")`` as with ``backend("reference")``.

The kernels are compiled for AVX-512, AVX2 and the baseline ISA and pick one at run time;
``LSR_CPU_ISA`` lowers the choice, so the op tests run every path this CPU has.
"""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import lsr.ops as ops
from lsr.ops import reference as R

if not ops.native_available():
    pytest.skip(f"the native extension lsr._C is not built or does not load ({ops._native_error or 'not built'}); "
                "build it with `python setup.py build_ext --inplace`", allow_module_level=True)

from lsr.ops import _native as N  # noqa: E402  (needs the extension loaded)

pytestmark = pytest.mark.usefixtures("one_thread")

ISAS = ["avx512", "avx2", "base"]       # a path the CPU lacks falls back to the next one down


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    monkeypatch.setenv("LSR_CPU_ISA", request.param)
    return request.param


def rel_err(a, b):
    """max |a - b| / max |b|, in float64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300)) if b.numel() else 0.0


# ---------------------------------------------------------------- vq_nearest


def naive_sq_dist(z, e):
    """Squared distances ||z_n - e_k||^2 in float64, a loop over rows: (N, K)."""
    z, e = z.double(), e.double()
    out = torch.empty(z.shape[0], e.shape[0], dtype=torch.float64)
    for n in range(z.shape[0]):
        out[n] = ((e - z[n]) ** 2).sum(dim=1)
    return out


def check_vq_native(z, e):
    """Native indices equal the reference's, except at true near ties, where both chosen
    codes are equally near in float64; and they are a nearest code by the naive loop."""
    idx = torch.ops.lsr.vq_nearest(z, e)
    ref = R.vq_nearest(z, e)
    N_, K = z.shape[0], e.shape[0]
    assert idx.shape == (N_,) and idx.dtype == torch.int64
    if N_ == 0:
        return idx
    assert int(idx.min()) >= 0 and int(idx.max()) < K
    d = naive_sq_dist(z, e)
    rows = torch.arange(N_)
    # rounding of ||e||^2 - 2 z.e in the accumulation type: ~eps * (||z||^2 + ||e||^2)
    eps = 1e-14 if z.dtype == torch.float64 else 1e-5
    tol = eps * ((z.double() ** 2).sum(1) + (e.double() ** 2).sum(1).max()) + 1e-30
    assert (d[rows, idx] <= d.min(1).values + tol).all()
    differ = idx != ref
    assert ((d[rows, idx] - d[rows, ref]).abs()[differ] <= tol[differ]).all(), "a difference that is no near tie"
    return idx


VQ_SHAPES = [(0, 4, 3), (1, 1, 1), (5, 1, 3), (7, 3, 1), (50, 8, 16), (300, 16, 64), (257, 33, 5),
             (130, 513, 64), (64, 100, 7)]
VQ_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", VQ_DTYPES, ids=str)
@pytest.mark.parametrize("N,K,D", VQ_SHAPES)
def test_vq_nearest_vs_reference_and_naive(N, K, D, dtype, isa):
    g = torch.Generator().manual_seed(N * 1000 + K * 10 + D)
    z = torch.randn(N, D, generator=g).to(dtype)
    e = torch.randn(K, D, generator=g).to(dtype)
    idx = check_vq_native(z, e)
    if K == 1:
        assert torch.equal(idx, torch.zeros(N, dtype=torch.long))
    if dtype == torch.float64:                           # no near ties in random float64 data
        assert torch.equal(idx, naive_sq_dist(z, e).argmin(1) if N else idx)
        assert torch.equal(idx, R.vq_nearest(z, e))


@pytest.mark.parametrize("dtype", VQ_DTYPES, ids=str)
def test_vq_nearest_non_contiguous(dtype):
    g = torch.Generator().manual_seed(3)
    N, K, D = 70, 40, 6
    zs = [torch.randn(D, N, generator=g).to(dtype).t(), torch.randn(N, 2 * D, generator=g).to(dtype)[:, ::2],
          torch.randn(2 * N, D, generator=g).to(dtype)[::2]]
    es = [torch.randn(D, K, generator=g).to(dtype).t(), torch.randn(2 * K, D, generator=g).to(dtype)[::2]]
    for z in zs:
        for e in es:
            assert not z.is_contiguous() and not e.is_contiguous()
            idx = check_vq_native(z, e)
            assert torch.equal(idx, torch.ops.lsr.vq_nearest(z.contiguous(), e.contiguous()))


def test_vq_nearest_exact_ties_go_to_the_lower_index(isa):
    # integer data: every distance is exact, so ties are exact ties
    g = torch.Generator().manual_seed(0)
    K, D = 100, 8                                            # several panels of codes
    e = torch.randint(-3, 4, (K, D), generator=g).float()
    e[37] = e[5]
    e[90] = e[5]                                              # duplicates of code 5, in later panels
    z = torch.cat([e[5:6] + 0.25 * torch.randint(-1, 2, (20, D), generator=g).float(),
                   torch.randint(-3, 4, (30, D), generator=g).float()])
    for dtype in VQ_DTYPES:
        zt, et = z.to(dtype), e.to(dtype)
        idx = torch.ops.lsr.vq_nearest(zt, et)
        d = naive_sq_dist(zt, et)
        first_min = (d == d.min(1, keepdim=True).values).double().argmax(1)   # lowest index among equals
        assert torch.equal(idx, first_min), dtype
        assert torch.equal(idx, R.vq_nearest(zt, et)), dtype
        assert not ((idx == 37) | (idx == 90)).any()
    # all codes at the same distance (z = 0, codes of one norm): index 0
    e2 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]).repeat(9, 1)
    assert torch.equal(torch.ops.lsr.vq_nearest(torch.zeros(5, 2), e2), torch.zeros(5, dtype=torch.long))


def test_vq_nearest_many_codes_ties_across_blocks():
    K, D = 1 << 12, 2
    e = torch.zeros(K, D)
    e[K - 1] = torch.tensor([1.0, 1.0])
    z = torch.zeros(200, D)
    z[150] = torch.tensor([1.0, 1.0])
    expected = torch.zeros(200, dtype=torch.long)
    expected[150] = K - 1
    assert torch.equal(torch.ops.lsr.vq_nearest(z, e), expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_vq_nearest_half_accumulates_in_float32(dtype):
    # ||e||^2 = 160000 overflows float16: half accumulation would give inf - inf
    z = torch.full((3, 4), 200.0, dtype=dtype)
    e = torch.stack([torch.full((4,), 200.0), torch.zeros(4), torch.full((4,), -200.0)]).to(dtype)
    assert torch.equal(torch.ops.lsr.vq_nearest(z, e), torch.tensor([0, 0, 0]))
    e2 = torch.tensor([[1.0, 1.0], [1.0, 1.0 + 2 ** -7]], dtype=dtype)
    z2 = torch.tensor([[1.0, 1.0 + 2 ** -7]], dtype=dtype)
    assert torch.equal(torch.ops.lsr.vq_nearest(z2, e2), torch.tensor([1]))


def test_vq_nearest_nan_as_torch_argmin():
    e = torch.randn(40, 4)
    z = torch.randn(6, 4)
    z[2, 1] = float("nan")                # every distance of row 2 is NaN: the first, 0
    e[17, 0] = float("nan")               # code 17 is at NaN distance of every row: chosen
    assert torch.equal(torch.ops.lsr.vq_nearest(z, e), R.vq_nearest(z, e))
    assert torch.equal(torch.ops.lsr.vq_nearest(z, e), torch.tensor([17, 17, 0, 17, 17, 17]))


def test_vq_nearest_threads_give_the_same_indices():
    g = torch.Generator().manual_seed(1)
    z, e = torch.randn(3000, 16, generator=g), torch.randn(300, 16, generator=g)
    one = torch.ops.lsr.vq_nearest(z, e)
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert torch.equal(torch.ops.lsr.vq_nearest(z, e), one)
    finally:
        torch.set_num_threads(n)


def test_vq_nearest_errors(monkeypatch):
    with pytest.raises(RuntimeError, match="K >= 1"):
        torch.ops.lsr.vq_nearest(torch.zeros(3, 2), torch.zeros(0, 2))
    with pytest.raises(RuntimeError, match="D="):
        torch.ops.lsr.vq_nearest(torch.zeros(3, 2), torch.zeros(4, 3))
    with pytest.raises(RuntimeError, match="same dtype"):
        torch.ops.lsr.vq_nearest(torch.zeros(3, 2), torch.zeros(4, 2, dtype=torch.float64))
    monkeypatch.setenv("LSR_CPU_ISA", "sse9")
    with pytest.raises(RuntimeError, match="LSR_CPU_ISA"):
        torch.ops.lsr.vq_nearest(torch.zeros(3, 2), torch.zeros(4, 2))


# ---------------------------------------------------------------- causal attention


def naive_attention(q, k, v):
    """Loop over t in float64: query t attends to keys s < t; row 0 is zeros. Also the
    log-sum-exp of each row's scaled scores (-inf for row 0)."""
    q, k, v = q.double(), k.double(), v.double()
    B, h, T, d = q.shape
    out = torch.zeros(B, h, T, d, dtype=torch.float64)
    lse = torch.full((B, h, T), float("-inf"), dtype=torch.float64)
    for t in range(1, T):
        s = (q[:, :, t:t + 1] @ k[:, :, :t].transpose(-1, -2))[:, :, 0] / math.sqrt(d)    # (B, h, t)
        out[:, :, t] = (torch.softmax(s, dim=-1).unsqueeze(2) @ v[:, :, :t])[:, :, 0]
        lse[:, :, t] = torch.logsumexp(s, dim=-1)
    return out, lse


# (B, h, T, d): T = 1, 2, block edges (64 queries, 128 keys), odd d (padded to 16 lanes)
ATT_SHAPES = [(1, 1, 1, 16), (2, 2, 2, 16), (1, 2, 3, 3), (2, 1, 65, 32), (1, 2, 130, 64), (1, 1, 200, 20),
              (1, 1, 129, 128)]
ATT_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}


@pytest.mark.parametrize("dtype", list(ATT_TOL), ids=str)
@pytest.mark.parametrize("shape", ATT_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_attention_forward_vs_naive(shape, dtype, isa):
    g = torch.Generator().manual_seed(sum(shape))
    q, k, v = (torch.randn(*shape, generator=g).to(dtype) for _ in range(3))
    out, lse = torch.ops.lsr.causal_attention_fwd(q, k, v)
    expected, expected_lse = naive_attention(q, k, v)
    assert out.shape == q.shape and out.dtype == dtype
    assert lse.shape == shape[:3] and lse.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert torch.equal(out[:, :, 0], torch.zeros_like(out[:, :, 0]))
    assert (lse[:, :, 0] == float("-inf")).all()
    if shape[2] > 1:
        assert rel_err(out, expected) < ATT_TOL[dtype]
        assert rel_err(out, R.causal_attention(q, k, v)) < ATT_TOL[dtype]
        torch.testing.assert_close(lse[:, :, 1:].double(), expected_lse[:, :, 1:], rtol=1e-6, atol=1e-6)


def test_attention_non_contiguous_and_layout():
    # the layout PixelSNAIL passes: (B, C, T) convolution output viewed as (B, h, T, d)
    g = torch.Generator().manual_seed(0)
    B, h, T, d = 2, 3, 40, 8
    q, k, v = (torch.randn(B, h * d, T, generator=g).view(B, h, d, T).transpose(2, 3) for _ in range(3))
    assert not q.is_contiguous()
    out, lse = torch.ops.lsr.causal_attention_fwd(q, k, v)
    assert out.stride() == torch.empty_like(q).stride()                # as the fake kernel says
    expected, _ = naive_attention(q, k, v)
    assert rel_err(out, expected) < 1e-5
    out_c, lse_c = torch.ops.lsr.causal_attention_fwd(q.contiguous(), k.contiguous(), v.contiguous())
    assert torch.equal(out, out_c) and torch.equal(lse, lse_c)


def test_attention_huge_scores_row0_never_nan():
    g = torch.Generator().manual_seed(0)
    for T in (1, 2, 5, 70):
        q, k, v = (torch.randn(1, 3, T, 8, generator=g) * 100 for _ in range(3))
        out = N.causal_attention(q, k, v)
        assert torch.isfinite(out).all()
        assert torch.equal(out[:, :, 0], torch.zeros(1, 3, 8))
        torch.testing.assert_close(out, R.causal_attention(q, k, v), rtol=1e-4, atol=1e-3)
    q, k, v = (torch.randn(2, 1, 2, 4, generator=g) for _ in range(3))
    torch.testing.assert_close(N.causal_attention(q, k, v)[:, :, 1], v[:, :, 0])   # row 1 sees key 0 only


def test_attention_future_keys_do_not_matter():
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 150, 4, generator=g, dtype=torch.float64) for _ in range(3))
    base = N.causal_attention(q, k, v)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 100:] += 10.0
    v2[:, :, 100:] -= 10.0
    out = N.causal_attention(q, k2, v2)
    assert torch.equal(out[:, :, :101], base[:, :, :101])         # query t <= 100 sees keys < t <= 99
    assert not torch.equal(out[:, :, 101:], base[:, :, 101:])


def test_attention_threads_give_the_same_results():
    g = torch.Generator().manual_seed(2)
    qkv = [torch.randn(3, 2, 150, 16, generator=g, requires_grad=True) for _ in range(3)]
    grad = torch.randn(3, 2, 150, 16, generator=g)

    def run():
        with torch.enable_grad():
            out = N.causal_attention(*qkv)
            return (out, *torch.autograd.grad(out, qkv, grad))

    one = run()
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        two = run()
    finally:
        torch.set_num_threads(n)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


GRAD_SHAPES = [(1, 1, 1, 4), (1, 2, 2, 3), (2, 1, 5, 3), (1, 1, 70, 5), (1, 2, 140, 16)]


@pytest.mark.parametrize("shape", GRAD_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_attention_grads_vs_reference_autograd(shape, isa):
    g = torch.Generator().manual_seed(sum(shape))
    q, k, v = (torch.randn(*shape, generator=g) for _ in range(3))
    grad = torch.randn(*shape, generator=g)
    with torch.enable_grad():
        ref_in = [t.double().requires_grad_() for t in (q, k, v)]
        ref = torch.autograd.grad(R.causal_attention(*ref_in), ref_in, grad.double())
        for dtype, rtol, atol in ((torch.float64, 1e-10, 1e-12), (torch.float32, 1e-4, 1e-5)):
            nat_in = [t.to(dtype).requires_grad_() for t in (q, k, v)]
            nat = torch.autograd.grad(N.causal_attention(*nat_in), nat_in, grad.to(dtype))
            for a, b in zip(nat, ref):
                assert a.dtype == dtype
                torch.testing.assert_close(a.double(), b, rtol=rtol, atol=atol)
    if shape[2] > 1:
        assert torch.equal(nat[0][:, :, 0], torch.zeros_like(nat[0][:, :, 0]))    # row 0: no dependence on q[0]
        assert torch.equal(nat[1][:, :, -1], torch.zeros_like(nat[1][:, :, -1]))  # the last key: seen by no one


@pytest.mark.parametrize("T", [1, 2, 5, 67])
def test_attention_gradcheck_float64(T):
    g = torch.Generator().manual_seed(T)
    qkv = [torch.randn(1, 2, T, 3, generator=g, dtype=torch.float64).requires_grad_() for _ in range(3)]
    with torch.enable_grad():
        assert torch.autograd.gradcheck(N.causal_attention, qkv)


def test_attention_bf16_grads():
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(2, 2, 90, 16, generator=g) for _ in range(3))
    grad = torch.randn(2, 2, 90, 16, generator=g)
    with torch.enable_grad():
        ref_in = [t.bfloat16().double().requires_grad_() for t in (q, k, v)]
        ref = torch.autograd.grad(R.causal_attention(*ref_in), ref_in, grad.bfloat16().double())
        nat_in = [t.bfloat16().requires_grad_() for t in (q, k, v)]
        nat = torch.autograd.grad(N.causal_attention(*nat_in), nat_in, grad.bfloat16())
    for a, b in zip(nat, ref):
        assert a.dtype == torch.bfloat16 and rel_err(a, b) < 2e-2


# ---------------------------------------------------------------- opcheck


def _opcheck(op, args):
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration",
                                                "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("case", ["small", "empty", "half", "strided"])
def test_opcheck_vq_nearest(case):
    g = torch.Generator().manual_seed(0)
    z, e = torch.randn(37, 5, generator=g), torch.randn(9, 5, generator=g)
    if case == "empty":
        z = z[:0]
    elif case == "half":
        z, e = z.half(), e.half()
    elif case == "strided":
        z = torch.randn(5, 37, generator=g).t()
    _opcheck(torch.ops.lsr.vq_nearest.default, (z, e))


@pytest.mark.parametrize("case", ["small", "row0", "double", "strided"])
def test_opcheck_causal_attention(case):
    g = torch.Generator().manual_seed(0)
    shape = {"small": (2, 2, 9, 8), "row0": (1, 1, 1, 4), "double": (1, 2, 6, 3), "strided": (2, 2, 7, 4)}[case]
    dtype = torch.float64 if case == "double" else torch.float32
    q, k, v = (torch.randn(*shape, generator=g, dtype=dtype) for _ in range(3))
    if case == "strided":
        q, k, v = (t.transpose(2, 3).contiguous().transpose(2, 3) for t in (q, k, v))
    _opcheck(torch.ops.lsr.causal_attention_fwd.default, tuple(t.clone().requires_grad_() for t in (q, k, v)))
    out, lse = torch.ops.lsr.causal_attention_fwd(q, k, v)
    _opcheck(torch.ops.lsr.causal_attention_bwd.default, (torch.randn_like(out), q, k, v, out, lse))


# ---------------------------------------------------------------- models


def test_vector_quantizer_native_equals_reference():
    from lsr.models import VectorQuantizer

    torch.manual_seed(0)
    vq = VectorQuantizer(64, 16).eval()
    vq.codebook.normal_()
    z = torch.randn(4, 16, 12, 12)
    with ops.backend("native"):
        nat = vq(z)
    with ops.backend("reference"):
        ref = vq(z)
    assert torch.equal(nat.indices, ref.indices)
    assert torch.equal(nat.quantized, ref.quantized)
    assert torch.equal(nat.loss, ref.loss)


def _prior(dtype):
    from lsr.config import preset
    from lsr.models import PixelSNAIL

    torch.manual_seed(0)
    cfg = dataclasses.replace(preset("tiny", in_channels=1).prior, grid_size=12, channels=32, n_heads=2)
    return PixelSNAIL(cfg).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_pixelsnail_native_equals_reference(dtype):
    model = _prior(dtype).eval()
    codes = torch.randint(0, model.cfg.codebook_size, (3, 12, 12), generator=torch.Generator().manual_seed(1))
    with ops.backend("native"):
        nat = model(codes)
    with ops.backend("reference"):
        ref = model(codes)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert rel_err(nat, ref) < tol


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_pixelsnail_training_gradients_native_equal_reference(dtype):
    model = _prior(dtype).train()
    codes = torch.randint(0, model.cfg.codebook_size, (4, 12, 12), generator=torch.Generator().manual_seed(2))
    grads = {}
    for name in ("native", "reference"):
        model.zero_grad()
        with torch.enable_grad(), ops.backend(name):
            F.cross_entropy(model(codes), codes).backward()
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters()}
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    attention_params = [n for n in grads["native"] if ".attn." in n]
    assert attention_params
    for n in grads["native"]:
        assert rel_err(grads["native"][n], grads["reference"][n]) < tol, n
