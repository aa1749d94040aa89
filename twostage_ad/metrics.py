"""Image and pixel AUROC on scikit-learn; undefined cases give ``None`` and a reason, never NaN.

Pixel AUROC uses every pixel of every test image with a ground-truth mask; anomalous images whose
mask is empty (a labelling gap, e.g. 4 MTD "Uneven" images) are left out of pixel metrics.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score

__all__ = ["MetricResult", "image_auroc", "pixel_auroc", "recall_at_threshold"]


class MetricResult(tuple):
    """``(value or None, reason or None)``."""

    def __new__(cls, value: float | None, reason: str | None = None):
        return super().__new__(cls, (value, reason))

    @property
    def value(self) -> float | None:
        return self[0]

    @property
    def reason(self) -> str | None:
        return self[1]


def image_auroc(labels: np.ndarray, scores: np.ndarray) -> MetricResult:
    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=np.float64)
    if len(labels) == 0:
        return MetricResult(None, "no test images")
    if len(np.unique(labels)) < 2:
        return MetricResult(None, f"only one class among {len(labels)} test images (label {int(labels[0])})")
    if not np.all(np.isfinite(scores)):
        return MetricResult(None, f"{int((~np.isfinite(scores)).sum())} scores are NaN or infinite")
    return MetricResult(float(roc_auc_score(labels, scores)))


def pixel_auroc(
    labels: np.ndarray, masks: np.ndarray, has_mask: np.ndarray, maps: np.ndarray, max_pixels: int = 20_000_000
) -> MetricResult:
    """AUROC over pixels of images with masks; ``masks`` / ``maps`` are ``N×H×W`` (1 = defect).

    Above ``max_pixels`` the pixels are subsampled with a fixed stride (stated in the reason).
    """
    labels = np.asarray(labels)
    usable = np.asarray(has_mask, dtype=bool) & ~((labels == 1) & (masks.reshape(len(masks), -1).sum(axis=1) == 0))
    if not np.any(usable & (labels == 1)):
        return MetricResult(None, "no test anomaly has a ground-truth mask")
    truth = masks[usable].reshape(-1).astype(np.uint8)
    pred = maps[usable].reshape(-1).astype(np.float32)
    note = None
    if truth.size > max_pixels:
        stride = int(np.ceil(truth.size / max_pixels))
        truth, pred = truth[::stride], pred[::stride]
        note = f"subsampled every {stride}th pixel"
    if truth.min() == truth.max():
        return MetricResult(None, "masks have only one class of pixels")
    return MetricResult(float(roc_auc_score(truth, pred)), note)


def recall_at_threshold(labels: np.ndarray, scores: np.ndarray, threshold: float) -> MetricResult:
    labels = np.asarray(labels)
    anomalous = np.asarray(scores)[labels == 1]
    if len(anomalous) == 0:
        return MetricResult(None, "no anomalous test images")
    return MetricResult(float(np.mean(anomalous > threshold)))
