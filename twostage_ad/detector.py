"""A trained run as one object: ``TwoStageDetector.from_run(run_dir).predict(images)``.

The deployment path of the cascade: stage 1 screens every image, stage 2 scores only the flagged
ones, and the thresholds and validation statistics saved by ``run`` / ``calibrate`` make the
decision. The numbers equal those ``run`` wrote to ``scores.csv`` for the same pixels (the
scoring is deterministic and batch-independent).
"""

from __future__ import annotations

import glob
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from twostage_ad.cascade import Cascade
from twostage_ad.data.images import decode_records
from twostage_ad.data.records import IMAGE_EXTENSIONS, DataError, Record
from twostage_ad.runs import RUN_FILES, read_json
from twostage_ad.stages.attention import SCREENING_COMPONENTS, AttentionStage
from twostage_ad.stages.patch_scorer import PatchScorerStage

__all__ = ["ImagePrediction", "Predictions", "TwoStageDetector", "expand_image_paths"]

log = logging.getLogger(__name__)


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
        columns = ["image", "stage1_loss", *SCREENING_COMPONENTS, "stage2_score", "flagged",
                   "stage2_decision_score", "cascade_score", "decision"]
        return pd.DataFrame(rows, columns=columns)


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


class TwoStageDetector:
    """Both trained stages and the calibrated cascade of a run folder."""

    def __init__(self, stage1: AttentionStage, stage2: PatchScorerStage, cascade: Cascade, *, name: str = ""):
        if (stage1.image_size, stage1.channels) != (stage2.image_size, stage2.channels):
            raise ValueError(
                f"stage 1 ({stage1.image_size}px, {stage1.channels} ch) and stage 2 "
                f"({stage2.image_size}px, {stage2.channels} ch) were trained on different images"
            )
        self.stage1 = stage1
        self.stage2 = stage2
        self.cascade = cascade
        self.name = name

    @property
    def image_size(self) -> int:
        return self.stage1.image_size

    @property
    def channels(self) -> int:
        return self.stage1.channels

    @classmethod
    def from_run(cls, run_dir: str | Path, device: str = "auto") -> "TwoStageDetector":
        """Load ``checkpoints/stage{1,2}.pt`` (weights only) and the current ``thresholds.json``."""
        run_dir = Path(run_dir)
        checkpoints = run_dir / RUN_FILES["checkpoints"]
        thresholds_path = run_dir / RUN_FILES["thresholds"]
        for path in (checkpoints / "stage1.pt", checkpoints / "stage2.pt", thresholds_path):
            if not path.is_file():
                raise FileNotFoundError(f"{str(run_dir)!r} is not a finished run: {path.relative_to(run_dir)} is missing")
        stage1 = AttentionStage.load(checkpoints / "stage1.pt", device=device)
        stage2 = PatchScorerStage.load(checkpoints / "stage2.pt", device=device)
        if not hasattr(stage2, "map_mean_"):
            raise ValueError(f"{str(checkpoints / 'stage2.pt')!r} has no map statistics: the run did not finish")
        return cls(stage1, stage2, Cascade.from_dict(read_json(thresholds_path)), name=run_dir.name)

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
        decoded = decode_records(records, size, channels, desc="decode", progress=False)
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
        skipped and listed in ``Predictions.failed``.
        """
        names, pixels, failed = self._decode(images)
        for name, reason in failed:
            log.warning("skipped %s: %s", name, reason)
        start = time.perf_counter()
        first = self.stage1.score(pixels, batch_size=batch_size, progress=progress, desc="stage 1")
        flagged = first.loss > self.cascade.stage1.value
        run2 = np.ones(len(pixels), bool) if all_stages else flagged
        guided = self.stage2.config.guidance != "none"
        second = self.stage2.score(pixels[run2], stage1_maps=first.anomaly_maps[run2] if guided else None,
                                   batch_size=batch_size, progress=progress, desc="stage 2")
        stage2_scores = np.full(len(pixels), np.nan)
        stage2_scores[run2] = second.scores
        decided = self.cascade.apply(first.loss, stage2_scores)
        seconds = time.perf_counter() - start
        stage2_maps: list[np.ndarray | None] = [None] * len(pixels)
        for slot, index in enumerate(np.flatnonzero(run2)):
            stage2_maps[index] = second.maps[slot]
        results = [
            ImagePrediction(
                image=names[i],
                stage1_loss=float(first.loss[i]),
                flagged=bool(decided.flagged[i]),
                stage2_score=float(stage2_scores[i]) if run2[i] else None,
                stage2_decision_score=float(decided.second_score[i]) if decided.flagged[i] else None,
                cascade_score=float(decided.cascade_score[i]),
                decision=int(decided.decision[i]),
                components={k: float(v[i]) for k, v in first.components.items()},
                stage1_map=first.anomaly_maps[i] if maps else None,
                stage2_map=stage2_maps[i] if maps else None,
            )
            for i in range(len(pixels))
        ]
        return Predictions(images=results, failed=failed, seconds=seconds)
