"""Tests for lsr.models.vqvae: the vector quantiser and the VQ-VAE wrapper.

Covers: eval-mode ``quantized == decode_indices(indices)``; ties to the lower index;
straight-through gradients (+ commitment and codebook loss gradients by hand); one EMA
step computed by hand; dead-code restarts from encoder outputs; the fixed NamedTuple
output in train and eval modes; encode/decode shapes for the ``tiny`` and ``cpu`` presets.
"""
import pytest
import torch

from lsr import ops
from lsr.config import preset
from lsr.models import VQVAE, QuantizerOutput, VectorQuantizer, VQVAEOutput


pytestmark = pytest.mark.usefixtures("one_thread")


def _flat(z):
    """(B, D, H, W) -> (B*H*W, D), the quantiser's row order."""
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])


def _set_codebook(vq, codebook):
    with torch.no_grad():
        vq.codebook.data.copy_(codebook)
        if vq.ema_decay > 0:
            vq.embed_sum.copy_(codebook)
            vq.cluster_size.fill_(1.0)


# ---------------------------------------------------------------- forward / decode


@pytest.mark.parametrize("ema_decay", [0.99, 0.0])
def test_eval_quantized_equals_decode_indices(ema_decay):
    torch.manual_seed(0)
    vq = VectorQuantizer(16, 8, ema_decay=ema_decay).eval()
    z = torch.randn(3, 8, 5, 7)
    out = vq(z)
    assert torch.equal(out.quantized, vq.decode_indices(out.indices))
    # and the indices are the nearest codebook vectors (brute force, float64)
    d = torch.cdist(_flat(z).double(), vq.codebook.detach().double())
    assert torch.equal(out.indices.reshape(-1), d.argmin(dim=1))


def test_vqvae_eval_no_grad_quantized_equals_decode_indices():
    torch.manual_seed(0)
    model = VQVAE(preset("tiny", in_channels=1).vqvae).eval()
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        out = model(x)
        assert torch.equal(out.quantized, model.quantizer.decode_indices(out.indices))
        assert torch.equal(out.reconstruction, model.decode_indices(out.indices))
        assert torch.equal(model.encode(x), out.indices)


def test_vqvae_eval_with_grad_enabled_quantized_equals_decode_indices():
    torch.manual_seed(0)
    model = VQVAE(preset("tiny", in_channels=1).vqvae).eval()
    out = model(torch.rand(2, 1, 32, 32))          # grad mode on: encoder params require grad
    assert torch.equal(out.quantized, model.quantizer.decode_indices(out.indices))


def test_decode_indices_shape_and_values():
    torch.manual_seed(0)
    vq = VectorQuantizer(5, 3)
    idx = torch.tensor([[[0, 4], [2, 2]]])                     # (1, 2, 2)
    q = vq.decode_indices(idx)
    assert q.shape == (1, 3, 2, 2)
    assert torch.equal(q[0, :, 0, 1], vq.codebook[4])
    assert torch.equal(q[0, :, 1, 0], vq.codebook[2])


# ---------------------------------------------------------------- ties


def test_ties_go_to_lower_index_duplicates_and_equidistant():
    vq = VectorQuantizer(6, 2).eval()
    cb = torch.tensor([[1.0, 0.0],     # 0
                       [0.0, 1.0],     # 1
                       [1.0, 0.0],     # 2  duplicate of 0
                       [0.0, 1.0],     # 3  duplicate of 1
                       [-1.0, 0.0],    # 4
                       [0.0, 0.0]])    # 5
    _set_codebook(vq, cb)
    pts = torch.tensor([[1.0, 0.0],    # exactly e0 == e2 -> 0
                        [0.0, 1.0],    # exactly e1 == e3 -> 1
                        [0.5, 0.5],    # equidistant to e0, e1, e2, e3 (and e5) -> 0
                        [-0.5, 0.5],   # equidistant to e1, e3, e4, e5 -> 1
                        [-0.5, 0.0],   # equidistant to e4 and e5 -> 4
                        [0.5, 0.0]])   # equidistant to e0, e2, e5 -> 0
    expected = torch.tensor([0, 1, 0, 1, 4, 0])
    z = pts.t().reshape(1, 2, 1, 6)                           # (B, D, H, W), row order = pts order
    out = vq(z)
    assert torch.equal(out.indices.reshape(-1), expected)
    assert torch.equal(ops.vq_nearest(pts, cb), expected)
    assert torch.equal(ops.reference.vq_nearest(pts, cb), expected)


def test_ties_lower_index_when_duplicate_comes_later():
    torch.manual_seed(1)
    cb = torch.randn(8, 4)
    cb[6] = cb[2]                                             # duplicate at a higher index
    cb[7] = cb[2]
    idx = ops.reference.vq_nearest(cb[[2, 6, 7]].clone(), cb)
    assert torch.equal(idx, torch.tensor([2, 2, 2]))


# ---------------------------------------------------------------- gradients


def test_straight_through_gradient():
    torch.manual_seed(0)
    vq = VectorQuantizer(16, 8).train()
    z = torch.randn(2, 8, 4, 3, requires_grad=True)
    w = torch.randn(2, 8, 4, 3)
    out = vq(z)
    (out.quantized * w).sum().backward()
    assert torch.equal(z.grad, w)                             # d quantized / d z is the identity


@pytest.mark.parametrize("ema_decay", [0.99, 0.0])
def test_straight_through_plus_commitment_gradient(ema_decay):
    torch.manual_seed(0)
    beta = 0.25
    vq = VectorQuantizer(16, 8, commitment_weight=beta, ema_decay=ema_decay).train()
    z = torch.randn(2, 8, 4, 3, requires_grad=True)
    w = torch.randn(2, 8, 4, 3)
    out = vq(z)
    ((out.quantized * w).sum() + out.loss).backward()
    q = vq.decode_indices(out.indices).detach()
    expected = w + 2.0 * beta * (z.detach() - q) / z.numel()
    torch.testing.assert_close(z.grad, expected, rtol=1e-6, atol=1e-7)
    # value of the loss
    loss = beta * ((z.detach() - q) ** 2).mean()
    if ema_decay <= 0:
        loss = loss + ((q - z.detach()) ** 2).mean()
    torch.testing.assert_close(out.loss.detach(), loss, rtol=1e-6, atol=0)


def test_codebook_loss_gradient_without_ema():
    torch.manual_seed(0)
    vq = VectorQuantizer(6, 3, ema_decay=0.0).train()
    z = torch.randn(2, 3, 4, 4, requires_grad=True)
    w = torch.randn(2, 3, 4, 4)
    out = vq(z)
    ((out.quantized * w).sum() + out.loss).backward()
    # only the codebook loss mean((e_idx - z)^2) reaches the codebook; the straight-through
    # output and the commitment term do not
    flat, idx = _flat(z.detach()), out.indices.reshape(-1)
    expected = torch.zeros(6, 3)
    for n in range(flat.shape[0]):
        expected[idx[n]] += 2.0 * (vq.codebook.detach()[idx[n]] - flat[n]) / z.numel()
    torch.testing.assert_close(vq.codebook.grad, expected, rtol=1e-5, atol=1e-7)


def test_ema_codebook_is_not_a_parameter():
    vq = VectorQuantizer(6, 3, ema_decay=0.99)
    assert not any(p is vq.codebook for p in vq.parameters())
    assert "codebook" in dict(vq.named_buffers())


# ---------------------------------------------------------------- EMA update


def test_ema_update_one_step_by_hand():
    K, D, d, eps = 4, 3, 0.99, 1e-5
    vq = VectorQuantizer(K, D, ema_decay=d, dead_code_after=0, eps=eps)
    torch.manual_seed(0)
    cs0 = torch.tensor([2.0, 3.0, 1.5, 4.0])
    cb0 = torch.randn(K, D)
    with torch.no_grad():
        vq.cluster_size.copy_(cs0)
        vq.embed_sum.copy_(cb0 * cs0.unsqueeze(1))
        vq.codebook.copy_(cb0)
    # five encoder outputs: three assigned to code 0, two to code 2; codes 1 and 3 unused
    pts = torch.randn(5, D) + 3.0
    assign = torch.tensor([0, 0, 2, 0, 2])
    z = pts.t().reshape(1, D, 1, 5)
    n_restarted = vq.ema_update(z, assign.view(1, 1, 5))
    assert n_restarted == 0

    cs, es = cs0.double().tolist(), (cb0 * cs0.unsqueeze(1)).double()
    counts = [3.0, 0.0, 2.0, 0.0]
    sums = torch.zeros(K, D, dtype=torch.float64)
    for p, k in zip(pts.double(), assign.tolist()):
        sums[k] += p
    cs_new = [d * cs[k] + (1 - d) * counts[k] for k in range(K)]
    es_new = d * es + (1 - d) * sums
    n = sum(cs_new)
    cb_new = torch.stack([es_new[k] / ((cs_new[k] + eps) / (n + K * eps) * n) for k in range(K)])
    torch.testing.assert_close(vq.cluster_size.double(), torch.tensor(cs_new, dtype=torch.float64),
                               rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(vq.embed_sum.double(), es_new, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(vq.codebook.double(), cb_new, rtol=1e-5, atol=1e-6)

    # the used codes moved toward the mean of their assigned vectors
    for k in (0, 2):
        mean = pts[assign == k].mean(0)
        assert (vq.codebook[k] - mean).norm() < (cb0[k] - mean).norm()
        # on the segment between old vector and mean (up to the tiny eps smoothing)
        frac = (1 - d) * counts[k] / cs_new[k]
        torch.testing.assert_close(vq.codebook[k], (1 - frac) * cb0[k] + frac * mean, rtol=1e-4, atol=1e-4)
    # the unused codes keep (essentially) their vectors
    for k in (1, 3):
        torch.testing.assert_close(vq.codebook[k], cb0[k], rtol=1e-4, atol=1e-4)


def test_ema_update_leaves_forward_pure():
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 4).train()
    before = {k: v.clone() for k, v in vq.state_dict().items()}
    vq(torch.randn(2, 4, 3, 3, requires_grad=True))
    for k, v in vq.state_dict().items():
        assert torch.equal(v, before[k]), k


# ---------------------------------------------------------------- dead codes


@pytest.mark.parametrize("ema_decay", [0.99, 0.0])
def test_dead_codes_restarted_from_encoder_outputs(ema_decay):
    K, D, after = 6, 3, 2
    vq = VectorQuantizer(K, D, ema_decay=ema_decay, dead_code_after=after)
    torch.manual_seed(0)
    z = torch.randn(2, D, 3, 3) + 5.0                         # far from the initial codebook
    flat = _flat(z)
    idx = torch.zeros(2, 3, 3, dtype=torch.long)
    idx.view(-1)[::2] = 1                                     # only codes 0 and 1 are used
    g = torch.Generator().manual_seed(0)
    assert vq.ema_update(z, idx, generator=g) == 0           # unused once: not yet dead
    before = vq.codebook.detach().clone()
    assert vq.ema_update(z, idx, generator=g) == K - 2       # unused twice: restarted
    for k in range(2, K):
        # each restarted code is one of this batch's encoder outputs
        assert (flat == vq.codebook.detach()[k]).all(dim=1).any(), k
        if ema_decay > 0:
            assert torch.equal(vq.embed_sum[k], vq.codebook[k])
            assert float(vq.cluster_size[k]) == 1.0
    for k in range(2):                                        # used codes are not restarted
        assert not (flat == vq.codebook.detach()[k]).all(dim=1).any()
        if ema_decay <= 0:
            assert torch.equal(vq.codebook.detach()[k], before[k])
    # the restart clock is reset: the next batch restarts nothing
    assert vq.ema_update(z, idx, generator=g) == 0


def test_dead_code_restart_disabled():
    vq = VectorQuantizer(4, 2, dead_code_after=0)
    z = torch.randn(1, 2, 2, 2)
    idx = torch.zeros(1, 2, 2, dtype=torch.long)
    for _ in range(5):
        assert vq.ema_update(z, idx) == 0


# ---------------------------------------------------------------- output types


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("requires_grad", [True, False])
def test_quantizer_output_is_fixed_namedtuple(train, requires_grad):
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 4).train(train)
    z = torch.randn(2, 4, 3, 5, requires_grad=requires_grad)
    out = vq(z)
    assert type(out) is QuantizerOutput
    assert out._fields == ("quantized", "indices", "loss")
    assert out.quantized.shape == (2, 4, 3, 5) and out.quantized.dtype == torch.float32
    assert out.indices.shape == (2, 3, 5) and out.indices.dtype == torch.int64
    assert out.loss.dim() == 0


@pytest.mark.parametrize("train", [True, False])
def test_vqvae_output_is_fixed_namedtuple(train):
    torch.manual_seed(0)
    cfg = preset("tiny", in_channels=1).vqvae
    model = VQVAE(cfg).train(train)
    out = model(torch.rand(2, 1, 32, 32))
    assert type(out) is VQVAEOutput
    assert out._fields == ("reconstruction", "quantized", "indices", "loss", "z_e")
    g = cfg.grid_size
    assert out.reconstruction.shape == (2, 1, 32, 32)
    assert out.quantized.shape == (2, cfg.embed_dim, g, g)
    assert out.z_e.shape == (2, cfg.embed_dim, g, g)
    assert out.indices.shape == (2, g, g) and out.indices.dtype == torch.int64
    assert out.loss.dim() == 0


# ---------------------------------------------------------------- presets


@pytest.mark.parametrize("name,channels", [("tiny", 1), ("tiny", 3), ("cpu", 1)])
def test_vqvae_encode_decode_shapes(name, channels):
    torch.manual_seed(0)
    cfg = preset(name, in_channels=channels).vqvae
    model = VQVAE(cfg).eval()
    S, g = cfg.image_size, cfg.grid_size
    x = torch.rand(1, channels, S, S)
    with torch.no_grad():
        codes = model.encode(x)
        assert codes.shape == (1, g, g) and codes.dtype == torch.int64
        assert int(codes.min()) >= 0 and int(codes.max()) < cfg.codebook_size
        y = model.decode_indices(codes)
    assert y.shape == (1, channels, S, S)
    assert torch.isfinite(y).all()
