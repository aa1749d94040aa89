"""Threshold calibration from validation scores (never test labels). Higher score = more anomalous.

Normals only: ``conformal`` (a bound a new normal exceeds with probability at most 1 − q: free of
any assumption from q/(1 − q) normals on, a Gaussian bound below), ``quantile`` (the q-quantile of
normal scores), ``meanstd`` (mean + k·std), ``fpr`` (the smallest threshold whose false-positive
rate on normals is <= the target).
With labelled anomalies: ``youden`` (max TPR − FPR), ``f1`` (max F1), ``recall`` (the largest
threshold that still flags at least the target share of anomalies — a screen should rarely let an
anomaly through). Without labels: ``synthetic_recall``, the same target on the scores of validation
normals that each carry one synthetic defect. A score is flagged when it is strictly greater than
the threshold.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import stats as scipy_stats
from sklearn.metrics import precision_recall_curve, roc_curve

from twostage_ad.config import CALIBRATION_METHODS, CalibrationConfig

__all__ = ["CalibrationError", "Threshold", "calibrate", "conformal_threshold", "NORMAL_ONLY_METHODS", "SYNTHETIC_METHODS"]

log = logging.getLogger(__name__)

NORMAL_ONLY_METHODS = ("conformal", "quantile", "meanstd", "fpr")
SYNTHETIC_METHODS = ("synthetic_recall",)  # need the scores of validation normals with synthetic defects


class CalibrationError(ValueError):
    """The validation scores cannot support the requested method."""


@dataclass
class Threshold:
    """A calibrated threshold: method, its parameters, the value and the statistics it used."""

    method: str
    params: dict[str, float]
    value: float
    stats: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Threshold:
        return cls(method=values["method"], params=dict(values["params"]), value=float(values["value"]), stats=dict(values.get("stats", {})))


def _normal_stats(normal: np.ndarray) -> dict[str, Any]:
    return {
        "n_normal": int(len(normal)),
        "mean": float(np.mean(normal)),
        "std": float(np.std(normal, ddof=1)) if len(normal) > 1 else 0.0,
        "min": float(np.min(normal)),
        "median": float(np.median(normal)),
        "max": float(np.max(normal)),
    }


def _fpr_threshold(normal: np.ndarray, target: float) -> float:
    """Smallest observed normal score t with mean(normal > t) <= target."""
    ordered = np.sort(normal)
    n = len(ordered)
    allowed = int(np.floor(target * n + 1e-9))  # tolerance: 0.29·100 is 28.999… in floats  # at most this many normals may lie strictly above t
    return float(ordered[n - 1 - allowed]) if allowed < n else float(ordered[0])


def conformal_threshold(normal: np.ndarray, q: float) -> tuple[float, dict[str, Any]]:
    """A threshold a new normal's score exceeds with probability at most ``1 − q``, and how it was set.

    With ``n`` exchangeable normal scores, a new one lies above the ``k``-th smallest with
    probability at most ``1 − k/(n + 1)`` (exactly, without ties), so the ``⌈(n + 1)·q⌉``-th
    smallest is a distribution-free bound once ``n ≥ q/(1 − q)`` (9 normals at q = 0.9;
    split-conformal prediction). The probability is over the draw of the validation set: one
    small set can still land high or low. The plain q-quantile (``quantile``) lies below that order
    statistic and is exceeded more often: by 0.24 of new normals with 4 validation normals at
    q = 0.9, 0.11 with 95 (Gaussian scores). Below ``q/(1 − q)`` normals no order statistic is a
    bound, and the Gaussian prediction bound ``mean + t_{q, n−1}·s·√(1 + 1/n)`` is used instead,
    never below the largest normal (exact for Gaussian scores where the largest normal does not
    decide; heavier tails exceed it more often), with a warning. One normal: its score, with a
    warning.
    """
    ordered = np.sort(np.asarray(normal, dtype=np.float64))
    n = len(ordered)
    if n == 0 or not 0.0 < q < 1.0:
        raise ValueError(f"conformal_threshold needs at least one score and q in (0, 1), got {n} scores and q={q!r}")
    rank = max(1, math.ceil((n + 1) * q - 1e-9))  # the tolerance: (n + 1)·q may come out a hair above an integer
    if rank <= n:
        return float(ordered[rank - 1]), {"bound": "order_statistic", "rank": rank}
    needed = math.ceil(q / (1.0 - q) - 1e-9)
    if n == 1:
        log.warning("calibration 'conformal' on a single validation normal: the threshold is its score, which about "
                    "half of new normals exceed; %d validation normals give a distribution-free bound at q=%g", needed, q)
        return float(ordered[0]), {"bound": "single_normal"}
    log.warning("calibration 'conformal' on %d validation normals: the threshold is a Gaussian prediction bound, "
                "which heavy-tailed scores exceed more often than 1 − q; %d give a distribution-free one at q=%g",
                n, needed, q)
    t = float(scipy_stats.t.ppf(q, df=n - 1))
    bound = float(np.mean(ordered) + t * np.std(ordered, ddof=1) * math.sqrt(1.0 + 1.0 / n))
    return max(bound, float(ordered[-1])), {"bound": "gaussian_prediction", "t": t}


def _just_below(score: float) -> float:
    """A threshold that still flags ``score`` (flagged = score > threshold) whether the comparison
    runs in float64 or in float32: one float32 step below the score's float32 value. Screening
    losses are float32 and NumPy compares a float32 array with a Python float in float32, where a
    float64 step below would round back up to the score; and a score read back from
    a file is only as exact as the digits it was written with. At most a relative 2e-7 below the
    score, so nothing else of note is flagged with it."""
    return float(np.nextafter(np.float32(score), np.float32(-np.inf)))


def _recall_threshold(anomalous: np.ndarray, target: float) -> float:
    """The largest threshold that flags (score > t) at least ``target`` of ``anomalous``."""
    ordered = np.sort(anomalous)
    must_flag = int(np.ceil(target * len(ordered) - 1e-9))
    return _just_below(float(ordered[len(ordered) - must_flag]))


def calibrate(scores: np.ndarray, labels: np.ndarray, config: CalibrationConfig, method: str | None = None, *,
              synthetic: np.ndarray | None = None) -> Threshold:
    """Pick a threshold from validation ``scores`` with ``labels`` (0 normal, 1 anomalous);
    ``synthetic``: scores of validation normals with a synthetic defect each (``synthetic_recall``)."""
    method = method or config.method
    if method not in CALIBRATION_METHODS:
        raise CalibrationError(f"unknown calibration method {method!r}; choose one of {CALIBRATION_METHODS}")
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if scores.shape != labels.shape:
        raise CalibrationError(f"scores and labels differ in shape: {scores.shape} vs {labels.shape}")
    if not np.all(np.isfinite(scores)):
        raise CalibrationError(f"{int((~np.isfinite(scores)).sum())} validation score(s) are NaN or infinite")
    normal, anomalous = scores[labels == 0], scores[labels == 1]
    if len(normal) == 0:
        raise CalibrationError("no normal validation scores: calibration needs held-out normal images")
    stats = _normal_stats(normal)
    stats["n_anomalous"] = int(len(anomalous))
    if method == "conformal":
        params = {"q": config.q}
        value, how = conformal_threshold(normal, config.q)
        stats.update(how)
    elif method == "quantile":
        params = {"q": config.q}
        value = float(np.quantile(normal, config.q))
    elif method == "meanstd":
        params = {"k": config.k}
        value = stats["mean"] + config.k * stats["std"]
    elif method == "fpr":
        params = {"fpr": config.fpr}
        value = _fpr_threshold(normal, config.fpr)
    elif method == "synthetic_recall":
        synthetic = np.asarray([] if synthetic is None else synthetic, dtype=np.float64)
        if len(synthetic) == 0:
            raise CalibrationError("method 'synthetic_recall' needs the scores of validation normals with synthetic defects: "
                                   "TwoStageDetector.calibrate(..., synthetic=detector.score_synthetic(normals, augment)[0]), "
                                   "or a run folder's synthetic_scores.csv (runs with >= 2 validation normals write it)")
        if not np.all(np.isfinite(synthetic)):
            raise CalibrationError(f"{int((~np.isfinite(synthetic)).sum())} synthetic-defect score(s) are NaN or infinite")
        params = {"recall": config.recall}
        value = _recall_threshold(synthetic, config.recall)
        stats["n_synthetic"] = int(len(synthetic))
        stats["recall_synthetic"] = float(np.mean(synthetic > value))
    else:
        if len(anomalous) == 0:
            raise CalibrationError(
                f"method {method!r} needs labelled anomalies in the validation split, which has none; "
                f"use one of {NORMAL_ONLY_METHODS} or add labelled anomalies to the val split"
            )
        if method == "youden":
            params = {}
            fpr, tpr, thresholds = roc_curve(labels, scores)
            best = int(np.argmax(tpr - fpr))
            # roc_curve flags score >= t; we flag score > t, so step just below the cut
            value = _just_below(float(thresholds[best]))
            stats["youden_j"] = float(tpr[best] - fpr[best])
        elif method == "f1":
            params = {}
            precision, recall, thresholds = precision_recall_curve(labels, scores)
            f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
            best = int(np.argmax(f1))
            value = _just_below(float(thresholds[best]))
            stats["f1"] = float(f1[best])
        else:  # recall
            params = {"recall": config.recall}
            value = _recall_threshold(anomalous, config.recall)
    value = float(value)
    stats["flagged_fraction_normal"] = float(np.mean(normal > value))
    if len(anomalous):
        stats["recall_anomalous"] = float(np.mean(anomalous > value))
    return Threshold(method=method, params=params, value=value, stats=stats)
