"""Feature normality: nearest-neighbour distances, the coreset, leave-one-out statistics, the stage."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from twostage_ad.config import Stage1Config
from twostage_ad.metrics import image_auroc
from twostage_ad.stages.attention import AttentionStage
from twostage_ad.stages.feature_normality import FeatureNormality, feature_level, greedy_coreset, nearest_distances

from conftest import textured


def test_nearest_distances_match_a_brute_force_search_and_leave_an_owner_out():
    torch.manual_seed(0)
    queries, bank = torch.randn(7, 5), torch.randn(11, 5)
    brute = torch.cdist(queries, bank).min(dim=1).values
    torch.testing.assert_close(nearest_distances(queries, bank, chunk=3), brute, rtol=1e-4, atol=1e-4)
    owners = torch.tensor([0] * 6 + [1] * 5)
    exclude = torch.zeros(7, dtype=torch.long)  # every query belongs to owner 0: only rows 6.. may match
    torch.testing.assert_close(nearest_distances(queries, bank, exclude=exclude, owners=owners),
                               torch.cdist(queries, bank[6:]).min(dim=1).values, rtol=1e-4, atol=1e-4)


def test_greedy_coreset_takes_the_farthest_points_first():
    points = torch.tensor([[0.0], [0.1], [0.2], [5.0], [10.0]])
    chosen = set(greedy_coreset(points, 3, seed=0).tolist())
    assert {3, 4} <= chosen or {0, 4} <= chosen  # the two ends of the line are always covered
    nearest = torch.cdist(points, points[list(chosen)]).min(dim=1).values
    assert nearest.max() <= 2.5  # no point is left far from the coreset
    assert greedy_coreset(points, 9).tolist() == [0, 1, 2, 3, 4]  # all rows when the bank is not smaller


def test_fit_statistics_by_hand():
    """Three one-cell images at 0, 1 and 3 (one channel): left out in turn, their nearest others are
    1, 1 and 2 away: mean 4/3, sample std sqrt(1/3)."""
    features = torch.tensor([0.0, 1.0, 3.0]).reshape(3, 1, 1, 1)
    attention = torch.tensor([1.0, 2.0, 3.0])
    fitted = FeatureNormality.fit(features, attention, level=0, bank_size=10)
    assert fitted.bank.shape == (3, 1) and fitted.count == 3
    assert fitted.feature_mean == pytest.approx(4 / 3) and fitted.feature_std == pytest.approx(np.sqrt(1 / 3))
    assert fitted.attention_mean == pytest.approx(2.0) and fitted.attention_std == pytest.approx(1.0)
    assert fitted.image_scores(torch.tensor([7.0]).reshape(1, 1, 1, 1)).item() == pytest.approx(4.0)  # 7 − 3
    z = fitted.combined(np.array([3.0]), np.array([4 / 3 + np.sqrt(1 / 3)]), 1.0, 2.0)
    assert z[0] == pytest.approx(1.0 + 2.0)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="at least 2 training images"):
        FeatureNormality.fit(torch.zeros(1, 4, 2, 2), torch.zeros(1), level=0, bank_size=8)
    fitted = FeatureNormality.fit(torch.randn(3, 4, 2, 2), torch.zeros(3), level=0, bank_size=8)
    with pytest.raises(ValueError, match="5 channels, the bank 4"):
        fitted.cell_distances(torch.zeros(1, 5, 2, 2))


def test_the_level_follows_the_stride_and_stops_at_the_bottleneck():
    assert feature_level(128, 4, 16) == 3  # 8×8 cells
    assert feature_level(256, 4, 16) == 3  # 16×16 cells
    assert feature_level(32, 4, 16) == 2  # only 3 levels at 32 px: the bottleneck
    assert feature_level(128, 4, 32) == 4  # the map's default: 4×4 cells, the bottleneck at 128 px
    assert feature_level(512, 4, 32) == 4  # 16×16 cells


# -- the stage ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stage_and_images():
    rng = np.random.default_rng(0)
    images = np.stack([textured(rng, size=32)[..., None] for _ in range(10)])
    config = Stage1Config(min_steps=0, epochs=1, base_width=8, max_width=16, batch_size=5, feature_bank_size=64)
    return AttentionStage(config=config, image_size=32, channels=1, device="cpu", seed=0).fit(images, progress=False), images


def test_fit_leaves_a_bank_of_the_configured_size_and_it_travels_with_the_checkpoint(tmp_path, stage_and_images):
    stage, images = stage_and_images
    assert stage.features_.bank.shape[0] == 64 and stage.features_.count == len(images)
    stage.save(tmp_path / "s1.pt")
    loaded = AttentionStage.load(tmp_path / "s1.pt", device="cpu")
    torch.testing.assert_close(loaded.features_.bank, stage.features_.bank)
    np.testing.assert_array_equal(loaded.score(images, progress=False).loss, stage.score(images, progress=False).loss)


def test_a_changed_bank_size_is_refused_until_refitted(stage_and_images):
    stage, images = stage_and_images
    original = stage.config
    try:
        stage.config = replace(stage.config, feature_bank_size=32)
        with pytest.raises(RuntimeError, match="no feature bank"):
            stage.score(images, progress=False)
        saved = stage.features_
        assert stage.fit_missing_statistics(images) and stage.features_.bank.shape[0] == 32
    finally:
        stage.config, stage.features_ = original, saved


def test_an_unseen_texture_scores_higher_than_the_training_texture(stage_and_images):
    """The one-class question: cells unlike any normal one are far from the bank (even after one epoch)."""
    stage, images = stage_and_images
    rng = np.random.default_rng(5)
    normal = np.stack([textured(rng, size=32)[..., None] for _ in range(8)])
    unseen = np.stack([(rng.random((32, 32, 1)) > 0.5).astype(np.uint8) * 255 for _ in range(8)])  # salt and pepper
    scores = stage.score(np.concatenate([normal, unseen]), progress=False).components["stage1_feature"]
    assert image_auroc(np.r_[np.zeros(8), np.ones(8)].astype(int), scores).value >= 0.9


def expected_map_and_feature_term(stage: AttentionStage, images: np.ndarray, bank: FeatureNormality) -> tuple[np.ndarray, np.ndarray]:
    """By hand: ``(1 − w)·(1 − A) + w·sigmoid(z)`` with z from ``bank``'s cells, and the screening's feature term."""
    with torch.inference_mode():
        out = stage.model_(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1, reconstruct=False)
    cells = bank.cell_distances(out.encoder_features[bank.level])
    size = images.shape[1]
    cell_map = torch.nn.functional.interpolate(torch.sigmoid((cells - bank.feature_mean) / bank.feature_std)[:, None],
                                               size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    w = stage.config.feature_map_weight
    expected = (1 - w) * (1 - torch.sigmoid(out.attention_logits[:, 0])) + w * cell_map
    term = stage.features_.cell_distances(out.encoder_features[stage.features_.level]).flatten(1).max(dim=1).values
    return expected.numpy(), term.numpy()


def test_the_map_blends_one_minus_a_with_the_cells_feature_z(stage_and_images):
    stage, images = stage_and_images
    assert stage.map_features_ is None  # at 32 px both strides name the bottleneck: one bank
    result = stage.score(images[:3], progress=False)
    expected, term = expected_map_and_feature_term(stage, images[:3], stage.features_)
    np.testing.assert_allclose(result.anomaly_maps, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.components["stage1_feature"], term, rtol=1e-6)


def test_the_map_takes_its_cells_from_its_own_level_and_the_screening_does_not_change(tmp_path, stage_and_images):
    stage, images = stage_and_images
    before = stage.score(images, progress=False)
    original = stage.config
    try:
        stage.config = replace(original, feature_map_stride=4)  # 8×8 cells at 32 px; the screening keeps the 4×4 bottleneck
        with pytest.raises(RuntimeError, match="no feature bank"):
            stage.score(images, progress=False)
        assert stage.fit_missing_statistics(images)
        assert (stage.features_.level, stage.map_features_.level) == (2, 1)
        after = stage.score(images, progress=False)
        np.testing.assert_array_equal(after.loss, before.loss)  # the screening's bank is refitted identically
        assert not np.allclose(after.anomaly_maps, before.anomaly_maps)
        expected, term = expected_map_and_feature_term(stage, images[:3], stage.map_features_)
        np.testing.assert_allclose(after.anomaly_maps[:3], expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(after.components["stage1_feature"][:3], term, rtol=1e-6)
        stage.save(tmp_path / "s1.pt")
        loaded = AttentionStage.load(tmp_path / "s1.pt", device="cpu")
        torch.testing.assert_close(loaded.map_features_.bank, stage.map_features_.bank)
        np.testing.assert_array_equal(loaded.score(images, progress=False).anomaly_maps, after.anomaly_maps)
    finally:
        stage.config = original
        stage.fit_missing_statistics(images)
    assert stage.map_features_ is None
