"""Stage 2 (GANomaly2D) training and scoring: batch-independent maps, fixed statistics, guidance."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from twostage_ad.config import AugmentConfig, Stage2Config
from twostage_ad.models.patch_head import GANomaly2DWithHead
from twostage_ad.stages.losses import discriminator_loss, generator_loss
from twostage_ad.stages.patch_scorer import PatchScorerStage, guide, raw_maps, standardised_map

from conftest import textured


@pytest.fixture(scope="module")
def fitted():
    rng = np.random.default_rng(0)
    images = np.stack([textured(rng, size=32)[..., None] for _ in range(16)])
    stage = PatchScorerStage(Stage2Config(epochs=2, min_steps=0, width_divisor=16, batch_size=4, guidance="none"), image_size=32, channels=1, device="cpu")
    stage.fit(images[:12], progress=False).fit_normalisation(images[12:])
    return stage, images


def test_map_does_not_change_with_the_batch_around_it(fitted):
    stage, images = fitted
    rng = np.random.default_rng(1)
    others = (rng.random((6, 32, 32, 1)) * 255).astype(np.uint8)
    target = images[13:14]
    alone = stage.score(target, batch_size=1, progress=False)
    in_batch = stage.score(np.concatenate([others[:4], target, others[4:]]), batch_size=7, progress=False)
    stage.model_.train()  # score() must switch to eval (BatchNorm running statistics) itself
    mixed = stage.score(np.concatenate([target, others]), batch_size=3, progress=False)
    # maps are in units of the validation cells' std: batch-size-dependent rounding in the convs
    # (1e-7) reaches 1.1e-5 there with nn.Conv2d as the last decoder conv and 2.1e-5 with its
    # depthwise form; batch statistics (BatchNorm left in train mode) move them by 6.7e3
    for other, index in ((in_batch, 4), (mixed, 0)):
        assert other.scores[index] == pytest.approx(alone.scores[0], rel=1e-5)
        np.testing.assert_allclose(other.maps[index], alone.maps[0], rtol=1e-5, atol=1e-4)
    assert alone.maps.shape == (1, 32, 32)


def test_maps_are_standardised_with_validation_normals(fitted):
    stage, images = fitted
    val = stage.score(images[12:], progress=False)
    # validation normals' cells have mean 0 and std 1; the upsampled map stays near that
    assert abs(float(val.maps.mean())) < 0.5 and 0.3 < float(val.maps.std()) < 1.5
    assert stage.map_std_ > 0
    noise = (np.random.default_rng(2).random((4, 32, 32, 1)) * 255).astype(np.uint8)
    assert stage.score(noise, progress=False).scores.mean() > val.scores.mean()  # noise is anomalous


def test_score_before_normalisation_is_refused(fitted):
    stage, images = fitted
    fresh = PatchScorerStage(stage.config, image_size=32, channels=1, device="cpu")
    with pytest.raises(RuntimeError, match="not fitted"):
        fresh.score(images[:1])
    fresh.model_ = stage.model_
    fresh.device_ = stage.device_
    with pytest.raises(RuntimeError, match="fit_normalisation"):
        fresh.score(images[:1])


def test_save_and_load_give_the_same_scores(fitted, tmp_path):
    stage, images = fitted
    stage.save(tmp_path / "stage2.pt")
    loaded = PatchScorerStage.load(tmp_path / "stage2.pt", device="cpu")
    assert loaded.map_mean_ == stage.map_mean_ and loaded.map_std_ == stage.map_std_
    np.testing.assert_array_equal(loaded.score(images[:3], progress=False).scores, stage.score(images[:3], progress=False).scores)


def test_a_stage_loaded_inside_inference_mode_scores(fitted, tmp_path):
    stage, images = fitted
    stage.save(tmp_path / "stage2.pt")
    with torch.inference_mode():
        loaded = PatchScorerStage.load(tmp_path / "stage2.pt", device="cpu")
        got = loaded.score(images[:3], progress=False)
    np.testing.assert_allclose(got.scores, stage.score(images[:3], progress=False).scores, rtol=1e-5, atol=1e-6)


def test_topk_reduction_is_between_mean_and_max(fitted):
    stage, images = fitted
    top = PatchScorerStage.__new__(PatchScorerStage)
    top.__dict__.update(stage.__dict__)
    top.config = Stage2Config(width_divisor=16, score_reduction="topk", score_topk=0.1, guidance="none")
    result_top, result_max = top.score(images[12:], progress=False), stage.score(images[12:], progress=False)
    assert (result_top.scores <= result_max.scores + 1e-6).all()
    assert (result_top.scores >= result_max.maps.reshape(4, -1).mean(axis=1)).all()


def test_guidance_weighs_cells_by_the_stage1_anomaly_in_them():
    raw = torch.ones(1, 1, 2, 2)
    anomaly = torch.zeros(1, 32, 32)
    anomaly[0, 3, 20] = 1.0  # one anomalous pixel in the top-right 16×16 cell
    guided = guide(raw, anomaly, floor=0.25)
    np.testing.assert_allclose(guided[0, 0].numpy(), [[0.25, 1.0], [0.25, 0.25]])


def test_guided_scoring_needs_stage1_maps(fitted):
    stage, images = fitted
    guided = PatchScorerStage.__new__(PatchScorerStage)
    guided.__dict__.update(stage.__dict__)
    guided.config = Stage2Config(width_divisor=16, guidance="attention")
    with pytest.raises(ValueError, match="no stage-1 anomaly maps"):
        guided.score(images[:2], progress=False)
    ones = np.ones((2, 32, 32), np.float32)  # stage 1 sees anomalies everywhere: weight 1, same as unguided
    np.testing.assert_allclose(guided.score(images[:2], stage1_maps=ones, progress=False).scores,
                               stage.score(images[:2], progress=False).scores, rtol=1e-5)


def test_losses_hand_computed():
    config = Stage2Config(w_adv=1.0, w_con=50.0, w_enc=1.0)
    x = torch.zeros(1, 1, 2, 2)
    recon = torch.full((1, 1, 2, 2), 0.1)  # L1 = 0.1
    z, z_hat = torch.zeros(1, 2, 1, 1), torch.tensor([[[[1.0]], [[0.0]]]])  # L2 = 0.5
    logits = torch.zeros(1, 1, 2, 2)  # BCE(0 logit, 1) = log 2
    terms = generator_loss(x, recon, z, z_hat, logits, config)
    assert terms["total"].item() == pytest.approx(50 * 0.1 + 0.5 + np.log(2), rel=1e-5)
    assert "adversarial" not in generator_loss(x, recon, z, z_hat, None, config)
    # discriminator: real rows first; a confident, right D has a loss near 0
    assert discriminator_loss(torch.tensor([[10.0], [-10.0]])).item() < 1e-4
    assert discriminator_loss(torch.tensor([[0.0], [0.0]])).item() == pytest.approx(np.log(2))


def test_collapsed_discriminator_is_reinitialised(monkeypatch):
    from twostage_ad.stages import training

    monkeypatch.setattr(training, "COLLAPSE_LOSS", 10.0)  # every step counts as collapsed
    rng = np.random.default_rng(0)
    images = np.stack([textured(rng, size=32)[..., None] for _ in range(8)])
    stage = PatchScorerStage(Stage2Config(epochs=1, min_steps=0, width_divisor=16, batch_size=4), image_size=32, channels=1, device="cpu")
    stage.fit(images, progress=False)
    assert stage.history_[-1]["discriminator_resets"] == 2


def test_wrong_image_shape_is_refused():
    stage = PatchScorerStage(Stage2Config(epochs=1, width_divisor=16), image_size=32, channels=1, device="cpu")
    with pytest.raises(ValueError, match=r"expected N×32×32×1 images, got shape \(4, 32, 32, 3\)"):
        stage.fit(np.zeros((4, 32, 32, 3), np.uint8))


# the defect head (score: head)


@pytest.fixture(scope="module")
def headed():
    rng = np.random.default_rng(0)
    images = np.stack([textured(rng, size=64)[..., None] for _ in range(12)])
    config = Stage2Config(epochs=1, min_steps=0, width_divisor=16, batch_size=4, guidance="none", score="head", head_width=4,
                          tile_size=32)
    stage = PatchScorerStage(config, augment=AugmentConfig(probability=0.9, kinds=["blob", "crack"]), image_size=64, channels=1,
                             device="cpu")
    stage.fit(images[:10], progress=False).fit_normalisation(images[10:])
    return stage, images


def test_headed_stage_trains_the_head_and_scores_tiles_batch_independently(headed):
    stage, images = headed
    assert isinstance(stage.model_, GANomaly2DWithHead) and stage.tiled
    assert {"head", "recon", "latent", "discriminator"} <= set(stage.history_[-1])
    together = stage.score(images[8:], progress=False)
    alone = stage.score(images[9:10], batch_size=1, progress=False)
    assert together.maps.shape == (4, 64, 64) and np.isfinite(together.maps).all()
    # σ units of a barely trained head's small spread: batch-size rounding reaches 2e-4 (batch statistics: orders more)
    np.testing.assert_allclose(alone.maps[0], together.maps[1], rtol=1e-4, atol=1e-3)


def test_headed_stage_round_trips_its_augmentation_and_scores(headed, tmp_path):
    stage, images = headed
    stage.save(tmp_path / "stage2.pt")
    loaded = PatchScorerStage.load(tmp_path / "stage2.pt", device="cpu")
    assert isinstance(loaded.model_, GANomaly2DWithHead) and loaded.augment == stage.augment
    np.testing.assert_array_equal(loaded.score(images[:3], progress=False).scores, stage.score(images[:3], progress=False).scores)


def test_headed_config_is_checked_with_the_value():
    from twostage_ad.config import ConfigError

    with pytest.raises(ConfigError, match="stage2.score must be one of .*got 'pixels'"):
        Stage2Config(score="pixels").validate()
    with pytest.raises(ConfigError, match="stage2.head_width must be an integer >= 1, got 0"):
        Stage2Config(head_width=0).validate()


def test_the_defect_head_learns_to_find_defects_it_was_trained_to_repair():
    # 56 striped 32-px normals, 10 epochs: painted squares (dark or bright) on held-out normals
    # must outscore the clean copies (a barely trained head, 6 epochs, gave 0.52-0.73; chance 0.5)
    rng = np.random.default_rng(0)
    images = np.stack([textured(rng, size=32)[..., None] for _ in range(72)])
    clean = images[64:]
    painted = clean.copy()
    for k, image in enumerate(painted):
        image[4 + 3 * k : 8 + 3 * k, 22 - 2 * k : 26 - 2 * k] = 30 if k % 2 else 230
    config = Stage2Config(epochs=10, min_steps=0, width_divisor=16, batch_size=8, guidance="none", head_width=4)
    stage = PatchScorerStage(config, augment=AugmentConfig(probability=0.5, kinds=["cutout", "blob"]), image_size=32, channels=1,
                             device="cpu")
    stage.fit(images[:56], progress=False).fit_normalisation(images[56:64])
    scores = stage.score(np.concatenate([clean, painted]), progress=False).scores
    assert roc_auc_score(np.r_[np.zeros(8), np.ones(8)], scores) >= 0.9


def test_combined_map_is_the_pixelwise_max_of_both_sigma_maps(headed):
    stage, images = headed
    assert stage.config.combine_latent and len(stage.map_statistics) == 2
    x = torch.from_numpy(images[:2]).permute(0, 3, 1, 2).float() / 127.5 - 1
    head_only = PatchScorerStage(replace(stage.config, combine_latent=False), image_size=64, channels=1, device="cpu")
    with torch.inference_mode():
        combined = standardised_map(stage.model_, x, None, stage.config, stage.map_statistics)
        head = standardised_map(stage.model_, x, None, head_only.config, stage.map_statistics[:1])
        latent = raw_maps(stage.model_, x, None, stage.config, ("latent_map",))[0]
        mean, std = stage.map_statistics[1]
        latent = torch.nn.functional.interpolate((latent - mean) / std, size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(combined, torch.maximum(head, latent))
    assert (combined > head).any() and (combined > latent).any()  # each map wins somewhere


def test_combining_without_the_latent_statistics_is_refused(headed):
    stage, images = headed
    x = torch.zeros(1, 1, 64, 64)
    with pytest.raises(RuntimeError, match="fit_normalisation"):
        standardised_map(stage.model_, x, None, stage.config, stage.map_statistics[:1])
