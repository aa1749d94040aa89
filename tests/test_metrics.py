import numpy as np
import pytest

from twostage_ad.metrics import image_auroc, image_auroc_by_category, pixel_auroc, pixel_auroc_by_category, pro_score, recall_at_threshold


def test_image_auroc_hand_computed():
    # pairs (anomaly, normal): 0.8>0.1, 0.8>0.4, 0.35>0.1, 0.35<0.4 -> 3/4
    assert image_auroc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])).value == pytest.approx(0.75)


def test_single_class_gives_none_with_a_reason_not_nan():
    result = image_auroc(np.array([0, 0]), np.array([0.1, 0.2]))
    assert result.value is None and "only one class" in result.reason


def test_pixel_auroc_skips_anomalies_with_empty_masks_and_unmasked_images():
    masks = np.zeros((3, 2, 2), np.uint8)
    masks[0, 0, 0] = 1
    maps = np.array([[[0.9, 0.1], [0.2, 0.3]], [[0.0, 0.0], [0.0, 0.0]], [[0.1, 0.1], [0.1, 0.1]]])
    labels = np.array([1, 1, 0])
    # image 1 is anomalous with an empty mask: dropped (its zeros would otherwise tie)
    result = pixel_auroc(labels, masks, np.array([True, True, True]), maps)
    assert result.value == pytest.approx(1.0)
    assert pixel_auroc(labels, masks, np.array([False, False, True]), maps).value is None


def test_recall_at_threshold_is_strictly_greater():
    assert recall_at_threshold(np.array([1, 1, 0]), np.array([0.5, 0.7, 0.9]), 0.5).value == 0.5


def _pro_case():
    """Two 1×4 images. A: region R1 = pixels 0-1; B: region R2 = pixel 3; 5 defect-free pixels."""
    masks = np.array([[[1, 1, 0, 0]], [[0, 0, 0, 1]]], np.uint8)
    maps = np.array([[[0.9, 0.4, 0.5, 0.1]], [[0.2, 0.3, 0.6, 0.8]]])
    return np.array([1, 1]), masks, np.array([True, True]), maps


def test_pro_hand_computed():
    # descending thresholds give (FPR, PRO): (0, .25) R1 half, (0, .75) R2 whole, (.2, .75),
    # (.4, .75), (.4, 1.0) R1 whole, (.6, 1.0) ... Each region weighs 1/2 whatever its size.
    # up to FPR .3: PRO is .75 over [0, .3] -> area .225, normalised .75
    assert pro_score(*_pro_case(), max_fpr=0.3).value == pytest.approx(0.75)
    # up to FPR .5: .75 over [0, .4] + 1.0 over [.4, .5] = .4, normalised .8
    assert pro_score(*_pro_case(), max_fpr=0.5).value == pytest.approx(0.8)


def test_pro_perfect_map_is_one_and_regions_count_equally():
    labels, masks, has_mask, _ = _pro_case()
    assert pro_score(labels, masks, has_mask, masks.astype(float)).value == pytest.approx(1.0)
    # a map that finds only the 1-pixel region R2 (R1 below every defect-free pixel) scores 0.5,
    # however large R1 is
    only_r2 = np.where(masks > 0, 0.0, 0.5)
    only_r2[1, 0, 3] = 1.0
    assert pro_score(labels, masks, has_mask, only_r2).value == pytest.approx(0.5)


def test_pro_joins_diagonal_pixels_into_one_region():
    masks = np.zeros((1, 4, 4), np.uint8)
    masks[0, [0, 1], [0, 1]] = 1  # a diagonal pair: one region with 8-connectivity, two with 4
    masks[0, [1, 2], [3, 3]] = 1  # a vertical pair: one region either way
    maps = np.where(masks > 0, 0.1, 0.5)
    maps[0, 0, 0] = 0.9  # the only pixel found before the first false positive
    # 8-connectivity: half of one of two regions = 0.25 (4-connectivity would give 1/3)
    assert pro_score(np.array([1]), masks, np.array([True]), maps, max_fpr=0.3).value == pytest.approx(0.25)


def test_pro_hand_computed_holds_when_streamed_at_thresholds():
    # past max_pixels the images are streamed; with every distinct map value among the
    # thresholds the curve is the exact one, so the hand-computed values hold
    result = pro_score(*_pro_case(), max_fpr=0.5, max_pixels=4)
    assert result.value == pytest.approx(0.8) and "streamed per image" in result.reason
    assert pro_score(*_pro_case(), max_fpr=0.3, max_pixels=4).value == pytest.approx(0.75)
    labels, masks, has_mask, _ = _pro_case()
    assert pro_score(labels, masks, has_mask, masks.astype(float), max_pixels=4).value == pytest.approx(1.0)


def test_pro_streamed_on_many_pixels_agrees_with_the_exact_curve():
    rng = np.random.default_rng(0)
    masks = np.zeros((40, 48, 48), np.uint8)
    for mask in masks[:25]:  # 25 anomalous images with one to three blobs of any size, 15 normal
        for _ in range(rng.integers(1, 4)):
            y, x, r = rng.integers(0, 48), rng.integers(0, 48), rng.integers(1, 9)
            mask[max(0, y - r):y + r, max(0, x - r):x + r] = 1
    maps = rng.normal(0.0, 1.0, masks.shape) + 1.5 * masks * rng.uniform(0.2, 1.5, (40, 1, 1))
    labels, has_mask = (masks.reshape(40, -1).max(axis=1) > 0).astype(int), np.ones(40, bool)
    exact = pro_score(labels, masks, has_mask, maps)
    streamed = pro_score(labels, masks, has_mask, maps, max_pixels=10_000, thresholds=2_048)
    assert exact.reason is None and streamed.reason is not None
    assert 0.3 < exact.value < 0.95  # a map that is neither perfect nor random
    assert streamed.value == pytest.approx(exact.value, abs=2e-3)


def test_pro_without_masks_is_none_with_a_reason():
    labels, masks, _, maps = _pro_case()
    result = pro_score(labels, masks, np.array([False, False]), maps)
    assert result.value is None and "mask" in result.reason
    with pytest.raises(ValueError, match="max_fpr must be in"):
        pro_score(*_pro_case(), max_fpr=0.0)
    with pytest.raises(ValueError, match="thresholds must be >= 2, got 1"):
        pro_score(*_pro_case(), thresholds=1)


def test_pixel_auroc_by_category_scores_each_kind_against_all_normals():
    masks = np.zeros((4, 2, 2), np.uint8)
    masks[2, 0, 0] = masks[3, 1, 1] = 1  # one defect pixel each in images 2 ("dent") and 3 ("scratch")
    maps = np.zeros((4, 2, 2), np.float32)
    maps[0, 0, 1] = 0.5  # a normal image's brightest pixel
    maps[2, 0, 0] = 0.9  # the dent is found: above every normal pixel
    maps[3, 1, 1] = 0.2  # the scratch is found less well: two normal pixels rank above it
    maps[3, 0, 0] = 0.8
    labels, categories = np.array([0, 0, 1, 1]), np.array(["good", "good", "dent", "scratch"])
    out = pixel_auroc_by_category(labels, categories, masks, np.ones(4, bool), maps)
    assert list(out) == ["dent", "scratch"]
    assert out["dent"] == pytest.approx(1.0)
    # scratch rows: images 0, 1, 3 -> 11 normal pixels (0.5, 0.8 and nine 0.0) against the defect's 0.2
    assert out["scratch"] == pytest.approx(9 / 11)
    # pooled: 14 normal pixels against 0.9 (above all 14) and 0.2 (above the twelve zeros)
    assert pixel_auroc(labels, masks, np.ones(4, bool), maps).value == pytest.approx(26 / 28)
    without_masks = pixel_auroc_by_category(labels, categories, masks, np.array([True, True, True, False]), maps)
    assert without_masks == {"dent": pytest.approx(1.0), "scratch": None}


def test_image_auroc_by_category_pairs_each_kind_with_every_normal():
    labels = np.array([0, 0, 0, 1, 1, 1])
    categories = np.array(["", "", "", "dent", "dent", "scratch"])
    scores = np.array([0.1, 0.2, 0.6, 0.7, 0.3, 0.5])
    out = image_auroc_by_category(labels, categories, scores)
    assert out == {"dent": pytest.approx(5 / 6), "scratch": pytest.approx(2 / 3)}  # dent: 0.7 > 3 normals, 0.3 > 2; scratch: 0.5 > 2
