"""Feature normality: how far each cell of an image is from everything the training normals showed.

The attention head answers "does this look like a synthetic defect?"; a real defect that looks
like none of them passes. :class:`FeatureNormality` adds the one-class question, "has a normal
image ever looked like this?": stage 1's own encoder features at one level (``feature_stride``
pixels per cell; 32 by default, the 4×4 level at 128 px) of every training normal go into a
memory bank, and a cell's score is the Euclidean distance to its nearest bank row; an image's is
its largest cell score (docs/design.md §2, stage 1).

After PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR
2022), deviating where this package must: the features are stage 1's, trained from scratch on
normals and synthetic defects (no pretrained network can be downloaded); one level, no
neighbourhood pooling and k = 1 (each chosen on the synthetic validation score,
docs/experiments.md); the bank is a greedy k-centre coreset of at most ``feature_bank_size``
rows, so scoring costs the same for any training-set size.

To add this term to the attention term, both are put in z units of the training normals: the
attention term by its mean and std over the training images, the feature term by its mean and
std over the training images each scored against the bank *without its own rows* (an image's
own cells are at distance 0 otherwise).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["STD_FLOOR", "FeatureNormality", "feature_level", "greedy_coreset", "nearest_distances"]

STD_FLOOR = 1e-6  # a term whose training normals never vary is not divided by zero
POOL_PER_BANK_ROW = 16  # the coreset is drawn from at most this many times its size of cells (random subsample first)


def feature_level(image_size: int, bottleneck_size: int, stride: int) -> int:
    """Index into the encoder's feature list for ``stride`` px per cell (level ``i`` has stride
    ``2^(i+1)``), or the bottleneck's when the image is too small for that stride."""
    deepest = int(round(math.log2(image_size / bottleneck_size))) - 1
    return min(int(round(math.log2(stride))) - 1, deepest)


def nearest_distances(queries: torch.Tensor, bank: torch.Tensor, *, exclude: torch.Tensor | None = None,
                      owners: torch.Tensor | None = None, chunk: int = 1024) -> torch.Tensor:
    """``Q×C`` queries, ``M×C`` bank -> ``Q`` Euclidean distances to the nearest bank row (float32).

    ``exclude`` (``Q`` ints) with ``owners`` (``M`` ints): a query never matches a bank row of its
    own owner (leave-one-image-out). The nearest row is found by minimising ``|b|² − 2 q·b`` (one
    ``addmm``), in chunks of ``chunk`` queries, so memory stays ``chunk × M`` (twice as fast as
    ``chunk = Q`` at 4096 × 4096 × 128, measured); its distance is then computed directly as
    ``|q − b|``, since the expanded form loses the small distances to cancellation, and by an amount
    that depends on the matrix product's blocking (the batch).
    """
    queries, bank = queries.float(), bank.float()
    bank_sq, bank_t = bank.pow(2).sum(dim=1), bank.T
    out = []
    for start in range(0, queries.shape[0], chunk):
        q = queries[start:start + chunk]
        partial = torch.addmm(bank_sq, q, bank_t, alpha=-2.0)  # |b|² − 2 q·b, chunk × M
        if exclude is not None and owners is not None:
            partial = partial.masked_fill(exclude[start:start + chunk, None] == owners[None, :], float("inf"))
        best, index = partial.min(dim=1)
        distance = (q - bank[index]).pow(2).sum(dim=1).sqrt()
        out.append(distance.masked_fill(torch.isinf(best), float("inf")))  # every row excluded: no neighbour
    return torch.cat(out) if out else queries.new_zeros(0)


def greedy_coreset(features: torch.Tensor, size: int, *, seed: int = 0) -> torch.Tensor:
    """Indices of ``size`` rows of ``N×C`` ``features`` chosen by greedy k-centre (PatchCore's coreset):
    each new row is the one farthest from all chosen so far, so no normal cell is left far from the
    bank. The first row is drawn with ``seed``. All rows when ``size >= N``."""
    n = features.shape[0]
    if size >= n:
        return torch.arange(n)
    features = features.float()
    generator = torch.Generator().manual_seed(seed)
    chosen = [int(torch.randint(n, (1,), generator=generator))]
    nearest = (features - features[chosen[0]]).pow(2).sum(dim=1)
    for _ in range(size - 1):
        index = int(nearest.argmax())
        chosen.append(index)
        nearest = torch.minimum(nearest, (features - features[index]).pow(2).sum(dim=1))
    return torch.tensor(chosen)


@dataclass
class FeatureNormality:
    """A memory bank of normal features and the training normals' spread of both screening terms.

    ``bank``: ``M×C`` float32 (at most ``bank_size`` rows); ``level``: the encoder level it was taken
    from; ``count``: training images; ``feature_mean`` / ``feature_std``: the image score (max cell distance) of the training
    images, each left out of the bank; ``attention_mean`` / ``attention_std``: their attention term.
    """

    bank: torch.Tensor
    level: int
    bank_size: int
    count: int
    feature_mean: float
    feature_std: float
    attention_mean: float
    attention_std: float

    def __post_init__(self) -> None:
        if self.bank.ndim != 2 or self.bank.shape[0] < 1:
            raise ValueError(f"the feature bank must be M×C with M >= 1, got shape {tuple(self.bank.shape)}")
        if self.count < 2:
            raise ValueError(f"feature normality needs at least 2 training images (one left out at a time), got {self.count}")

    @classmethod
    def fit(cls, features: torch.Tensor, attention_terms: torch.Tensor, *, level: int, bank_size: int,
            seed: int = 0) -> FeatureNormality:
        """From the training normals' encoder features ``N×C×h×w`` (one level) and attention terms ``N``."""
        n, c = features.shape[:2]
        if n < 2:
            raise ValueError(f"feature normality needs at least 2 training images (one left out at a time), got {n}")
        if bank_size < 1:
            raise ValueError(f"feature_bank_size must be >= 1, got {bank_size!r}")
        cells = features.float().permute(0, 2, 3, 1).reshape(-1, c)
        owners = torch.arange(n).repeat_interleave(features.shape[2] * features.shape[3])
        pool_size = bank_size * POOL_PER_BANK_ROW
        if cells.shape[0] > pool_size:  # bound the coreset's cost on large training sets
            pool = torch.randperm(cells.shape[0], generator=torch.Generator().manual_seed(seed))[:pool_size]
            cells, owners = cells[pool], owners[pool]
        keep = greedy_coreset(cells, bank_size, seed=seed)
        bank, bank_owners = cells[keep].contiguous(), owners[keep]
        queries = features.float().permute(0, 2, 3, 1).reshape(n, -1, c)
        left_out = torch.stack([
            nearest_distances(queries[i], bank, exclude=torch.full((queries.shape[1],), i), owners=bank_owners).max()
            for i in range(n)
        ])
        left_out = left_out[torch.isfinite(left_out)]  # an image that owns every bank row has no neighbour
        if left_out.numel() < 2:
            raise ValueError("feature normality: fewer than 2 training images have a neighbour outside themselves in the bank; "
                             f"raise feature_bank_size (got {bank_size!r})")
        attention_terms = attention_terms.double()
        return cls(bank=bank, level=level, bank_size=bank_size, count=n, feature_mean=float(left_out.mean()),
                   feature_std=float(left_out.std()), attention_mean=float(attention_terms.mean()),
                   attention_std=float(attention_terms.std()))

    def cell_distances(self, features: torch.Tensor) -> torch.Tensor:
        """``B×C×h×w`` encoder features -> ``B×h×w`` distances to the nearest normal cell."""
        b, c, h, w = features.shape
        if c != self.bank.shape[1]:
            raise ValueError(f"features have {c} channels, the bank {self.bank.shape[1]}")
        bank = self.bank.to(features.device)
        return nearest_distances(features.float().permute(0, 2, 3, 1).reshape(-1, c), bank).reshape(b, h, w)

    def image_scores(self, features: torch.Tensor) -> torch.Tensor:
        """``B×C×h×w`` -> ``B``: each image's largest cell distance (the feature term, raw)."""
        return self.cell_distances(features).flatten(1).max(dim=1).values

    def feature_z(self, distance: Any) -> Any:
        """A distance (an image's or a cell's) in z units of the training normals' image scores."""
        return (distance - self.feature_mean) / max(self.feature_std, STD_FLOOR)

    def combined(self, attention_term: Any, feature_term: Any, attention_weight: float, feature_weight: float) -> Any:
        """``attention_weight·z_att + feature_weight·z_feat`` in z units of the training normals
        (numpy arrays or tensors)."""
        z_att = (attention_term - self.attention_mean) / max(self.attention_std, STD_FLOOR)
        return attention_weight * z_att + feature_weight * self.feature_z(feature_term)

    def to_payload(self) -> dict[str, Any]:
        """Plain tensors and numbers for a checkpoint (loads with ``weights_only=True``)."""
        return {"bank": self.bank.clone(), "level": self.level, "bank_size": self.bank_size, "count": self.count, "feature_mean": self.feature_mean,
                "feature_std": self.feature_std, "attention_mean": self.attention_mean, "attention_std": self.attention_std}

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> FeatureNormality:
        return cls(bank=payload["bank"].float(), level=int(payload["level"]), bank_size=int(payload["bank_size"]),
                   count=int(payload["count"]),
                   **{k: float(payload[k]) for k in ("feature_mean", "feature_std", "attention_mean", "attention_std")})
