"""Stage 1 over tiles (``stage1.tile_size``): the network is built for the tile and trains on random
tiles; whole images are scored through overlapping tiles blended into one map, batch-independent
and local (a change in one corner moves no pixel that no tile shares with it); the statistics cover
the whole image; a tiny run's ``predict`` and export reproduce its scores; bad settings are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from twostage_ad.config import Config, ConfigError, Stage1Config
from twostage_ad.stages.attention import AttentionStage

from conftest import textured


def _images(count: int, size: int = 64) -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.stack([textured(rng, size=size)[..., None] for _ in range(count)])


@pytest.fixture(scope="module")
def tiled_stage() -> tuple[AttentionStage, np.ndarray]:
    images = _images(12)
    config = Stage1Config(epochs=1, min_steps=0, max_steps=4, base_width=8, max_width=32, batch_size=4, tile_size=32)
    stage = AttentionStage(config, image_size=64, channels=1, device="cpu")
    return stage.fit(images[:10], progress=False), images


def test_the_network_is_built_for_the_tile_and_trains_on_tiles(tiled_stage) -> None:
    stage, images = tiled_stage
    assert stage.tiled and stage.network_size == 32 and stage.model_.image_size == 32
    x_in, clean, mask, _ = stage._dataset(images[:10])[0][(0, 3)]
    assert x_in.shape == clean.shape == (1, 32, 32) and mask.shape == (1, 32, 32)
    for whole in (64, 128):  # a tile as large as the image, or larger: the whole image
        untiled = AttentionStage(Stage1Config(tile_size=whole), image_size=64, channels=1)
        assert not untiled.tiled and untiled.network_size == 64


def test_by_default_both_stages_tile_only_a_decode_larger_than_128_px() -> None:
    from twostage_ad.stages.patch_scorer import PatchScorerStage

    defaults = Config()
    for size, tiled in ((64, False), (128, False), (256, True), (512, True)):
        stage1 = AttentionStage(defaults.stage1, image_size=size, channels=1)
        stage2 = PatchScorerStage(defaults.stage2, image_size=size, channels=1)
        assert stage1.tiled == stage2.tiled == tiled
        assert stage1.network_size == min(size, 128)


def test_a_tile_at_least_the_image_scores_exactly_as_the_whole_image() -> None:
    """The default ``tile_size`` (128) changes nothing at or below its size: same network, same
    training, same scores as ``tile_size: 0``."""
    images = _images(12, size=32)
    results = []
    for tile in (0, 32, 128):
        config = Stage1Config(epochs=1, min_steps=0, max_steps=3, base_width=8, max_width=32, batch_size=4, tile_size=tile)
        stage = AttentionStage(config, image_size=32, channels=1, device="cpu").fit(images[:10], progress=False)
        results.append(stage.score(images[10:], progress=False))
    for result in results[1:]:
        np.testing.assert_array_equal(result.loss, results[0].loss)
        np.testing.assert_array_equal(result.anomaly_maps, results[0].anomaly_maps)


def test_statistics_cover_the_whole_image(tiled_stage) -> None:
    stage, _ = tiled_stage
    assert tuple(stage.position_.mean.shape) == (64, 64)
    # the screening cells (32 px asked, 8 px the deepest a 32-px tile has) of the 3 × 3 scoring tiles of 10 images
    assert stage.features_.level == 2 and stage.features_.bank.shape[0] == 10 * 9 * 4 * 4


def test_tiled_scoring_is_whole_image_and_batch_independent(tiled_stage) -> None:
    stage, images = tiled_stage
    result = stage.score(images[10:], progress=False)
    assert result.anomaly_maps.shape == (2, 64, 64)
    assert np.isfinite(result.anomaly_maps).all() and np.isfinite(result.loss).all()
    assert np.isfinite(result.components["stage1_feature"]).all() and np.isnan(result.components["stage1_recon"]).all()
    alone = stage.score(images[11:], batch_size=1, progress=False)
    np.testing.assert_allclose(alone.anomaly_maps[0], result.anomaly_maps[1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(alone.loss[0], result.loss[1], rtol=1e-5)


@pytest.mark.parametrize("overlap", [0.5, 0.2])  # tiles 16 px apart, and 24 px (not a divisor of the tile)
def test_statistics_are_fitted_where_scoring_looks(overlap) -> None:
    """The feature bank and both terms' spread come from the tiles scoring uses, so held-out normals
    of the training images' kind score about 0 in z units (a bank fitted on other tile positions put
    them 6 σ up)."""
    images = _images(24)
    config = Stage1Config(epochs=1, min_steps=0, max_steps=4, base_width=8, max_width=32, batch_size=4, tile_size=32,
                          tile_overlap=overlap)
    stage = AttentionStage(config, image_size=64, channels=1, device="cpu").fit(images[:16], progress=False)
    components = stage.score(images[16:], progress=False).components
    bank = stage.features_
    assert bank.bank.shape[0] == 16 * 9 * 4 * 4  # 3 × 3 tiles of 4 × 4 cells each, every training image
    feature_z = (components["stage1_feature"] - bank.feature_mean) / bank.feature_std
    attention_z = (components["stage1_att_topk"] - bank.attention_mean) / bank.attention_std
    assert abs(feature_z.mean()) < 1.5 and abs(attention_z.mean()) < 1.5


def test_tiled_maps_are_local(tiled_stage) -> None:
    """Tiles start every 16 px (32-px tiles, half overlapping); a change at rows and columns 48-63
    lies only in the tiles that start at 32, so the blended map at 0-31 cannot move, while a whole
    image network (instance norm, self-attention) would move everywhere."""
    stage, images = tiled_stage
    changed = images[10:11].copy()
    changed[0, 48:64, 48:64] = 255 - changed[0, 48:64, 48:64]
    before, after = (stage.score(x, progress=False).anomaly_maps[0] for x in (images[10:11], changed))
    np.testing.assert_array_equal(before[:32, :32], after[:32, :32])
    assert np.abs(before[48:, 48:] - after[48:, 48:]).max() > 1e-3


def test_bad_tile_settings_are_refused_with_the_value() -> None:
    with pytest.raises(ConfigError, match=r"stage1.tile_size must be 0 \(the whole image\) or a power of two from 32 to 512, got 48"):
        Stage1Config(tile_size=48).validate()
    with pytest.raises(ConfigError, match=r"stage1.tile_overlap must be in \[0, 1\), got 1.0"):
        Stage1Config(tile_size=32, tile_overlap=1.0).validate()
    config = Config()
    config.data.image_size, config.stage1.tile_size = 64, 32
    config.stage1.w_con = config.stage1.screen_con = 1.0
    with pytest.raises(ConfigError, match="stage1.screen_con must be 0 with stage1.tile_size below data.image_size"):
        config.validate()
    for whole in (64, 128):  # as large as the image or larger: nothing is tiled, the reconstruction may screen
        config.stage1.tile_size = whole
        config.validate()
    config = Config()
    config.data.image_size, config.stage1.tile_size, config.stage1.bottleneck_size = 128, 32, 16
    with pytest.raises(ConfigError, match="stage1.bottleneck_size must be at most stage1.tile_size / 4 = 8"):
        config.validate()


TINY = ["stage1.epochs=2", "stage1.base_width=8", "stage1.max_width=32", "stage1.screen_con=0", "stage1.screen_enc=0",
        "stage2.epochs=2", "stage2.width_divisor=16", "run.overlays=0", "data.image_size=64", "stage1.tile_size=32",
        "run.precision=float32"]  # the exported graph is float32; bf16 scoring would differ by its rounding


@pytest.fixture(scope="module")
def tiled_run(tmp_path_factory):
    """The digits demo decoded at 64 px, stage 1 over 32-px tiles (stage 2 on the whole 64-px image)."""
    from twostage_ad.config_io import load_config
    from twostage_ad.workflow import run_pipeline

    config = load_config(None, TINY)
    return run_pipeline(config, tmp_path_factory.mktemp("runs") / "tiled1", progress=False), config


def test_predict_and_export_reproduce_a_tiled_run(tiled_run, tmp_path) -> None:
    import pandas as pd

    from twostage_ad.data.images import resize_images, to_tensor
    from twostage_ad.detector import TwoStageDetector
    from twostage_ad.export import export_run

    result, _ = tiled_run
    assert all(np.isfinite(result.metrics["image_auroc"][k]) for k in ("stage1", "stage2", "cascade"))
    saved = np.load(result.run_dir / "maps" / "test_maps.npz")
    assert saved["stage1"].shape[1:] == (64, 64)
    detector = TwoStageDetector.from_run(result.run_dir, device="cpu")
    assert detector.stage1.tiled and detector.stage1.model_.image_size == 32
    frame = detector.predict(saved["images"], all_stages=True, progress=False, maps=False).to_frame()
    scores = pd.read_csv(result.run_dir / "scores.csv")
    scores = scores[scores["split"] == "test"].reset_index(drop=True)
    for column in ("stage1_loss", "cascade_score"):
        np.testing.assert_allclose(frame[column], scores[column], rtol=1e-5, atol=1e-6)
    stage1_path = export_run(result.run_dir, tmp_path, formats=("torchscript",))["torchscript"][0]
    with torch.inference_mode():
        loss, anomaly = torch.jit.load(stage1_path)(to_tensor(saved["images"][:1]))
    assert float(loss[0]) == pytest.approx(scores["stage1_loss"][0], rel=1e-4, abs=1e-5)
    assert anomaly.shape == (1, 64, 64)
    for other in (saved["images"][:2], resize_images(saved["images"][:1], 32)):  # its tile loop was unrolled for one 64-px image
        with pytest.raises(torch.jit.Error, match="scores one image of its size per call"):
            torch.jit.load(stage1_path)(to_tensor(other))
