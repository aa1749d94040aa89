"""Both stages and the calibrated cascade as one object: the only cascade path of the package.

``TwoStageDetector.from_config(config).fit(...)`` trains stage 1, stage 2 and the cascade's
thresholds (what ``run`` does); ``TwoStageDetector.from_run(run_dir).predict(images)`` scores new
images the way a deployment does: stage 1 screens every image, stage 2 scores only the flagged
ones. Scoring is deterministic and batch-independent, so ``predict`` returns the numbers ``run``
wrote to ``scores.csv`` for the same pixels. Under ``torchrun`` scoring is sharded by index.
"""

from __future__ import annotations

import glob
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from twostage_ad.cascade import Cascade, CascadeOutput, MapFusion, fit_cascade
from twostage_ad.config import AugmentConfig, CalibrationConfig, CascadeConfig, Config, ConfigError, RunConfig
from twostage_ad.data.augment import synthetic_defects
from twostage_ad.data.images import decode_records, resize_images, resize_maps
from twostage_ad.data.records import IMAGE_EXTENSIONS, DataError, Record
from twostage_ad.device import memory_format_for
from twostage_ad.distributed import DistributedContext
from twostage_ad.evaluate import DECISION_COLUMNS
from twostage_ad.runs import RUN_FILES, read_json
from twostage_ad.stages.attention import SCREENING_COMPONENTS, AttentionStage, ScreeningResult
from twostage_ad.stages.patch_scorer import PatchScoreResult, PatchScorerStage
from twostage_ad.stages.training import TrainableStage

__all__ = ["CascadeScores", "ImagePrediction", "Predictions", "TwoStageDetector", "expand_image_paths"]

log = logging.getLogger(__name__)

# predict decodes and scores files in chunks of about this many bytes: per pixel the decoded uint8
# channels and about four float32 maps at the decode size (each stage's, resized and stored)
MAX_CHUNK_BYTES = 1 << 28
BYTES_PER_PIXEL_OF_MAPS = 16
# the columns of scores.csv that need no label
PREDICTION_COLUMNS = ["image", "stage1_loss", *SCREENING_COMPONENTS, "stage2_score", *DECISION_COLUMNS]


@dataclass
class CascadeScores:
    """Both stages' outputs for N images, in order. Stage 2 ran where ``ran_stage2``; elsewhere its
    scores are NaN and its maps zero. ``decided`` is None before the cascade is calibrated."""

    stage1: ScreeningResult
    stage2: PatchScoreResult
    ran_stage2: np.ndarray
    decided: CascadeOutput | None = None

    def __len__(self) -> int:
        return len(self.stage1.loss)

    @property
    def seconds(self) -> float:
        return self.stage1.seconds + self.stage2.seconds


@dataclass
class ImagePrediction:
    """One image's result. Maps are ``H×W`` float32 at the model's size; higher = more anomalous."""

    image: str
    stage1_loss: float
    flagged: bool
    stage2_score: float | None  # None when stage 2 did not run (unflagged, unless all_stages)
    stage2_decision_score: float | None
    cascade_score: float
    decision: int  # 1 = anomalous
    components: dict[str, float] = field(default_factory=dict)
    stage1_map: np.ndarray | None = None  # 1 − A in [0, 1]
    stage2_map: np.ndarray | None = None  # validation-normal σ units
    # the cascade's map (cascade.map_weight): stage 1's in validation-normal σ units plus w × stage 2's
    # (stage 2's term 0 where it did not run); None for a run calibrated before the map was stored
    fused_map: np.ndarray | None = None


@dataclass
class Predictions:
    """What :meth:`TwoStageDetector.predict` returns: per-image results, skipped files, timing."""

    images: list[ImagePrediction]
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    def __len__(self) -> int:
        return len(self.images)

    @property
    def images_per_s(self) -> float:
        return len(self.images) / self.seconds if self.seconds > 0 else float("nan")

    def to_frame(self) -> pd.DataFrame:
        """One row per image with the columns of ``scores.csv`` that need no label."""
        rows = [
            {
                "image": p.image,
                "stage1_loss": p.stage1_loss,
                **p.components,
                "stage2_score": np.nan if p.stage2_score is None else p.stage2_score,
                "flagged": p.flagged,
                "stage2_decision_score": np.nan if p.stage2_decision_score is None else p.stage2_decision_score,
                "cascade_score": p.cascade_score,
                "decision": p.decision,
            }
            for p in self.images
        ]
        return pd.DataFrame(rows, columns=PREDICTION_COLUMNS)


def expand_image_paths(inputs: Iterable[str | Path]) -> list[Path]:
    """Files, folders (their image files, sorted, not recursive) and glob patterns to image paths.

    Raises ``DataError`` for an input that matches nothing, so a typo is not a silent empty run.
    """
    paths: list[Path] = []
    for item in inputs:
        text = str(item)
        path = Path(text)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        elif path.is_file():
            found = [path]
        elif any(ch in text for ch in "*?["):
            found = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
        else:
            raise DataError(f"{text!r} is neither a file, a folder nor a glob pattern that matches anything")
        if not found:
            raise DataError(f"{text!r} holds or matches no image file ({', '.join(IMAGE_EXTENSIONS)})")
        paths.extend(found)
    return paths


def apply_run_settings(stage: TrainableStage, run: RunConfig) -> None:
    """A run's compute settings on a stage (also a loaded one): amp, layout, scoring batch, precision."""
    stage.amp, stage.score_batch_size = run.amp, run.score_batch_size
    if isinstance(stage, AttentionStage):
        stage.precision = run.precision
    if stage.channels_last != run.channels_last:
        stage.channels_last = run.channels_last
        if hasattr(stage, "model_"):
            stage.model_.to(memory_format=memory_format_for(run.channels_last))


def _load_reused(stage: TrainableStage, checkpoint: str | Path, run: RunConfig) -> TrainableStage:
    """A trained stage from ``checkpoint`` with ``stage``'s scoring fields and ``run``'s compute settings."""
    loaded = type(stage).load(checkpoint, device=stage.device)
    if (loaded.image_size, loaded.channels) != (stage.image_size, stage.channels):
        raise ConfigError(
            f"checkpoint {str(checkpoint)!r} was trained on {loaded.image_size}px, {loaded.channels} channel(s); this run uses "
            f"{stage.image_size}px, {stage.channels} channel(s): set "
            f"{'stage2.image_size' if isinstance(stage, PatchScorerStage) else 'data.image_size'} / data.channels to match"
        )
    loaded.use_scoring_fields(stage.config)  # stage 1 drops feature banks of another screening (refitted on the training images)
    if isinstance(loaded, PatchScorerStage):  # explicit, so the run's config.yaml reads as the size it was trained at
        loaded.config = replace(loaded.config, image_size=loaded.image_size)
    apply_run_settings(loaded, run)
    loaded.train_seconds_ = 0.0
    log.info("%s reused from %s (trained %d epochs)", stage.stage_name, checkpoint, len(loaded.history_))
    return loaded


class TwoStageDetector:
    """Stage 1 (:class:`AttentionStage`), stage 2 (:class:`PatchScorerStage`) and their :class:`Cascade`."""

    def __init__(self, stage1: AttentionStage, stage2: PatchScorerStage, cascade: Cascade | None = None, *, name: str = "",
                 bit_depth: int = 16):
        if stage1.channels != stage2.channels:
            raise ValueError(
                f"stage 1 ({stage1.channels} channel(s)) and stage 2 ({stage2.channels} channel(s)) were trained on different images"
            )
        self.stage1 = stage1
        self.stage2 = stage2
        self.cascade = cascade
        self.name = name
        self.bit_depth = bit_depth  # the bits 16-bit files' values use (data.bit_depth), for reading files to score

    @property
    def image_size(self) -> int:
        """The square size input arrays come at: the larger of the two stages' scales. Each stage
        scores its own view (resized like a decoded image), and both maps come back at this size."""
        return max(self.stage1.image_size, self.stage2.image_size)

    @property
    def channels(self) -> int:
        return self.stage1.channels

    @property
    def guided(self) -> bool:
        """Whether stage 2 weighs its cells by stage 1's map (``stage2.guidance``)."""
        return self.stage2.config.guidance != "none"

    # -- building and training ------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: Config, *, device: str = "auto", reuse: dict[str, str | Path | None] | None = None) -> TwoStageDetector:
        """Unfitted stages as ``config`` describes them (``data.channels`` must be resolved, not 0).

        ``reuse``: ``{"stage1": path, "stage2": path}`` of trained stages to load now instead of
        training them in :meth:`fit`; their model and training fields come from the checkpoint
        (``detector.stage1.config``), their scoring fields and compute settings from ``config``.
        """
        if config.data.channels == 0:
            raise ConfigError("data.channels must be 1 or 3 here (0 = decide from the first training image)")
        shared = {"channels": config.data.channels, "device": device, "seed": config.run.seed, "num_workers": config.run.num_workers}
        stage1 = AttentionStage(config=config.stage1, augment=config.augment, image_size=config.data.image_size, **shared)
        stage2 = PatchScorerStage(config=config.stage2, augment=config.augment, image_size=config.stage2.image_size or config.data.image_size,
                                  **shared)
        for stage in (stage1, stage2):
            apply_run_settings(stage, config.run)
        detector = cls(stage1, stage2, name=config.run.name, bit_depth=config.data.bit_depth or 16)
        detector.reused_ = {name: str(path) for name, path in (reuse or {}).items() if path is not None}
        if "stage1" in detector.reused_:
            detector.stage1 = _load_reused(stage1, detector.reused_["stage1"], config.run)
        if "stage2" in detector.reused_:
            detector.stage2 = _load_reused(stage2, detector.reused_["stage2"], config.run)
        return detector

    def fit(
        self,
        train: np.ndarray,
        val: np.ndarray,
        val_labels: np.ndarray,
        calibration: CalibrationConfig | None,
        *,
        fusion: str = "max",
        map_weight: float = CascadeConfig.map_weight,
        checkpoint_dir: str | Path | None = None,
        resume: bool = False,
        progress: bool = True,
        context: DistributedContext | None = None,
    ) -> TwoStageDetector:
        """Train both stages on uint8 ``N×H×W×C`` normal ``train`` images, fix stage 2's map
        statistics on the validation normals, score the validation images (``validation_``, a
        :class:`CascadeScores`) and, unless ``calibration`` is None, :meth:`calibrate` τ₁ and τ₂ on
        them. Test labels are never involved.

        ``checkpoint_dir``: where each stage checkpoints every epoch (``stage1.pt``, ``stage2.pt``;
        a reused stage is copied there); ``resume``: continue from the checkpoints in it.
        """
        context = context or DistributedContext()
        folder = None if checkpoint_dir is None else Path(checkpoint_dir)
        self._fit_stage(self.stage1, train, folder, resume, progress, context)
        first = self._score_stage1(val, context, progress, "stage 1 score val")
        self._fit_stage(self.stage2, train, folder, resume, progress, context)
        self.fit_stage2_statistics(val, val_labels, stage1_maps=first.anomaly_maps)
        if folder is not None and context.is_main:
            self.stage2.save(folder / "stage2.pt")  # now with its map statistics
        second = self._score_stage2(val, first.anomaly_maps, context, progress, "stage 2 score val")
        self.validation_ = CascadeScores(first, second, np.ones(len(val), bool))
        self.validation_labels_ = np.asarray(val_labels)
        return self if calibration is None else self.calibrate(calibration, fusion=fusion, map_weight=map_weight)

    def fit_stage2_statistics(self, val: np.ndarray, val_labels: np.ndarray, *, stage1_maps: np.ndarray | None = None,
                              progress: bool = False) -> TwoStageDetector:
        """Fix stage 2's map statistics on the normals among the validation images (``stage1_maps``:
        stage 1's ``N×H×W`` anomaly maps of all of them, scored here when guided and not given)."""
        normal = np.asarray(val_labels) == 0
        if self.guided and stage1_maps is None:
            stage1_maps = self._score_stage1(val, DistributedContext(), progress, "stage 1 score val").anomaly_maps
        self.stage2.fit_normalisation(resize_images(val[normal], self.stage2.image_size),
                                      stage1_maps=stage1_maps[normal] if self.guided else None)
        return self

    def calibrate(self, calibration: CalibrationConfig, *, fusion: str = "max",
                  synthetic: CascadeScores | None = None, map_weight: float = CascadeConfig.map_weight) -> TwoStageDetector:
        """Pick τ₁ and τ₂ (and the fusion statistics) from the validation scores of :meth:`fit`, and
        fit the cascade's map (:class:`MapFusion`, stage 2's weight ``map_weight``) on the validation
        normals' stage-1 maps; ``synthetic``: :meth:`score_synthetic`'s scores, which
        ``synthetic_recall`` calibrates on."""
        if not hasattr(self, "validation_"):
            raise RuntimeError("no validation scores to calibrate on: call fit() first")
        first, second = self.validation_.stage1, self.validation_.stage2
        self.cascade = fit_cascade(first.loss, second.scores, self.validation_labels_, calibration, fusion=fusion,
                                   synthetic_stage1=None if synthetic is None else synthetic.stage1.loss,
                                   synthetic_stage2=None if synthetic is None else synthetic.stage2.scores)
        self.cascade.map_fusion = MapFusion.fit(first.anomaly_maps[self.validation_labels_ == 0], map_weight)
        self.validation_.decided = self.cascade.apply(first.loss, second.scores)
        return self

    def _fit_stage(self, stage: TrainableStage, train: np.ndarray, folder: Path | None, resume: bool, progress: bool,
                   context: DistributedContext) -> None:
        """Train ``stage`` with per-epoch checkpoints in ``folder``, or copy a reused one there."""
        path = None if folder is None else folder / f"{stage.config_name}.pt"
        train = resize_images(train, stage.image_size)
        if stage.config_name not in getattr(self, "reused_", {}):
            stage.fit(train, checkpoint_path=path, progress=progress, resume=resume, context=context)
            return
        if isinstance(stage, AttentionStage) and stage.fit_missing_statistics(train, context=context, progress=progress):
            log.info("stage 1 reused from a checkpoint without the statistics its scoring needs: fitted them on the training images")
        if path is not None and context.is_main:
            stage.save(path)

    # -- scoring ---------------------------------------------------------------------------------
    def _score_stage1(self, images: np.ndarray, context: DistributedContext, progress: bool, desc: str,
                      batch_size: int | None = None) -> ScreeningResult:
        """Each rank scores its contiguous shard; every rank gets all results, in order. The maps come
        back at the input size (bilinear, when stage 1 works at a smaller one)."""
        start = time.perf_counter()
        view = resize_images(images[context.shard(len(images))], self.stage1.image_size)
        part = self.stage1.score(view, batch_size=batch_size, progress=progress, desc=desc)
        if self.stage1.image_size != images.shape[1]:
            part = replace(part, anomaly_maps=resize_maps(part.anomaly_maps, images.shape[1]),
                           seconds=time.perf_counter() - start)  # the resizing is part of the stage's cost
        if not context.enabled:
            return part
        return ScreeningResult(
            loss=context.gather(part.loss),
            components={k: context.gather(v) for k, v in part.components.items()},
            anomaly_maps=context.gather(part.anomaly_maps),
            seconds=time.perf_counter() - start,
        )

    def _score_stage2(self, images: np.ndarray, stage1_maps: np.ndarray, context: DistributedContext, progress: bool,
                      desc: str, batch_size: int | None = None) -> PatchScoreResult:
        start = time.perf_counter()
        shard = context.shard(len(images))
        maps = stage1_maps[shard] if self.guided else None
        view = resize_images(images[shard], self.stage2.image_size)
        part = self.stage2.score(view, stage1_maps=maps, batch_size=batch_size, progress=progress, desc=desc)
        if self.stage2.image_size != images.shape[1]:
            part = replace(part, maps=resize_maps(part.maps, images.shape[1]), seconds=time.perf_counter() - start)
        if not context.enabled:
            return part
        return PatchScoreResult(scores=context.gather(part.scores), maps=context.gather(part.maps), seconds=time.perf_counter() - start)

    def score(
        self,
        images: np.ndarray,
        *,
        all_stages: bool = True,
        batch_size: int | None = None,
        progress: bool = True,
        desc: str = "",
        context: DistributedContext | None = None,
    ) -> CascadeScores:
        """Both stages on uint8 ``N×S×S×C`` images (``S`` = :attr:`image_size`): stage 1 on every image, stage 2 on every image
        (``all_stages``, for analysis) or on the flagged ones only (the deployment path); then the
        cascade's decisions when it is calibrated. Timed per stage."""
        context = context or DistributedContext()
        suffix = f" {desc}" if desc else ""
        first = self._score_stage1(images, context, progress, f"stage 1 score{suffix}", batch_size)
        if all_stages:
            run2 = np.ones(len(images), bool)
        elif self.cascade is None:
            raise RuntimeError("the cascade is not calibrated: call fit() or from_run() first, or score with all_stages=True")
        else:
            run2 = first.loss > self.cascade.stage1.value
        part = self._score_stage2(images[run2], first.anomaly_maps[run2], context, progress, f"stage 2 score{suffix}", batch_size)
        scores = np.full(len(images), np.nan)
        scores[run2] = part.scores
        maps = np.zeros((len(images), *images.shape[1:3]), np.float32)
        maps[run2] = part.maps
        second = PatchScoreResult(scores=scores, maps=maps, seconds=part.seconds)
        decided = None if self.cascade is None else self.cascade.apply(first.loss, scores)
        return CascadeScores(first, second, run2, decided)

    def score_synthetic(
        self, normals: np.ndarray, augment: AugmentConfig, *, seed: int = 0, progress: bool = True,
        context: DistributedContext | None = None,
    ) -> tuple[CascadeScores, np.ndarray, list[str]] | None:
        """Both stages on validation ``normals`` with one synthetic defect each, drawn apart from
        training's (:func:`~twostage_ad.data.augment.synthetic_defects`): ``(scores, masks N×H×W
        with 1 = defect, kinds)``, or None with fewer than 2 normals."""
        if len(normals) < 2:
            return None
        images, masks, kinds = synthetic_defects(normals, augment, seed=seed)
        return self.score(images, all_stages=True, progress=progress, desc="synthetic val", context=context), masks, kinds

    # -- deployment ------------------------------------------------------------------------------
    @classmethod
    def from_run(cls, run_dir: str | Path, device: str = "auto") -> TwoStageDetector:
        """Load ``checkpoints/stage{1,2}.pt`` (weights only), the run's compute settings and the
        current ``thresholds.json``."""
        from twostage_ad.runs import load_run_config

        run_dir = Path(run_dir)
        checkpoints = run_dir / RUN_FILES["checkpoints"]
        thresholds_path = run_dir / RUN_FILES["thresholds"]
        for path in (checkpoints / "stage1.pt", checkpoints / "stage2.pt", thresholds_path):  # config.yaml: load_run_config
            if not path.is_file():
                raise FileNotFoundError(f"{str(run_dir)!r} is not a finished run: {path.relative_to(run_dir)} is missing")
        stage1 = AttentionStage.load(checkpoints / "stage1.pt", device=device)
        stage2 = PatchScorerStage.load(checkpoints / "stage2.pt", device=device)
        if not hasattr(stage2, "map_mean_"):
            raise ValueError(f"{str(checkpoints / 'stage2.pt')!r} has no map statistics: the run did not finish")
        config = load_run_config(run_dir)
        for stage in (stage1, stage2):
            apply_run_settings(stage, config.run)
        return cls(stage1, stage2, Cascade.from_dict(read_json(thresholds_path)), name=run_dir.name,
                   bit_depth=config.data.bit_depth or 16)

    def _decode(self, images: Sequence[str | Path] | np.ndarray) -> tuple[list[str], np.ndarray, list[tuple[str, str]]]:
        size, channels = self.image_size, self.channels
        if isinstance(images, np.ndarray):
            if images.ndim != 4 or images.shape[1:] != (size, size, channels) or images.dtype != np.uint8:
                raise ValueError(
                    f"an array input must be uint8 N×{size}×{size}×{channels} (the run's size), got "
                    f"{images.dtype} {images.shape}; pass file paths to have them read and resized"
                )
            return [str(i) for i in range(len(images))], images, []
        records = [Record(name=str(p), label=0, split="predict", image=Path(p)) for p in images]
        decoded = decode_records(records, size, channels, desc="decode", progress=False, bit_depth=self.bit_depth)
        return [r.name for r in decoded.records], decoded.images, decoded.failed

    def predict(
        self,
        images: Sequence[str | Path] | np.ndarray,
        *,
        batch_size: int | None = None,
        all_stages: bool = False,
        maps: bool = True,
        progress: bool = True,
    ) -> Predictions:
        """Score image files (read and resized like training images) or a uint8 ``N×S×S×C`` array.

        Stage 2 runs on flagged images only, unless ``all_stages`` (then every image gets a
        stage-2 score and map, for analysis; decisions are the same). Unreadable files are
        skipped and listed in ``Predictions.failed``. Files are decoded and scored a chunk at a
        time (about :data:`MAX_CHUNK_BYTES` of pixels and maps), so memory stays bounded for many
        large images; with ``maps`` every image's maps are kept (two float32 ``S×S`` arrays each).
        """
        if self.cascade is None:
            raise RuntimeError("the cascade is not calibrated: call fit() or from_run() first")
        if isinstance(images, np.ndarray):
            chunks: list[Sequence[str | Path] | np.ndarray] = [images]
        else:  # decoded a chunk at a time, so large images do not all sit in memory at once
            paths = list(images)
            per_chunk = max(1, MAX_CHUNK_BYTES // (self.image_size**2 * (self.channels + BYTES_PER_PIXEL_OF_MAPS)))
            chunks = [paths[first : first + per_chunk] for first in range(0, len(paths), per_chunk)]
        results: list[ImagePrediction] = []
        failed: list[tuple[str, str]] = []
        seconds = 0.0
        for chunk in chunks:
            names, pixels, chunk_failed = self._decode(chunk)
            for name, reason in chunk_failed:
                log.warning("skipped %s: %s", name, reason)
            failed += chunk_failed
            start = time.perf_counter()
            scored = self.score(pixels, all_stages=all_stages, batch_size=batch_size, progress=progress)
            seconds += time.perf_counter() - start
            results += self._predictions(names, scored, maps, self.cascade.map_fusion)
        return Predictions(images=results, failed=failed, seconds=seconds)

    @staticmethod
    def _predictions(names: list[str], scored: CascadeScores, maps: bool, fusion: MapFusion | None) -> list[ImagePrediction]:
        first, second, decided = scored.stage1, scored.stage2, scored.decided
        # score() leaves stage 2's map at 0 (its normal mean) where it did not run
        fused = fusion.apply(first.anomaly_maps, second.maps) if maps and fusion is not None else None
        return [
            ImagePrediction(
                image=names[i],
                stage1_loss=float(first.loss[i]),
                flagged=bool(decided.flagged[i]),
                stage2_score=float(second.scores[i]) if scored.ran_stage2[i] else None,
                stage2_decision_score=float(decided.second_score[i]) if decided.flagged[i] else None,
                cascade_score=float(decided.cascade_score[i]),
                decision=int(decided.decision[i]),
                components={k: float(v[i]) for k, v in first.components.items()},
                stage1_map=first.anomaly_maps[i] if maps else None,
                stage2_map=second.maps[i] if maps and scored.ran_stage2[i] else None,
                fused_map=None if fused is None else fused[i],
            )
            for i in range(len(names))
        ]
