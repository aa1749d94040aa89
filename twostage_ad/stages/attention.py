"""Stage 1: the attention network as an estimator, and its deterministic screening loss.

Training (normal images only, the loop in :mod:`twostage_ad.stages.training`): each batch is
shuffled normals; a share ``augment.probability`` of them gets one synthetic defect with a known
mask. Losses (:mod:`twostage_ad.stages.losses`, all mean-reduced, weights in
:class:`~twostage_ad.config.Stage1Config`):

- ``w_con · L1(x̂, x)`` on clean rows, ``w_rep · L1(x̂_aug, x)`` on defect rows (repair),
- ``w_enc · L2(z, ẑ)``,
- ``w_att · [BCE(A(x), 1) + BCE(A(x_aug), M)]`` with logits, class-balanced (``att_balanced``),
- ``w_adv ·`` feature matching against a discriminator on image ⊕ attention map, which sees
  (clean image, true mask) as real and (x̂, A) as fake,
- with ``repair`` (reconstruct-then-attend): ``w_repair_l2 · L2(x̃, x) + w_repair_ssim · (1 − SSIM(x̃, x))``
  on every row, x̃ the repair network's output, which the attention network sees beside the image.

Screening (:func:`~twostage_ad.stages.screening.screening_scores`, re-exported here): eval mode, ``torch.inference_mode``, no augmentation, one
image at a time in effect (InstanceNorm, no batch statistics), so the same image always gets the
same numbers whatever batch it is in.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from twostage_ad.config import AugmentConfig, Stage1Config, effective_tile
from twostage_ad.data.training_rows import DefectDataset
from twostage_ad.device import resolve_device, resolve_precision
from twostage_ad.distributed import DistributedContext
from twostage_ad.migration import stored_section
from twostage_ad.models.attention_net import AttentionNet, AttentionNetEnsemble, ImageMapDiscriminator
from twostage_ad.models.repair_net import RepairNet, RepairThenAttend
from twostage_ad.stages.feature_normality import FeatureNormality, feature_level
from twostage_ad.stages.losses import attention_bce, discriminator_loss, feature_matching, masked_mean, repair_losses
from twostage_ad.stages.normality import PositionNormality
from twostage_ad.stages.screening import (
    SCREENING_COMPONENTS,
    ScreeningResult,
    pixel_screening_bce,
    screening_batch,
    screening_loss,
    screening_scores,
    screening_share,
    screening_topk,
    tiled_maps,
    uses_reconstruction,
)
from twostage_ad.stages.training import TrainableStage, inference_batches

__all__ = [
    "SCREENING_COMPONENTS",
    "AttentionStage",
    "DefectDataset",
    "ScreeningResult",
    "build_attention_network",
    "pixel_screening_bce",
    "screening_batch",
    "screening_loss",
    "screening_scores",
    "screening_topk",
    "uses_reconstruction",
]

CHECKPOINT_FORMAT = "twostage_ad.stage1/2"  # /1 loads for scoring but cannot resume


def build_attention_network(config: Stage1Config, channels: int, image_size: int) -> AttentionNet | AttentionNetEnsemble | RepairThenAttend:
    """The stage-1 network a config describes: one :class:`AttentionNet`, ``ensemble_size`` of
    them (each drawn from the torch random state in turn) in an :class:`AttentionNetEnsemble`, or
    with ``repair`` a :class:`RepairThenAttend` (repair network drawn first)."""
    if config.repair:
        repair = RepairNet(channels, image_size, base_width=config.base_width, max_width=config.max_width)
        attend = AttentionNet(
            channels, image_size, base_width=config.base_width, max_width=config.max_width,
            bottleneck_size=config.bottleneck_size, attention_max_tokens=config.attention_max_tokens,
            attention_kv_max_tokens=config.attention_kv_max_tokens, final_up=config.final_up,
            separate_reconstruction=config.separate_reconstruction, condition_channels=channels,
        )
        return RepairThenAttend(repair, attend, detach_repair=config.repair_detach)
    members = [
        AttentionNet(
            channels,
            image_size,
            base_width=config.base_width,
            max_width=config.max_width,
            bottleneck_size=config.bottleneck_size,
            attention_max_tokens=config.attention_max_tokens,
            attention_kv_max_tokens=config.attention_kv_max_tokens,
            final_up=config.final_up,
            separate_reconstruction=config.separate_reconstruction,
        )
        for _ in range(config.ensemble_size)
    ]
    return members[0] if len(members) == 1 else AttentionNetEnsemble(members)


# --------------------------------------------------------------------------------------------
# the stage as an estimator


@dataclass(kw_only=True)
class AttentionStage(TrainableStage):
    """Stage 1 as an estimator: ``fit`` on normal images, then ``score``.

    Parameters are stored as given (shared ones documented on :class:`TrainableStage`);
    ``precision``: ``float32``, ``bf16`` or ``auto`` for scoring (docs/design.md §8). Fitted
    besides the shared attributes: ``position_``, the training normals' per-position statistics
    (:class:`~twostage_ad.stages.normality.PositionNormality`), ``features_``, their bank of
    encoder features (:class:`~twostage_ad.stages.feature_normality.FeatureNormality`, when
    ``screen_feature > 0``), and ``map_features_``, the map's bank when ``feature_map_stride`` names
    another level (else None), all fitted at the end of ``fit``.
    """

    config_name = "stage1"
    checkpoint_format = CHECKPOINT_FORMAT
    progress_term = ("att", "attention")

    config: Stage1Config = field(default_factory=Stage1Config, kw_only=False)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    precision: str = "float32"

    @property
    def tiled(self) -> bool:
        """Whether the network works on tiles of the stage's images (``tile_size`` below ``image_size``)."""
        return bool(effective_tile(self.config.tile_size, self.image_size))

    @property
    def network_size(self) -> int:
        """The square input the network is built for: the tile when tiled, else the whole image."""
        return self.config.tile_size if self.tiled else self.image_size

    def _networks(self) -> tuple[torch.nn.Module, torch.nn.Module | None]:
        c = self.config
        model = build_attention_network(c, self.channels, self.network_size)
        discriminator = (ImageMapDiscriminator(self.channels, self.network_size, base_width=c.base_width, max_width=c.max_width)
                         if c.w_adv > 0 else None)
        return model, discriminator

    def _identity(self) -> dict[str, Any]:
        return {**super()._identity(), "augment": asdict(self.augment)}

    def _dataset(self, images: np.ndarray) -> tuple[Dataset, bool]:
        return DefectDataset(images, self.augment, seed=self.seed, tile=self.network_size if self.tiled else 0), True

    def _optimisers(self) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer | None]:
        c = self.config
        g_opt = torch.optim.Adam(self.model_.parameters(), lr=c.lr, betas=(0.5, 0.999), weight_decay=c.weight_decay)
        d_opt = None if self.discriminator_ is None else torch.optim.Adam(self.discriminator_.parameters(), lr=c.lr, betas=(0.5, 0.999))
        return g_opt, d_opt

    def _start_training(self, context: DistributedContext) -> None:
        if not uses_reconstruction(self.config, training=True):  # attention-only training: x̂ and ẑ are never computed
            for module in self.model_.reconstruction_modules():
                module.requires_grad_(False)  # (and DDP does not wait for their gradients)

    def _fit_statistics(self, images: np.ndarray, context: DistributedContext, progress: bool) -> bool:
        self.fit_position_normality(images, context=context, progress=progress)
        if self.config.screen_feature > 0:
            self.fit_feature_normality(images, progress=progress)
        return True

    def _feature_levels(self) -> tuple[int, int]:
        """Encoder levels of the screening's feature cells and of the map's."""
        c = self.config
        level = feature_level(self.network_size, c.bottleneck_size, c.feature_stride)
        return level, feature_level(self.network_size, c.bottleneck_size, c.feature_map_stride) if c.feature_map_stride else level

    def _pixel_bce(self, x: torch.Tensor) -> torch.Tensor:
        """``B×1×S×S`` per-pixel BCE of images ``x`` (float32, blended over tiles when tiled)."""
        if self.tiled:
            return tiled_maps(self.model_, x, self.config, tile_batch=self.score_batch_size).maps[:, :1]
        with torch.autocast(x.device.type, enabled=False):
            return pixel_screening_bce(self.model_(x, reconstruct=False).attention_logits)

    def _bce_and_features(self, x: torch.Tensor, levels: list[int]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """:meth:`_pixel_bce` and the encoder features ``B×C×h×w`` of images ``x`` at ``levels`` (float32);
        when tiled, the cells of every scoring tile side by side (``B×C×1×(tiles·cells)``), so the
        bank and its statistics see the cells at the tile positions scoring compares."""
        if self.tiled:
            scored = tiled_maps(self.model_, x, self.config, levels=tuple(levels), tile_batch=self.score_batch_size)
            return scored.maps[:, :1], scored.features
        with torch.autocast(x.device.type, enabled=False):
            out = self.model_(x, reconstruct=False)
        return pixel_screening_bce(out.attention_logits), {lv: out.encoder_features[lv].float() for lv in levels}

    def fit_feature_normality(self, images: np.ndarray, *, progress: bool = False) -> FeatureNormality:
        """Fit ``features_`` (and ``map_features_``) on uint8 ``N×H×W×C`` normal images (the training
        images, after training and after :meth:`fit_position_normality`): the bank of their encoder
        features and both screening terms' spread (:class:`~twostage_ad.stages.feature_normality.FeatureNormality`),
        and a second bank at the map's level when ``feature_map_stride`` names another; float32, eval
        mode (an ensemble's first member's features). Every rank fits them on all images, so all hold the
        same banks."""
        self._require_fitted()
        self._check_images(images)
        level, map_level = self._feature_levels()
        levels = sorted({level, map_level})
        positions = self._positions()
        features: dict[int, list[torch.Tensor]] = {lv: [] for lv in levels}
        attention = []
        self.model_.eval()
        with torch.inference_mode():
            for x, _ in inference_batches(images, self.score_batch_size, self.device_, progress=progress, desc="stage 1 features"):
                bce, parts = self._bce_and_features(x, levels)
                screened = bce if positions is None else positions.apply(bce, self.config.position_normality)
                attention.append(screening_topk(screened, screening_share(self.config, *x.shape[-2:])).cpu())
                for lv, part in parts.items():
                    features[lv].append(part.cpu())
        attention_terms = torch.cat(attention)
        banks = {lv: FeatureNormality.fit(torch.cat(features[lv]), attention_terms, level=lv, bank_size=self.config.feature_bank_size,
                                          seed=self.seed) for lv in levels}
        self.features_ = banks[level]
        self.map_features_ = banks[map_level] if map_level != level else None
        return self.features_

    def _features_match(self) -> bool:
        """Whether ``features_`` (and ``map_features_``) were fitted with this config's ``feature_stride``,
        ``feature_map_stride`` and ``feature_bank_size``."""
        level, map_level = self._feature_levels()
        size = self.config.feature_bank_size
        features, map_features = getattr(self, "features_", None), getattr(self, "map_features_", None)
        if features is None or (features.level, features.bank_size) != (level, size):
            return False
        return map_features is None if map_level == level else (
            map_features is not None and (map_features.level, map_features.bank_size) == (map_level, size))

    def _features(self) -> FeatureNormality | None:
        """The feature bank the screening compares with, or None when ``screen_feature`` is 0."""
        if self.config.screen_feature == 0:
            return None
        if not self._features_match():
            raise RuntimeError("stage1.screen_feature > 0 but this stage 1 holds no feature bank for its feature_stride, "
                               "feature_map_stride and feature_bank_size (a checkpoint of an older version, or changed fields): "
                               "call fit_feature_normality(training images), or set stage1.screen_feature: 0")
        return self.features_

    def _map_features(self) -> FeatureNormality | None:
        """The bank of the map's feature cells (``features_`` when both strides name one level)."""
        features = self._features()
        return None if features is None else (getattr(self, "map_features_", None) or features)

    def use_scoring_fields(self, config: Stage1Config) -> None:
        """Take ``config``'s scoring fields (the stage's own for the rest). The feature banks keep the
        attention term's spread as it was screened when they were fitted; a change of ``screen_topk``
        or ``position_normality`` drops them, so :meth:`fit_missing_statistics` refits them."""
        screened_as = (self.config.screen_topk, self.config.position_normality)
        super().use_scoring_fields(config)
        if (self.config.screen_topk, self.config.position_normality) != screened_as:
            self.features_ = self.map_features_ = None

    def fit_missing_statistics(self, images: np.ndarray, *, context: DistributedContext | None = None,
                               progress: bool = False) -> bool:
        """Fit, on the training ``images``, the statistics this config's scoring needs and a reused
        checkpoint lacks (position statistics, a feature bank of the configured stride and size).
        Returns whether anything was fitted."""
        fitted = False
        if self.config.position_normality != "none" and getattr(self, "position_", None) is None:
            self.fit_position_normality(images, context=context, progress=progress)
            fitted = True
        if self.config.screen_feature > 0 and not self._features_match():
            self.fit_feature_normality(images, progress=progress)
            fitted = True
        return fitted

    def fit_position_normality(self, images: np.ndarray, *, context: DistributedContext | None = None,
                               progress: bool = False) -> PositionNormality:
        """Fit ``position_`` on uint8 ``N×H×W×C`` normal images (the training images, after
        training): per-position mean and std of the pixel BCE, in float32, eval mode. Under
        ``torchrun`` each rank scores its shard and the sums are added up over ranks."""
        self._require_fitted()
        self._check_images(images)
        context = context or DistributedContext()
        total = torch.zeros(self.image_size, self.image_size, dtype=torch.float64, device=self.device_)
        squares = torch.zeros_like(total)
        shard = images[context.shard(len(images))]
        self.model_.eval()
        with torch.inference_mode():
            for x, _ in inference_batches(shard, self.score_batch_size, self.device_, progress=progress, desc="stage 1 normality"):
                bce = self._pixel_bce(x)[:, 0].double()
                total += bce.sum(dim=0)
                squares += bce.pow(2).sum(dim=0)
        self.position_ = PositionNormality.from_sums(context.sum(total), context.sum(squares), len(images))
        return self.position_

    def _positions(self) -> PositionNormality | None:
        """The statistics the screening compares each pixel with, or None when ``position_normality`` is none."""
        if self.config.position_normality == "none":
            return None
        if getattr(self, "position_", None) is None:
            raise RuntimeError("stage1.position_normality is on but this stage 1 holds no position statistics (a checkpoint "
                               "of an older version): call fit_position_normality(training images), or set "
                               "stage1.position_normality: none")
        return self.position_

    def _extra_payload(self) -> dict[str, Any]:
        extra = {}
        if getattr(self, "position_", None) is not None:
            extra["position_normality"] = self.position_.to_payload()
        if getattr(self, "features_", None) is not None:
            extra["feature_normality"] = self.features_.to_payload()
        if getattr(self, "map_features_", None) is not None:
            extra["feature_map_normality"] = self.map_features_.to_payload()
        return extra

    def _load_extra(self, payload: dict[str, Any]) -> None:
        stored = payload.get("position_normality")
        self.position_ = None if stored is None else PositionNormality.from_payload(stored)
        stored = payload.get("feature_normality")
        self.features_ = None if stored is None else FeatureNormality.from_payload(stored)
        stored = payload.get("feature_map_normality")
        self.map_features_ = None if stored is None else FeatureNormality.from_payload(stored)

    @classmethod
    def _from_payload(cls, payload: dict[str, Any], device: str) -> AttentionStage:
        config = Stage1Config(**stored_section("stage1", payload["config"]))
        augment = AugmentConfig(**stored_section("augment", payload["augment"]))
        config.validate()
        augment.validate()
        return cls(config=config, augment=augment, image_size=payload["image_size"], channels=payload["channels"],
                   device=device, seed=payload["seed"])

    def _train_step(
        self,
        batch: tuple[torch.Tensor, ...],
        model: torch.nn.Module,
        discriminator: torch.nn.Module | None,
        g_opt: torch.optim.Optimizer,
        d_opt: torch.optim.Optimizer | None,
        context: DistributedContext,
    ) -> dict[str, float]:
        """One generator and one discriminator update; ``model`` / ``discriminator`` may be DDP-wrapped.

        Every loss is a mean over the *global* batch (all ranks), so DDP's gradient average
        equals one process's gradient: means over clean / defect rows divide by global row
        counts, and feature matching compares global feature means (autograd all-reduce).
        """
        c = self.config
        x_in, x_clean, mask, is_defect = (t.to(self.device_, non_blocking=True) for t in batch)
        clean_rows = ~is_defect
        n_clean, n_defect = context.sum(torch.stack([clean_rows.sum(), is_defect.sum()]).float()).tolist()
        reconstruct = uses_reconstruction(c, training=True)
        with torch.autocast(self.device_.type, dtype=torch.bfloat16, enabled=self.amp):
            out = model(x_in, reconstruct=reconstruct)
        logits = out.attention_logits.float()
        members = 1
        if out.member_attention_logits is None:
            bce = attention_bce(logits, mask, balanced=c.att_balanced)
        else:  # the sum of the members' own losses: each member's gradient is the one it would get alone
            members = out.member_attention_logits.shape[0]
            bce = sum(attention_bce(m, mask, balanced=c.att_balanced) for m in out.member_attention_logits.float())
        scale = context.world_size  # DDP divides the summed gradients by the world size
        if reconstruct:
            recon_err = (out.reconstruction.float() - x_clean).abs().mean(dim=(1, 2, 3))
            l_con = masked_mean(recon_err, clean_rows, n_clean, scale)
            l_rep = masked_mean(recon_err, is_defect, n_defect, scale)
            l_enc = F.mse_loss(out.latent_reconstructed.float(), out.latent.float())
        else:
            l_con = l_rep = l_enc = torch.zeros((), device=self.device_)
        l_att = masked_mean(bce, clean_rows, n_clean, scale) + masked_mean(bce, is_defect, n_defect, scale)
        total = c.w_con * l_con + c.w_rep * l_rep + c.w_enc * l_enc + c.w_att * l_att
        losses = {"recon": l_con.item(), "repair": l_rep.item(), "latent": l_enc.item(), "attention": l_att.item() / members}
        if out.repaired is not None:  # every row: clean rows teach identity, defect rows the repair
            l2, structure = repair_losses(out.repaired.float(), x_clean)
            total = total + c.w_repair_l2 * l2 + c.w_repair_ssim * structure
            losses.update({"repair_l2": l2.item(), "repair_ssim": structure.item()})
        attention = torch.sigmoid(logits)
        if self.discriminator_ is not None:
            # the plain network (no DDP): this forward trains the generator, not the discriminator
            self.discriminator_.requires_grad_(False)
            _, features = self._discriminate(self.discriminator_, x_clean, mask, out.reconstruction.float(), attention)
            self.discriminator_.requires_grad_(True)
            real_feat, fake_feat = features.flatten(1).chunk(2)
            rows = float(len(real_feat) * context.world_size)
            fake_mean = context.sum(fake_feat.sum(dim=0), differentiable=True) / rows
            real_mean = context.sum(real_feat.detach().sum(dim=0)) / rows
            l_adv = feature_matching(fake_mean, real_mean)
            total = total + c.w_adv * l_adv
            losses["adversarial"] = l_adv.item()
        g_opt.zero_grad(set_to_none=True)
        total.backward()
        g_opt.step()
        # per rank and member (ensembles train the attention term alone); the mean over ranks is the global batch's
        losses["total"] = total.item() / members
        if discriminator is not None and d_opt is not None:
            logits_d, _ = self._discriminate(discriminator, x_clean, mask, out.reconstruction.detach().float(), attention.detach())
            l_d = discriminator_loss(logits_d)
            d_opt.zero_grad(set_to_none=True)
            l_d.backward()
            d_opt.step()
            losses["discriminator"] = l_d.item()
        return losses

    @staticmethod
    def _discriminate(
        discriminator: torch.nn.Module, image: torch.Tensor, mask: torch.Tensor, reconstruction: torch.Tensor,
        attention: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One concatenated forward (DDP-safe): rows ``[:B]`` real (clean image, true mask), ``[B:]`` fake."""
        return discriminator(torch.cat([image, reconstruction]), torch.cat([mask, attention]))

    def scoring_precision(self) -> str:
        """The precision :meth:`score` runs in here: ``float32`` or ``bf16`` (``auto`` resolved for this device)."""
        device = self.device_ if hasattr(self, "device_") else resolve_device(self.device)
        attention_only = not uses_reconstruction(self.config)
        if self.precision == "bf16" and not attention_only:
            raise ValueError("bf16 scoring needs attention-only screening (stage1.screen_con and screen_enc 0): "
                             "reconstruction and latent errors are differences that bf16 rounding distorts")
        return resolve_precision(self.precision, device, bf16_allowed=attention_only)

    def score(self, images: np.ndarray, *, batch_size: int | None = None, progress: bool = True, desc: str = "stage 1 score") -> ScreeningResult:
        """Screening loss, its components and the anomaly maps ``1 − A`` of uint8 ``N×H×W×C`` images."""
        self._require_fitted()
        bf16 = self.scoring_precision() == "bf16"
        return screening_scores(self.model_, images, self.config, self.device_, batch_size=batch_size or self.score_batch_size,
                                bf16=bf16, positions=self._positions(), features=self._features(), map_features=self._map_features(),
                                progress=progress, desc=desc)
