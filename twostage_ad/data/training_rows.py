"""What the stages train on: normal images, whole or as random tiles, with or without synthetic defects.

Every draw (a tile's position, whether a row gets a defect, its kind, its texture) comes from the
run's seed, the epoch and the image's index alone, so a resumed run, another process or a loader
worker cuts the same tile and draws the same defect; items are keyed ``(epoch, i)`` (or ``i``,
epoch 0) by :class:`~twostage_ad.distributed` 's epoch-aware sampler.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from twostage_ad.config import AugmentConfig
from twostage_ad.data.augment import apply_defect, build_defect_augmentation
from twostage_ad.data.images import to_tensor

__all__ = ["DefectDataset", "RandomTiles", "tile_origin"]

_TILE_STREAM = 2  # the tile position's random stream, apart from the defect's


def _key(key: int | tuple[int, int]) -> tuple[int, int]:
    return key if isinstance(key, tuple) else (0, key)


def tile_origin(shape: tuple[int, int], tile: int, seed: int, epoch: int, index: int) -> tuple[int, int]:
    """Top-left corner of the ``tile × tile`` crop of image ``index`` in ``epoch`` (``shape`` = H, W)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, epoch, index, _TILE_STREAM]))
    top = int(rng.integers(0, shape[0] - tile + 1))
    left = int(rng.integers(0, shape[1] - tile + 1))
    return top, left


def _check_tile(images: np.ndarray, tile: int) -> None:
    if tile and min(images.shape[1:3]) < tile:
        raise ValueError(f"tiles of {tile} px do not fit in images of {images.shape[1]}×{images.shape[2]}")


class RandomTiles(Dataset):
    """Training normals as random ``tile × tile`` crops; item ``(epoch, i)`` is ``(crop,)`` in [-1, 1]."""

    def __init__(self, images: np.ndarray, tile: int, seed: int):
        _check_tile(images, tile)
        self.images, self.tile, self.seed = images, tile, seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor]:
        epoch, index = _key(key)
        top, left = tile_origin(self.images.shape[1:3], self.tile, self.seed, epoch, index)
        return (to_tensor(self.images[index, top : top + self.tile, left : left + self.tile][None])[0],)


class DefectDataset(Dataset):
    """Training normals; item ``(epoch, i)`` (or ``i``) is ``(input, clean, mask, is_defect)``, tensors in [-1, 1].

    ``mask`` is ``1×H×W`` with 1 = normal, 0 = synthetic defect (all ones for clean rows). A share
    ``augment.probability`` of the rows gets one defect; its texture is another training image.

    ``tile``: crop a random ``tile × tile`` window first (the same one :class:`RandomTiles` cuts)
    and draw the defect on the crop, its texture the same window of the other image, so defect
    sizes are relative to the tile. ``stream``: 0 (stage 1's draws) or another integer, for a
    stage that should see other defects from the same seed.
    """

    def __init__(self, images: np.ndarray, augment: AugmentConfig, seed: int = 0, *, tile: int = 0, stream: int = 0):
        if images.ndim != 4 or len(images) == 0:
            raise ValueError(f"expected a non-empty N×H×W×C uint8 array, got shape {images.shape}")
        _check_tile(images, tile)
        self.images = images
        self.augment_config = augment
        self.seed, self.tile, self.stream = seed, tile, stream
        self.augmentation = build_defect_augmentation(augment, seed=seed)

    def __len__(self) -> int:
        return len(self.images)

    def _crop(self, image: np.ndarray, epoch: int, index: int) -> np.ndarray:
        if not self.tile:
            return image
        top, left = tile_origin(self.images.shape[1:3], self.tile, self.seed, epoch, index)
        return image[top : top + self.tile, left : left + self.tile]

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        epoch, index = _key(key)
        image = self._crop(self.images[index], epoch, index)
        clean = to_tensor(image[None])[0]
        entropy = np.random.SeedSequence([self.seed, epoch, index] + ([self.stream] if self.stream else []))
        rng = np.random.default_rng(entropy)
        is_defect = bool(rng.random() < self.augment_config.probability)
        if not is_defect or len(self.images) < 2:
            return clean, clean, torch.ones(1, *image.shape[:2]), torch.tensor(False)
        other = (index + 1 + int(rng.integers(0, len(self.images) - 1))) % len(self.images)  # never itself
        self.augmentation.set_random_seed(int(entropy.generate_state(1)[0]))
        defective, mask = apply_defect(self.augmentation, image, self._crop(self.images[other], epoch, index))
        return to_tensor(defective[None])[0], clean, torch.from_numpy(mask).float()[None], torch.tensor(True)
