"""Stage 2: training the GANomaly2D patch scorer and scoring images with it.

Training (normal images only, no augmentation), all losses mean-reduced, weights in
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
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from twostage_ad.config import Stage2Config
from twostage_ad.data.images import to_tensor
from twostage_ad.distributed import (
    DistributedContext,
    GlobalBatchSampler,
    convert_batchnorm,
    restore_batchnorm,
    wrap_ddp,
)
from twostage_ad.models.ganomaly2d import GANomaly2D, PatchDiscriminator
from twostage_ad.runs import load_checkpoint, save_checkpoint
from twostage_ad.stages.attention import (
    load_for_resume,
    memory_format_for,
    reinitialise_discriminator,
    resolve_device,
    training_fingerprint,
)

__all__ = [
    "PatchScoreResult",
    "generator_loss",
    "discriminator_loss",
    "guide",
    "raw_maps",
    "image_scores",
    "patch_scores",
    "PatchScorerStage",
]

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "twostage_ad.stage2/2"  # /1: before channels_last and the global-batch sampler (loads, cannot resume)
COLLAPSE_LOSS = 1e-5  # discriminator loss below this = collapsed (GANomaly re-initialises D)


# --------------------------------------------------------------------------------------------
# losses


def generator_loss(
    x: torch.Tensor,
    reconstruction: torch.Tensor,
    latent: torch.Tensor,
    latent_reconstructed: torch.Tensor,
    fake_logits: torch.Tensor | None,
    config: Stage2Config,
) -> dict[str, torch.Tensor]:
    """GANomaly's generator loss terms and their weighted ``total`` (all mean-reduced)."""
    terms = {
        "recon": F.l1_loss(reconstruction, x),
        "latent": F.mse_loss(latent_reconstructed, latent),
    }
    total = config.w_con * terms["recon"] + config.w_enc * terms["latent"]
    if fake_logits is not None:
        terms["adversarial"] = F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))
        total = total + config.w_adv * terms["adversarial"]
    terms["total"] = total
    return terms


def discriminator_loss(logits: torch.Tensor) -> torch.Tensor:
    """BCE-with-logits of a concatenated forward: rows ``[:B]`` real (target 1), ``[B:]`` fake (0)."""
    real, fake = logits.chunk(2)
    target = torch.cat([torch.ones_like(real), torch.zeros_like(fake)])
    return F.binary_cross_entropy_with_logits(logits, target)


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


def guide(raw_map: torch.Tensor, stage1_anomaly: torch.Tensor, floor: float) -> torch.Tensor:
    """Weigh a ``B×1×h×w`` cell map by stage 1's ``B×H×W`` anomaly map (``1 − A``).

    Each cell's weight is ``floor + (1 − floor)·max(1 − A)`` over the cell's pixels: max so that a
    small defect inside a cell is not averaged away.
    """
    cell = stage1_anomaly.shape[-1] // raw_map.shape[-1]
    weight = F.max_pool2d(stage1_anomaly[:, None].float(), kernel_size=cell, stride=cell)
    return raw_map * (floor + (1.0 - floor) * weight)


def image_scores(maps: torch.Tensor, config: Stage2Config) -> torch.Tensor:
    """``B×H×W`` maps -> ``B`` image scores: max, or the mean of the top ``score_topk`` share."""
    flat = maps.flatten(1)
    if config.score_reduction == "max":
        return flat.amax(dim=1)
    k = max(1, int(round(config.score_topk * int(flat.shape[1]))))
    return flat.topk(k, dim=1).values.mean(dim=1)


def raw_maps(
    model: GANomaly2D, x: torch.Tensor, stage1_anomaly: torch.Tensor | None, config: Stage2Config
) -> torch.Tensor:
    """Raw ``B×1×h×w`` cell maps ``mean_c (z − ẑ)²``, weighted by stage 1 when guided."""
    raw = model(x).score_map.float()
    if config.guidance == "attention":
        if stage1_anomaly is None:
            raise ValueError("stage2.guidance is 'attention' but no stage-1 anomaly maps were given")
        raw = guide(raw, stage1_anomaly, config.guidance_floor)
    return raw


def patch_scores(
    model: GANomaly2D,
    images: np.ndarray,
    config: Stage2Config,
    device: torch.device,
    map_mean: float,
    map_std: float,
    *,
    stage1_maps: np.ndarray | None = None,
    batch_size: int | None = None,
    progress: bool = True,
    desc: str = "stage 2 score",
) -> PatchScoreResult:
    """Score uint8 ``N×H×W×C`` images: standardised, upsampled maps and image scores."""
    model.eval()
    batch_size = batch_size or config.score_batch_size
    if stage1_maps is not None and len(stage1_maps) != len(images):
        raise ValueError(f"got {len(stage1_maps)} stage-1 maps for {len(images)} images")
    scores: list[np.ndarray] = []
    maps: list[np.ndarray] = []
    height, width = images.shape[1:3]
    start = time.perf_counter()
    with torch.inference_mode():
        for first in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", disable=not progress, leave=False):
            x = to_tensor(images[first : first + batch_size]).to(device)
            guidance = None if stage1_maps is None else torch.as_tensor(stage1_maps[first : first + batch_size]).to(device)
            raw = raw_maps(model, x, guidance, config)
            standardised = (raw - map_mean) / map_std
            full = F.interpolate(standardised, size=(height, width), mode="bilinear", align_corners=False)[:, 0]
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


@dataclass
class PatchScorerStage:
    """Stage 2 as an estimator: ``fit`` on normals, ``fit_normalisation`` on validation normals, ``score``.

    Fitted attributes: ``model_`` (generator), ``discriminator_``, ``history_`` (per-epoch losses),
    ``train_seconds_``, and after :meth:`fit_normalisation` ``map_mean_`` / ``map_std_``.
    """

    config: Stage2Config = field(default_factory=Stage2Config)
    image_size: int = 32
    channels: int = 1
    device: str = "auto"
    seed: int = 0
    num_workers: int = 0

    def _build(self) -> None:
        self.device_ = resolve_device(self.device)
        memory_format = memory_format_for(self.config)
        self.model_ = GANomaly2D(self.channels, width_divisor=self.config.width_divisor).to(self.device_, memory_format=memory_format)
        self.discriminator_ = PatchDiscriminator(self.channels, width_divisor=self.config.width_divisor).to(
            self.device_, memory_format=memory_format)

    def _check_images(self, images: np.ndarray) -> None:
        if images.ndim != 4 or images.shape[1:3] != (self.image_size, self.image_size) or images.shape[3] != self.channels:
            raise ValueError(f"expected N×{self.image_size}×{self.image_size}×{self.channels} images, got shape {images.shape}")

    def fit(
        self,
        images: np.ndarray,
        *,
        checkpoint_path: str | Path | None = None,
        progress: bool = True,
        resume: bool = False,
        context: DistributedContext | None = None,
    ) -> "PatchScorerStage":
        """Train on uint8 ``N×H×W×C`` normal images; checkpoint each epoch when a path is given.

        ``resume``: continue from the last complete epoch in ``checkpoint_path`` (weights,
        optimisers, random states), ending where an uninterrupted run ends.
        ``context``: under ``torchrun``, each rank trains on its slice of every global batch in
        ``DistributedDataParallel`` with global BatchNorm statistics; rank 0 writes checkpoints.
        """
        self._check_images(images)
        if len(images) < 2:
            raise ValueError(f"stage 2 needs at least 2 normal training images, got {len(images)}")
        context = context or DistributedContext()
        torch.manual_seed(self.seed)
        self._build()
        c = self.config
        dataset = TensorDataset(to_tensor(images))  # decoded once, N×C×H×W in [-1, 1], on the CPU
        generator = torch.Generator().manual_seed(self.seed)
        g_opt = torch.optim.Adam(self.model_.parameters(), lr=c.lr, betas=(0.5, 0.999))
        d_opt = torch.optim.Adam(self.discriminator_.parameters(), lr=c.lr, betas=(0.5, 0.999))
        use_amp = c.amp
        self.history_: list[dict[str, float]] = []
        first_epoch, earlier_seconds = 1, 0.0
        data_id = training_fingerprint(images)
        if resume and checkpoint_path is not None and Path(checkpoint_path).is_file():
            first_epoch = self._restore(Path(checkpoint_path), g_opt, d_opt, generator, data_id)
            earlier_seconds = self.history_[-1]["seconds"] if self.history_ else 0.0
        # full batches only (BatchNorm); under DDP each rank takes its slice of every global batch
        sampler = GlobalBatchSampler(len(dataset), min(c.batch_size, len(dataset)), generator, context, start_epoch=first_epoch)
        loader = DataLoader(dataset, batch_sampler=sampler, num_workers=self.num_workers, persistent_workers=self.num_workers > 0)
        if context.enabled:
            convert_batchnorm(self.model_, self.device_)
        model = wrap_ddp(self.model_, context, self.device_)
        discriminator = wrap_ddp(self.discriminator_, context, self.device_)
        self.model_.train()
        self.discriminator_.train()
        start = time.perf_counter() - earlier_seconds
        epochs = tqdm(range(first_epoch, c.epochs + 1), desc="stage 2 train", unit="epoch", disable=not progress,
                      initial=first_epoch - 1, total=c.epochs)
        try:
            for epoch in epochs:
                sums: dict[str, float] = {}
                resets = steps = 0
                for step, batch in enumerate(tqdm(loader, desc=f"epoch {epoch}", unit="batch", disable=not progress, leave=False)):
                    x = batch[0].to(self.device_, non_blocking=True)
                    losses = context.mean_of(self._train_step(x, model, discriminator, g_opt, d_opt, use_amp))
                    steps += 1
                    if losses["discriminator"] < COLLAPSE_LOSS:  # the same decision on every rank
                        reinitialise_discriminator(self.discriminator_, d_opt)
                        context.broadcast_parameters(self.discriminator_)
                        resets += 1
                        log.warning("stage 2 epoch %d step %d: discriminator loss %.2g < %.0e, re-initialised it",
                                    epoch, step, losses["discriminator"], COLLAPSE_LOSS)
                    for name, value in losses.items():
                        sums[name] = sums.get(name, 0.0) + value
                record = {"epoch": epoch, "seconds": time.perf_counter() - start,
                          **{k: v / steps for k, v in sums.items()}, "discriminator_resets": resets}
                if not math.isfinite(record["total"]):
                    raise FloatingPointError(
                        f"stage 2 loss became {record['total']} in epoch {epoch}; lower stage2.lr (now {c.lr}) or check the input images"
                    )
                self.history_.append(record)
                epochs.set_postfix(loss=f"{record['total']:.4f}", recon=f"{record['recon']:.4f}")
                log.info("stage 2 epoch %d/%d: %s", epoch, c.epochs, {k: round(v, 5) for k, v in record.items() if k != "epoch"})
                if checkpoint_path is not None and context.is_main:
                    state = {"g_opt": g_opt.state_dict(), "d_opt": d_opt.state_dict(),
                             "loader_generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
                             "data": data_id, "device": str(self.device_)}
                    self.save(checkpoint_path, epoch=epoch, training_state=state)
        finally:
            restore_batchnorm(self.model_)
        self.train_seconds_ = time.perf_counter() - start
        self.model_.eval()
        return self

    def _restore(
        self, path: Path, g_opt: torch.optim.Optimizer, d_opt: torch.optim.Optimizer, generator: torch.Generator, data: str
    ) -> int:
        """Load a per-epoch checkpoint into the fresh training objects; returns the next epoch."""
        expected = {"format": CHECKPOINT_FORMAT, "config": asdict(self.config), "image_size": self.image_size,
                    "channels": self.channels, "seed": self.seed}
        payload, state = load_for_resume(path, expected, self, data, name="stage 2")
        if state is None:
            return self.config.epochs + 1
        g_opt.load_state_dict(state["g_opt"])
        d_opt.load_state_dict(state["d_opt"])
        generator.set_state(state["loader_generator"])
        torch.set_rng_state(state["torch_rng"])
        return int(payload["epoch"]) + 1

    def _train_step(
        self, x: torch.Tensor, model: torch.nn.Module, discriminator: torch.nn.Module,
        g_opt: torch.optim.Optimizer, d_opt: torch.optim.Optimizer, use_amp: bool,
    ) -> dict[str, float]:
        """One generator and one discriminator update on a batch (``model`` / ``discriminator`` may be DDP-wrapped)."""
        c = self.config
        with torch.autocast(self.device_.type, dtype=torch.bfloat16, enabled=use_amp):
            out = model(x)
            # the plain network (no DDP), frozen: this forward trains the generator, not D
            self.discriminator_.requires_grad_(False)
            fake_logits = self.discriminator_(out.reconstruction) if c.w_adv > 0 else None
            self.discriminator_.requires_grad_(True)
        terms = generator_loss(
            x, out.reconstruction.float(), out.latent.float(), out.latent_reconstructed.float(),
            None if fake_logits is None else fake_logits.float(), c,
        )
        g_opt.zero_grad(set_to_none=True)
        terms["total"].backward()
        g_opt.step()
        with torch.autocast(self.device_.type, dtype=torch.bfloat16, enabled=use_amp):
            logits = discriminator(torch.cat([x, out.reconstruction.detach()]))
        l_d = discriminator_loss(logits.float())
        d_opt.zero_grad(set_to_none=True)
        l_d.backward()
        d_opt.step()
        return {**{k: v.item() for k, v in terms.items()}, "discriminator": l_d.item()}

    def fit_normalisation(self, images: np.ndarray, *, stage1_maps: np.ndarray | None = None) -> "PatchScorerStage":
        """Fix ``map_mean_`` / ``map_std_`` from validation normals' raw cell maps (never a batch's)."""
        self._require_fitted()
        self._check_images(images)
        if len(images) == 0:
            raise ValueError("stage-2 map statistics need at least one validation normal image")
        # statistics of the cells, before upsampling (bilinear upsampling is a weighted mean of cells)
        cells = self._cell_maps(images, stage1_maps)
        self.map_mean_ = float(cells.mean())
        std = float(cells.std())
        self.map_std_ = std if std > 0 and math.isfinite(std) else 1.0
        return self

    def _cell_maps(self, images: np.ndarray, stage1_maps: np.ndarray | None) -> np.ndarray:
        out = []
        batch_size = self.config.score_batch_size
        self.model_.eval()
        with torch.inference_mode():
            for first in range(0, len(images), batch_size):
                x = to_tensor(images[first : first + batch_size]).to(self.device_)
                guidance = None if stage1_maps is None else torch.as_tensor(stage1_maps[first : first + batch_size]).to(self.device_)
                out.append(raw_maps(self.model_, x, guidance, self.config).cpu().numpy())
        return np.concatenate(out)

    def _require_fitted(self) -> None:
        if not hasattr(self, "model_"):
            raise RuntimeError("PatchScorerStage is not fitted: call fit() or load() first")

    def score(
        self, images: np.ndarray, *, stage1_maps: np.ndarray | None = None, batch_size: int | None = None,
        progress: bool = True, desc: str = "stage 2 score",
    ) -> PatchScoreResult:
        """Standardised maps and image scores; ``stage1_maps`` (``N×H×W``, 1 − A) when guided."""
        self._require_fitted()
        if not hasattr(self, "map_mean_"):
            raise RuntimeError("stage-2 map statistics are not fitted: call fit_normalisation() on validation normals first")
        self._check_images(images)
        return patch_scores(self.model_, images, self.config, self.device_, self.map_mean_, self.map_std_,
                            stage1_maps=stage1_maps, batch_size=batch_size, progress=progress, desc=desc)

    # -- persistence ----------------------------------------------------------------------------
    def save(self, path: str | Path, *, epoch: int | None = None, training_state: dict[str, Any] | None = None) -> None:
        """Weights, config, history, map statistics; ``training_state`` lets ``fit`` resume."""
        payload: dict[str, Any] = {
            "format": CHECKPOINT_FORMAT,
            "model": self.model_.state_dict(),
            "discriminator": self.discriminator_.state_dict(),
            "config": asdict(self.config),
            "image_size": self.image_size,
            "channels": self.channels,
            "seed": self.seed,
            "epoch": epoch if epoch is not None else len(getattr(self, "history_", [])),
            "history": getattr(self, "history_", []),
        }
        if hasattr(self, "map_mean_"):
            payload["map_mean"] = self.map_mean_
            payload["map_std"] = self.map_std_
        if training_state is not None:
            payload["training_state"] = training_state
        save_checkpoint(path, payload)

    @classmethod
    def load(cls, path: str | Path, device: str = "auto") -> "PatchScorerStage":
        payload = load_checkpoint(path)
        if payload.get("format") not in ("twostage_ad.stage2/1", CHECKPOINT_FORMAT):
            raise ValueError(f"{str(path)!r} is not a twostage_ad stage-2 checkpoint (format {payload.get('format')!r})")
        try:
            config = Stage2Config(**payload["config"])
            config.validate()
        except (TypeError, ValueError) as exc:
            raise ValueError(f"checkpoint {str(path)!r} holds a config this version cannot use: {exc}") from exc
        stage = cls(config=config, image_size=payload["image_size"], channels=payload["channels"], device=device, seed=payload["seed"])
        stage._build()
        stage.model_.load_state_dict(payload["model"])
        stage.discriminator_.load_state_dict(payload["discriminator"])
        stage.history_ = list(payload.get("history", []))
        if "map_mean" in payload:
            stage.map_mean_ = float(payload["map_mean"])
            stage.map_std_ = float(payload["map_std"])
        stage.model_.eval()
        return stage
