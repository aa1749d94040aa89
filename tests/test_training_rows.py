"""Training rows: random tiles and synthetic-defect rows drawn from (seed, epoch, image) alone."""

import numpy as np
import pytest
import torch

from twostage_ad.config import AugmentConfig
from twostage_ad.data.training_rows import DefectDataset, RandomTiles

from conftest import textured


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.stack([textured(rng, size=64)[..., None] for _ in range(6)])


def _defect_rows(dataset: DefectDataset, epochs: range) -> list[tuple[torch.Tensor, ...]]:
    return [dataset[(e, i)] for e in epochs for i in range(len(dataset)) if bool(dataset[(e, i)][3])]


def test_tiled_defect_rows_cut_the_random_tile_and_draw_the_defect_inside_it(images):
    augment = AugmentConfig(probability=0.9)
    rows = DefectDataset(images, augment, seed=3, tile=32)
    tiles = RandomTiles(images, 32, seed=3)
    for epoch, index in ((0, 0), (2, 4), (5, 1)):
        defective, clean, mask, _ = rows[(epoch, index)]
        assert defective.shape == clean.shape == mask.shape == (1, 32, 32)
        assert torch.equal(clean, tiles[(epoch, index)][0])  # the same window as stage 2's plain tiles
    found = _defect_rows(rows, range(4))
    assert len(found) > 10
    for defective, clean, mask, _ in found:
        outside = mask[0] > 0.5
        # the image changes (visibly) only where the mask says defect
        assert (defective[0][outside] - clean[0][outside]).abs().max() <= 8 / 127.5
    assert sum(float((m < 0.5).float().mean()) for _, _, m, _ in found) > 0  # and the masks are not empty


def test_defect_rows_repeat_for_the_same_key_and_differ_by_stream(images):
    augment = AugmentConfig(probability=0.9)
    first, again = DefectDataset(images, augment, seed=1), DefectDataset(images, augment, seed=1)
    other = DefectDataset(images, augment, seed=1, stream=2)
    for key in ((0, 2), (3, 5)):
        assert all(torch.equal(a, b) for a, b in zip(first[key], again[key]))
    assert any(not torch.equal(first[(e, i)][0], other[(e, i)][0]) for e in range(3) for i in range(6))


def test_defect_rows_refuse_tiles_larger_than_the_images(images):
    with pytest.raises(ValueError, match="tiles of 96 px do not fit in images of 64×64"):
        DefectDataset(images, AugmentConfig(), tile=96)
    with pytest.raises(ValueError, match="non-empty"):
        DefectDataset(images[:0], AugmentConfig())
