"""Stage 2: training the GANomaly2D patch scorer and scoring images with it.

Training (normal images only, no augmentation; the loop in :mod:`twostage_ad.stages.training`),
losses in :mod:`twostage_ad.stages.losses`, all mean-reduced, weights in
:class:`~twostage_ad.config.Stage2Config` (GANomaly: 1 / 50 / 1):

- generator: ``w_adv·BCE(D(x̂), 1) + w_con·L1(x̂, x) + w_enc·L2(z, ẑ)`` with logits;
- discriminator: ``BCE(D(x), 1) + BCE(D(x̂), 0)`` in one concatenated forward (DDP-safe). When
  its loss falls below 1e-5 it has won outright and gives the generator no signal: it is
  re-initialised and the event is logged and counted in the history (as GANomaly does).

Scoring (:func:`patch_scores`): eval mode (BatchNorm running statistics, so an image's map does not
depend on the batch around it), ``torch.inference_mode``. The raw map ``mean_c (z − ẑ)²`` per
latent cell is optionally weighted by stage 1's anomaly map (``guidance``), standardised with
``map_mean_`` / ``map_std_`` — the mean and std of validation normals' cells, fitted once by
:meth:`PatchScorerStage.fit_normalisation` — and bilinear-upsampled to the image.

Defect head (``score: head``, :mod:`twostage_ad.models.patch_head`): the rows get synthetic defects
(``augment``, drawn on the tile, from another random stream than stage 1's); the generator learns
to repair them (``L1(x̂, clean)``, the latent and adversarial terms as above) and a segmenter that
sees the tile beside ``x̂`` learns the defect's 4×4-pixel cells (class-balanced BCE, ``w_head``). The
raw map is then the head's ``softplus(logit)`` per cell; guidance, standardisation and tiles
treat it as they treat the latent difference.

Tiles (``tile_size`` smaller than the stage's ``image_size``): training crops one random tile per
image and step (:class:`RandomTiles`, drawn from the seed, the epoch and the image alone);
scoring runs the network on overlapping tiles and blends their cell maps into one seamless map
of the whole image (:func:`~twostage_ad.stages.tiling.stitch_cell_maps`), so the stage sees the
image at its own, higher scale for the cost of a tile per step.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from twostage_ad.config import AugmentConfig, Stage2Config, effective_tile
from twostage_ad.data.images import to_tensor
from twostage_ad.data.training_rows import DefectDataset, RandomTiles
from twostage_ad.distributed import DistributedContext, convert_batchnorm, restore_batchnorm
from twostage_ad.migration import stored_section
from twostage_ad.models.ganomaly2d import GANomaly2D, PatchDiscriminator
from twostage_ad.models.patch_head import HEAD_CELL, GANomaly2DWithHead
from twostage_ad.stages.losses import attention_bce, discriminator_loss, generator_loss
from twostage_ad.stages.tiling import stitch_cell_maps, tile_stride
from twostage_ad.stages.training import TrainableStage, inference_batches

__all__ = [
    "PatchScoreResult",
    "PatchScorerStage",
    "RandomTiles",
    "guide",
    "image_scores",
    "patch_scores",
    "map_names",
    "raw_maps",
    "standardised_map",
]

CHECKPOINT_FORMAT = "twostage_ad.stage2/2"  # /1: before channels_last and the global-batch sampler (loads, cannot resume)
DEFECT_STREAM = 2  # stage 2's synthetic defects: another random stream than stage 1's from the same seed
GUIDANCE_FLOOR = 0.25  # a cell's weight where stage 1 sees nothing (MTD: stage-2 AUROC 0.551 guided vs 0.503)


# --------------------------------------------------------------------------------------------
# scoring


@dataclass
class PatchScoreResult:
    """Per-image stage-2 scores (length N), standardised maps ``N×H×W`` and the time it took."""

    scores: np.ndarray
    maps: np.ndarray
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        return len(self.scores) / self.seconds if self.seconds > 0 else float("nan")


def guide(raw_map: torch.Tensor, stage1_anomaly: torch.Tensor, floor: float = GUIDANCE_FLOOR) -> torch.Tensor:
    """Weigh a ``B×1×h×w`` cell map by stage 1's ``B×H×W`` anomaly map (``1 − A``, any size).

    Each cell's weight is ``floor + (1 − floor)·max(1 − A)`` over the cell's pixels: max so that a
    small defect inside a cell is not averaged away (when stage 1's map is coarser than the cells,
    a cell takes the value of the stage-1 pixel it lies in).
    """
    anomaly = stage1_anomaly[:, None].float()
    cell = anomaly.shape[-1] // raw_map.shape[-1]
    if cell >= 1 and anomaly.shape[-2:] == (raw_map.shape[-2] * cell, raw_map.shape[-1] * cell):
        weight = F.max_pool2d(anomaly, kernel_size=cell, stride=cell)  # whole cells (what ONNX exports)
    else:
        weight = F.adaptive_max_pool2d(anomaly, raw_map.shape[-2:])
    return raw_map * (floor + (1.0 - floor) * weight)


def cell_mask(mask: torch.Tensor, cell: int = HEAD_CELL) -> torch.Tensor:
    """``B×1×H×W`` mask (1 normal, 0 defect) -> ``B×1×H/cell×W/cell``: a cell is a defect if any pixel is."""
    return -F.max_pool2d(-mask, kernel_size=cell, stride=cell)


def image_scores(maps: torch.Tensor, config: Stage2Config) -> torch.Tensor:
    """``B×H×W`` maps -> ``B`` image scores: max, or the mean of the top ``score_topk`` share."""
    flat = maps.flatten(1)
    if config.score_reduction == "max":
        return flat.amax(dim=1)
    k = max(1, int(round(config.score_topk * int(flat.shape[1]))))
    return flat.topk(k, dim=1).values.mean(dim=1)


MapStatistics = tuple[float, float]  # (mean, std) of validation normals' raw cells of one map


def map_names(model: torch.nn.Module, config: Stage2Config) -> tuple[str, ...]:
    """The outputs the stage scores with: ``score_map`` (the head's, or GANomaly2D's latent
    difference), and with ``combine_latent`` the headed generator's ``latent_map`` too (a
    latent-only network has nothing to combine: ``combine_latent`` changes nothing there)."""
    if config.combine_latent and isinstance(model, GANomaly2DWithHead):
        return ("score_map", "latent_map")
    return ("score_map",)


def cell_maps(model: torch.nn.Module, x: torch.Tensor, config: Stage2Config, names: tuple[str, ...] = ("score_map",),
              tile_batch: int = 64) -> list[torch.Tensor]:
    """The ``B×1×h×w`` cell maps ``names`` of ``B×C×H×W`` images: one forward pass, or overlapping
    ``config.tile_size`` tiles stitched when the images are larger (at most ``max(tile_batch, B)``
    tiles per forward pass; tile origins on the latent cells' grid, which every map's cell divides)."""
    tile = config.tile_size
    if not effective_tile(tile, max(x.shape[-2:])):
        out = model(x)
        return [getattr(out, name).float() for name in names]
    stride = tile_stride(tile, config.tile_overlap, model.latent_cell_size)
    return [stitch_cell_maps(x, lambda tiles, name=name: getattr(model(tiles), name), tile=tile, stride=stride,
                             cell=model.latent_cell_size if name == "latent_map" else model.cell_size, batch_size=tile_batch)
            for name in names]


def raw_maps(
    model: torch.nn.Module, x: torch.Tensor, stage1_anomaly: torch.Tensor | None, config: Stage2Config,
    names: tuple[str, ...] = ("score_map",),
) -> list[torch.Tensor]:
    """Raw ``B×1×h×w`` cell maps (non-negative), each weighted by stage 1 when guided."""
    raws = cell_maps(model, x, config, names)
    if config.guidance == "attention":
        if stage1_anomaly is None:
            raise ValueError("stage2.guidance is 'attention' but no stage-1 anomaly maps were given")
        raws = [guide(raw, stage1_anomaly) for raw in raws]
    return raws


def standardised_map(
    model: torch.nn.Module, x: torch.Tensor, stage1_anomaly: torch.Tensor | None, config: Stage2Config,
    statistics: list[MapStatistics],
) -> torch.Tensor:
    """``B×H×W`` map in validation-normal σ units, bilinear-upsampled to ``x``'s size: each map of
    :func:`map_names` standardised with its own statistics, the pixel-wise max where there are two."""
    names = map_names(model, config)
    if len(statistics) < len(names):
        raise RuntimeError(f"stage 2 scores {names} but holds map statistics for {len(statistics)} of them: "
                           "call fit_normalisation() on validation normals again")
    full: torch.Tensor | None = None
    for raw, (mean, std) in zip(raw_maps(model, x, stage1_anomaly, config, names), statistics):
        z = F.interpolate((raw - mean) / std, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        full = z if full is None else torch.maximum(full, z)
    return full


def patch_scores(
    model: torch.nn.Module,
    images: np.ndarray,
    config: Stage2Config,
    device: torch.device,
    statistics: list[MapStatistics],
    *,
    stage1_maps: np.ndarray | None = None,
    batch_size: int = 64,
    progress: bool = True,
    desc: str = "stage 2 score",
) -> PatchScoreResult:
    """Score uint8 ``N×H×W×C`` images: standardised, upsampled maps and image scores."""
    model.eval()
    scores: list[np.ndarray] = []
    maps: list[np.ndarray] = []
    height, width = images.shape[1:3]
    start = time.perf_counter()
    with torch.inference_mode():
        for x, guidance in inference_batches(images, batch_size, device, extra=stage1_maps, extra_name="stage-1 maps",
                                                 progress=progress, desc=desc):
            full = standardised_map(model, x, guidance, config, statistics)
            scores.append(image_scores(full, config).cpu().numpy())
            maps.append(full.cpu().numpy())
    seconds = time.perf_counter() - start
    return PatchScoreResult(
        scores=np.concatenate(scores) if scores else np.zeros(0, np.float32),
        maps=np.concatenate(maps) if maps else np.zeros((0, height, width), np.float32),
        seconds=seconds,
    )


# --------------------------------------------------------------------------------------------
# the stage as an estimator


@dataclass(kw_only=True)
class PatchScorerStage(TrainableStage):
    """Stage 2 as an estimator: ``fit`` on normals, ``fit_normalisation`` on validation normals, ``score``.

    Fitted attributes (besides :class:`TrainableStage`'s): ``map_mean_`` / ``map_std_`` after
    :meth:`fit_normalisation`.
    """

    config_name = "stage2"
    checkpoint_format = CHECKPOINT_FORMAT
    progress_term = ("recon", "recon")

    config: Stage2Config = field(default_factory=Stage2Config, kw_only=False)
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # the defects ``score: head`` trains on

    @property
    def headed(self) -> bool:
        """Whether the map is the defect head's (``score: head``) rather than the latent difference."""
        return self.config.score == "head"

    def _networks(self) -> tuple[torch.nn.Module, torch.nn.Module | None]:
        c = self.config
        generator = (GANomaly2DWithHead(self.channels, width_divisor=c.width_divisor, head_width=c.head_width) if self.headed
                     else GANomaly2D(self.channels, width_divisor=c.width_divisor))
        return generator, PatchDiscriminator(self.channels, width_divisor=c.width_divisor)

    def _identity(self) -> dict[str, Any]:
        identity = super()._identity()
        return {**identity, "augment": asdict(self.augment)} if self.headed else identity

    @property
    def tiled(self) -> bool:
        """Whether the stage trains on tiles and stitches tiles when scoring."""
        return bool(effective_tile(self.config.tile_size, self.image_size))

    def _dataset(self, images: np.ndarray) -> tuple[Dataset, bool]:
        if self.headed:
            tile = self.config.tile_size if self.tiled else 0
            return DefectDataset(images, self.augment, seed=self.seed, tile=tile, stream=DEFECT_STREAM), True
        if self.tiled:
            return RandomTiles(images, self.config.tile_size, self.seed), True
        return TensorDataset(to_tensor(images)), False  # decoded once, N×C×H×W in [-1, 1], on the CPU

    def _optimisers(self) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer | None]:
        lr = self.config.lr
        groups: list[dict[str, Any]] = [{"params": self.model_.parameters()}]
        if self.headed:  # GAN betas for the generator, Adam's defaults for the segmenter
            groups = [{"params": self.model_.generator.parameters()},
                      {"params": self.model_.head.parameters(), "lr": self.config.head_lr, "betas": (0.9, 0.999)}]
        return (torch.optim.Adam(groups, lr=lr, betas=(0.5, 0.999)),
                torch.optim.Adam(self.discriminator_.parameters(), lr=lr, betas=(0.5, 0.999)))

    def _start_training(self, context: DistributedContext) -> None:
        if context.enabled:  # BatchNorm statistics of the global batch
            convert_batchnorm(self.model_, self.device_)

    def _end_training(self) -> None:
        restore_batchnorm(self.model_)

    def _extra_payload(self) -> dict[str, Any]:
        if not hasattr(self, "map_mean_"):
            return {}
        latent = {"latent_mean": self.latent_mean_, "latent_std": self.latent_std_} if hasattr(self, "latent_mean_") else {}
        return {"map_mean": self.map_mean_, "map_std": self.map_std_, **latent}

    def _load_extra(self, payload: dict[str, Any]) -> None:
        for name in ("map_mean", "map_std", "latent_mean", "latent_std"):
            if name in payload:
                setattr(self, f"{name}_", float(payload[name]))

    @property
    def map_statistics(self) -> list[MapStatistics]:
        """``(mean, std)`` of each map the stage can score with: its own, then the latent difference's (a head)."""
        pairs = [(self.map_mean_, self.map_std_)]
        return pairs + [(self.latent_mean_, self.latent_std_)] if hasattr(self, "latent_mean_") else pairs

    @classmethod
    def _from_payload(cls, payload: dict[str, Any], device: str) -> PatchScorerStage:
        config = Stage2Config(**stored_section("stage2", payload["config"]))
        config.validate()
        augment = AugmentConfig(**stored_section("augment", payload["augment"])) if "augment" in payload else AugmentConfig()
        return cls(config=config, augment=augment, image_size=payload["image_size"], channels=payload["channels"], device=device,
                   seed=payload["seed"])

    def _train_step(
        self, batch: list[torch.Tensor], model: torch.nn.Module, discriminator: torch.nn.Module | None,
        g_opt: torch.optim.Optimizer, d_opt: torch.optim.Optimizer | None, context: DistributedContext,
    ) -> dict[str, float]:
        """One generator and one discriminator update on a batch (``model`` / ``discriminator`` may be DDP-wrapped).

        ``score: head``: the batch is ``(input, clean, mask, is_defect)``; the generator repairs the
        input towards the clean tile, and the head's balanced BCE against the mask joins its loss."""
        c = self.config
        x = batch[0].to(self.device_, non_blocking=True)
        clean = batch[1].to(self.device_, non_blocking=True) if self.headed else x
        with torch.autocast(self.device_.type, dtype=torch.bfloat16, enabled=self.amp):
            out = model(x)
            # the plain network (no DDP), frozen: this forward trains the generator, not D
            self.discriminator_.requires_grad_(False)
            fake_logits = self.discriminator_(out.reconstruction) if c.w_adv > 0 else None
            self.discriminator_.requires_grad_(True)
        terms = generator_loss(
            clean, out.reconstruction.float(), out.latent.float(), out.latent_reconstructed.float(),
            None if fake_logits is None else fake_logits.float(), c,
        )
        if self.headed:  # the head predicts "defect" per cell; attention_bce takes logits of "normal"
            terms["head"] = attention_bce(-out.defect_logits.float(), cell_mask(batch[2].to(self.device_, non_blocking=True))).mean()
            terms["total"] = terms["total"] + c.w_head * terms["head"]
        g_opt.zero_grad(set_to_none=True)
        terms["total"].backward()
        g_opt.step()
        with torch.autocast(self.device_.type, dtype=torch.bfloat16, enabled=self.amp):
            logits = discriminator(torch.cat([clean, out.reconstruction.detach()]))
        l_d = discriminator_loss(logits.float())
        d_opt.zero_grad(set_to_none=True)
        l_d.backward()
        d_opt.step()
        return {**{k: v.item() for k, v in terms.items()}, "discriminator": l_d.item()}

    def fit_normalisation(self, images: np.ndarray, *, stage1_maps: np.ndarray | None = None) -> PatchScorerStage:
        """Fix ``map_mean_`` / ``map_std_`` (and, for a head, ``latent_mean_`` / ``latent_std_`` of the
        generator's latent difference) from validation normals' raw cell maps (never a batch's)."""
        self._require_fitted()
        self._check_images(images)
        if len(images) == 0:
            raise ValueError("stage-2 map statistics need at least one validation normal image")
        # statistics of the cells, before upsampling (bilinear upsampling is a weighted mean of cells)
        names = ("score_map", "latent_map") if self.headed else ("score_map",)
        cells: list[list[np.ndarray]] = [[] for _ in names]
        self.model_.eval()
        with torch.inference_mode():
            for x, guidance in inference_batches(images, self.score_batch_size, self.device_, extra=stage1_maps, extra_name="stage-1 maps"):
                for kept, raw in zip(cells, raw_maps(self.model_, x, guidance, self.config, names)):
                    kept.append(raw.cpu().numpy().ravel())
        for prefix, kept in zip(("map", "latent"), cells):
            values = np.concatenate(kept)
            std = float(values.std())
            setattr(self, f"{prefix}_mean_", float(values.mean()))
            setattr(self, f"{prefix}_std_", std if std > 0 and math.isfinite(std) else 1.0)
        return self

    def score(
        self, images: np.ndarray, *, stage1_maps: np.ndarray | None = None, batch_size: int | None = None,
        progress: bool = True, desc: str = "stage 2 score",
    ) -> PatchScoreResult:
        """Standardised maps and image scores; ``stage1_maps`` (``N×H×W``, 1 − A) when guided."""
        self._require_fitted()
        if not hasattr(self, "map_mean_"):
            raise RuntimeError("stage-2 map statistics are not fitted: call fit_normalisation() on validation normals first")
        self._check_images(images)
        return patch_scores(self.model_, images, self.config, self.device_, self.map_statistics,
                            stage1_maps=stage1_maps, batch_size=batch_size or self.score_batch_size, progress=progress, desc=desc)
