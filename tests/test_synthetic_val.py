"""The synthetic-defect validation score: settings are chosen by it, never by test labels."""

import numpy as np
import pytest

from twostage_ad.calibration import Threshold
from twostage_ad.cascade import Cascade, MapFusion
from twostage_ad.config import AugmentConfig
from twostage_ad.data.augment import HELD_OUT_KINDS, build_defect_augmentation, held_out_defect, synthetic_defects
from twostage_ad.detector import CascadeScores
from twostage_ad.evaluate import synthetic_validation_metrics
from twostage_ad.stages.attention import ScreeningResult
from twostage_ad.stages.patch_scorer import PatchScoreResult

from conftest import textured


@pytest.fixture
def normals():
    rng = np.random.default_rng(0)
    return np.stack([textured(rng, size=32)[..., None] for _ in range(12)])


def test_each_normal_gets_one_visible_defect_kind_by_kind_reproducibly(normals):
    images, masks, kinds = synthetic_defects(normals, AugmentConfig(), seed=3)
    again, masks_again, _ = synthetic_defects(normals, AugmentConfig(), seed=3)
    assert images.shape[1:] == normals.shape[1:] and masks.shape == (len(images), 32, 32) and masks.dtype == np.uint8
    np.testing.assert_array_equal(images, again)
    np.testing.assert_array_equal(masks, masks_again)
    assert set(np.unique(masks)) <= {0, 1} and masks.reshape(len(masks), -1).max(axis=1).min() == 1  # 1 = defect, never empty
    order = [*AugmentConfig().kinds, *HELD_OUT_KINDS]  # the training kinds, then kinds training never draws
    assert len(kinds) >= 10 and set(kinds) == set(order)
    assert all(kinds.index(k) <= order.index(k) for k in set(kinds))  # in turn (a skipped invisible one shifts them)
    changed = np.abs(images.astype(int) - normals[: len(images)].astype(int)).sum(axis=(1, 2, 3))
    assert (changed > 0).all()
    other_seed, _, _ = synthetic_defects(normals, AugmentConfig(), seed=4)
    assert not np.array_equal(images, other_seed)


def test_validation_defects_are_drawn_apart_from_training(normals):
    """Training's augmentation with the run's seed never draws the validation defects."""
    config = AugmentConfig(kinds=["blob"])
    training = build_defect_augmentation(config, seed=3)
    trained_on = training(image=normals[0], mask=np.ones((32, 32), np.uint8), texture=normals[1])["image"]
    validation, _, _ = synthetic_defects(normals[:2], config, seed=3)
    assert not np.array_equal(trained_on, validation[0])


@pytest.mark.parametrize("kind", HELD_OUT_KINDS)
def test_held_out_kinds_change_only_what_their_mask_marks(normals, kind):
    rng = np.random.default_rng(5)
    for image in normals[:4]:
        defective, mask = held_out_defect(kind, image, rng)
        change = np.abs(defective.astype(int) - image.astype(int))[..., 0]
        assert (mask == 0).any() and defective.dtype == np.uint8
        assert change[mask == 1].max() < 3 and change[mask == 0].min() >= 3  # mask = the visibly changed pixels
    with pytest.raises(ValueError, match="kind must be one of"):
        held_out_defect("smudge", normals[0], rng)


def test_too_few_images_are_refused():
    with pytest.raises(ValueError, match="at least 2 images"):
        synthetic_defects(np.zeros((1, 32, 32, 1), np.uint8), AugmentConfig())


def _scores(loss, stage2, maps, maps2=None):
    loss = np.asarray(loss, float)
    maps2 = np.zeros_like(maps, np.float32) if maps2 is None else np.asarray(maps2, np.float32)
    return CascadeScores(ScreeningResult(loss, {}, np.asarray(maps, np.float32)),
                         PatchScoreResult(np.asarray(stage2, float), maps2), np.ones(len(loss), bool))


def test_synthetic_validation_metrics_hand_computed():
    # validation: normals with stage-1 losses 1, 2, 3 and one labelled anomaly (left out: only normals count)
    flat = np.zeros((4, 2, 2))
    validation = _scores([1.0, 2.0, 3.0, 9.0], [0.0, 0.0, 0.0, 0.0], flat)
    labels = np.array([0, 0, 0, 1])
    # synthetic copies of the 3 normals: losses 2.5 (cutout), 4 (crack), 0.5 (crack)
    maps = np.zeros((3, 2, 2))
    maps[:, 0, 0] = 1.0  # every defect pixel scores above every normal pixel
    masks = np.zeros((3, 2, 2), np.uint8)
    masks[:, 0, 0] = 1
    maps2 = np.zeros((3, 2, 2))
    maps2[:, 1, 1] = 2.0  # stage 2 marks a defect-free pixel of each defective copy
    synthetic = _scores([2.5, 4.0, 0.5], [1.0, 1.0, 1.0], maps, maps2)
    cascade = Cascade(stage1=Threshold("quantile", {"q": 0.9}, 2.0, {}), stage2=Threshold("quantile", {"q": 0.9}, 0.5, {}),
                      fusion="stage2", stage1_mean=2.0, stage1_std=1.0, stage2_mean=0.0, stage2_std=1.0, second_std=1.0)
    fusion = MapFusion(stage1_mean=0.0, stage1_std=1.0, stage2_weight=5.0)  # fused: defect pixels 1, the marked ones 10
    out = synthetic_validation_metrics(validation, labels, synthetic, masks, ["cutout", "crack", "crack"], cascade, fusion)
    assert out["images"] == 3
    # stage 1: pairs (defect > normal) of 2.5 > {1,2}, 4 > {1,2,3}, 0.5 > {} = 5 of 9
    assert out["image_auroc"]["stage1"] == pytest.approx(5 / 9)
    assert out["image_auroc"]["stage2"] == pytest.approx(1.0)
    # 3 defect pixels against 21 defect-free ones (12 of the 3 normals, 9 of the copies; 3 of those marked by stage 2)
    assert out["pixel_auroc"]["stage1"] == pytest.approx(1.0) and out["pro"]["stage1"] == pytest.approx(1.0)
    assert out["pixel_auroc"]["stage2"] == pytest.approx(18 * 0.5 / 21)  # defects at 0: ties with 18, below 3
    assert out["pixel_auroc"]["fused"] == pytest.approx(18 / 21)  # defects at 1: above 18 zeros, below 3 tens
    # PRO to FPR 0.3 (3 one-pixel regions): stage 2 reaches its defects only with every pixel, at FPR 1
    # (PRO(0.3) = (0.3 − 1/7)/(6/7)); fused reaches them all at FPR 1/7 (the 3 tens first)
    assert out["pro"]["stage2"] == pytest.approx(0.5 * (0.3 - 1 / 7) * (0.3 - 1 / 7) / (6 / 7) / 0.3)  # 121/2520
    assert out["pro"]["fused"] == pytest.approx((0.3 - 1 / 7) / 0.3)  # 11/21
    assert out["image_auroc_stage1_by_kind"] == {"cutout": pytest.approx(2 / 3), "crack": pytest.approx(3 / 6)}
    assert out["stage1_recall_at_threshold"] == pytest.approx(2 / 3)  # 2.5 and 4 exceed τ₁ = 2
    assert out["image_auroc_stage1_held_out_kinds"] is None  # no held-out kind among them: one class only
    held = synthetic_validation_metrics(validation, labels, synthetic, masks, ["cutout", "scratch", "stain"], cascade, fusion)
    assert held["image_auroc_stage1_held_out_kinds"] == pytest.approx(3 / 6)  # 4 > {1,2,3}, 0.5 > {}
    assert held["image_auroc_stage2_held_out_kinds"] == pytest.approx(1.0)  # stage 2: every defect 1 > every normal 0
    assert held["image_auroc_stage2_by_kind"] == {"cutout": pytest.approx(1.0), "scratch": pytest.approx(1.0),
                                                  "stain": pytest.approx(1.0)}
    assert 0.0 <= out["image_auroc"]["cascade"] <= 1.0
