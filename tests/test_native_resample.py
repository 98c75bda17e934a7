"""Tests for the native resampling loop (csrc/resample) and the incremental prior passes
(lsr/models/incremental.py) it drives:

* ``lsr::causal_attention_rows`` (the attention of a partial pass) against the full op
  (bit for bit on the CPU), the pure-PyTorch rows reference, its composite ATen kernel
  (the one CUDA uses), and opcheck;
* the incremental prior: full pass == PixelSNAIL.forward, partial passes == a fresh full
  pass on the changed grid, eager == TorchScript, cache layout;
* the loop: naive == fast == native (codes, masks, likelihoods, prior passes), batched,
  on grids where many codes change; fewer positions evaluated; clear errors.
"""
import pytest
import torch

import lsr.ops as ops
from lsr.config import PriorConfig, preset
from lsr.models import PixelSNAIL
from lsr.models.incremental import IncrementalPrior, script_prior
from lsr.ops.reference import causal_attention_rows as reference_attention_rows
from lsr.ops import gumbel_noise, resample_fast, resample_naive, resample_native
from lsr.ops import reference as R

if not ops.native_available():
    pytest.skip(f"the native extension lsr._C is not built ({ops._native_error or 'not built'})",
                allow_module_level=True)

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- attention rows

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 100, 16), (1, 2, 300, 32), (2, 1, 64, 64), (1, 1, 5, 8)])
def test_attention_rows_bitwise_equal_to_full_op(dtype, shape):
    B, h, T, d = shape
    g = torch.Generator().manual_seed(T + d)
    q, k, v = (torch.randn(B, h, T, d, generator=g).to(dtype) for _ in range(3))
    full = torch.ops.lsr.causal_attention_fwd(q, k, v)[0]
    for q0 in sorted({0, 1, 3, 63, 64, 65, 127, 128, T // 2, T - 1}):
        if q0 >= T:
            continue
        rows = torch.ops.lsr.causal_attention_rows(q[:, :, q0:].contiguous(), k, v, q0)
        assert rows.dtype == dtype and rows.shape == (B, h, T - q0, d)
        assert torch.equal(rows, full[:, :, q0:]), q0


def test_attention_rows_match_reference_and_composite():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 90, 16, generator=g, dtype=torch.float64) for _ in range(3))
    want = R.causal_attention(q, k, v)
    composite = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    for q0 in [0, 1, 40, 89]:
        qs = q[:, :, q0:]
        ref = reference_attention_rows(qs, k, v, q0)
        torch.testing.assert_close(ref, want[:, :, q0:], rtol=1e-12, atol=1e-12)
        nat = torch.ops.lsr.causal_attention_rows(qs.contiguous(), k, v, q0)
        torch.testing.assert_close(nat, want[:, :, q0:], rtol=1e-12, atol=1e-12)
        # the device-generic kernel (what a CUDA tensor gets), run here on the CPU
        comp = torch.ops.lsr.causal_attention_rows.default.redispatch(composite, qs, k, v, q0)
        torch.testing.assert_close(comp, want[:, :, q0:], rtol=1e-12, atol=1e-12)
    assert torch.equal(torch.ops.lsr.causal_attention_rows(q[:, :, :1].contiguous(), k[:, :, :1], v[:, :, :1], 0),
                       torch.zeros(2, 2, 1, 16, dtype=torch.float64))       # row 0: no keys, zeros


def test_attention_rows_non_contiguous_and_opcheck():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 40, 3, 16, generator=g).transpose(1, 2) for _ in range(3))   # (2, 3, 40, 16) strided
    full = torch.ops.lsr.causal_attention_fwd(q.contiguous(), k.contiguous(), v.contiguous())[0]
    got = torch.ops.lsr.causal_attention_rows(q[:, :, 10:], k, v, 10)
    assert torch.equal(got, full[:, :, 10:])
    torch.library.opcheck(torch.ops.lsr.causal_attention_rows.default, (q[:, :, 10:].contiguous(), k, v, 10))


def test_attention_rows_bad_shapes_are_clear():
    q = torch.randn(1, 2, 10, 8)
    with pytest.raises(RuntimeError, match="k and v must be"):
        torch.ops.lsr.causal_attention_rows(q, torch.randn(1, 2, 12, 8), torch.randn(1, 2, 12, 8), 5)
    with pytest.raises(RuntimeError, match="same dtype"):
        torch.ops.lsr.causal_attention_rows(q, torch.randn(1, 2, 15, 8).double(), torch.randn(1, 2, 15, 8), 5)


# ---------------------------------------------------------------- incremental prior

CONFIGS = {
    "tiny": preset("tiny", 1).prior,
    "k5-3blocks": PriorConfig(codebook_size=24, grid_size=12, channels=16, n_blocks=3, n_res_blocks=1,
                              kernel_size=5, n_heads=2),
    "k7-no-attention": PriorConfig(codebook_size=10, grid_size=9, channels=8, n_blocks=2, n_res_blocks=2,
                                   kernel_size=7, n_heads=2, attention=False),
    # no layer that needs a cache: the cache holds only the grid-height marker
    "no-cached-layers": PriorConfig(codebook_size=6, grid_size=6, channels=8, n_blocks=1, n_res_blocks=0,
                                    kernel_size=3, n_heads=2, attention=False),
}


def make_prior(name, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return PixelSNAIL(CONFIGS[name]).to(dtype).eval()


@pytest.mark.parametrize("native", [True, False], ids=["native", "reference"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_partial_passes_equal_full_passes(name, native):
    prior = make_prior(name)
    cfg = prior.cfg
    G, K, B = cfg.grid_size, cfg.codebook_size, 3
    inc = IncrementalPrior(prior, native=native)
    gen = torch.Generator().manual_seed(5)
    codes = torch.randint(0, K, (B, G, G), generator=gen)
    with torch.no_grad():
        logits, cache = inc.full(codes)
        torch.testing.assert_close(logits, prior(codes), rtol=1e-10, atol=1e-10)
        assert len(cache) == inc.n_cache + 1                      # + the grid-height marker
        for step in range(12):
            rows = torch.tensor([0, 2]) if step % 3 else torch.tensor([1])
            i = int(torch.randint(0, G, (1,), generator=gen))
            j = int(torch.randint(0, G, (1,), generator=gen))
            codes[rows, i, j] = torch.randint(0, K, (len(rows),), generator=gen)
            part = inc.partial(codes[rows], rows, i, cache)
            assert part.shape == (len(rows), K, G - i, G)
            torch.testing.assert_close(part, prior(codes)[rows][:, :, i:], rtol=1e-10, atol=1e-10)
        # the cache now describes the current grid: a pass from row 0 reproduces a full pass
        torch.testing.assert_close(inc.partial(codes, torch.arange(B), 0, cache), prior(codes),
                                   rtol=1e-10, atol=1e-10)


def test_partial_passes_float32_close():
    prior = make_prior("tiny", torch.float32)
    inc = IncrementalPrior(prior)
    codes = torch.randint(0, prior.cfg.codebook_size, (2, 8, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, cache = inc.full(codes)
        assert torch.equal(logits, prior(codes))              # the first pass: the very same kernels
        codes[1, 3, 4] = (codes[1, 3, 4] + 1) % prior.cfg.codebook_size
        part = inc.partial(codes[1:], torch.tensor([1]), 3, cache)
        torch.testing.assert_close(part, prior(codes)[1:, :, 3:], rtol=1e-5, atol=1e-5)


def test_scripted_equals_eager_and_is_inference_only():
    prior = make_prior("k5-3blocks")
    inc = IncrementalPrior(prior)
    sm = script_prior(prior)
    assert hasattr(sm, "partial") and hasattr(sm, "full")
    codes = torch.randint(0, prior.cfg.codebook_size, (2, 12, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, ca = inc.full(codes)
        b, cb = sm.full(codes)
        assert torch.equal(a, b)
        codes[0, 7, 0] = (codes[0, 7, 0] + 3) % prior.cfg.codebook_size
        assert torch.equal(inc.partial(codes[:1], torch.tensor([0]), 7, ca),
                           sm.partial(codes[:1], torch.tensor([0]), 7, cb))
        assert torch.equal(sm(codes), prior(codes)) or torch.allclose(sm(codes), prior(codes), atol=1e-12)
    with pytest.raises(RuntimeError, match="inference only"):
        inc.train()


# ---------------------------------------------------------------- the loop

def setup_case(dtype, B=4, G=8, quantile=0.3, seed=0, name="tiny"):
    prior = make_prior(name, dtype, seed)
    K = prior.cfg.codebook_size
    codes = torch.randint(0, K, (B, G, G), generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        p = torch.softmax(prior(codes).float(), 1).gather(1, codes[:, None])[:, 0]
    tau = float(p.flatten().quantile(quantile))
    noise = gumbel_noise(B, G * G, K, [300 + 7 * seed + i for i in range(B)])
    return prior, codes, noise, tau


def run_three(prior, codes, noise, tau, temperature=1.0):
    with torch.no_grad():
        n = resample_naive(prior, codes, noise, tau, temperature)
        f = resample_fast(prior, codes, noise, tau, temperature)
        x = resample_native(prior, codes, noise, tau, temperature)
    return n, f, x


def check_same(n, f, x, codes, min_changes=3):
    B, H, W = codes.shape
    for r in (f, x):
        assert torch.equal(r.codes, n.codes)
        assert torch.equal(r.resampled, n.resampled)
    torch.testing.assert_close(x.likelihood, f.likelihood, rtol=0, atol=1e-6)
    changes = x.resampled.flatten(1).sum(1)
    assert (changes >= min_changes).all(), changes                 # the loop was exercised
    assert torch.equal(f.prior_passes, 1 + changes)
    # native: one full pass, then calls that evaluate only the rows each image needs next
    # (at least the changed row after each change; more calls, far fewer positions)
    assert (x.prior_passes >= 1 + changes).all()
    assert torch.equal(f.positions_evaluated, f.prior_passes * H * W)
    assert (x.positions_evaluated >= H * W + changes * W).all()
    assert (x.positions_evaluated < f.positions_evaluated).all()
    assert x.codes.dtype == torch.int64 and x.resampled.dtype == torch.bool


@pytest.mark.parametrize("name", list(CONFIGS))
def test_naive_fast_native_identical_float64(name):
    G = CONFIGS[name].grid_size
    prior, codes, noise, tau = setup_case(torch.float64, B=4, G=G, quantile=0.3, name=name)
    n, f, x = run_three(prior, codes, noise, tau)
    check_same(n, f, x, codes)


@pytest.mark.parametrize("seed", [0, 1])
def test_naive_fast_native_identical_float32_many_changes(seed):
    prior, codes, noise, tau = setup_case(torch.float32, B=5, quantile=0.5, seed=seed)
    n, f, x = run_three(prior, codes, noise, tau)
    check_same(n, f, x, codes, min_changes=8)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_native_with_temperature(temperature):
    prior, codes, noise, tau = setup_case(torch.float64, seed=2)
    n, f, x = run_three(prior, codes, noise, tau, temperature)
    check_same(n, f, x, codes)


def test_native_same_alone_or_in_batch_and_nothing_flagged():
    prior, codes, noise, tau = setup_case(torch.float64, seed=3)
    with torch.no_grad():
        batch = resample_native(prior, codes, noise, tau)
        for i in range(codes.shape[0]):
            alone = resample_native(prior, codes[i:i + 1], noise[i:i + 1], tau)
            assert torch.equal(alone.codes[0], batch.codes[i])
            assert torch.equal(alone.resampled[0], batch.resampled[i])
        none = resample_native(prior, codes, noise, 0.0)
    assert torch.equal(none.codes, codes) and not none.resampled.any()
    assert torch.equal(none.prior_passes, torch.ones(4, dtype=torch.long))
    assert torch.equal(none.positions_evaluated, torch.full((4,), 64))


def test_native_accepts_a_scripted_prior_and_dispatch_point():
    prior, codes, noise, tau = setup_case(torch.float64, seed=4)
    sm = script_prior(prior)
    with torch.no_grad():
        a = resample_native(sm, codes, noise, tau)
        b = ops.resample(prior, codes, noise, tau, method="native")
        c = ops.resample(prior, codes, noise, tau, method="fast")
    assert torch.equal(a.codes, b.codes) and torch.equal(b.codes, c.codes)


def test_native_errors_are_clear():
    prior, codes, noise, tau = setup_case(torch.float64)
    with pytest.raises(TypeError, match="PixelSNAIL"):
        resample_native(lambda c: c, codes, noise, tau)
    with pytest.raises(RuntimeError, match="noise must be"):
        resample_native(prior, codes, noise[:, :10], tau)
    with pytest.raises(RuntimeError, match="noise has K"):
        resample_native(prior, codes, noise[:, :, :3], tau)
    with pytest.raises(RuntimeError, match="temperature"):
        resample_native(prior, codes, noise, tau, 0.0)


def test_native_refused_clearly_without_extension(monkeypatch):
    prior, codes, noise, tau = setup_case(torch.float64)
    monkeypatch.setattr(ops, "native_available", lambda: False)
    with pytest.raises(RuntimeError, match="--resampler fast"):
        ops.resample(prior, codes, noise, tau, method="native")
