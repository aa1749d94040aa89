"""Stage 1's screening: the deterministic per-image loss and anomaly map of a trained attention network.

Eval mode, ``torch.inference_mode``, no augmentation, one image at a time in effect (InstanceNorm,
no batch statistics), so the same image always gets the same numbers whatever batch it is in. The
screening loss is ``screen_con·L1(x̂, x) + screen_enc·L2(z, ẑ) + screen_att·att`` or, with feature
normality, the attention and feature terms in z units of the training normals (docs/design.md §2).
The estimator that trains the network and fits the statistics is in :mod:`twostage_ad.stages.attention`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from twostage_ad.config import Stage1Config, effective_tile
from twostage_ad.models.attention_net import AttentionNet, AttentionNetEnsemble
from twostage_ad.models.repair_net import RepairThenAttend
from twostage_ad.stages.feature_normality import FeatureNormality
from twostage_ad.stages.normality import PositionNormality
from twostage_ad.stages.tiling import stitch_cell_maps, tile_stride
from twostage_ad.stages.training import inference_batches

__all__ = [
    "SCREENING_COMPONENTS",
    "ScreeningResult",
    "TiledPass",
    "pixel_screening_bce",
    "screening_batch",
    "screening_loss",
    "screening_scores",
    "screening_share",
    "screening_topk",
    "tiled_maps",
    "tiled_stride",
    "uses_reconstruction",
]

SCREENING_COMPONENTS = ("stage1_recon", "stage1_latent", "stage1_att_mean", "stage1_att_topk", "stage1_feature")


@dataclass
class ScreeningResult:
    """Per-image screening loss and components (arrays of length N) and anomaly maps ``N×H×W``.

    ``anomaly_maps`` is ``1 − A``: 0 = looks normal, 1 = looks anomalous.
    """

    loss: np.ndarray
    components: dict[str, np.ndarray]
    anomaly_maps: np.ndarray
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        return len(self.loss) / self.seconds if self.seconds > 0 else float("nan")


Network = AttentionNet | AttentionNetEnsemble | RepairThenAttend


def tiled_stride(config: Stage1Config) -> int:
    """Step between stage 1's tile origins: ``tile_size·(1 − tile_overlap)`` in whole cells of the
    network's deepest level, so that every tile's feature cells, at any level, coincide with the image's."""
    return tile_stride(config.tile_size, config.tile_overlap, config.tile_size // config.bottleneck_size)


@dataclass
class TiledPass:
    """What one pass over the tiles of images ``B×C×H×W`` gives (:func:`tiled_maps`).

    ``maps``: ``B×K×H×W`` blended per pixel: the pixel BCE, ``1 − A`` and, with a feature bank and a
    map weight, the map's ``sigmoid(z)`` of the cell distances (bilinear within each tile);
    ``feature_term``: each image's largest cell distance over all its tiles (``B``, or None without a
    bank), unblended, as the bank's statistics are fitted; ``features``: per asked level, every
    tile's encoder cells side by side (``B×C×1×(tiles·cells)``), the cells the bank is fitted on.
    """

    maps: torch.Tensor
    feature_term: torch.Tensor | None
    features: dict[int, torch.Tensor]


def tiled_maps(model: Network, x: torch.Tensor, config: Stage1Config, *, bf16: bool = False,
               features: FeatureNormality | None = None, map_features: FeatureNormality | None = None,
               levels: tuple[int, ...] = (), tile_batch: int = 64) -> TiledPass:
    """Score images ``B×C×H×W`` larger than ``config.tile_size`` over overlapping tiles (origins
    :func:`tiled_stride` apart), blending the per-pixel maps with
    :func:`~twostage_ad.stages.tiling.stitch_cell_maps` (no map normalised per tile), at most
    ``max(tile_batch, B)`` tiles a forward pass. Fitting and scoring both go through here, so the
    feature bank holds cells from exactly the tile positions scoring compares."""
    batch = len(x)
    largest: list[torch.Tensor] = []  # per chunk: origins × B
    cells_by_level: dict[int, list[torch.Tensor]] = {lv: [] for lv in levels}  # per chunk: origins × B × C × h × w

    def forward(tiles: torch.Tensor) -> torch.Tensor:  # stitch_cell_maps orders a chunk's tiles origin by origin, image by image
        with torch.autocast(tiles.device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(tiles, reconstruct=False)
        channels = [pixel_screening_bce(out.attention_logits), 1.0 - torch.sigmoid(out.attention_logits.float())]
        if features is not None:
            distances = features.cell_distances(out.encoder_features[features.level])
            largest.append(distances.flatten(1).max(dim=1).values.view(-1, batch))
            if config.feature_map_weight > 0:
                map_bank = map_features or features
                if map_bank is not features:
                    distances = map_bank.cell_distances(out.encoder_features[map_bank.level])
                channels.append(F.interpolate(torch.sigmoid(map_bank.feature_z(distances))[:, None], size=tuple(tiles.shape[-2:]),
                                              mode="bilinear", align_corners=False))
        for lv in levels:
            part = out.encoder_features[lv].float()
            cells_by_level[lv].append(part.view(-1, batch, *part.shape[1:]))
        return torch.cat(channels, dim=1)

    maps = stitch_cell_maps(x, forward, tile=config.tile_size, stride=tiled_stride(config), cell=1, batch_size=tile_batch)
    gathered = {}
    for lv, parts in cells_by_level.items():
        cells = torch.cat(parts)  # tiles × B × C × h × w
        gathered[lv] = cells.permute(1, 2, 0, 3, 4).reshape(batch, cells.shape[2], 1, -1)
    return TiledPass(maps=maps, feature_term=torch.cat(largest).amax(dim=0) if largest else None, features=gathered)


def screening_share(config: Stage1Config, height: int, width: int) -> float:
    """The share of an ``H×W`` map's pixels the attention term averages: ``screen_topk`` of the image,
    or, over tiles, ``screen_topk`` of one tile's area, so that a small defect weighs in the score as
    much at any decode size as it does in the tile the network saw."""
    height, width = int(height), int(width)  # ints also when traced
    if effective_tile(config.tile_size, max(height, width)):
        return config.screen_topk * min(1.0, config.tile_size**2 / (height * width))
    return config.screen_topk


def _tiled_screening(
    model: Network, x: torch.Tensor, config: Stage1Config, *, bf16: bool, positions: PositionNormality | None,
    features: FeatureNormality | None, map_features: FeatureNormality | None, tile_batch: int,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """:func:`screening_batch` over tiles: the same components and map, from the blended maps and
    the largest cell distance of any tile."""
    scored = tiled_maps(model, x, config, bf16=bf16, features=features, map_features=map_features, tile_batch=tile_batch)
    maps = scored.maps
    pixel_bce, anomaly = maps[:, :1], maps[:, 1]
    screened = pixel_bce if positions is None else positions.apply(pixel_bce, config.position_normality)
    nan = torch.full((x.shape[0],), float("nan"), device=x.device)
    components = {"stage1_recon": nan, "stage1_latent": nan, "stage1_att_mean": pixel_bce.mean(dim=(1, 2, 3)),
                  "stage1_att_topk": screening_topk(screened, screening_share(config, *x.shape[-2:])), "stage1_feature": nan}
    if features is not None:
        components["stage1_feature"] = scored.feature_term
        if config.feature_map_weight > 0:
            anomaly = (1.0 - config.feature_map_weight) * anomaly + config.feature_map_weight * maps[:, 2]
    return components, anomaly


def screening_batch(
    model: Network, x: torch.Tensor, config: Stage1Config, *, bf16: bool = False,
    positions: PositionNormality | None = None, features: FeatureNormality | None = None,
    map_features: FeatureNormality | None = None, tile_batch: int = 64,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Screening components (each ``B``) and the anomaly map ``1 − A`` (``B×H×W``) of a batch ``x``.

    x̂ and ẑ are computed only when a screening weight uses them; otherwise ``stage1_recon`` and
    ``stage1_latent`` are NaN (not computed), and the screening loss leaves them out. With
    ``bf16`` the network runs under bf16 autocast, everything after it in float32; without it,
    autocast is switched off for the network even inside a caller's autocast region. With
    ``positions`` the attention term is taken over the pixel BCE standardised position by
    position (:class:`~twostage_ad.stages.normality.PositionNormality`); the map stays ``1 − A``.
    With ``features`` the feature term (``stage1_feature``, the largest distance of a cell's encoder
    features to the training normals' bank) is computed, otherwise it is NaN, and the map becomes
    ``(1 − w)·(1 − A) + w·sigmoid(z)`` with ``w = feature_map_weight`` and ``z`` each cell's distance
    in z units of the training normals, upsampled bilinearly; the cells are ``map_features``' (a bank
    at ``feature_map_stride``'s level) when given, else ``features``'.

    Images larger than ``config.tile_size`` (when set) are scored over overlapping tiles (at most
    ``tile_batch`` a forward pass) whose maps are blended into one map of the image; the attention
    terms are taken from the blended BCE, the feature term is the largest cell distance of any tile.
    """
    if effective_tile(config.tile_size, x.shape[-1]):
        return _tiled_screening(model, x, config, bf16=bf16, positions=positions, features=features, map_features=map_features,
                                tile_batch=tile_batch)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        out = model(x, reconstruct=uses_reconstruction(config))
    nan = torch.full((x.shape[0],), float("nan"), device=x.device)
    recon = nan if out.reconstruction is None else (out.reconstruction.float() - x).abs().mean(dim=(1, 2, 3))
    latent = nan if out.latent_reconstructed is None else (
        (out.latent.float() - out.latent_reconstructed.float()).pow(2).mean(dim=(1, 2, 3)))
    pixel_bce = pixel_screening_bce(out.attention_logits)
    screened = pixel_bce if positions is None else positions.apply(pixel_bce, config.position_normality)
    components = {
        "stage1_recon": recon,
        "stage1_latent": latent,
        "stage1_att_mean": pixel_bce.mean(dim=(1, 2, 3)),
        "stage1_att_topk": screening_topk(screened, config.screen_topk),
        "stage1_feature": nan,
    }
    anomaly = 1.0 - torch.sigmoid(out.attention_logits.float())[:, 0]
    if features is not None:
        cells = features.cell_distances(out.encoder_features[features.level])  # B×h×w
        components["stage1_feature"] = cells.flatten(1).max(dim=1).values
        if config.feature_map_weight > 0:
            map_bank = map_features or features
            if map_bank is not features:  # the map's cells come from another level
                cells = map_bank.cell_distances(out.encoder_features[map_bank.level])
            cell_map = torch.sigmoid(map_bank.feature_z(cells))[:, None]
            cell_map = F.interpolate(cell_map, size=tuple(anomaly.shape[-2:]), mode="bilinear", align_corners=False)[:, 0]
            anomaly = (1.0 - config.feature_map_weight) * anomaly + config.feature_map_weight * cell_map
    return components, anomaly


def pixel_screening_bce(attention_logits: torch.Tensor) -> torch.Tensor:
    """``B×1×H×W`` attention logits -> per-pixel BCE against "normal" (1), float32: ``softplus(−logit)``."""
    return F.softplus(-attention_logits.float())


def screening_topk(pixel_bce: torch.Tensor, share: float) -> torch.Tensor:
    """The attention term of the screening loss: ``B×1×H×W`` per-pixel BCE against "normal" -> ``B``.

    A 3×3 mean blur, then the mean of the ``share`` most anomalous pixels, so that a small defect
    is not diluted by a large normal part. Public so that analyses re-score saved maps exactly.
    """
    smoothed = F.avg_pool2d(pixel_bce, kernel_size=3, stride=1, padding=1, count_include_pad=False)
    k = max(1, int(round(share * math.prod(int(d) for d in smoothed.shape[1:]))))  # ints also when traced
    return smoothed.flatten(1).topk(k, dim=1).values.mean(dim=1)


def uses_reconstruction(config: Stage1Config, *, training: bool = False) -> bool:
    """Whether screening (or, with ``training``, the training loss) needs x̂ and ẑ."""
    if training:
        return any(w > 0 for w in (config.w_con, config.w_rep, config.w_enc, config.w_adv))
    return config.screen_con != 0 or config.screen_enc != 0


def screening_loss(components: dict[str, Any], config: Stage1Config, features: FeatureNormality | None = None) -> Any:
    """``screen_con·recon + screen_enc·latent + screen_att·att_topk`` (documented weights; terms
    with weight 0 are left out, so a component that was not computed does not turn it NaN). With
    ``screen_feature > 0`` the attention and feature terms enter in z units of the training normals
    instead, ``screen_att·z(att_topk) + screen_feature·z(feature)`` (``features`` holds the statistics).

    Works on numpy arrays and on torch tensors (the exported scorer uses it too).
    """
    terms = [(config.screen_con, "stage1_recon"), (config.screen_enc, "stage1_latent"), (config.screen_att, "stage1_att_topk")]
    total = components["stage1_att_topk"] * 0
    if config.screen_feature > 0:
        if features is None:
            raise ValueError("stage1.screen_feature > 0 needs the training normals' feature statistics (FeatureNormality)")
        total = total + features.combined(components["stage1_att_topk"], components["stage1_feature"], config.screen_att,
                                          config.screen_feature)
        terms = terms[:2]
    for weight, name in terms:
        if weight != 0:
            total = total + weight * components[name]
    return total


def screening_scores(
    model: Network,
    images: np.ndarray,
    config: Stage1Config,
    device: torch.device,
    *,
    batch_size: int = 64,
    bf16: bool = False,
    positions: PositionNormality | None = None,
    features: FeatureNormality | None = None,
    map_features: FeatureNormality | None = None,
    progress: bool = True,
    desc: str = "stage 1 score",
) -> ScreeningResult:
    """Score uint8 ``N×H×W×C`` images: deterministic eval-mode screening loss, components, maps."""
    model.eval()
    parts: dict[str, list[np.ndarray]] = {name: [] for name in SCREENING_COMPONENTS}
    maps: list[np.ndarray] = []
    start = time.perf_counter()
    with torch.inference_mode():
        for x, _ in inference_batches(images, batch_size, device, progress=progress, desc=desc):
            components, anomaly = screening_batch(model, x, config, bf16=bf16, positions=positions, features=features,
                                                  map_features=map_features, tile_batch=batch_size)
            for name, value in components.items():
                parts[name].append(value.cpu().numpy())
            maps.append(anomaly.cpu().numpy())
    seconds = time.perf_counter() - start
    size = images.shape[1]
    components = {k: np.concatenate(v) if v else np.zeros(0, np.float32) for k, v in parts.items()}
    return ScreeningResult(
        loss=screening_loss(components, config, features),
        components=components,
        anomaly_maps=np.concatenate(maps) if maps else np.zeros((0, size, size), np.float32),
        seconds=seconds,
    )
