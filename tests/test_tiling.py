"""Stage 2 over tiles: the grid covers the image, the stitch is exact for local maps and shows no
seam with the real network, training tiles are reproducible, and a tiled stage scores images at
its own scale."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from twostage_ad.config import Config, ConfigError, Stage2Config
from twostage_ad.models.ganomaly2d import GANomaly2D
from twostage_ad.stages.patch_scorer import PatchScorerStage, RandomTiles
from twostage_ad.stages.tiling import blend_window, stitch_cell_maps, tile_origins, tile_stride

from conftest import textured


def test_origins_cover_the_axis_and_end_flush() -> None:
    assert tile_origins(256, 128, 64) == [0, 64, 128]
    assert tile_origins(272, 128, 64) == [0, 64, 128, 144]  # the last tile ends at the border
    assert tile_origins(128, 128, 64) == [0]
    with pytest.raises(ValueError, match="shorter than the tile"):
        tile_origins(100, 128, 64)


def test_stride_is_whole_cells() -> None:
    assert tile_stride(128, 0.5, 16) == 64
    assert tile_stride(112, 0.5, 16) == 48  # 56 rounded down to cells
    assert tile_stride(32, 0.9, 16) == 16  # at least one cell
    assert tile_stride(160, 0.8, 16) == 32 and tile_stride(320, 0.9, 16) == 32  # 31.999… in floating point
    with pytest.raises(ValueError, match="multiple of the cell size"):
        tile_stride(100, 0.5, 16)
    with pytest.raises(ValueError, match=r"overlap must be in \[0, 1\)"):
        tile_stride(128, 1.0, 16)


def test_blend_window_is_positive_and_peaks_in_the_middle() -> None:
    window = blend_window(8)
    assert window.shape == (8, 8) and float(window.min()) > 0
    assert torch.equal(window, window.T) and float(window[3, 3]) == float(window.max())


def _cell_means(tiles: torch.Tensor, cell: int = 16) -> torch.Tensor:
    """A local map with no border effect: each cell's mean pixel."""
    return torch.nn.functional.avg_pool2d(tiles[:, :1], cell)


@pytest.mark.parametrize("size", [(256, 256), (208, 300)])
def test_stitch_is_exact_for_a_local_map(size: tuple[int, int]) -> None:
    x = torch.rand(1, 1, *size, generator=torch.Generator().manual_seed(0))
    stitched = stitch_cell_maps(x, _cell_means, tile=128, stride=64, cell=16, batch_size=3)
    padded_h, padded_w = -(-size[0] // 16) * 16, -(-size[1] // 16) * 16
    expected = _cell_means(torch.nn.functional.pad(x, (0, padded_w - size[1], 0, padded_h - size[0]), mode="reflect"))
    assert stitched.shape == (1, 1, padded_h // 16, padded_w // 16)
    torch.testing.assert_close(stitched, expected, rtol=1e-5, atol=1e-6)


def _defect_across_a_tile_border() -> torch.Tensor:
    rng = np.random.default_rng(0)
    xx = np.mgrid[:256, :256][1]
    image = 0.3 * np.sin(xx / 3.0) + rng.normal(0, 0.03, (256, 256))
    image[100:140, 50:80] = 0.9  # across the border of the first tile column (x = 64 and 128 with stride 64)
    return torch.tensor(image, dtype=torch.float32)[None, None]


def _column_jumps(cell_map: torch.Tensor) -> torch.Tensor:
    standard = (cell_map - cell_map.mean()) / cell_map.std()
    return (standard[..., 1:] - standard[..., :-1]).abs().mean(dim=-2).flatten()


def test_overlapping_tiles_show_no_seam_where_hard_tiles_do() -> None:
    torch.manual_seed(0)
    model = GANomaly2D(1, width_divisor=16).eval()
    x = _defect_across_a_tile_border()
    with torch.inference_mode():
        whole = model(x).score_map  # one pass over the whole image: no tile, no seam
        blended = stitch_cell_maps(x, lambda t: model(t).score_map, tile=128, stride=64, cell=16)
        hard = stitch_cell_maps(x, lambda t: model(t).score_map, tile=128, stride=128, cell=16)
    edges = [3, 7, 11]  # jumps between cells 3|4, 7|8, 11|12: where tiles begin or end (64, 128, 192 px)
    blended_excess = (_column_jumps(blended) - _column_jumps(whole))[edges].abs().max()
    hard_excess = (_column_jumps(hard) - _column_jumps(whole))[edges].abs().max()
    assert blended_excess < 0.5 < hard_excess  # hard tiles step by about 1 σ at their border
    assert np.corrcoef(whole.flatten(), blended.flatten())[0, 1] > 0.98
    assert np.unravel_index(int(blended.argmax()), blended.shape[-2:]) == np.unravel_index(int(whole.argmax()), whole.shape[-2:])


def test_random_tiles_depend_on_seed_epoch_and_image_only() -> None:
    rng = np.random.default_rng(0)
    images = np.stack([textured(rng, size=64)[..., None] for _ in range(3)])
    tiles = RandomTiles(images, 32, seed=5)
    assert tiles[(2, 1)][0].shape == (1, 32, 32)
    assert torch.equal(tiles[(2, 1)][0], RandomTiles(images, 32, seed=5)[(2, 1)][0])
    assert not all(torch.equal(tiles[(e, 1)][0], tiles[(1, 1)][0]) for e in range(2, 6))
    with pytest.raises(ValueError, match="do not fit"):
        RandomTiles(images, 96, seed=0)


def test_tiled_stage_trains_on_tiles_and_scores_whole_images() -> None:
    rng = np.random.default_rng(0)
    images = np.stack([textured(rng, size=64)[..., None] for _ in range(10)])
    config = Stage2Config(epochs=1, min_steps=0, width_divisor=16, batch_size=4, guidance="none", tile_size=32)
    stage = PatchScorerStage(config, image_size=64, channels=1, device="cpu")
    assert stage.tiled
    stage.fit(images[:8], progress=False).fit_normalisation(images[8:])
    result = stage.score(images[8:], progress=False)
    assert result.maps.shape == (2, 64, 64) and np.isfinite(result.maps).all() and np.isfinite(result.scores).all()
    alone = stage.score(images[9:], batch_size=1, progress=False)  # batch-independent like the untiled stage
    np.testing.assert_allclose(alone.maps[0], result.maps[1], rtol=1e-5, atol=1e-4)


def test_a_tile_at_least_the_image_scores_stage_two_exactly_as_the_whole_image(rng) -> None:
    """The default ``tile_size`` (128) changes nothing for stage 2 at or below its size."""
    images = np.stack([textured(rng, size=32)[..., None] for _ in range(10)])
    results = []
    for tile in (0, 32, 128):
        config = Stage2Config(epochs=1, min_steps=0, max_steps=2, width_divisor=16, batch_size=4, guidance="none", tile_size=tile)
        stage = PatchScorerStage(config, image_size=32, channels=1, device="cpu").fit(images[:8], progress=False)
        results.append(stage.fit_normalisation(images[:8]).score(images[8:], progress=False))
    for result in results[1:]:
        np.testing.assert_array_equal(result.scores, results[0].scores)
        np.testing.assert_array_equal(result.maps, results[0].maps)


def test_a_tile_at_least_stage_two_size_is_the_whole_image_and_bad_tiles_are_refused() -> None:
    config = Config()
    config.stage2.image_size, config.stage2.tile_size = 64, 128
    config.validate()
    assert not PatchScorerStage(config.stage2, image_size=64, channels=1).tiled
    config.stage2.tile_size = 40
    with pytest.raises(ConfigError, match="stage2.tile_size must be 0 .* multiple of 16"):
        config.validate()


TINY = ["stage1.epochs=2", "stage1.base_width=8", "stage1.max_width=32", "stage2.epochs=2", "stage2.width_divisor=16",
        "run.overlays=0"]


@pytest.fixture(scope="module")
def tiled_run(tmp_path_factory):
    """The digits demo with stage 2 at twice stage 1's scale (64 px) over 32-px tiles."""
    from twostage_ad.config_io import load_config
    from twostage_ad.workflow import run_pipeline

    config = load_config(None, [*TINY, "stage2.image_size=64", "stage2.tile_size=32"])
    return run_pipeline(config, tmp_path_factory.mktemp("runs") / "tiled", progress=False), config


def test_run_with_stage_two_at_its_own_scale(tiled_run) -> None:
    from twostage_ad.data.images import decode_records
    from twostage_ad.data.records import load_records, split_records
    from twostage_ad.detector import TwoStageDetector

    result, config = tiled_run
    assert all(np.isfinite(result.metrics["image_auroc"][k]) for k in ("stage1", "stage2", "cascade"))
    saved = np.load(result.run_dir / "maps" / "test_maps.npz")
    assert saved["images"].shape[1:3] == (64, 64) and saved["stage1"].shape[1:] == (64, 64)
    assert saved["stage2"].shape[1:] == (64, 64)
    detector = TwoStageDetector.from_run(result.run_dir, device="cpu")
    assert (detector.stage1.image_size, detector.stage2.image_size, detector.image_size) == (32, 64, 64)
    test = decode_records(split_records(load_records(config.data, seed=config.run.seed))["test"], 64, 1, progress=False)
    frame = detector.predict(test.images, all_stages=True, progress=False, maps=False).to_frame()
    scores = result.scores[result.scores["split"] == "test"].reset_index(drop=True)
    for column in ("stage1_loss", "stage2_score", "cascade_score"):
        np.testing.assert_allclose(frame[column], scores[column], rtol=1e-5, atol=1e-6)


def test_export_of_a_tiled_stage_two_matches_the_run(tiled_run, tmp_path) -> None:
    import pandas as pd

    from twostage_ad.data.images import resize_images, to_tensor
    from twostage_ad.export import export_run

    result, _ = tiled_run
    stage1_path, stage2_path = export_run(result.run_dir, tmp_path, formats=("torchscript",))["torchscript"]
    images = np.load(result.run_dir / "maps" / "test_maps.npz")["images"][:1]  # at the decode size, 64 px
    stage1, stage2 = torch.jit.load(stage1_path), torch.jit.load(stage2_path)
    with torch.inference_mode():
        loss, anomaly = stage1(to_tensor(resize_images(images, 32)))  # stage 1's graph takes its own 32-px view
        score, full = stage2(to_tensor(images), anomaly)
    saved = pd.read_csv(result.run_dir / "scores.csv")
    saved = saved[saved["split"] == "test"].iloc[0]
    assert float(loss[0]) == pytest.approx(saved["stage1_loss"], rel=1e-4, abs=1e-6)
    assert float(score[0]) == pytest.approx(saved["stage2_score"], rel=1e-4, abs=1e-5)  # guided as the run guides
    assert full.shape == (1, 64, 64)
    with pytest.raises(torch.jit.Error, match="scores one image of its size per call"):
        stage2(to_tensor(np.concatenate([images, images])), anomaly.expand(2, -1, -1))


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    from twostage_ad.data.images import resize_images

    return resize_images(images, size)
