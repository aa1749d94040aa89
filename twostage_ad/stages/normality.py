"""Position-aware normality: what normal images show at each position does not count as anomalous.

Many inspection images share a fixed structure at fixed places — dark cut corners, borders,
printed lines, fixtures. Stage 1's attention head may fire there on every image, normal or not
(it was taught that dark or sharp patches are defects), and then the screening's top-k mean
ranks normals and anomalies alike. :class:`PositionNormality` holds, for each pixel position,
the mean and standard deviation of the per-pixel screening BCE over the training normals (eval
mode, after training), and the screening compares each pixel with them before its blur and
top-k mean (docs/design.md §2, stage 1), by ``stage1.position_normality``::

    mean (default):  bce[y, x] − mean[y, x]
    standardise:     (bce[y, x] − mean[y, x]) / (std[y, x] + POSITION_STD_FLOOR)

A position that fires on every normal image then scores about 0; a position where normals are
quiet keeps its full weight (``standardise`` multiplies it by up to 1 / floor, which is noise
when few training images estimate the spread; the floor keeps std ≈ 0 from exploding it). Fitted on the *training* normals, so that the
validation normals that calibrate τ₁ stay unseen by both the network and these statistics.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["POSITION_MODES", "POSITION_STD_FLOOR", "PositionNormality"]

POSITION_STD_FLOOR = 0.1  # in BCE units (nats): a quiet position's z is its BCE times 10 at most
POSITION_MODES = ("none", "mean", "standardise")  # stage1.position_normality


@dataclass
class PositionNormality:
    """Per-position mean and standard deviation (each ``H×W``, float32) of normal images' pixel BCE."""

    mean: torch.Tensor
    std: torch.Tensor
    count: int

    def __post_init__(self) -> None:
        if self.mean.ndim != 2 or self.mean.shape != self.std.shape:
            raise ValueError(f"mean and std must be matching H×W maps, got {tuple(self.mean.shape)} and {tuple(self.std.shape)}")
        if self.count < 1:
            raise ValueError(f"position statistics need at least one normal image, got count {self.count}")

    @classmethod
    def from_maps(cls, batches: Iterable[torch.Tensor]) -> PositionNormality:
        """Fit from per-pixel BCE maps of normal images, given in batches ``B×1×H×W`` (or ``B×H×W``).

        Sums are accumulated in float64, so the result does not depend on how the images are batched.
        """
        total = squares = None
        count = 0
        for batch in batches:
            values = batch.detach().double().reshape(batch.shape[0], *batch.shape[-2:])
            batch_sum, batch_squares = values.sum(dim=0), values.pow(2).sum(dim=0)
            total = batch_sum if total is None else total + batch_sum
            squares = batch_squares if squares is None else squares + batch_squares
            count += values.shape[0]
        if total is None or squares is None:
            raise ValueError("position statistics need at least one normal image, got none")
        return cls.from_sums(total, squares, count)

    @classmethod
    def from_sums(cls, total: torch.Tensor, squares: torch.Tensor, count: int) -> PositionNormality:
        """From per-position sums of BCE and of BCE² over ``count`` images (e.g. summed over ranks)."""
        mean = total / count
        variance = (squares / count - mean.pow(2)).clamp_min(0.0)
        return cls(mean=mean.float().cpu(), std=variance.sqrt().float().cpu(), count=int(count))

    def standardise(self, pixel_bce: torch.Tensor) -> torch.Tensor:
        """``B×1×H×W`` per-pixel BCE -> the same shape in z units of this position's normals."""
        std = self.std.to(pixel_bce.device, pixel_bce.dtype)
        return self.subtract_mean(pixel_bce) / (std + POSITION_STD_FLOOR)

    def subtract_mean(self, pixel_bce: torch.Tensor) -> torch.Tensor:
        """``B×1×H×W`` per-pixel BCE minus this position's normal mean (never amplifies a quiet position)."""
        if tuple(pixel_bce.shape[-2:]) != tuple(self.mean.shape):
            raise ValueError(f"maps of {tuple(pixel_bce.shape[-2:])} px do not match the position statistics' {tuple(self.mean.shape)}")
        return pixel_bce - self.mean.to(pixel_bce.device, pixel_bce.dtype)

    def apply(self, pixel_bce: torch.Tensor, mode: str) -> torch.Tensor:
        """The screening's view of ``pixel_bce`` under ``stage1.position_normality`` (:data:`POSITION_MODES`)."""
        if mode == "mean":
            return self.subtract_mean(pixel_bce)
        if mode == "standardise":
            return self.standardise(pixel_bce)
        if mode == "none":
            return pixel_bce
        raise ValueError(f"position normality mode must be one of {POSITION_MODES}, got {mode!r}")

    def to_payload(self) -> dict[str, Any]:
        """Plain tensors and ints for a checkpoint (loads with ``weights_only=True``)."""
        return {"mean": self.mean.clone(), "std": self.std.clone(), "count": self.count}

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> PositionNormality:
        return cls(mean=payload["mean"].float(), std=payload["std"].float(), count=int(payload["count"]))
