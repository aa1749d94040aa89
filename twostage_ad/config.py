"""Configuration: the dataclasses and their validation (YAML loading and ``--set`` overrides:
:mod:`twostage_ad.config_io`).

The defaults of :class:`Config` *are* the real-data recipe (one recipe for every data set;
``pipelines/mtd.yaml`` and ``piped.yaml`` only say where the data is). ``run`` with no config
runs the embedded demo, ``twostage_ad/configs/digits.yaml`` (also ``pipelines/digits.yaml``):
scikit-learn's bundled digits at 32 px, which overrides the recipe where digits differ.

Three tiers: what a user sets (``data``, ``calibration``, ``run``, each stage's ``epochs`` and
``batch_size``), each stage's model / training / scoring fields, and nothing unused. Fields that
were removed or moved are migrated with a warning (:mod:`twostage_ad.migration`).

Every field is checked when a config is built; an error names the field and quotes the bad value,
e.g. ``ConfigError: stage1.epochs must be an integer >= 1, got -3``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

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
]

DATA_SOURCES = ("digits", "folders", "mvtec", "manifest")
SOURCE_ALIASES = {"seed": "folders"}  # the folders layout's first name, still accepted
PRECISIONS = ("auto", "float32", "bf16")
DEMO_CONFIG = "configs/digits.yaml"  # inside the package: what `run` does with no --config
DEFECT_KINDS = ("cutout", "cutpaste", "blob", "crack")
BLOB_AREA_DRAWS = ("log_uniform", "uniform")
CALIBRATION_METHODS = ("conformal", "quantile", "meanstd", "fpr", "youden", "f1", "recall", "synthetic_recall")
SCORE_REDUCTIONS = ("max", "topk")
GUIDANCE_MODES = ("none", "attention")
PATCH_SCORES = ("latent", "head")
MAX_IMAGE_SIZE = 512  # the largest data.image_size
FUSION_MODES = ("stage2", "sum", "max")


class ConfigError(ValueError):
    """A configuration field is missing, unknown or has a bad value."""


def _check(condition: bool, field_name: str, requirement: str, value: Any) -> None:
    if not condition:
        raise ConfigError(f"{field_name} must be {requirement}, got {value!r}")


def _is_power_of_two(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def effective_tile(tile_size: int, image_size: int) -> int:
    """The tile a stage works on: ``tile_size`` when below its ``image_size``, else 0 (the whole image)."""
    return tile_size if 0 < tile_size < image_size else 0


def _check_step_bounds(min_steps: Any, max_steps: Any, prefix: str) -> None:
    """A stage's ``min_steps`` / ``max_steps``: integers >= 0 (0: no bound), the cap not below the floor."""
    for name, value in (("min_steps", min_steps), ("max_steps", max_steps)):
        _check(isinstance(value, int) and not isinstance(value, bool) and value >= 0, f"{prefix}.{name}",
               "an integer >= 0 (0: no bound)", value)
    _check(max_steps == 0 or max_steps >= min_steps, f"{prefix}.max_steps", f"0 or >= min_steps ({min_steps})", max_steps)


def _check_time_budget(max_seconds: Any, prefix: str) -> None:
    """A stage's ``max_seconds``: a finite number >= 0 (0: no bound)."""
    _check(isinstance(max_seconds, (int, float)) and not isinstance(max_seconds, bool) and math.isfinite(max_seconds)
           and max_seconds >= 0, f"{prefix}.max_seconds", "a finite number of seconds >= 0 (0: no bound)", max_seconds)


@dataclass
class DataConfig:
    """Where the images come from and how they are decoded.

    ``source``: ``digits`` (bundled, no download), ``folders`` (``root/train/0.normal``,
    ``root/test/0.normal``, ``root/test/1.abnormal``; ``seed`` is an alias), ``mvtec`` (``root/train/good`` ...) or
    ``manifest`` (a CSV with columns ``image,label,split,mask,category``). Relative paths in a
    config file are resolved against the config file's folder.
    """

    section: ClassVar[str] = "data"

    source: str = "digits"
    path: str | None = None
    category: str | None = None
    image_size: int = 128
    channels: int = 0  # 0 = decide from the first training image (1 grey, 3 colour)
    # 16-bit files: the bits their values use (a 12-bit camera saves 0-4095 in 16-bit files); 0 = from the
    # training images' largest value (8, 10, 12, 14 or 16). 8-bit files are unaffected.
    bit_depth: int = 0
    normal_digit: int = 0  # digits only: the digit that is "normal"
    val_fraction: float = 0.15  # share of train normals carved out for calibration if no val split
    invert_masks: bool = False  # True when defects are black in the mask files (PIPED)
    allow_outside_paths: bool = False  # manifest paths may leave the CSV's folder (absolute, ..)

    def validate(self, prefix: str = "data") -> None:
        _check(self.source in DATA_SOURCES or self.source in SOURCE_ALIASES, f"{prefix}.source", f"one of {DATA_SOURCES}", self.source)
        if self.source != "digits":
            _check(bool(self.path), f"{prefix}.path", f"a folder or CSV path for source {self.source!r}", self.path)
        _check(
            isinstance(self.image_size, int) and _is_power_of_two(self.image_size) and 32 <= self.image_size <= MAX_IMAGE_SIZE,
            f"{prefix}.image_size",
            "a power of two from 32 to 512",
            self.image_size,
        )
        _check(self.channels in (0, 1, 3), f"{prefix}.channels", "0 (auto), 1 or 3", self.channels)
        _check(self.bit_depth == 0 or (isinstance(self.bit_depth, int) and 8 <= self.bit_depth <= 16), f"{prefix}.bit_depth",
               "0 (from the training images) or 8-16", self.bit_depth)
        _check(0 <= self.normal_digit <= 9, f"{prefix}.normal_digit", "a digit 0-9", self.normal_digit)
        _check(0.0 < self.val_fraction < 1.0, f"{prefix}.val_fraction", "in (0, 1)", self.val_fraction)


@dataclass
class AugmentConfig:
    """Hard augmentation: synthetic defects with a known mask (docs/design.md §2).

    ``kinds`` are drawn uniformly per image: ``cutout`` (albumentations CoarseDropout, random
    fill), ``cutpaste`` (a patch moved, rotated and colour-jittered), ``blob`` (a Perlin-noise
    shaped region filled with a foreign texture at an opacity drawn from U[``blob_opacity_min``, 1], DRAEM style) and ``crack`` (thin
    random-walk lines, dark or bright). A blob covers a share of the image drawn between
    ``blob_area_min`` and ``max_area``, ``log_uniform`` (many small spots, some large stains) or
    ``uniform``. The synthetic validation defects keep ``blob_opacity_min``, ``blob_area_min`` and
    ``blob_area_draw`` at their defaults whatever training uses (a fixed yardstick for them); they
    share ``kinds`` and ``max_area`` with training.
    """

    section: ClassVar[str] = "augment"

    kinds: list[str] = field(default_factory=lambda: list(DEFECT_KINDS))
    probability: float = 0.5  # share of each training batch that gets a synthetic defect
    max_area: float = 0.25  # largest share of the image one defect may cover (cracks, thin lines, ignore it)
    blob_opacity_min: float = 0.25  # DRAEM draws U[0.1, 1]; docs/experiments.md compares the two
    blob_area_min: float = 0.001  # smallest share of the image a blob covers (capped at max_area)
    blob_area_draw: str = "log_uniform"  # or "uniform"; docs/experiments.md compares the two

    def validate(self, prefix: str = "augment") -> None:
        _check(
            isinstance(self.kinds, list) and len(self.kinds) > 0 and all(k in DEFECT_KINDS for k in self.kinds),
            f"{prefix}.kinds",
            f"a non-empty list drawn from {DEFECT_KINDS}",
            self.kinds,
        )
        _check(0.0 < self.probability < 1.0, f"{prefix}.probability", "in (0, 1)", self.probability)
        _check(0.0 < self.max_area <= 1.0, f"{prefix}.max_area", "in (0, 1]", self.max_area)
        _check(0.0 < self.blob_opacity_min <= 1.0, f"{prefix}.blob_opacity_min", "in (0, 1]", self.blob_opacity_min)
        _check(0.0 < self.blob_area_min <= 1.0, f"{prefix}.blob_area_min", "in (0, 1]", self.blob_area_min)
        _check(self.blob_area_draw in BLOB_AREA_DRAWS, f"{prefix}.blob_area_draw", f"one of {BLOB_AREA_DRAWS}", self.blob_area_draw)


@dataclass
class Stage1Config:
    """The attention network and its training (docs/design.md §2, stage 1).

    Training loss: ``w_con·L1(x̂, x) + w_enc·L2(z, ẑ) + w_att·[BCE(A(x), 1) + BCE(A(x_aug), M)]
    + w_adv·feature-matching + w_rep·L1(x̂_aug, x)``, all mean-reduced. ``w_adv = 0`` skips the
    discriminator entirely (faster).

    Screening loss per image (eval mode, no augmentation): ``screen_con·L1(x̂, x) +
    screen_enc·L2(z, ẑ) + screen_att·topk_mean(−log A)``, where the attention term averages the
    per-pixel BCE against "normal everywhere" over the ``screen_topk`` most anomalous share of
    pixels (after a small blur), so that a small defect is not diluted by a large normal part.
    With ``screen_feature > 0`` (the default) the attention term and the feature-normality term
    (the largest distance of a cell's encoder features to the training normals') enter in z units
    of the training normals: ``screen_att·z(att) + screen_feature·z(feature)`` (docs/design.md §2).

    The defaults are the real-data recipe: the attention head alone is trained and screens (on
    local defects the reconstruction, latent and adversarial objectives compete with it for the
    shared decoder; docs/experiments.md). The digits demo turns them on for semantic anomalies.
    """

    section: ClassVar[str] = "stage1"
    scoring_fields: ClassVar[tuple[str, ...]] = ("screen_con", "screen_enc", "screen_att", "screen_topk", "position_normality",
                                                 "screen_feature", "feature_stride", "feature_bank_size", "feature_map_weight",
                                                 "feature_map_stride")

    # model

    base_width: int = 16  # measured: 16/128 trains 2.7x faster than 32/256 at 128 px on 2 cores
    max_width: int = 128
    bottleneck_size: int = 4  # spatial size of the latent map z
    attention_max_tokens: int = 1024  # self-attention only where H·W <= this
    # keys/values max-pooled to at most this many positions (BigGAN-style); None = all positions
    attention_kv_max_tokens: int | None = 256
    final_up: str = "conv_upsample"  # or upsample_conv: conv_upsample convolves the last up-step at half resolution
    separate_reconstruction: bool = True  # x̂ from z by its own skip-free decoder (digits 0.996 vs 0.932 shared)
    # reconstruct-then-attend (DRAEM-style): a skip-free repair network x̃ = R(x) is trained to restore the
    # clean image (w_repair_l2·L2 + w_repair_ssim·(1 − SSIM) on every row) and the attention network sees
    # x ⊕ x̃; repair_detach stops the attention loss's gradient at x̃ (models/repair_net.py)
    repair: bool = False
    repair_detach: bool = False
    # networks with their own initial weights, trained side by side on the same batches (each on its
    # own loss), scored with their averaged attention logits; ensemble_size x the stage-1 training and
    # scoring time; attention-only training (docs/experiments.md, ensembles)
    ensemble_size: int = 1
    # tiles: above tile_size px the network is built for the tile, trains on random tiles of the data.image_size decode
    # and scores overlapping tiles blended into one map, so a step costs a tile at any decode size; at or below it, and
    # with 0, the whole image (nothing changes at 128 px; on MTD mosaics tiles won at 512 px, on MTD itself they lost)
    tile_size: int = 128
    tile_overlap: float = 0.5  # share of a tile its neighbour overlaps when scoring (stride rounded to feature cells)
    # training: epochs passes over the training set, at least min_steps and at most max_steps optimiser steps
    # (0: no bound); the floor gives a small set enough updates (32 images: 80 epochs instead of 40), the cap
    # keeps a large set's training time bounded (docs/experiments.md, training length)
    epochs: int = 40
    min_steps: int = 160
    max_steps: int = 1400
    # wall-clock budget: training stops after the step that spends it (0: no bound), so both stages train in
    # about 15 minutes on a CPU slower than the one the steps were sized on; it does not bind where the steps
    # fit (MTD on 2 idle AVX-512 cores: 440-498 s), and where it binds the result depends on the machine
    max_seconds: float = 600.0
    batch_size: int = 16
    lr: float = 5e-4
    weight_decay: float = 0.0
    w_con: float = 0.0
    w_enc: float = 0.0
    w_att: float = 1.0
    # the attention BCE's defect and normal pixels weigh half each (False: a plain mean over pixels, which
    # a defect covering 1 % of the image barely moves; docs/experiments.md, stage-1 objective)
    att_balanced: bool = True
    w_adv: float = 0.0
    w_rep: float = 0.0
    w_repair_l2: float = 1.0
    w_repair_ssim: float = 1.0
    # scoring
    screen_con: float = 0.0
    screen_enc: float = 0.0
    screen_att: float = 1.0
    screen_topk: float = 0.01
    # each pixel's BCE less the training normals' mean BCE at that position before the top-k mean, so that
    # fixed structure (corners, borders, printed lines) is not scored as a defect: "mean"; "standardise"
    # also divides by (std + 0.1), which small training sets make noisy; "none" (docs/experiments.md)
    position_normality: str = "mean"
    # feature normality: the distance of each cell's stage-1 encoder features (the level with feature_stride px
    # per cell, or the bottleneck) to a coreset of the training normals' (feature_bank_size rows); the screening
    # adds screen_feature·z(feature) to screen_att·z(attention), both in z units of the training normals
    # (stages/feature_normality.py); 0 = the attention term alone, as before
    screen_feature: float = 1.0
    feature_stride: int = 32  # 4×4 cells at 128 px: the synthetic-validation optimum over 16 and 32 (docs/experiments.md)
    feature_bank_size: int = 4096
    # the map: (1 − w)·(1 − A) + w·sigmoid(z of each cell's feature distance), upsampled; 0 = 1 − A alone
    feature_map_weight: float = 0.25  # the synthetic-validation optimum over MTD and PIPED together
    # px per cell of the map's feature distances when they should differ from the screening's (a second bank at
    # that level, or the bottleneck's; e.g. 16 for finer maps); 0 = feature_stride's cells, one bank
    feature_map_stride: int = 0

    def validate(self, prefix: str = "stage1") -> None:
        for name in ("base_width", "max_width", "ensemble_size", "epochs", "batch_size"):
            value = getattr(self, name)
            _check(isinstance(value, int) and value >= 1, f"{prefix}.{name}", "an integer >= 1", value)
        _check_step_bounds(self.min_steps, self.max_steps, prefix)
        _check_time_budget(self.max_seconds, prefix)
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
        _check(self.lr > 0, f"{prefix}.lr", "> 0", self.lr)
        _check(self.weight_decay >= 0, f"{prefix}.weight_decay", ">= 0", self.weight_decay)
        for name in ("w_con", "w_enc", "w_att", "w_adv", "w_rep", "w_repair_l2", "w_repair_ssim", "screen_con", "screen_enc", "screen_att",
                     "screen_feature"):
            value = getattr(self, name)
            _check(value >= 0, f"{prefix}.{name}", "a finite number >= 0", value)
        _check(0.0 < self.screen_topk <= 1.0, f"{prefix}.screen_topk", "in (0, 1]", self.screen_topk)
        _check(isinstance(self.feature_stride, int) and self.feature_stride >= 2 and _is_power_of_two(self.feature_stride),
               f"{prefix}.feature_stride", "a power of two >= 2", self.feature_stride)
        _check(self.feature_map_stride == 0 or (isinstance(self.feature_map_stride, int) and self.feature_map_stride >= 2
                                                 and _is_power_of_two(self.feature_map_stride)),
               f"{prefix}.feature_map_stride", "0 (feature_stride's) or a power of two >= 2", self.feature_map_stride)
        _check(0.0 <= self.feature_map_weight <= 1.0, f"{prefix}.feature_map_weight", "in [0, 1]", self.feature_map_weight)
        _check(isinstance(self.feature_bank_size, int) and self.feature_bank_size >= 1, f"{prefix}.feature_bank_size",
               "an integer >= 1", self.feature_bank_size)
        _check(isinstance(self.tile_size, int) and (self.tile_size == 0 or (32 <= self.tile_size <= 512 and _is_power_of_two(self.tile_size))),
               f"{prefix}.tile_size", "0 (the whole image) or a power of two from 32 to 512", self.tile_size)
        _check(0.0 <= self.tile_overlap < 1.0, f"{prefix}.tile_overlap", "in [0, 1)", self.tile_overlap)
        _check(self.position_normality in ("none", "mean", "standardise"), f"{prefix}.position_normality",
               "none, mean or standardise", self.position_normality)
        for name in ("repair", "repair_detach"):
            _check(isinstance(getattr(self, name), bool), f"{prefix}.{name}", "true or false", getattr(self, name))
        if self.repair:  # the repair network is the reconstruction; x̂ and ẑ would be a second one
            for name in ("w_con", "w_rep", "w_enc", "w_adv"):
                _check(getattr(self, name) == 0, f"{prefix}.{name}", "0 with stage1.repair (attention-only training beside the repair)",
                       getattr(self, name))
            _check(self.ensemble_size == 1, f"{prefix}.ensemble_size", "1 with stage1.repair", self.ensemble_size)
            _check(self.w_repair_l2 + self.w_repair_ssim > 0, f"{prefix}.w_repair_l2", "> 0 when w_repair_ssim is 0 (the repair must be trained)",
                   self.w_repair_l2)
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
    """The GANomaly2D patch scorer and its training (docs/design.md §2, stage 2, has the maths).

    Generator ``w_adv·BCE(D(x̂), 1) + w_con·L1(x̂, x) + w_enc·L2(z, ẑ)`` (GANomaly's 1 / 50 / 1);
    ``score: head`` adds a defect head on tile ⊕ repair (``w_head``, ``head_lr``, ``models/patch_head.py``)
    whose map ``combine_latent`` max-combines with the latent difference's. Maps are weighted by
    stage 1's (``guidance``: ``0.25 + 0.75·max(1 − A)`` per cell), standardised by validation normals
    (never per batch) and upsampled; the image score is their ``max`` or top-``score_topk`` mean.
    """

    section: ClassVar[str] = "stage2"
    scoring_fields: ClassVar[tuple[str, ...]] = ("score_reduction", "score_topk", "guidance", "tile_overlap", "combine_latent")

    # model
    width_divisor: int = 4  # r: widths 64/r ... 1024/r (GANomaly2D: r = 1)
    # input scale and tiles
    image_size: int = 0  # stage 2's square input size; 0 = data.image_size (stage 1's); a multiple of 16, >= 32
    tile_size: int = 128  # above it, train on random tiles and score overlapping tiles of this size; else, and 0, the whole image
    tile_overlap: float = 0.5  # share of a tile its neighbour overlaps when scoring (stride rounded to 16 px)
    # training: as stage 1's; the floor gives a small set enough updates (32 images: 80 epochs instead of 15;
    # docs/experiments.md, a floor for stage 2 on small sets)
    epochs: int = 15
    min_steps: int = 160
    max_steps: int = 600
    max_seconds: float = 300.0  # as stage 1's (MTD on 2 idle AVX-512 cores: 244-279 s)
    batch_size: int = 16
    lr: float = 2e-4
    w_adv: float = 1.0
    w_con: float = 50.0
    w_enc: float = 1.0
    # scoring
    score_reduction: str = "max"
    score_topk: float = 0.01
    guidance: str = "attention"  # MTD: stage-2 AUROC 0.551 vs 0.503, PRO 0.33 vs 0.22 (docs/experiments.md)
    score: str = "head"  # or "latent" (GANomaly2D's own map); MTD synthetic stage 2: 0.870 vs 0.665 (docs/experiments.md)
    head_width: int = 8
    w_head: float = 1.0
    head_lr: float = 5e-4
    combine_latent: bool = True  # with score head: the map is the pixel-wise max of the head's and the latent difference's σ-maps

    def validate(self, prefix: str = "stage2") -> None:
        _check(isinstance(self.width_divisor, int) and self.width_divisor >= 1 and 64 % self.width_divisor == 0,
               f"{prefix}.width_divisor", "a divisor of 64 (1, 2, 4, 8, 16, 32 or 64)", self.width_divisor)
        _check(isinstance(self.image_size, int) and (self.image_size == 0 or (self.image_size >= 32 and self.image_size % 16 == 0)),
               f"{prefix}.image_size", "0 (stage 1's size) or a multiple of 16 that is >= 32", self.image_size)
        _check(isinstance(self.tile_size, int) and (self.tile_size == 0 or (self.tile_size >= 32 and self.tile_size % 16 == 0)),
               f"{prefix}.tile_size", "0 (the whole image) or a multiple of 16 that is >= 32", self.tile_size)
        _check(0.0 <= self.tile_overlap < 1.0, f"{prefix}.tile_overlap", "in [0, 1)", self.tile_overlap)
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            _check(isinstance(value, int) and value >= 1, f"{prefix}.{name}", "an integer >= 1", value)
        _check_step_bounds(self.min_steps, self.max_steps, prefix)
        _check_time_budget(self.max_seconds, prefix)
        _check(self.lr > 0, f"{prefix}.lr", "> 0", self.lr)
        for name in ("w_adv", "w_con", "w_enc"):
            value = getattr(self, name)
            _check(value >= 0, f"{prefix}.{name}", "a finite number >= 0", value)
        _check(self.w_con + self.w_enc + self.w_adv > 0, f"{prefix}.w_con", "> 0 when w_enc and w_adv are 0", self.w_con)
        _check(self.score_reduction in SCORE_REDUCTIONS, f"{prefix}.score_reduction", f"one of {SCORE_REDUCTIONS}", self.score_reduction)
        _check(0.0 < self.score_topk <= 1.0, f"{prefix}.score_topk", "in (0, 1]", self.score_topk)
        _check(self.guidance in GUIDANCE_MODES, f"{prefix}.guidance", f"one of {GUIDANCE_MODES}", self.guidance)
        _check(self.score in PATCH_SCORES, f"{prefix}.score", f"one of {PATCH_SCORES}", self.score)
        _check(isinstance(self.head_width, int) and self.head_width >= 1, f"{prefix}.head_width", "an integer >= 1", self.head_width)
        _check(self.w_head > 0 and self.head_lr > 0, f"{prefix}.w_head", "> 0 (and head_lr > 0)", (self.w_head, self.head_lr))


@dataclass
class CascadeConfig:
    """How the two stages make one decision and one score (docs/design.md §2, cascade).

    An image is *flagged* when its stage-1 screening loss exceeds τ₁; unflagged images are normal
    without running stage 2. A flagged image is anomalous when its second-stage score exceeds τ₂.
    The second-stage score is the stage-2 image score (``fusion: stage2``), or the sum (``fusion:
    sum``) or the larger (``fusion: max``) of both stages' scores, each standardised with
    validation normals' mean and std.

    The cascade's map (``pixel_auroc.fused``, ``pro.fused``) is stage 1's map plus ``map_weight`` ×
    stage 2's, each in validation-normal σ units (:func:`~twostage_ad.cascade.fused_anomaly_map`);
    0 = stage 1's map alone.
    """

    # max: cascade AUROC within 0.003 of the best fusion and above sum on MTD (0.844 vs 0.840),
    # PIPED (0.993 vs 0.986) and digits (0.9993 vs 0.9989) — docs/experiments.md, fusion
    fusion: str = "max"
    # 0.1: the best mean synthetic-validation pixel AUROC and PRO over MTD and PIPED among 0–1 and
    # the former geometric mean (benchmarks/map_fusion.py; docs/experiments.md, the cascade's map)
    map_weight: float = 0.1

    def validate(self, prefix: str = "cascade") -> None:
        _check(self.fusion in FUSION_MODES, f"{prefix}.fusion", f"one of {FUSION_MODES}", self.fusion)
        _check(self.map_weight >= 0 and math.isfinite(self.map_weight), f"{prefix}.map_weight", "a finite number >= 0",
               self.map_weight)


@dataclass
class CalibrationConfig:
    """How the thresholds τ₁ and τ₂ are picked from validation scores (never from test labels).

    The same method sets both stages' thresholds in ``run``; ``calibrate --stage`` re-picks one.
    The methods, and what each needs (normals, labelled anomalies, synthetic defects):
    :mod:`twostage_ad.calibration`.
    """

    method: str = "conformal"
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
    """Run-wide settings: seed, device and precision, where outputs go, how many overlays to draw.

    ``precision``: what stage 1 scores in. ``auto`` = bf16 autocast only where the CPU
    (avx512_bf16, AMX) or GPU has bf16 natively and the screening is attention-only, float32
    elsewhere; ``bf16`` forces it (emulated and slower without native bf16, with a warning). Its
    loss and maps stay float32; stage 2 always scores in float32 (its score is a difference of two
    latents, which bf16 rounding distorts). MTD, PIPED: AUROC within 0.0002 of float32, 1.3-1.5x
    faster with native bf16 (docs/experiments.md, precision).
    """

    name: str = "run"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto | float32 | bf16 (stage-1 scoring)
    amp: bool = False  # bf16 autocast in training, both stages (GPUs, CPUs with native bf16)
    channels_last: bool = True  # NHWC weights and activations: faster convolutions on CPUs and tensor cores
    score_batch_size: int = 64  # images per scoring batch, both stages
    output_root: str = "runs"
    num_workers: int = 0
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    tune_malloc: bool = True  # keep freed large blocks for reuse (glibc only; twostage_ad/allocator.py)
    overlays: int = 8

    def validate(self, prefix: str = "run") -> None:
        _check(bool(self.name) and "/" not in self.name, f"{prefix}.name", "a non-empty name without '/'", self.name)
        _check(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"), f"{prefix}.device",
               "auto, cpu, cuda or cuda:N", self.device)
        _check(self.seed >= 0, f"{prefix}.seed", "an integer >= 0", self.seed)
        _check(self.precision in PRECISIONS, f"{prefix}.precision", f"one of {PRECISIONS}", self.precision)
        _check(isinstance(self.score_batch_size, int) and self.score_batch_size >= 1, f"{prefix}.score_batch_size",
               "an integer >= 1", self.score_batch_size)
        _check(self.num_workers >= 0, f"{prefix}.num_workers", ">= 0", self.num_workers)
        _check(self.threads >= 0, f"{prefix}.threads", ">= 0", self.threads)
        _check(self.overlays >= 0, f"{prefix}.overlays", ">= 0", self.overlays)


@dataclass
class Config:
    """The whole pipeline configuration. ``Config()`` is the real-data recipe."""

    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    cascade: CascadeConfig = field(default_factory=CascadeConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> Config:
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate(f.name)
        tile = effective_tile(self.stage1.tile_size, self.data.image_size)
        network_size, what = (tile, "stage1.tile_size") if tile else (self.data.image_size, "data.image_size")
        _check(network_size // self.stage1.bottleneck_size >= 4, "stage1.bottleneck_size",
               f"at most {what} / 4 = {network_size // 4} (the network needs two down-steps)", self.stage1.bottleneck_size)
        if tile:  # a tile's reconstruction and latent errors do not add up to the image's
            for name in ("screen_con", "screen_enc"):
                _check(getattr(self.stage1, name) == 0, f"stage1.{name}", "0 with stage1.tile_size below data.image_size "
                       "(tiles score the attention and feature terms only; stage1.tile_size: 0 scores the whole image)",
                       getattr(self.stage1, name))
        stage2_size = self.stage2.image_size or self.data.image_size
        _check(stage2_size % 16 == 0 and stage2_size >= 32, "stage2.image_size",
               f"a multiple of 16 that is >= 32 (0 takes data.image_size, {self.data.image_size})", self.stage2.image_size)
        _check(self.stage1.base_width >= 4, "stage1.base_width", "an integer >= 4 (self-attention needs 8 channels)", self.stage1.base_width)
        for name in ("screen_con", "screen_enc"):  # bf16 scoring was measured with the attention term alone
            _check(not (self.run.precision == "bf16" and getattr(self.stage1, name) != 0), f"stage1.{name}",
                   "0 with run.precision bf16 (reconstruction and latent errors are differences that bf16 rounding distorts)",
                   getattr(self.stage1, name))
        return self
