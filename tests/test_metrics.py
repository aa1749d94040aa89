import numpy as np
import pytest

from twostage_ad.metrics import image_auroc, pixel_auroc, recall_at_threshold


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
