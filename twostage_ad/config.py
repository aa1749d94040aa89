"""Configuration: dataclasses, YAML loading, ``--set a.b=c`` overrides and validation.

The defaults of :class:`Config` *are* the embedded default pipeline (scikit-learn's bundled
digits, ``pipelines/digits.yaml`` spells them out), so ``run`` with no config needs no file.

Every field is checked when a config is built; an error names the field and quotes the bad value,
e.g. ``ConfigError: stage1.epochs must be an integer >= 1, got -3``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

__all__ = [
    "ConfigError",
    "DataConfig",
    "AugmentConfig",
    "Stage1Config",
    "Stage2Config",
    "CascadeConfig",
    "CalibrationConfig",
    "RunConfig",
    "Config",
    "load_config",
    "apply_overrides",
    "config_to_dict",
    "config_from_dict",
    "save_config",
]

DATA_SOURCES = ("digits", "seed", "mvtec", "manifest")
DEFECT_KINDS = ("cutout", "cutpaste", "blob", "crack")
CALIBRATION_METHODS = ("quantile", "meanstd", "fpr", "youden", "f1", "recall")
SCORE_REDUCTIONS = ("max", "topk")
GUIDANCE_MODES = ("none", "attention")
FUSION_MODES = ("stage2", "sum", "max")


class ConfigError(ValueError):
    """A configuration field is missing, unknown or has a bad value."""


def _check(condition: bool, field_name: str, requirement: str, value: Any) -> None:
    if not condition:
        raise ConfigError(f"{field_name} must be {requirement}, got {value!r}")


def _is_power_of_two(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


@dataclass
class DataConfig:
    """Where the images come from and how they are decoded.

    ``source``: ``digits`` (bundled, no download), ``seed`` (``root/train/0.normal``,
    ``root/test/0.normal``, ``root/test/1.abnormal``), ``mvtec`` (``root/train/good`` ...) or
    ``manifest`` (a CSV with columns ``image,label,split,mask,category``). Relative paths in a
    config file are resolved against the config file's folder.
    """

    source: str = "digits"
    path: str | None = None
    category: str | None = None
    image_size: int = 32
    channels: int = 0  # 0 = decide from the first training image (1 grey, 3 colour)
    normal_digit: int = 0  # digits only: the digit that is "normal"
    val_fraction: float = 0.15  # share of train normals carved out for calibration if no val split
    invert_masks: bool = False  # True when defects are black in the mask files (PIPED)
    allow_outside_paths: bool = False  # manifest paths may leave the CSV's folder (absolute, ..)

    def validate(self, prefix: str = "data") -> None:
        _check(self.source in DATA_SOURCES, f"{prefix}.source", f"one of {DATA_SOURCES}", self.source)
        if self.source != "digits":
            _check(bool(self.path), f"{prefix}.path", f"a folder or CSV path for source {self.source!r}", self.path)
        _check(
            isinstance(self.image_size, int) and _is_power_of_two(self.image_size) and 32 <= self.image_size <= 512,
            f"{prefix}.image_size",
            "a power of two from 32 to 512",
            self.image_size,
        )
        _check(self.channels in (0, 1, 3), f"{prefix}.channels", "0 (auto), 1 or 3", self.channels)
        _check(0 <= self.normal_digit <= 9, f"{prefix}.normal_digit", "a digit 0-9", self.normal_digit)
        _check(0.0 < self.val_fraction < 1.0, f"{prefix}.val_fraction", "in (0, 1)", self.val_fraction)


@dataclass
class AugmentConfig:
    """Hard augmentation: synthetic defects with a known mask (DESIGN §2).

    ``kinds`` are drawn uniformly per image: ``cutout`` (albumentations CoarseDropout, random
    fill), ``cutpaste`` (a patch moved, rotated and colour-jittered), ``blob`` (a Perlin-noise
    shaped region filled with a foreign texture at random opacity, DRAEM style) and ``crack`` (thin
    random-walk lines, dark or bright).
    """

    kinds: list[str] = field(default_factory=lambda: list(DEFECT_KINDS))
    probability: float = 0.5  # share of each training batch that gets a synthetic defect
    opacity_min: float = 0.25  # lowest blend opacity of a blob defect (1.0 = fully replaced)
    max_area: float = 0.25  # largest share of the image one defect may cover (cracks, thin lines, ignore it)

    def validate(self, prefix: str = "augment") -> None:
        _check(
            isinstance(self.kinds, list) and len(self.kinds) > 0 and all(k in DEFECT_KINDS for k in self.kinds),
            f"{prefix}.kinds",
            f"a non-empty list drawn from {DEFECT_KINDS}",
            self.kinds,
        )
        _check(0.0 < self.probability < 1.0, f"{prefix}.probability", "in (0, 1)", self.probability)
        _check(0.0 < self.opacity_min <= 1.0, f"{prefix}.opacity_min", "in (0, 1]", self.opacity_min)
        _check(0.0 < self.max_area <= 1.0, f"{prefix}.max_area", "in (0, 1]", self.max_area)


@dataclass
class Stage1Config:
    """The attention network and its training (DESIGN §2, stage 1).

    Training loss: ``w_con·L1(x̂, x) + w_enc·L2(z, ẑ) + w_att·[BCE(A(x), 1) + BCE(A(x_aug), M)]
    + w_adv·feature-matching + w_rep·L1(x̂_aug, x)``, all mean-reduced. ``w_adv = 0`` skips the
    discriminator entirely (faster).

    Screening loss per image (eval mode, no augmentation): ``screen_con·L1(x̂, x) +
    screen_enc·L2(z, ẑ) + screen_att·topk_mean(−log A)``, where the attention term averages the
    per-pixel BCE against "normal everywhere" over the ``screen_topk`` most anomalous share of
    pixels (after a small blur), so that a small defect is not diluted by a large normal part.
    """

    base_width: int = 16  # measured: 16/128 trains 2.7x faster than 32/256 at 128 px on 2 cores
    max_width: int = 128
    bottleneck_size: int = 4  # spatial size of the latent map z
    attention_max_tokens: int = 1024  # self-attention only where H·W <= this
    # keys/values max-pooled to at most this many positions (BigGAN-style); None = all positions
    attention_kv_max_tokens: int | None = None
    final_up: str = "upsample_conv"  # or conv_upsample: the last up-step convolves at half resolution
    separate_reconstruction: bool = True  # x̂ from z by its own skip-free decoder (digits 0.996 vs 0.932 shared)
    # networks with their own initial weights, trained side by side on the same batches (each on its
    # own loss), scored with their averaged attention logits; ensemble_size x the stage-1 training and
    # scoring time; attention-only training (benchmarks/README.md entry 40)
    ensemble_size: int = 1
    epochs: int = 10
    batch_size: int = 16
    lr: float = 5e-4
    lr_schedule: str = "constant"  # constant | cosine (decay to 0 over the epochs; measured no gain on MTD)
    weight_decay: float = 0.0
    w_con: float = 1.0
    w_enc: float = 1.0
    w_att: float = 1.0
    w_adv: float = 0.1
    w_rep: float = 1.0
    att_balanced: bool = True  # defect and normal pixels weigh half each in BCE(A(x_aug), M)
    screen_con: float = 1.0
    screen_enc: float = 1.0
    screen_att: float = 1.0
    screen_topk: float = 0.01
    score_batch_size: int = 64
    amp: bool = False  # bf16 autocast in training (CUDA, or CPUs with bf16 instructions)
    # bf16 autocast for the network in scoring (validation, test, predict); the loss and maps are
    # float32. MTD, PIPED: AUROC within 0.0002, 1.3-1.5x faster on a CPU with avx512_bf16, slower on
    # CPUs without bf16 instructions (benchmarks/README.md, entry 27). Needs attention-only screening
    # (screen_con = screen_enc = 0, as measured); stage 2 has no such option: its score is a
    # difference of two latents, which loses its digits to bf16 rounding.
    score_bf16: bool = False
    channels_last: bool = True  # NHWC weights and activations: faster convolutions on CPUs and tensor cores

    def validate(self, prefix: str = "stage1") -> None:
        for name in ("base_width", "max_width", "ensemble_size", "epochs", "batch_size", "score_batch_size"):
            value = getattr(self, name)
            _check(isinstance(value, int) and value >= 1, f"{prefix}.{name}", "an integer >= 1", value)
        _check(self.max_width >= self.base_width, f"{prefix}.max_width", f">= base_width ({self.base_width})", self.max_width)
        _check(
            isinstance(self.bottleneck_size, int) and _is_power_of_two(self.bottleneck_size) and self.bottleneck_size <= 16,
            f"{prefix}.bottleneck_size",
            "a power of two from 1 to 16",
            self.bottleneck_size,
        )
        _check(self.attention_max_tokens >= 0, f"{prefix}.attention_max_tokens", ">= 0", self.attention_max_tokens)
        _check(self.attention_kv_max_tokens is None or (isinstance(self.attention_kv_max_tokens, int) and self.attention_kv_max_tokens >= 1),
               f"{prefix}.attention_kv_max_tokens", "an integer >= 1 or null", self.attention_kv_max_tokens)
        _check(self.final_up in ("upsample_conv", "conv_upsample"), f"{prefix}.final_up", "upsample_conv or conv_upsample", self.final_up)
        for name in ("screen_con", "screen_enc"):  # bf16 scoring was measured with the attention term alone
            _check(
                not (self.score_bf16 and getattr(self, name) != 0),
                f"{prefix}.{name}",
                "0 with score_bf16 (reconstruction and latent errors are differences that bf16 rounding distorts)",
                getattr(self, name),
            )
        _check(self.lr > 0, f"{prefix}.lr", "> 0", self.lr)
        _check(self.lr_schedule in ("cosine", "constant"), f"{prefix}.lr_schedule", "cosine or constant", self.lr_schedule)
        _check(self.weight_decay >= 0, f"{prefix}.weight_decay", ">= 0", self.weight_decay)
        for name in ("w_con", "w_enc", "w_att", "w_adv", "w_rep", "screen_con", "screen_enc", "screen_att"):
            value = getattr(self, name)
            _check(value >= 0, f"{prefix}.{name}", "a finite number >= 0", value)
        _check(0.0 < self.screen_topk <= 1.0, f"{prefix}.screen_topk", "in (0, 1]", self.screen_topk)
        if self.ensemble_size > 1:  # members share only the attention head's objective
            for name in ("w_con", "w_rep", "w_enc", "w_adv"):
                _check(getattr(self, name) == 0, f"{prefix}.{name}",
                       f"0 with ensemble_size {self.ensemble_size} (ensembles train the attention head only)", getattr(self, name))
        if self.w_con == self.w_rep == self.w_enc == self.w_adv == 0:  # x̂ and ẑ are never trained
            for name in ("screen_con", "screen_enc"):
                _check(getattr(self, name) == 0, f"{prefix}.{name}",
                       "0 when w_con, w_rep, w_enc and w_adv are all 0 (the reconstruction is not trained)", getattr(self, name))


@dataclass
class Stage2Config:
    """The GANomaly2D patch scorer and its training (DESIGN §2, stage 2).

    Generator loss ``w_adv·BCE(D(x̂), 1) + w_con·L1(x̂, x) + w_enc·L2(z, ẑ)`` (GANomaly's
    1 / 50 / 1), all mean-reduced; D learns ``BCE(D(x), 1) + BCE(D(x̂), 0)`` with logits.

    Score map: ``mean_c (z − ẑ)²`` per latent cell (one cell = 16×16 pixels), optionally weighted
    by stage 1's anomaly map (``guidance``), standardised with the mean and std of validation
    normals' cells (fixed once, never per batch), bilinear-upsampled to the image. Image score:
    ``max`` of the map or the mean of its ``score_topk`` highest share of pixels (``topk``).

    ``guidance: attention`` weighs each latent cell's difference by ``guidance_floor + (1 −
    guidance_floor)·max(1 − A)`` over the cell, A = stage 1's attention (1 = normal): stage 2's
    evidence counts fully where stage 1 also sees something and ``guidance_floor`` elsewhere.
    """

    width_divisor: int = 4  # r: widths 64/r ... 1024/r (GANomaly2D: r = 1)
    epochs: int = 15
    batch_size: int = 16
    lr: float = 2e-4
    w_adv: float = 1.0
    w_con: float = 50.0
    w_enc: float = 1.0
    score_reduction: str = "max"
    score_topk: float = 0.01
    guidance: str = "attention"  # MTD: stage-2 AUROC 0.551 vs 0.503, PRO 0.33 vs 0.22 (benchmarks/README.md)
    guidance_floor: float = 0.25
    score_batch_size: int = 64
    amp: bool = False  # bf16 autocast in training (CUDA, or CPUs with bf16 instructions)
    channels_last: bool = True  # NHWC weights and activations: faster convolutions on CPUs and tensor cores

    def validate(self, prefix: str = "stage2") -> None:
        _check(
            isinstance(self.width_divisor, int) and self.width_divisor >= 1 and 64 % self.width_divisor == 0,
            f"{prefix}.width_divisor", "a divisor of 64 (1, 2, 4, 8, 16, 32 or 64)", self.width_divisor,
        )
        for name in ("epochs", "batch_size", "score_batch_size"):
            value = getattr(self, name)
            _check(isinstance(value, int) and value >= 1, f"{prefix}.{name}", "an integer >= 1", value)
        _check(self.lr > 0, f"{prefix}.lr", "> 0", self.lr)
        for name in ("w_adv", "w_con", "w_enc"):
            value = getattr(self, name)
            _check(value >= 0, f"{prefix}.{name}", "a finite number >= 0", value)
        _check(self.w_con + self.w_enc + self.w_adv > 0, f"{prefix}.w_con", "> 0 when w_enc and w_adv are 0", self.w_con)
        _check(self.score_reduction in SCORE_REDUCTIONS, f"{prefix}.score_reduction", f"one of {SCORE_REDUCTIONS}", self.score_reduction)
        _check(0.0 < self.score_topk <= 1.0, f"{prefix}.score_topk", "in (0, 1]", self.score_topk)
        _check(self.guidance in GUIDANCE_MODES, f"{prefix}.guidance", f"one of {GUIDANCE_MODES}", self.guidance)
        _check(0.0 <= self.guidance_floor <= 1.0, f"{prefix}.guidance_floor", "in [0, 1]", self.guidance_floor)


@dataclass
class CascadeConfig:
    """How the two stages make one decision and one score (DESIGN §2, cascade).

    An image is *flagged* when its stage-1 screening loss exceeds τ₁; unflagged images are normal
    without running stage 2. A flagged image is anomalous when its second-stage score exceeds τ₂.
    The second-stage score is the stage-2 image score (``fusion: stage2``), or the sum (``fusion:
    sum``) or the larger (``fusion: max``) of both stages' scores, each standardised with
    validation normals' mean and std.
    """

    # max: cascade AUROC within 0.003 of the best fusion and above sum on MTD (0.844 vs 0.840),
    # PIPED (0.993 vs 0.986) and digits (0.9993 vs 0.9989) — benchmarks/README.md, entry 22
    fusion: str = "max"

    def validate(self, prefix: str = "cascade") -> None:
        _check(self.fusion in FUSION_MODES, f"{prefix}.fusion", f"one of {FUSION_MODES}", self.fusion)


@dataclass
class CalibrationConfig:
    """How the thresholds τ₁ and τ₂ are picked from validation scores (never from test labels).

    The same method sets both stages' thresholds in ``run``; ``calibrate --stage`` re-picks one.

    ``quantile`` (q), ``meanstd`` (mean + k·std), ``fpr`` (target false-positive rate on
    normals) use validation normals only; ``youden``, ``f1`` and ``recall`` (target recall) also
    need labelled anomalies in the validation split.
    """

    method: str = "quantile"
    q: float = 0.9
    k: float = 3.0
    fpr: float = 0.1
    recall: float = 0.95

    def validate(self, prefix: str = "calibration") -> None:
        _check(self.method in CALIBRATION_METHODS, f"{prefix}.method", f"one of {CALIBRATION_METHODS}", self.method)
        _check(0.0 < self.q < 1.0, f"{prefix}.q", "in (0, 1)", self.q)
        _check(self.k >= 0, f"{prefix}.k", ">= 0", self.k)
        _check(0.0 < self.fpr < 1.0, f"{prefix}.fpr", "in (0, 1)", self.fpr)
        _check(0.0 < self.recall <= 1.0, f"{prefix}.recall", "in (0, 1]", self.recall)


@dataclass
class RunConfig:
    """Run-wide settings: seed, device, where outputs go, how many overlays to draw."""

    name: str = "digits"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    output_root: str = "runs"
    num_workers: int = 0
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    tune_malloc: bool = True  # keep freed large blocks for reuse (glibc only; twostage_ad/allocator.py)
    overlays: int = 8

    def validate(self, prefix: str = "run") -> None:
        _check(bool(self.name) and "/" not in self.name, f"{prefix}.name", "a non-empty name without '/'", self.name)
        _check(
            self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
            f"{prefix}.device",
            "auto, cpu, cuda or cuda:N",
            self.device,
        )
        _check(self.seed >= 0, f"{prefix}.seed", "an integer >= 0", self.seed)
        _check(self.num_workers >= 0, f"{prefix}.num_workers", ">= 0", self.num_workers)
        _check(self.threads >= 0, f"{prefix}.threads", ">= 0", self.threads)
        _check(self.overlays >= 0, f"{prefix}.overlays", ">= 0", self.overlays)


@dataclass
class Config:
    """The whole pipeline configuration. ``Config()`` is the digits default."""

    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    cascade: CascadeConfig = field(default_factory=CascadeConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> "Config":
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate(f.name)
        levels = self.data.image_size // self.stage1.bottleneck_size
        _check(
            levels >= 4,
            "stage1.bottleneck_size",
            f"at most data.image_size / 4 = {self.data.image_size // 4} (the network needs two down-steps)",
            self.stage1.bottleneck_size,
        )
        _check(self.stage1.base_width >= 4, "stage1.base_width", "an integer >= 4 (self-attention needs 8 channels)", self.stage1.base_width)
        return self


# --------------------------------------------------------------------------------------------
# dict <-> dataclass with type checking


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, field_name: str) -> Any:
    """Check ``value`` against the annotation ``tp``; allow int -> float; reject NaN / inf."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _coerce(value, non_none[0], field_name)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{field_name} must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{field_name}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{field_name} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{field_name} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{field_name} must be a number, got {value!r}")
        if not math.isfinite(float(value)):
            raise ConfigError(f"{field_name} must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{field_name} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{field_name}: unsupported type {_type_name(tp)}")  # pragma: no cover


def _section_from_dict(cls: type, values: Mapping[str, Any], prefix: str) -> Any:
    if not isinstance(values, Mapping):
        raise ConfigError(f"{prefix} must be a mapping of fields, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown field {prefix}.{unknown[0]} (known fields of {prefix}: {', '.join(sorted(known))})")
    kwargs = {}
    for name, value in values.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _section_from_dict(tp, value, f"{prefix}.{name}")
        else:
            kwargs[name] = _coerce(value, tp, f"{prefix}.{name}")
    return cls(**kwargs)


def config_from_dict(values: Mapping[str, Any] | None) -> Config:
    """Build and validate a :class:`Config` from nested plain values (as YAML gives)."""
    values = values or {}
    if not isinstance(values, Mapping):
        raise ConfigError(f"a config must be a mapping of sections, got {values!r}")
    hints = typing.get_type_hints(Config)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise ConfigError(f"unknown config section {unknown[0]!r} (known: {', '.join(hints)})")
    sections = {name: _section_from_dict(hints[name], values[name] or {}, name) for name in values}
    return Config(**sections).validate()


def config_to_dict(config: Config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=c`` strings to nested ``values`` in place; ``c`` is parsed as YAML."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.field=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) != 2 or not all(parts):
            raise ConfigError(f"override key {key!r} must look like section.field (e.g. stage1.epochs)")
        section, name = parts
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from exc
        current = values.setdefault(section, {})
        if current is None:
            current = values[section] = {}
        current[name] = value
    return values


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the digits default when ``path`` is None) and apply overrides.

    Relative ``data.path`` values are resolved against the YAML file's folder, so configs work
    from any working directory.
    """
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections, got {loaded!r}")
        values = loaded or {}
        data = values.get("data") or {}
        if isinstance(data, dict) and isinstance(data.get("path"), str) and not Path(data["path"]).is_absolute():
            data["path"] = str((path.parent / data["path"]).resolve())
            values["data"] = data
    apply_overrides(values, list(overrides or []))
    return config_from_dict(values)


def save_config(config: Config, path: str | Path) -> None:
    from twostage_ad.runs import write_text_atomic

    write_text_atomic(path, yaml.safe_dump(config_to_dict(config), sort_keys=False))
