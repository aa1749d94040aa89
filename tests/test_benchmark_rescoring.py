"""Benchmark scripts that re-score a finished run read its images as ``run`` did: decoded at the
larger stage's size, each stage given its own view. A run with stage 2 at twice stage 1's scale
must reproduce its own scores through them."""

from __future__ import annotations

import json
import sys

import numpy as np
import pandas as pd
import pytest

from twostage_ad.config_io import load_config
from twostage_ad.workflow import run_pipeline

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
from _results import decode_run_split, run_image_size, score_stage1_as_run  # noqa: E402

feature_maps = pytest.importorskip("feature_maps")
precision = pytest.importorskip("precision")
rescore = pytest.importorskip("rescore")


@pytest.fixture(scope="module")
def two_scale_run(tmp_path_factory):
    """The digits demo screened by the attention and feature terms alone (what the re-scoring
    scripts accept), in float32, with stage 2 at 64 px beside stage 1's 32."""
    config = load_config(None, ["stage1.epochs=2", "stage1.base_width=8", "stage1.max_width=32", "stage2.epochs=2",
                                "stage2.width_divisor=16", "run.overlays=0", "run.precision=float32",
                                "stage1.screen_con=0", "stage1.screen_enc=0", "stage1.position_normality=mean",
                                "stage1.feature_map_weight=0.25", "stage2.image_size=64"])
    run = run_pipeline(config, tmp_path_factory.mktemp("runs") / "two-scale", progress=False)
    return run.run_dir, json.loads((run.run_dir / "metrics.json").read_text())


def test_stage_one_is_rescored_on_the_pixels_the_run_scored(two_scale_run):
    from twostage_ad.stages.attention import AttentionStage

    run_dir, _ = two_scale_run
    config = load_config(run_dir / "config.yaml")
    assert run_image_size(config) == 64 and config.data.image_size == 32
    test = decode_run_split(config, "test", run_image_size(config))
    stage1 = AttentionStage.load(run_dir / "checkpoints" / "stage1.pt", device="cpu")
    result = score_stage1_as_run(stage1, test.images, progress=False)
    saved = pd.read_csv(run_dir / "scores.csv")
    saved = saved[saved["split"] == "test"]
    assert saved["image"].tolist() == [r.name for r in test.records]
    np.testing.assert_allclose(result.loss, saved["stage1_loss"], rtol=1e-5, atol=1e-6)  # each image, not a rank
    assert result.anomaly_maps.shape == (len(test), 64, 64)  # back at the decode size, beside the masks


def test_precision_benchmark_reproduces_both_stages(two_scale_run):
    run_dir, metrics = two_scale_run
    row = precision.compare(run_dir, repeats=1)
    assert row["image_auroc_fp32"] == pytest.approx(metrics["image_auroc"]["stage1"], abs=1e-6)
    assert row["stage2_image_auroc_fp32"] == pytest.approx(metrics["image_auroc"]["stage2"], abs=1e-6)


def test_feature_maps_benchmark_reproduces_stage_one(two_scale_run):
    run_dir, metrics = two_scale_run
    stage1 = load_config(run_dir / "config.yaml").stage1
    [row] = feature_maps.rows_for(run_dir, [(stage1.feature_stride, stage1.feature_map_stride, stage1.feature_map_weight)])
    assert row["test_auroc_stage1"] == pytest.approx(metrics["image_auroc"]["stage1"], abs=1e-6)


def test_positions_rescoring_reproduces_the_attention_term(two_scale_run, tmp_path):
    run_dir, _ = two_scale_run
    with pytest.raises(SystemExit, match="position_normality 'mean', stage1.feature_map_weight 0.25. Re-score"):
        rescore.positions_row(run_dir)  # the recipe's scores subtract the normals' mean map; its map blends in features
    plain = tmp_path / "plain"  # the same weights, scored without either
    config = load_config(run_dir / "config.yaml", ["stage1.position_normality=none", "stage1.feature_map_weight=0"])
    run_pipeline(config, plain, stage1_checkpoint=run_dir / "checkpoints" / "stage1.pt",
                 stage2_checkpoint=run_dir / "checkpoints" / "stage2.pt", progress=False)
    row = rescore.positions_row(plain)  # exits when its recomputed score differs from the run's by > 1e-3
    assert 0.0 <= row["image_plain"] <= 1.0


def test_scales_of_a_run_with_itself_give_its_own_aurocs(two_scale_run):
    """z-standardising is monotone and a screen fused with itself ranks as it does alone: every
    column equals the run's own stage-1 AUROC, on the test and on its synthetic copies."""
    run_dir, metrics = two_scale_run
    row = rescore.scales_row(run_dir, run_dir)
    for name in ("a", "b", "sum", "max"):
        assert row[f"test_{name}"] == pytest.approx(metrics["image_auroc"]["stage1"], abs=1e-9)
        assert row[f"synthetic_{name}"] == pytest.approx(metrics["synthetic_val"]["image_auroc"]["stage1"], abs=1e-9)
