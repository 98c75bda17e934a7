"""Tests for lsr.models.pixelsnail: exact causality (float64, eval), a complete receptive
field (no blind spot), output shapes, and deterministic eval mode."""
import dataclasses
import random

import pytest
import torch
import torch.nn.functional as F

from lsr import ops
from lsr.config import RunConfig, preset
from lsr.models import PixelSNAIL

TINY = preset("tiny", in_channels=1).prior            # K=16, 16 channels, 1 block, kernel 3, 2 heads


pytestmark = pytest.mark.usefixtures("one_thread")


def make_prior(seed=0, **overrides):
    torch.manual_seed(seed)
    return PixelSNAIL(dataclasses.replace(TINY, **overrides)).double().eval()


def other_code(c, K, g):
    """A code different from c."""
    return (int(c) + int(torch.randint(1, K, (1,), generator=g))) % K


def positions_to_check(T, n, seed):
    rng = random.Random(seed)
    return sorted({0, T - 1} | set(rng.sample(range(1, T - 1), min(n, T - 2))))


# ---------------------------------------------------------------- causality


@pytest.mark.parametrize("backend", ["reference", "fast"])
@pytest.mark.parametrize("attention", [True, False])
@pytest.mark.parametrize("size,n_t", [(8, 22), (16, 6)])
def test_causality_exact(size, n_t, attention, backend):
    model = make_prior(attention=attention)
    K, H, W = TINY.codebook_size, size, size
    T = H * W
    g = torch.Generator().manual_seed(size)
    base = torch.randint(0, K, (1, H, W), generator=g)
    with torch.no_grad(), ops.backend(backend):
        L0 = model(base)[0].flatten(1)                                  # (K, T)
        for t in positions_to_check(T, n_t, seed=size + attention):
            c = base.clone()
            c.view(-1)[t] = other_code(c.view(-1)[t], K, g)
            L = model(c)[0].flatten(1)
            assert torch.equal(L[:, :t + 1], L0[:, :t + 1]), f"logits at positions <= {t} changed"
            if t < T - 1:                                                # the test can see a change
                assert not torch.equal(L[:, t + 1:], L0[:, t + 1:]), t


@pytest.mark.parametrize("attention", [True, False])
def test_causality_exact_in_batch(attention):
    """The same invariant with all perturbed grids in one batch (and batch elements independent)."""
    model = make_prior(seed=1, attention=attention)
    K, H, W = TINY.codebook_size, 8, 8
    g = torch.Generator().manual_seed(7)
    base = torch.randint(0, K, (H, W), generator=g)
    ts = positions_to_check(H * W, 20, seed=3)
    grids = [base]
    for t in ts:
        c = base.clone()
        c.view(-1)[t] = other_code(c.view(-1)[t], K, g)
        grids.append(c)
    with torch.no_grad():
        L = model(torch.stack(grids)).flatten(2)                         # (1 + n, K, T)
    for n, t in enumerate(ts, start=1):
        assert torch.equal(L[n, :, :t + 1], L[0, :, :t + 1]), t


@pytest.mark.parametrize("attention", [True, False])
def test_position0_logits_do_not_depend_on_input(attention):
    model = make_prior(seed=2, attention=attention)
    K = TINY.codebook_size
    g = torch.Generator().manual_seed(0)
    grids = [torch.zeros(1, 8, 8, dtype=torch.long), torch.full((1, 8, 8), K - 1)]
    grids += [torch.randint(0, K, (1, 8, 8), generator=g) for _ in range(4)]
    with torch.no_grad():
        first = [model(c)[0, :, 0, 0] for c in grids]
    for f in first[1:]:
        assert torch.equal(f, first[0])


# ---------------------------------------------------------------- receptive field


@pytest.mark.parametrize("overrides", [
    dict(attention=False, n_blocks=2, n_res_blocks=1),    # convolution stacks alone
    dict(attention=True),                                  # the tiny preset, with attention
], ids=["convs", "attention"])
def test_no_blind_spot_last_position_sees_every_earlier_position(overrides):
    model = make_prior(seed=3, **overrides)
    assert model.cfg.kernel_size == 3
    K, H, W = TINY.codebook_size, 6, 6
    T = H * W
    g = torch.Generator().manual_seed(11)
    base = torch.randint(0, K, (H, W), generator=g)
    grids = [base]
    for s in range(T - 1):
        c = base.clone()
        c.view(-1)[s] = other_code(c.view(-1)[s], K, g)
        grids.append(c)
    with torch.no_grad():
        last = model(torch.stack(grids)).flatten(2)[:, :, T - 1]           # (T, K)
    blind = [s for s in range(T - 1) if torch.equal(last[s + 1], last[0])]
    assert blind == [], f"the last position does not see positions {blind}"


# ---------------------------------------------------------------- shapes, modes


@pytest.mark.parametrize("H,W", [(8, 8), (5, 7), (1, 1), (1, 6), (6, 1)])
def test_output_shape_and_log_likelihood(H, W):
    torch.manual_seed(0)
    model = PixelSNAIL(TINY).eval()
    codes = torch.randint(0, TINY.codebook_size, (3, H, W))
    with torch.no_grad():
        logits = model(codes)
        ll = model.log_likelihood(codes)
    assert logits.shape == (3, TINY.codebook_size, H, W) and logits.dtype == torch.float32
    assert ll.shape == (3, H, W)
    assert torch.isfinite(logits).all() and (ll <= 0).all()
    torch.testing.assert_close(ll, F.log_softmax(logits, 1).gather(1, codes[:, None])[:, 0])


def test_dropout_off_in_eval_is_deterministic():
    torch.manual_seed(0)
    model = PixelSNAIL(dataclasses.replace(TINY, dropout=0.5))
    codes = torch.randint(0, TINY.codebook_size, (2, 8, 8))
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(codes), model(codes))                 # dropout is active in training
    model.eval()
    with torch.no_grad():
        a, b = model(codes), model(codes)
    assert torch.equal(a, b)


def test_reference_and_fast_attention_agree_in_model():
    model = make_prior(seed=4)
    codes = torch.randint(0, TINY.codebook_size, (2, 8, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with ops.backend("reference"):
            a = model(codes)
        with ops.backend("fast"):
            b = model(codes)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("k", [2, 4, 6])
def test_even_kernel_size_is_refused(k, tmp_path, capsys):
    """An even prior kernel has no centre column, so the masked convolutions cannot be
    made causal with a symmetric half-width: every way in refuses it with a ValueError
    naming prior.kernel_size (a RunConfig, a config.json, --set on the command line),
    while the odd neighbours are accepted."""
    import json

    from lsr.cli import main

    base = preset("tiny", in_channels=1)

    def build(kernel):
        return RunConfig(preset="tiny", vqvae=base.vqvae, prior=dataclasses.replace(base.prior, kernel_size=kernel),
                         train=base.train, detect=base.detect)

    for odd in (k - 1, k + 1):
        if odd >= 3:
            assert build(odd).prior.kernel_size == odd
    with pytest.raises(ValueError, match="kernel_size"):
        build(k)
    d = base.to_dict()
    d["prior"]["kernel_size"] = k
    with pytest.raises(ValueError, match="kernel_size"):
        RunConfig.from_dict(d, "config.json")
    with pytest.raises(ValueError, match="kernel_size"):
        base.with_overrides({"prior.kernel_size": k})
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(d))
    from PIL import Image

    data = tmp_path / "data"
    data.mkdir()
    for i in range(4):                                   # a plain folder of normal images
        Image.fromarray(((torch.rand(32, 32) * 255).byte()).numpy()).save(data / f"{i}.png")
    capsys.readouterr()
    assert main(["train", str(data), "--out", str(tmp_path / "run"), "--config", str(cfg), "--no-progress"]) == 2
    assert "prior.kernel_size" in capsys.readouterr().err
    assert main(["train", str(data), "--out", str(tmp_path / "run"), "--preset", "tiny",
                 "--set", f"prior.kernel_size={k}", "--no-progress"]) == 2
    assert "prior.kernel_size" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
