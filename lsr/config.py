"""Configuration dataclasses and presets.

Every hyperparameter lives here. A run folder stores the whole :class:`RunConfig` as
``config.json`` beside the safetensors weights; models are rebuilt from it, never
unpickled.

Example:
    >>> cfg = preset("cpu")
    >>> cfg.vqvae.codebook_size, cfg.grid_size
    (64, 16)
    >>> RunConfig.from_dict(cfg.to_dict()) == cfg
    True
"""
from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field, fields
from typing import Any, NamedTuple

SPACES = ("pixels", "features")
MAP_KINDS = ("restored_vs_input", "restored_vs_direct", "gated")
DISTANCES = ("l2", "ssim", "msgms", "cosine")
PIXEL_DISTANCES = ("l2", "ssim", "msgms")      # images
FEATURE_DISTANCES = ("l2", "cosine")           # feature maps
SMOOTHINGS = ("gaussian", "bilateral", "none")
MAP_SCORES = ("max", "topk_mean", "pooled_max")   # reductions of the map
#: the held-out normal images' statistics of the fused score, in the order of
#: lsr.anomaly.fuse's ``held_out`` (DetectConfig fields, bundle.json detect keys)
HELD_OUT_STATS = ("score_mean", "score_std", "nll_mean", "nll_std")
SCORES = MAP_SCORES + ("nll", "fused")           # "fused": max-of-map and NLL scores, standardised
WEIGHTINGS = ("mean", "closeness", "min")
RESAMPLERS = ("auto", "naive", "fast", "native")
BACKBONES = ("efficientnet_lite0", "resnet18", "wide_resnet50_2")
#: which backbone outputs make the feature map (the last block at stride 8, at stride 16, at
#: stride 4: brought to the stride-8 grid by space-to-depth; see lsr.models.backbone)
BACKBONE_TAPS = ("8+16", "8", "4", "4+8")

#: the environment variable that chooses how the CUDA kernels are used (see lsr.ops)
CUDA_KERNELS_ENV = "LSR_CUDA_KERNELS"
CUDA_KERNELS_MODES = ("verify", "on", "off")


def read_cuda_kernels_mode() -> str:
    """``LSR_CUDA_KERNELS`` as a mode (``verify`` when unset or empty); ValueError naming the
    variable for any other value. Torch-free, so the CLI checks it before any work, even where
    only a deployed bundle's runtime is installed."""
    raw = os.environ.get(CUDA_KERNELS_ENV, "")
    mode = raw.strip().lower() or "verify"
    if mode not in CUDA_KERNELS_MODES:
        raise ValueError(f"{CUDA_KERNELS_ENV} must be one of {', '.join(CUDA_KERNELS_MODES)} "
                         f"(default verify), got {raw!r}")
    return mode


@dataclass
class VQVAEConfig:
    in_channels: int = 3
    image_size: int = 128          # images are resized to image_size x image_size
    downsample: int = 8            # f: a code per f x f pixels (power of two)
    space: str = "pixels"          # what the VQ-VAE encodes: the image ("pixels", the paper's)
                                   # or a frozen pretrained backbone's feature map ("features")
    backbone: str = "efficientnet_lite0"   # features: one of lsr.models.backbone.BACKBONES
    backbone_weights: str = ""     # features: state dict path ("" = the file a package ships)
    backbone_pool: int = 3         # features: local averaging of each backbone tap
    backbone_taps: str = "8+16"    # features: the taps concatenated (BACKBONE_TAPS)
    backbone_margin: int = 0       # features: reflected border (px, multiple of 8) added before the
                                   # backbone and cropped after it (0: zero padding at the border)
    channels: int = 64             # conv channels at the lowest resolution
    res_channels: int = 32         # hidden channels inside residual blocks
    n_res_blocks: int = 2
    embed_dim: int = 32            # D, codebook vector size
    codebook_size: int = 64        # K
    ema_decay: float = 0.99        # EMA codebook updates (0 disables EMA: codebook loss instead)
    commitment_weight: float = 0.25
    dead_code_after: int = 10      # restart a code unused for this many training batches

    @property
    def grid_size(self) -> int:
        return self.image_size // self.downsample

    @property
    def feature_stride(self) -> int:
        """Pixels per backbone feature cell (features mode)."""
        return 8


@dataclass
class PriorConfig:
    codebook_size: int = 64
    grid_size: int = 16
    channels: int = 64
    n_blocks: int = 2              # blocks, each n_res_blocks gated residual blocks + attention
    n_res_blocks: int = 2
    kernel_size: int = 5
    n_heads: int = 4
    attention: bool = True
    dropout: float = 0.1


@dataclass
class TrainConfig:
    seed: int = 0
    batch_size: int = 16
    val_fraction: float = 0.15     # held out of train/good: early stopping and tau calibration
    num_threads: int = 0           # 0: torch default
    # VQ-VAE
    vqvae_epochs: int = 60
    vqvae_lr: float = 1e-3
    ssim_weight: float = 0.0       # optional SSIM term in the reconstruction loss
    hflip: bool = True             # augmentations for the VQ-VAE
    vflip: bool = True
    # prior
    prior_epochs: int = 60
    prior_lr: float = 1e-3
    prior_batch_size: int = 32
    shift_augment: int = 8         # code grids per image: the image and shifted copies
    patience: int = 10             # early stopping on held-out NLL (epochs)
    max_minutes: float = 0.0       # opt-in wall-clock cap per training stage (0: none); a capped
                                   # stage keeps its best/last epoch and warns: results then
                                   # depend on the machine's speed
    picture_weight: float = 1.0    # features: weight of the pixel decoder's loss (pictures only;
                                   # its gradient never reaches the codes)


@dataclass
class DetectConfig:
    tau: float | None = None       # set by calibration
    tau_quantile: float = 0.05     # quantile of held-out code likelihoods
    temperature: float = 1.0
    resampler: str = "auto"
    map_kind: str = "restored_vs_input"
    distance: str = "l2"
    score_distance: str = "map"    # the distance of the map the image score reduces: "map" (the
                                   # map's own distance) or another one, e.g. a cosine map for
                                   # localisation with an L2 image score for the verdict
    smoothing: str = "gaussian"
    sigma: float = 4.0             # Gaussian smoothing, in pixels of the model resolution
    score: str = "max"             # the image score; "fused" needs the held-out statistics below
    topk: int = 100                # pixels averaged for score="topk_mean"
    pool: int = 21                 # window side (model pixels) for score="pooled_max" (DSR)
    gate_dilate: int = 1           # map "gated": resampled-code mask dilated by this many cells
    restorations: int = 1
    weighting: str = "mean"        # restorations: plain mean, or weighted by closeness to the
                                   # input (softmax of 3 / mean distance, Marimont & Tarroni),
                                   # or "min": per pixel, the restoration closest to the input
    seed: int = 0
    # the draw of a resampled code: from p(k | context) * exp(-posterior * |z_t - e_k|^2 / s),
    # the prior times closeness to the encoder's output z_t there, a posterior given what was
    # seen (docs/method.md, section 3); 0 is the paper's draw from the prior alone.
    # s = posterior_scale: the held-out normal images' mean squared distance from z_t to its
    # code (set at training: a property of the trained VQ-VAE, kept when options change)
    posterior: float = 0.0
    posterior_scale: float | None = None
    # held-out normal images' image scores (set at calibration; fused = sum of standardised
    # map score and NLL score)
    score_mean: float | None = None
    score_std: float | None = None
    nll_mean: float | None = None
    nll_std: float | None = None
    # operating point (lsr.decision), set on the held-out normal images at calibration:
    # an image is anomalous when its score > image_threshold, chosen for this false-alarm
    # rate on good images; a pixel is defective when the map > pixel_threshold, chosen for
    # this per-pixel false-positive rate on good images
    false_alarm_rate: float = 0.01
    pixel_fpr: float = 0.001
    image_threshold: float | None = None
    pixel_threshold: float | None = None


class ConfigError(ValueError):
    """A value from outside (config.json, ``--set``, a CLI flag, bundle.json) broke a rule of
    :data:`RULES`; the message names where it came from, the key and the rule."""


class Rule(NamedTuple):
    """What one configuration value may be. ``kind``: int, float, str or bool; numbers lie
    in [lo, hi] (``open_lo``/``open_hi`` exclude the bound); ``odd``/``pow2`` add a
    condition; ``choices`` lists the strings allowed; ``optional``: ``null`` is allowed
    (tau before calibration, statistics not yet measured)."""
    kind: str
    lo: float | None = None
    hi: float | None = None
    open_lo: bool = False
    open_hi: bool = False
    choices: tuple[str, ...] = ()
    odd: bool = False
    pow2: bool = False
    optional: bool = False

    def describe(self) -> str:
        if self.kind == "bool":
            return "true or false"
        if self.kind == "str":
            return f"one of {', '.join(self.choices)}" if self.choices else "a string"
        what = {"int": "an integer", "float": "a finite number"}[self.kind]
        if self.odd:
            what = "an odd integer"
        if self.pow2:
            what = "a power of two"
        lo = None if self.lo is None else f"{'>' if self.open_lo else '>='} {_num(self.lo)}"
        hi = None if self.hi is None else f"{'<' if self.open_hi else '<='} {_num(self.hi)}"
        if lo and hi:
            what += f" in {'(' if self.open_lo else '['}{_num(self.lo)}, {_num(self.hi)}{')' if self.open_hi else ']'}"
        elif lo or hi:
            what += f" {lo or hi}"
        return what + (" (or null)" if self.optional else "")

    def check(self, value: Any) -> Any:
        """The value, normalised (an integral float for an int field stays an error); raises
        ``ValueError`` with the rule's description when it breaks the rule."""
        if value is None and self.optional:
            return None
        bad = ValueError(f"must be {self.describe()}, got {value!r}")
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise bad
            return value
        if self.kind == "str":
            if not isinstance(value, str) or (self.choices and value not in self.choices):
                raise bad
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        if self.kind == "int":
            if not isinstance(value, int):
                raise bad
        else:
            value = float(value)
            if not math.isfinite(value):
                raise bad
        if self.lo is not None and (value < self.lo or (self.open_lo and value == self.lo)):
            raise bad
        if self.hi is not None and (value > self.hi or (self.open_hi and value == self.hi)):
            raise bad
        if self.odd and value % 2 == 0:
            raise bad
        if self.pow2 and (value < 1 or value & (value - 1)):
            raise bad
        return value


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else repr(x)


_MAX_SEED = 2 ** 63 - 2          # chain_seed works modulo 2^63 - 1; the C++ runtime reads int64
_SIZE = Rule("int", 1, 4096)
_COUNT = Rule("int", 0, 1_000_000)
_NONNEG = Rule("float", 0.0, 1e6)
_POS = Rule("float", 0.0, 1e6, open_lo=True)
_UNIT_OPEN = Rule("float", 0.0, 1.0, open_lo=True, open_hi=True)

#: Every value that can come from outside, with its rule: the one list the config loader,
#: ``--set``, the CLI flags, bundle.json (Python and the C++ runtime, export/src) apply.
#: README "Valid values" prints it (:func:`rules_table`).
RULES: dict[str, Rule] = {
    "preset": Rule("str"),
    "version": Rule("int", 1, 1),
    "vqvae.in_channels": Rule("int", 1, 3),
    "vqvae.image_size": Rule("int", 8, 4096),
    "vqvae.downsample": Rule("int", 2, 256, pow2=True),
    "vqvae.space": Rule("str", choices=SPACES),
    "vqvae.backbone": Rule("str", choices=BACKBONES),
    "vqvae.backbone_weights": Rule("str"),
    "vqvae.backbone_pool": Rule("int", 1, 15, odd=True),
    "vqvae.backbone_taps": Rule("str", choices=BACKBONE_TAPS),
    "vqvae.backbone_margin": Rule("int", 0, 1024),
    "vqvae.channels": _SIZE,
    "vqvae.res_channels": _SIZE,
    "vqvae.n_res_blocks": Rule("int", 0, 64),
    "vqvae.embed_dim": _SIZE,
    "vqvae.codebook_size": Rule("int", 2, 65536),
    "vqvae.ema_decay": Rule("float", 0.0, 1.0, open_hi=True),
    "vqvae.commitment_weight": _NONNEG,
    "vqvae.dead_code_after": _COUNT,
    "prior.codebook_size": Rule("int", 2, 65536),
    "prior.grid_size": Rule("int", 1, 1024),
    "prior.channels": _SIZE,
    "prior.n_blocks": Rule("int", 1, 64),
    "prior.n_res_blocks": Rule("int", 0, 64),
    "prior.kernel_size": Rule("int", 3, 63, odd=True),
    "prior.n_heads": Rule("int", 1, 256),
    "prior.attention": Rule("bool"),
    "prior.dropout": Rule("float", 0.0, 1.0, open_hi=True),
    "train.seed": Rule("int", 0, _MAX_SEED),
    "train.batch_size": Rule("int", 1, 65536),
    "train.val_fraction": _UNIT_OPEN,
    "train.num_threads": Rule("int", 0, 4096),
    "train.vqvae_epochs": _COUNT,
    "train.vqvae_lr": _POS,
    "train.ssim_weight": _NONNEG,
    "train.hflip": Rule("bool"),
    "train.vflip": Rule("bool"),
    "train.prior_epochs": _COUNT,
    "train.prior_lr": _POS,
    "train.prior_batch_size": Rule("int", 1, 65536),
    "train.shift_augment": Rule("int", 1, 1024),
    "train.patience": Rule("int", 1, 1_000_000),
    "train.max_minutes": _NONNEG,
    "train.picture_weight": _NONNEG,
    "detect.tau": Rule("float", 0.0, 1.0, open_lo=True, open_hi=True, optional=True),
    "detect.tau_quantile": _UNIT_OPEN,
    "detect.temperature": Rule("float", 0.0, 1e3, open_lo=True),
    "detect.resampler": Rule("str", choices=RESAMPLERS),
    "detect.map_kind": Rule("str", choices=MAP_KINDS),
    "detect.distance": Rule("str", choices=DISTANCES),
    "detect.score_distance": Rule("str", choices=("map",) + DISTANCES),
    "detect.smoothing": Rule("str", choices=SMOOTHINGS),
    "detect.sigma": Rule("float", 0.0, 1e3),
    "detect.score": Rule("str", choices=SCORES),
    "detect.topk": Rule("int", 1, 1 << 26),
    "detect.pool": Rule("int", 1, 4096),
    "detect.gate_dilate": Rule("int", 0, 64),
    "detect.restorations": Rule("int", 1, 64),
    "detect.weighting": Rule("str", choices=WEIGHTINGS),
    "detect.seed": Rule("int", 0, _MAX_SEED),
    "detect.posterior": Rule("float", 0.0, 1e3),
    "detect.posterior_scale": Rule("float", 0.0, 1e12, open_lo=True, optional=True),
    "detect.score_mean": Rule("float", -1e12, 1e12, optional=True),
    "detect.score_std": Rule("float", 0.0, 1e12, open_lo=True, optional=True),
    "detect.nll_mean": Rule("float", -1e12, 1e12, optional=True),
    "detect.nll_std": Rule("float", 0.0, 1e12, open_lo=True, optional=True),
    "detect.false_alarm_rate": Rule("float", 0.0, 0.5, open_lo=True),
    "detect.pixel_fpr": Rule("float", 0.0, 0.5, open_lo=True),
    "detect.image_threshold": Rule("float", -1e12, 1e12, optional=True),
    "detect.pixel_threshold": Rule("float", -1e12, 1e12, optional=True),
}

#: Options of the commands themselves (not stored in config.json), same rule format.
OPTION_RULES: dict[str, Rule] = {
    "batch_size": Rule("int", 1, 4096),
    "threads": Rule("int", 0, 4096),
    "check_images": Rule("int", 0, 1000),
}


#: Values only bundle.json holds (lsr.deploy.bundle and the C++ runtime check them), same format.
BUNDLE_RULES: dict[str, Rule] = {
    "model.seen_channels": Rule("int", 1, 65536),
    "model.seen_size": Rule("int", 1, 65536),
}


def check_value(key: str, value: Any, where: str = "", rules: dict[str, Rule] | None = None) -> Any:
    """``value`` checked against the rule of ``key`` (e.g. ``"detect.tau"``); the error
    names ``where`` (a file or an option) and the key.

    Example:
        >>> check_value("detect.tau", 0.01)
        0.01
        >>> check_value("detect.tau", float("nan"), "--tau")
        Traceback (most recent call last):
        ...
        lsr.config.ConfigError: --tau: must be a finite number in (0, 1) (or null), got nan
    """
    rule = (rules or RULES).get(key)
    if rule is None:
        raise ConfigError(f"{where or key}: unknown option")
    try:
        return rule.check(value)
    except ValueError as e:
        label = where if where.startswith("-") else (f"{where}: {key}" if where else key)
        raise ConfigError(f"{label}: {e}") from None


def rules_table() -> str:
    """The rules as a Markdown table (README "Valid values")."""
    rows = ["| key | rule |", "|---|---|"]
    rows += [f"| `{k}` | {r.describe()} |" for k, r in {**RULES, **{f"(option) {k}": v for k, v in
                                                                     OPTION_RULES.items()}}.items()]
    return "\n".join(rows)


@dataclass
class RunConfig:
    preset: str = "cpu"
    vqvae: VQVAEConfig = field(default_factory=VQVAEConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    detect: DetectConfig = field(default_factory=DetectConfig)
    version: int = 1

    @property
    def grid_size(self) -> int:
        return self.vqvae.grid_size

    def __post_init__(self) -> None:
        self.validate(getattr(self, "_where", ""))

    def validate(self, where: str = "") -> None:
        """Check every value against :data:`RULES`, then the rules that tie values together;
        ``where`` (a file, ``--set``) is named in the error."""
        for section in ("vqvae", "prior", "train", "detect"):
            obj = getattr(self, section)
            for f in fields(obj):
                check_value(f"{section}.{f.name}", getattr(obj, f.name), where)
        check_value("preset", self.preset, where)
        check_value("version", self.version, where)
        try:
            self._validate_together()
        except ConfigError:
            raise
        except ValueError as e:
            raise ConfigError(f"{where}: {e}" if where else str(e)) from None

    def _validate_together(self) -> None:
        v, p, d = self.vqvae, self.prior, self.detect
        f = v.downsample
        if f < 2 or f & (f - 1):
            raise ValueError(f"vqvae.downsample must be a power of two >= 2, got {f}")
        if v.image_size % f:
            raise ValueError(f"vqvae.image_size {v.image_size} is not a multiple of downsample {f}")
        if v.in_channels not in (1, 3):
            raise ValueError(f"vqvae.in_channels must be 1 or 3, got {v.in_channels}")
        if v.space not in SPACES:
            raise ValueError(f"vqvae.space must be one of {SPACES}, got {v.space!r}")
        if v.space == "features":
            if f < v.feature_stride:
                raise ValueError(f"vqvae.downsample {f} is finer than the backbone's stride {v.feature_stride} "
                                 f"(features mode needs downsample >= {v.feature_stride})")
            if v.backbone not in BACKBONES:
                raise ValueError(f"vqvae.backbone must be one of {BACKBONES}, got {v.backbone!r}")
            if v.backbone_taps not in BACKBONE_TAPS:
                raise ValueError(f"vqvae.backbone_taps must be one of {BACKBONE_TAPS}, got {v.backbone_taps!r}")
            if v.backbone_pool < 1 or v.backbone_pool % 2 == 0:
                raise ValueError(f"vqvae.backbone_pool must be odd and >= 1, got {v.backbone_pool}")
            if v.backbone_margin % v.feature_stride or not 0 <= v.backbone_margin < v.image_size:
                raise ValueError(f"vqvae.backbone_margin must be a multiple of {v.feature_stride} pixels in "
                                 f"[0, vqvae.image_size = {v.image_size}), got {v.backbone_margin}")
            for key, value in (("distance", d.distance), ("score_distance", d.score_distance)):
                if value not in FEATURE_DISTANCES + ("map",) or (key == "distance" and value == "map"):
                    raise ValueError(f"detect.{key} {value!r} is not for feature maps; choose from "
                                     f"{FEATURE_DISTANCES}")
        else:
            for key, value in (("distance", d.distance), ("score_distance", d.score_distance)):
                if value not in PIXEL_DISTANCES + ("map",) or (key == "distance" and value == "map"):
                    raise ValueError(f"detect.{key} {value!r} is not for images; choose from {PIXEL_DISTANCES}")
        if p.codebook_size != v.codebook_size or p.grid_size != v.grid_size:
            raise ValueError(
                f"prior (K={p.codebook_size}, grid={p.grid_size}) does not match the VQ-VAE "
                f"(K={v.codebook_size}, grid={v.grid_size})")
        if p.kernel_size < 3 or p.kernel_size % 2 == 0:
            raise ValueError(f"prior.kernel_size must be odd and >= 3, got {p.kernel_size}")
        if p.channels % p.n_heads:
            raise ValueError(f"prior.channels {p.channels} not divisible by n_heads {p.n_heads}")
        for name, value, allowed in (("map_kind", d.map_kind, MAP_KINDS), ("distance", d.distance, DISTANCES),
                                     ("smoothing", d.smoothing, SMOOTHINGS), ("score", d.score, SCORES),
                                     ("resampler", d.resampler, RESAMPLERS),
                                     ("weighting", d.weighting, WEIGHTINGS)):
            if value not in allowed:
                raise ValueError(f"detect.{name} must be one of {allowed}, got {value!r}")
        if d.temperature <= 0:
            raise ValueError(f"detect.temperature must be > 0, got {d.temperature}")
        if d.restorations < 1:
            raise ValueError(f"detect.restorations must be >= 1, got {d.restorations}")
        if d.pool < 1:
            raise ValueError(f"detect.pool must be >= 1, got {d.pool}")
        if d.gate_dilate < 0:
            raise ValueError(f"detect.gate_dilate must be >= 0, got {d.gate_dilate}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "") -> "RunConfig":
        """Build from a dict (config.json); every key and value is checked (:data:`RULES`),
        and an error names ``where`` (the file) and the key."""
        pre = f"{where}: " if where else ""
        if not isinstance(d, dict):
            raise ConfigError(f"{pre}a config must be a JSON object, got {type(d).__name__}")
        d = dict(d)
        sub = {"vqvae": VQVAEConfig, "prior": PriorConfig, "train": TrainConfig, "detect": DetectConfig}
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in d:
                continue
            val = d.pop(f.name)
            if f.name in sub:
                kwargs[f.name] = _build(sub[f.name], val, f.name, where)
            else:
                kwargs[f.name] = check_value(f.name, val, where)
        if d:
            raise ConfigError(f"{pre}unknown config keys: {sorted(d)}")
        cfg = cls.__new__(cls)
        for k, v in {f.name: (f.default_factory() if f.default is dataclasses.MISSING else f.default)
                     for f in fields(cls)}.items():
            setattr(cfg, k, kwargs.get(k, v))
        cfg.validate(where)
        return cfg

    def with_overrides(self, overrides: dict[str, Any], where: str = "--set") -> "RunConfig":
        """Return a copy with dotted-key overrides applied, e.g. {"train.seed": 3}."""
        d = self.to_dict()
        for key, value in overrides.items():
            section, _, name = key.partition(".")
            if not name or section not in d or not isinstance(d[section], dict) or name not in d[section]:
                raise ConfigError(f"{where} {key}: unknown config key (keys are section.name, e.g. "
                                  f"train.vqvae_epochs)")
            check_value(key, value, f"{where} {key}")
            d[section][name] = value
        # keep prior shape consistent with the VQ-VAE when only the latter was overridden
        d["prior"]["codebook_size"] = d["vqvae"]["codebook_size"]
        d["prior"]["grid_size"] = d["vqvae"]["image_size"] // d["vqvae"]["downsample"]
        return RunConfig.from_dict(d, where)


def _build(cls, d: Any, section: str, where: str):
    pre = f"{where}: " if where else ""
    if not isinstance(d, dict):
        raise ConfigError(f"{pre}{section}: must be a JSON object, got {d!r}")
    names = {f.name for f in fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ConfigError(f"{pre}unknown {section} keys: {sorted(unknown)}")
    return cls(**{k: check_value(f"{section}.{k}", v, where) for k, v in d.items()})


def preset(name: str, in_channels: int = 3) -> RunConfig:
    """The named preset (see :data:`PRESETS`).

    Feature space (the default since the quality benchmark, ``benchmarks/quality``):
    ``cpu`` (the default without a GPU: 256 px through EfficientNet-Lite0, 16x16 codes,
    K = 64; sized for ~200 images in <= 10 min on 2 cores: 6.5 min measured, benchmarks/RESULTS.md), ``demo`` (the same model, fewer
    epochs, for ``lsr demo``), ``gpu`` (the default on a GPU: 32x32 codes, K = 256, a larger
    prior). Pixel space, the paper's method: ``paper`` (256 px, 32x32 codes, K = 512),
    ``cpu-pixels`` and ``demo-pixels`` (the earlier CPU presets). ``tiny`` and
    ``tiny-features`` are for tests. Budgets are epoch counts, never wall-clock time, so the
    same command gives the same model on a fast and a slow machine."""
    if name in ("cpu", "demo", "gpu", "tiny-features"):
        return _feature_preset(name, in_channels)
    if name == "cpu-pixels":
        v = VQVAEConfig(in_channels=in_channels)
        p = PriorConfig()
        t = TrainConfig()
    elif name == "demo-pixels":
        v = VQVAEConfig(in_channels=in_channels, image_size=128, channels=48, res_channels=24,
                        embed_dim=32, codebook_size=32)
        p = PriorConfig(codebook_size=32, channels=48, n_blocks=2, n_heads=4)
        t = TrainConfig(vqvae_epochs=40, prior_epochs=30)
    elif name == "paper":
        v = VQVAEConfig(in_channels=in_channels, image_size=256, downsample=8, channels=128,
                        res_channels=64, n_res_blocks=2, embed_dim=64, codebook_size=512)
        p = PriorConfig(codebook_size=512, grid_size=32, channels=128, n_blocks=4, n_res_blocks=2,
                        kernel_size=5, n_heads=8, dropout=0.1)
        t = TrainConfig(batch_size=32, vqvae_epochs=200, prior_epochs=200, prior_batch_size=64,
                        vflip=False, hflip=False, patience=20)
    elif name == "tiny":
        v = VQVAEConfig(in_channels=in_channels, image_size=32, downsample=4, channels=16,
                        res_channels=8, n_res_blocks=1, embed_dim=8, codebook_size=16)
        p = PriorConfig(codebook_size=16, grid_size=8, channels=16, n_blocks=1, n_res_blocks=1,
                        kernel_size=3, n_heads=2, dropout=0.0)
        t = TrainConfig(batch_size=8, vqvae_epochs=2, prior_epochs=2, prior_batch_size=8,
                        shift_augment=2, val_fraction=0.25)
    else:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return RunConfig(preset=name, vqvae=v, prior=p, train=t, detect=DetectConfig())


def _feature_preset(name: str, in_channels: int) -> RunConfig:
    if name == "gpu":
        v = VQVAEConfig(in_channels=in_channels, image_size=256, downsample=8, space="features",
                        channels=256, res_channels=128, n_res_blocks=2, embed_dim=64, codebook_size=256)
        p = PriorConfig(codebook_size=256, grid_size=32, channels=128, n_blocks=4, n_res_blocks=2,
                        kernel_size=5, n_heads=8, dropout=0.1)
        t = TrainConfig(batch_size=32, vqvae_epochs=100, prior_epochs=100, prior_batch_size=64, patience=15)
    elif name == "tiny-features":
        v = VQVAEConfig(in_channels=in_channels, image_size=64, downsample=8, space="features",
                        channels=16, res_channels=8, n_res_blocks=1, embed_dim=8, codebook_size=16)
        p = PriorConfig(codebook_size=16, grid_size=8, channels=16, n_blocks=1, n_res_blocks=1,
                        kernel_size=3, n_heads=2, dropout=0.0)
        t = TrainConfig(batch_size=8, vqvae_epochs=2, prior_epochs=2, prior_batch_size=8,
                        shift_augment=2, val_fraction=0.25)
    else:                                                # cpu, demo
        v = VQVAEConfig(in_channels=in_channels, image_size=256, downsample=16, space="features",
                        channels=128, res_channels=64, n_res_blocks=2, embed_dim=64, codebook_size=64)
        p = PriorConfig(codebook_size=64, grid_size=16, channels=64, n_blocks=2, n_res_blocks=2,
                        kernel_size=5, n_heads=4, dropout=0.1)
        epochs = {"cpu": (40, 30), "demo": (25, 25)}[name]
        t = TrainConfig(vqvae_epochs=epochs[0], prior_epochs=epochs[1], shift_augment=4)
    # chosen on the quality benchmark's validation split (benchmarks/RESULTS.md, 2026-12-04): the
    # posterior draw at b = 2 (mean image AUROC 0.774 vs 0.715 for the prior draw with the fused
    # score), the map by cosine distance, the image score the 21 x 21 pooled max of that map
    return RunConfig(preset=name, vqvae=v, prior=p, train=t,
                     detect=DetectConfig(score="pooled_max", distance="cosine", posterior=2.0))


PRESETS = ("cpu", "demo", "gpu", "paper", "cpu-pixels", "demo-pixels", "tiny", "tiny-features")
