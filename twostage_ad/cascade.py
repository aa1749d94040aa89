"""The two-stage decision and the one continuous cascade score (docs/design.md §2, cascade).

Rule: an image is *flagged* when its stage-1 screening loss ``s1 > τ₁``. Unflagged images are
decided normal and never reach stage 2. A flagged image is anomalous when its second-stage score
``r2 > τ₂``, where ``r2`` is the stage-2 image score (``fusion="stage2"``) or
``(s1 − μ₁)/σ₁ + (s2 − μ₂)/σ₂`` (``fusion="sum"``) or ``max((s1 − μ₁)/σ₁, (s2 − μ₂)/σ₂)``
(``fusion="max"``), with validation normals' means and stds.

Cascade score (higher = more anomalous), one number per image that ranks every flagged image
above every unflagged one:

- unflagged: ``0.5 + arctan((s1 − τ₁)/σ₁)/π`` ∈ (0, 0.5] — ordered by stage 1;
- flagged:   ``1.5 + arctan((r2 − τ₂)/σ_r)/π`` ∈ (1, 2) — ordered by the second stage;

so ``decision = cascade_score > 1.5``. ``arctan`` is monotone and, unlike a logistic, does not
round to its limit within float64 for any realistic score, so the order survives. All
statistics come from validation rows; :func:`fit_cascade` never sees test labels.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from twostage_ad.calibration import Threshold, calibrate
from twostage_ad.config import FUSION_MODES, CalibrationConfig

__all__ = ["Cascade", "CascadeOutput", "fit_cascade", "MapFusion", "fused_anomaly_map", "second_stage_score"]


def _std(values: np.ndarray) -> float:
    """Standard deviation used as a scale; 1.0 when it is 0 or undefined (a constant score)."""
    std = float(np.std(values)) if len(values) > 1 else 0.0
    return std if std > 0 and np.isfinite(std) else 1.0


@dataclass
class CascadeOutput:
    """Per-image results of :meth:`Cascade.apply` (arrays of length N)."""

    flagged: np.ndarray  # bool: s1 > τ₁
    second_score: np.ndarray  # r2 (NaN where stage 2 was not run)
    cascade_score: np.ndarray  # see the module docstring
    decision: np.ndarray  # int 0/1


@dataclass
class Cascade:
    """Fitted cascade: both thresholds and the validation statistics the scores use."""

    stage1: Threshold
    stage2: Threshold
    fusion: str
    stage1_mean: float
    stage1_std: float
    stage2_mean: float
    stage2_std: float
    second_std: float
    map_fusion: MapFusion | None = None  # the cascade's map (None: a run calibrated before it was stored)

    def second_score(self, stage1_scores: np.ndarray, stage2_scores: np.ndarray) -> np.ndarray:
        return second_stage_score(
            self.fusion, stage1_scores, stage2_scores, self.stage1_mean, self.stage1_std, self.stage2_mean, self.stage2_std
        )

    def apply(self, stage1_scores: np.ndarray, stage2_scores: np.ndarray) -> CascadeOutput:
        """Decide images from their stage-1 scores and stage-2 scores (NaN allowed where not flagged)."""
        s1 = np.asarray(stage1_scores, dtype=np.float64)
        s2 = np.asarray(stage2_scores, dtype=np.float64)
        if s1.shape != s2.shape:
            raise ValueError(f"stage-1 and stage-2 scores differ in shape: {s1.shape} vs {s2.shape}")
        broken = ~np.isfinite(s1)  # fail closed: an image stage 1 cannot score is flagged and anomalous
        flagged = (s1 > self.stage1.value) | broken
        missing = flagged & ~broken & ~np.isfinite(s2)
        if missing.any():
            raise ValueError(f"{int(missing.sum())} flagged image(s) have no finite stage-2 score")
        ok = flagged & ~broken
        r2 = np.where(ok, self.second_score(np.where(ok, s1, 0.0), np.where(ok, s2, 0.0)), np.nan)
        with np.errstate(invalid="ignore"):
            unflagged_score = 0.5 + np.arctan((s1 - self.stage1.value) / self.stage1_std) / np.pi
            flagged_score = 1.5 + np.arctan((np.nan_to_num(r2) - self.stage2.value) / self.second_std) / np.pi
        cascade = np.where(broken, 2.0, np.where(flagged, flagged_score, unflagged_score))
        decision = (broken | (ok & (np.nan_to_num(r2, nan=-np.inf) > self.stage2.value))).astype(int)
        return CascadeOutput(flagged=flagged, second_score=r2, cascade_score=cascade, decision=decision)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["stage1"] = self.stage1.to_dict()
        out["stage2"] = self.stage2.to_dict()
        return out

    @classmethod
    def from_dict(cls, thresholds: dict[str, Any]) -> Cascade:
        """From ``thresholds.json``: ``stage1`` and ``stage2`` thresholds and the ``cascade`` statistics."""
        try:
            stats = thresholds["cascade"]
            return cls(
                stage1=Threshold.from_dict(thresholds["stage1"]),
                stage2=Threshold.from_dict(thresholds["stage2"]),
                **{k: stats[k] for k in ("fusion", "stage1_mean", "stage1_std", "stage2_mean", "stage2_std", "second_std")},
                map_fusion=MapFusion(**stats["map_fusion"]) if stats.get("map_fusion") else None,
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"thresholds lack the cascade entry {exc}; re-run calibrate on this run") from exc


def second_stage_score(
    fusion: str,
    stage1_scores: np.ndarray,
    stage2_scores: np.ndarray,
    stage1_mean: float = 0.0,
    stage1_std: float = 1.0,
    stage2_mean: float = 0.0,
    stage2_std: float = 1.0,
) -> np.ndarray:
    """``r2``: the stage-2 score itself, or the sum or the larger of both standardised scores."""
    if fusion not in FUSION_MODES:
        raise ValueError(f"fusion must be one of {FUSION_MODES}, got {fusion!r}")
    s2 = np.asarray(stage2_scores, dtype=np.float64)
    if fusion == "stage2":
        return s2
    z1 = (np.asarray(stage1_scores, dtype=np.float64) - stage1_mean) / stage1_std
    z2 = (s2 - stage2_mean) / stage2_std
    return z1 + z2 if fusion == "sum" else np.maximum(z1, z2)


def fit_cascade(
    val_stage1: np.ndarray,
    val_stage2: np.ndarray,
    val_labels: np.ndarray,
    calibration: CalibrationConfig,
    *,
    fusion: str = "stage2",
    calibration2: CalibrationConfig | None = None,
    synthetic_stage1: np.ndarray | None = None,
    synthetic_stage2: np.ndarray | None = None,
) -> Cascade:
    """Pick τ₁ and τ₂ from validation rows (``calibration2`` for τ₂, default the same method).

    ``synthetic_stage1`` / ``synthetic_stage2``: both stages' scores of the validation normals with
    a synthetic defect each, for ``synthetic_recall`` (τ₂ is then picked on their fused score).

    Both thresholds are calibrated on *all* validation rows, not only the flagged ones: a
    calibration set of normals rarely holds enough flagged images to pick a quantile from. So the
    q of τ₂ is a share of all validation normals, not of the flagged ones; with ``fusion="sum"``
    flagged normals carry a high stage-1 term and exceed τ₂ far more often than 1 − q.
    ``stage2.stats`` records what the pair does on validation normals
    (``cascade_false_positive_rate_val``, ``anomalous_share_of_flagged_normals_val``).
    """
    s1 = np.asarray(val_stage1, dtype=np.float64)
    s2 = np.asarray(val_stage2, dtype=np.float64)
    labels = np.asarray(val_labels)
    if not np.all(np.isfinite(s2)):
        raise ValueError("every validation image needs a finite stage-2 score to calibrate τ₂")
    normal = labels == 0
    if not normal.any():
        raise ValueError("the validation split has no normal image to calibrate on")
    stats = {
        "stage1_mean": float(np.mean(s1[normal])),
        "stage1_std": _std(s1[normal]),
        "stage2_mean": float(np.mean(s2[normal])),
        "stage2_std": _std(s2[normal]),
    }
    r2 = second_stage_score(fusion, s1, s2, **stats)
    synthetic_r2 = None
    if synthetic_stage1 is not None and synthetic_stage2 is not None:
        synthetic_r2 = second_stage_score(fusion, np.asarray(synthetic_stage1, dtype=np.float64),
                                          np.asarray(synthetic_stage2, dtype=np.float64), **stats)
    cascade = Cascade(
        stage1=calibrate(s1, labels, calibration, synthetic=synthetic_stage1),
        stage2=calibrate(r2, labels, calibration2 or calibration, synthetic=synthetic_r2),
        fusion=fusion,
        second_std=_std(r2[normal]),
        **stats,
    )
    # τ₂ is picked on all validation rows, but only flagged ones reach it; with ``sum`` fusion they
    # carry a high stage-1 term, so say what the pair of thresholds does on validation normals
    decided = cascade.apply(s1, s2)
    cascade.stage2.stats["cascade_false_positive_rate_val"] = float(np.mean(decided.decision[normal]))
    cascade.stage2.stats["anomalous_share_of_flagged_normals_val"] = (
        float(np.mean(decided.decision[normal & decided.flagged])) if (normal & decided.flagged).any() else None
    )
    return cascade


def fused_anomaly_map(stage1_maps: np.ndarray, stage2_maps: np.ndarray, *, stage1_mean: float, stage1_std: float,
                      stage2_weight: float) -> np.ndarray:
    """``(m₁ − μ₁)/σ₁ + w·z₂``: stage 1's map in validation-normal σ units plus ``w`` × stage 2's.

    ``stage1_maps``: ``1 − A`` as floats in [0, 1], the scale the statistics were fitted on (the
    uint8 maps of ``maps/test_maps.npz`` are divided by 255 first; integer maps are refused);
    ``stage1_mean`` / ``stage1_std``: the mean and std of validation normals' stage-1 map pixels
    (:meth:`MapFusion.fit`); ``stage2_maps``: already in
    validation-normal σ units (``(raw − map_mean)/map_std``). A sum keeps stage 1's filled regions
    where stage 2 is silent (a product would erase them) and lets stage 2 add where it sees more;
    ``stage2_weight`` 0 gives stage 1's map alone. ``N×H×W`` in, ``N×H×W`` float32 out.
    """
    if stage1_maps.shape != stage2_maps.shape:
        raise ValueError(f"stage-1 and stage-2 maps differ in shape: {stage1_maps.shape} vs {stage2_maps.shape}")
    if not (np.issubdtype(stage1_maps.dtype, np.floating) and np.issubdtype(stage2_maps.dtype, np.floating)):
        raise ValueError(f"maps must be floats (stage 1's in [0, 1]), got {stage1_maps.dtype} and {stage2_maps.dtype}")
    if not (math.isfinite(stage1_std) and stage1_std > 0 and math.isfinite(stage1_mean)):
        raise ValueError(f"stage1_mean must be finite and stage1_std finite and > 0, got {stage1_mean!r} and {stage1_std!r}")
    z1 = (stage1_maps.astype(np.float32) - np.float32(stage1_mean)) / np.float32(stage1_std)
    return z1 + np.float32(stage2_weight) * stage2_maps.astype(np.float32)


@dataclass
class MapFusion:
    """How the cascade's map is made from both stages' maps: :func:`fused_anomaly_map` with stage
    1's validation-normal map statistics and stage 2's weight (``cascade.map_weight``)."""

    stage1_mean: float
    stage1_std: float
    stage2_weight: float

    @classmethod
    def fit(cls, normal_stage1_maps: np.ndarray, stage2_weight: float) -> MapFusion:
        """From validation normals' stage-1 maps (``N×H×W``): the mean and std of all their pixels
        (std 1.0 when the maps are constant, so dividing by it is always defined)."""
        values = np.asarray(normal_stage1_maps, dtype=np.float64)
        if values.size == 0:
            raise ValueError("no validation normal's stage-1 map to take the map statistics from")
        if not np.isfinite(values).all():
            raise ValueError(f"{int((~np.isfinite(values)).sum())} pixels of the validation normals' stage-1 maps are NaN or infinite")
        return cls(stage1_mean=float(values.mean()), stage1_std=_std(values.reshape(-1)), stage2_weight=float(stage2_weight))

    def apply(self, stage1_maps: np.ndarray, stage2_maps: np.ndarray) -> np.ndarray:
        return fused_anomaly_map(stage1_maps, stage2_maps, stage1_mean=self.stage1_mean, stage1_std=self.stage1_std,
                                 stage2_weight=self.stage2_weight)
