"""The cascade rule and score (docs/design.md §2): flagged above unflagged, each ordered by its own stage."""

import numpy as np
import pytest

from twostage_ad.calibration import Threshold
from twostage_ad.cascade import Cascade, MapFusion, fit_cascade, fused_anomaly_map, second_stage_score
from twostage_ad.config import CalibrationConfig


def _cascade(tau1: float = 1.0, tau2: float = 5.0, fusion: str = "stage2") -> Cascade:
    return Cascade(
        stage1=Threshold("quantile", {"q": 0.9}, tau1), stage2=Threshold("quantile", {"q": 0.9}, tau2), fusion=fusion,
        stage1_mean=0.5, stage1_std=0.25, stage2_mean=2.0, stage2_std=2.0, second_std=2.0,
    )


def test_every_flagged_image_ranks_above_every_unflagged_one():
    s1 = np.array([0.2, 0.9, 1.1, 5.0, 1.5, 0.95])
    s2 = np.array([99.0, 50.0, 0.1, 1.0, 7.0, -3.0])  # huge stage-2 scores on unflagged images must not matter
    out = _cascade().apply(s1, s2)
    np.testing.assert_array_equal(out.flagged, [False, False, True, True, True, False])
    assert out.cascade_score[out.flagged].min() > 1.0
    assert out.cascade_score[~out.flagged].max() <= 0.5
    # unflagged ordered by stage 1, flagged by stage 2
    assert list(np.argsort(out.cascade_score)) == [0, 1, 5, 2, 3, 4]
    # decision: flagged and r2 > τ₂, i.e. cascade score > 1.5; stage 2 is not consulted otherwise
    np.testing.assert_array_equal(out.decision, [0, 0, 0, 0, 1, 0])
    np.testing.assert_array_equal(out.decision, (out.cascade_score > 1.5).astype(int))
    assert np.isnan(out.second_score[~out.flagged]).all()


def test_unflagged_images_need_no_stage2_score_but_flagged_ones_do():
    out = _cascade().apply(np.array([0.1, 2.0]), np.array([np.nan, 6.0]))
    assert out.decision.tolist() == [0, 1]
    with pytest.raises(ValueError, match="1 flagged image"):
        _cascade().apply(np.array([0.1, 2.0]), np.array([1.0, np.nan]))


def test_cascade_score_keeps_order_for_extreme_scores():
    s1 = np.full(3, 2.0)
    out = _cascade().apply(s1, np.array([1e6, 2e6, 4e6]))  # a logistic would round all three to 2.0
    assert out.cascade_score[0] < out.cascade_score[1] < out.cascade_score[2] < 2.0


def test_sum_fusion_standardises_both_stages_with_validation_normals():
    # (2 − 0.5)/0.25 + (6 − 2)/2 = 6 + 2 = 8
    assert second_stage_score("sum", np.array([2.0]), np.array([6.0]), 0.5, 0.25, 2.0, 2.0)[0] == pytest.approx(8.0)
    assert second_stage_score("stage2", np.array([2.0]), np.array([6.0]))[0] == 6.0
    # max: the stage more sure of an anomaly decides; max(6, 2) = 6 and max(−2, 2) = 2
    assert second_stage_score("max", np.array([2.0, 0.0]), np.array([6.0, 6.0]), 0.5, 0.25, 2.0, 2.0).tolist() == [6.0, 2.0]
    with pytest.raises(ValueError, match="fusion must be one of"):
        second_stage_score("product", np.array([1.0]), np.array([1.0]))


def test_fit_cascade_calibrates_both_thresholds_on_validation_normals():
    rng = np.random.default_rng(0)
    s1, s2 = rng.normal(1.0, 0.1, 200), rng.normal(3.0, 1.0, 200)
    quantile = CalibrationConfig(method="quantile", q=0.8)
    cascade = fit_cascade(s1, s2, np.zeros(200, int), quantile, calibration2=CalibrationConfig(method="quantile", q=0.95))
    assert cascade.stage1.value == pytest.approx(np.quantile(s1, 0.8))
    assert cascade.stage2.value == pytest.approx(np.quantile(s2, 0.95))
    assert cascade.stage2_std == pytest.approx(np.std(s2))
    fused = fit_cascade(s1, s2, np.zeros(200, int), quantile, fusion="sum")
    r2 = (s1 - s1.mean()) / s1.std() + (s2 - s2.mean()) / s2.std()
    assert fused.stage2.value == pytest.approx(np.quantile(r2, 0.8))
    with pytest.raises(ValueError, match="finite stage-2 score"):
        fit_cascade(s1, np.r_[s2[:-1], np.nan], np.zeros(200, int), CalibrationConfig())


def test_fused_map_adds_stage2_to_stage1_in_sigma_units():
    stage1 = np.array([[[0.9, 0.9, 0.1]]])  # 1 − A
    stage2 = np.array([[[3.0, -1.0, 3.0]]])  # already in validation-normal σ units
    fused = fused_anomaly_map(stage1, stage2, stage1_mean=0.1, stage1_std=0.4, stage2_weight=0.5)
    # (0.9 − 0.1)/0.4 + 0.5·3, (0.9 − 0.1)/0.4 − 0.5·1, 0 + 0.5·3: stage 1's region survives where stage 2 is silent
    np.testing.assert_allclose(fused, [[[3.5, 1.5, 1.5]]], rtol=1e-6)
    alone = fused_anomaly_map(stage1, stage2, stage1_mean=0.1, stage1_std=0.4, stage2_weight=0.0)
    np.testing.assert_allclose(alone, [[[2.0, 2.0, 0.0]]], rtol=1e-6)
    with pytest.raises(ValueError, match="differ in shape"):
        fused_anomaly_map(stage1, stage2[:, :, :2], stage1_mean=0.0, stage1_std=1.0, stage2_weight=0.1)
    with pytest.raises(ValueError, match="stage1_std finite and > 0, got 0.0 and 0.0"):
        fused_anomaly_map(stage1, stage2, stage1_mean=0.0, stage1_std=0.0, stage2_weight=0.1)
    with pytest.raises(ValueError, match="got 0.0 and inf"):
        fused_anomaly_map(stage1, stage2, stage1_mean=0.0, stage1_std=np.inf, stage2_weight=0.1)
    with pytest.raises(ValueError, match="maps must be floats"):  # maps/test_maps.npz's uint8 stage-1 maps, undivided
        fused_anomaly_map((stage1 * 255).astype(np.uint8), stage2, stage1_mean=0.1, stage1_std=0.4, stage2_weight=0.1)


def test_the_cascades_map_statistics_round_trip_and_old_thresholds_have_none():
    cascade = _cascade()
    cascade.map_fusion = MapFusion(stage1_mean=0.2, stage1_std=0.05, stage2_weight=0.1)
    stored = {"stage1": cascade.stage1.to_dict(), "stage2": cascade.stage2.to_dict(),
              "cascade": {k: v for k, v in cascade.to_dict().items() if k not in ("stage1", "stage2")}}
    assert Cascade.from_dict(stored).map_fusion == cascade.map_fusion
    del stored["cascade"]["map_fusion"]  # thresholds.json of a run calibrated before the map was stored
    assert Cascade.from_dict(stored).map_fusion is None


def test_map_fusion_takes_its_statistics_from_normal_maps():
    normals = np.array([[[0.0, 0.2]], [[0.4, 0.2]]])  # mean 0.2, std sqrt(0.02)
    fusion = MapFusion.fit(normals, stage2_weight=0.1)
    assert fusion.stage1_mean == pytest.approx(0.2) and fusion.stage1_std == pytest.approx(np.sqrt(0.02))
    np.testing.assert_allclose(fusion.apply(normals, np.ones_like(normals)),
                               (normals - 0.2) / np.sqrt(0.02) + 0.1, rtol=1e-5)
    assert MapFusion.fit(np.full((2, 3, 3), 0.5), stage2_weight=0.1).stage1_std == 1.0  # constant maps: defined
    with pytest.raises(ValueError, match="no validation normal"):
        MapFusion.fit(np.zeros((0, 4, 4)), stage2_weight=0.1)
    with pytest.raises(ValueError, match="1 pixels of the validation normals' stage-1 maps are NaN"):
        MapFusion.fit(np.array([[[0.1, np.nan]]]), stage2_weight=0.1)


def test_an_image_stage1_cannot_score_fails_closed():
    out = _cascade().apply(np.array([np.nan, 0.1, np.inf]), np.array([np.nan, np.nan, np.nan]))
    assert out.flagged.tolist() == [True, False, True] and out.decision.tolist() == [1, 0, 1]
    assert out.cascade_score[0] == out.cascade_score[2] == 2.0


def test_fit_cascade_reports_what_the_thresholds_do_on_validation_normals():
    rng = np.random.default_rng(1)
    s1, s2 = rng.normal(size=2000), rng.normal(size=2000)
    for fusion in ("stage2", "sum", "max"):
        cascade = fit_cascade(s1, s2, np.zeros(2000, int), CalibrationConfig(q=0.9), fusion=fusion)
        stats = cascade.stage2.stats
        assert stats["cascade_false_positive_rate_val"] == pytest.approx(np.mean(cascade.apply(s1, s2).decision))
    # independent scores: with the stage-2 score alone about 10 % of flagged normals pass τ₂; the sum
    # carries the flagged images' high stage-1 term and passes far more (documented in fit_cascade)
    alone = fit_cascade(s1, s2, np.zeros(2000, int), CalibrationConfig(q=0.9), fusion="stage2").stage2.stats
    summed = fit_cascade(s1, s2, np.zeros(2000, int), CalibrationConfig(q=0.9), fusion="sum").stage2.stats
    assert alone["anomalous_share_of_flagged_normals_val"] < 0.2 < summed["anomalous_share_of_flagged_normals_val"]


def _operating_table() -> tuple:
    import pandas as pd

    val_s1, val_s2 = np.array([1.0, 2.0, 3.0, 4.0, 5.0]), np.array([0.1, 0.2, 0.3, 0.4, 0.5])
    test_s1 = np.array([1.0, 3.5, 6.0, 2.5, 4.0, 7.0])
    test_s2 = np.array([0.2, 0.1, 0.3, 0.9, 0.05, 0.8])
    labels = np.array([0, 0, 0, 1, 1, 1])
    table = pd.DataFrame({"split": ["val"] * 5 + ["test"] * 6, "label": np.r_[np.zeros(5, int), labels],
                          "stage1_loss": np.r_[val_s1, test_s1], "stage2_score": np.r_[val_s2, test_s2]})
    cascade = fit_cascade(val_s1, val_s2, np.zeros(5, int), CalibrationConfig(method="quantile", q=0.8), fusion="stage2")
    return table, cascade


def test_operating_points_move_tau1_over_validation_quantiles():
    from twostage_ad.evaluate import operating_points

    table, cascade = _operating_table()
    assert cascade.stage1.value == pytest.approx(4.2)  # the 0.8-quantile of 1..5
    points = operating_points(table, cascade, stage1_seconds=0.01, stage2_seconds=0.1, quantiles=(0.0, 0.5))
    every, half, current = (points[points["q"] == 0.0].iloc[0], points[points["q"] == 0.5].iloc[0],
                            points[points["current"]].iloc[0])
    # τ₁ = −∞: every test image goes to stage 2, so the cascade ranks by stage 2 alone
    assert every["test_flagged"] == 1.0 and every["stage1_recall"] == 1.0 and every["val_normals_flagged"] == 1.0
    assert every["cascade_auroc"] == pytest.approx(6 / 9)  # stage-2 AUROC by hand: 0.9 and 0.8 beat all 3 normals, 0.05 none
    # τ₁ = 3 (the median): test normals 3.5 and 6, anomalies 4 and 7 flagged
    assert half["tau1"] == 3.0 and half["val_normals_flagged"] == pytest.approx(0.4)
    assert half["test_normals_flagged"] == pytest.approx(2 / 3) and half["stage1_recall"] == pytest.approx(2 / 3)
    assert half["images_per_s"] == pytest.approx(1 / (0.01 + 0.1 * 4 / 6))
    # the run's own τ₁ = 4.2: only 6 and 7 flagged; τ₂ (0.8-quantile of 0.1..0.5 = 0.42) passes 7's 0.8
    assert current["q"] == pytest.approx(0.8) and current["test_flagged"] == pytest.approx(2 / 6)
    assert current["cascade_recall"] == pytest.approx(1 / 3) and current["cascade_false_positive_rate"] == 0.0
    assert (points["cascade_recall"] <= points["stage1_recall"]).all()
    assert list(points["val_normals_flagged"]) == sorted(points["val_normals_flagged"], reverse=True)
