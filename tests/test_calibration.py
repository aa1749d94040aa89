import numpy as np
import pytest

from twostage_ad.calibration import CalibrationError, calibrate, conformal_threshold
from twostage_ad.config import CalibrationConfig

NORMAL = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0])
LABELS = np.zeros(10, dtype=int)


def test_quantile_matches_numpy_linear_interpolation():
    t = calibrate(NORMAL, LABELS, CalibrationConfig(method="quantile", q=0.9))
    assert t.value == pytest.approx(9.1)  # 1 + 0.9·9
    assert t.params == {"q": 0.9}
    assert t.stats["n_normal"] == 10 and t.stats["max"] == 10.0
    assert t.stats["flagged_fraction_normal"] == pytest.approx(0.1)


def test_conformal_is_the_order_statistic_a_new_normal_exceeds_at_most_1_minus_q_of_the_time():
    t = calibrate(np.arange(1.0, 20.0), np.zeros(19, int), CalibrationConfig(method="conformal", q=0.9))
    assert t.value == 18.0  # the ⌈(19 + 1)·0.9⌉ = 18th smallest of 1..19
    assert t.params == {"q": 0.9} and t.stats["bound"] == "order_statistic" and t.stats["rank"] == 18
    assert calibrate(NORMAL, LABELS, CalibrationConfig(method="conformal", q=0.9)).value == 10.0  # ⌈11·0.9⌉ = 10th of 10


def test_conformal_on_too_few_normals_is_the_gaussian_prediction_bound():
    t = calibrate(np.array([1.0, 2.0, 3.0, 4.0]), np.zeros(4, int), CalibrationConfig(method="conformal", q=0.9))
    # ⌈5·0.9⌉ = 5 > 4 normals: mean 2.5 + t(0.9, 3 df) 1.637744 · s 1.290994 · √(1 + 1/4)
    assert t.value == pytest.approx(2.5 + 1.637744 * 1.290994 * 1.118034, rel=1e-6)
    assert t.stats["bound"] == "gaussian_prediction"
    # never below the largest normal: one far normal among eight (⌈9·0.9⌉ = 9 > 8) sets it
    assert conformal_threshold(np.array([0.0] * 7 + [10.0]), 0.9)[0] == 10.0


def test_conformal_on_one_normal_is_its_score_with_a_warning(caplog):
    value, how = conformal_threshold(np.array([3.5]), 0.9)
    assert value == 3.5 and how["bound"] == "single_normal"
    assert "single validation normal" in caplog.text


@pytest.mark.parametrize("n", [4, 19])
def test_conformal_keeps_new_normals_false_positive_rate_at_1_minus_q_where_the_quantile_does_not(n):
    """Many calibration sets of ``n`` normals: the share of new normals above the threshold. The plain
    0.9-quantile lies between two order statistics, so it rejects more than the upper one's
    1 − ⌈pos⌉/(n + 1) (0.2 of new normals with 4, 0.1 with 19); conformal rejects 0.1."""
    rng = np.random.default_rng(0)
    calibration, new = rng.normal(size=(4000, n)), rng.normal(size=(4000, 50))
    conformal = np.array([conformal_threshold(c, 0.9)[0] for c in calibration])
    quantile = np.quantile(calibration, 0.9, axis=1)
    assert np.mean(new > conformal[:, None]) == pytest.approx(0.10, abs=0.01)
    position = 1 + 0.9 * (n - 1)  # numpy's linear interpolation, 1-based
    assert 1 - np.ceil(position) / (n + 1) + 0.02 < np.mean(new > quantile[:, None]) < 1 - np.floor(position) / (n + 1)


def test_mean_plus_k_std_uses_the_sample_std():
    t = calibrate(NORMAL, LABELS, CalibrationConfig(method="meanstd", k=2.0))
    assert t.value == pytest.approx(5.5 + 2.0 * 3.0276503540974917)


@pytest.mark.parametrize("fpr, expected", [(0.1, 9.0), (0.25, 8.0), (0.05, 10.0)])
def test_target_fpr_keeps_the_rate_at_or_below_target(fpr, expected):
    t = calibrate(NORMAL, LABELS, CalibrationConfig(method="fpr", fpr=fpr))
    assert t.value == expected
    assert np.mean(t.value < NORMAL) <= fpr


def test_youden_f1_and_recall_with_labelled_anomalies():
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.35, 0.6, 0.7, 0.8])
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    youden = calibrate(scores, labels, CalibrationConfig(method="youden"))
    # flag > t: the best cut flags {0.6, 0.7, 0.8} (TPR .75, FPR 0) or all from 0.35 (TPR 1, FPR .25)
    assert youden.stats["youden_j"] == pytest.approx(0.75)
    assert np.mean(scores[labels == 1] > youden.value) in (0.75, 1.0)
    f1 = calibrate(scores, labels, CalibrationConfig(method="f1"))
    flagged = scores > f1.value
    precision = flagged[labels == 1].sum() / flagged.sum()
    recall = flagged[labels == 1].mean()
    assert 2 * precision * recall / (precision + recall) == pytest.approx(f1.stats["f1"])
    recall_t = calibrate(scores, labels, CalibrationConfig(method="recall", recall=1.0))
    assert np.all(scores[labels == 1] > recall_t.value)  # every anomaly flagged
    assert recall_t.value < 0.35 and recall_t.value > 0.3  # just below the weakest anomaly


def test_methods_needing_anomalies_explain_what_is_missing():
    with pytest.raises(CalibrationError, match="needs labelled anomalies in the validation split"):
        calibrate(NORMAL, LABELS, CalibrationConfig(method="youden"))


def test_no_normals_or_nan_scores_are_refused():
    with pytest.raises(CalibrationError, match="no normal validation scores"):
        calibrate(np.array([1.0]), np.array([1]), CalibrationConfig())
    with pytest.raises(CalibrationError, match="NaN or infinite"):
        calibrate(np.array([1.0, np.nan]), np.array([0, 0]), CalibrationConfig())


def test_synthetic_recall_flags_the_target_share_of_synthetic_defects_without_labels():
    synthetic = np.arange(11.0, 21.0)  # 11 … 20, all above every normal
    t = calibrate(NORMAL, LABELS, CalibrationConfig(method="synthetic_recall", recall=0.8), synthetic=synthetic)
    assert 12.999 < t.value < 13.0  # just below the 3rd lowest: 13 … 20 (8 of 10) flagged
    assert t.params == {"recall": 0.8}
    assert t.stats["recall_synthetic"] == pytest.approx(0.8) and t.stats["n_synthetic"] == 10
    assert t.stats["flagged_fraction_normal"] == 0.0
    # defects that look like normals: a full-recall target flags most normals too, and says so
    faint = calibrate(NORMAL, LABELS, CalibrationConfig(method="synthetic_recall", recall=1.0), synthetic=NORMAL + 0.5)
    assert 1.0 < faint.value < 1.5 and faint.stats["flagged_fraction_normal"] == pytest.approx(0.9)
    with pytest.raises(CalibrationError, match="synthetic defects"):
        calibrate(NORMAL, LABELS, CalibrationConfig(method="synthetic_recall"))
    with pytest.raises(CalibrationError, match="synthetic-defect score"):
        calibrate(NORMAL, LABELS, CalibrationConfig(method="synthetic_recall"), synthetic=np.array([1.0, np.inf]))


@pytest.mark.parametrize("method", ["recall", "synthetic_recall", "youden"])
def test_a_threshold_just_below_a_float32_score_still_flags_it_in_float32(method):
    """Screening losses are float32; NumPy compares them with a Python float in float32, where a
    float64 step below a score rounds back up to the score and leaves it unflagged."""
    rng = np.random.default_rng(0)
    normal = rng.normal(0.0, 1.0, 50).astype(np.float32)
    anomalous = rng.normal(3.0, 1.0, 50).astype(np.float32)
    scores, labels = np.r_[normal, anomalous], np.r_[np.zeros(50, int), np.ones(50, int)]
    config = CalibrationConfig(method=method, recall=1.0)
    t = calibrate(scores, labels, config, synthetic=anomalous if method == "synthetic_recall" else None)
    flagged32 = anomalous > t.value  # float32 comparison
    flagged64 = anomalous.astype(np.float64) > t.value
    assert np.array_equal(flagged32, flagged64)
    if method != "youden":
        assert flagged32.all()  # recall 1.0: even the weakest anomaly, in either precision


def test_a_recall_threshold_from_saved_decimals_still_flags_the_float32_losses():
    """``calibrate`` re-picks from scores.csv (9 significant digits); predict compares the model's
    float32 losses with that threshold."""
    losses = np.random.default_rng(1).normal(3.0, 1.0, 200).astype(np.float32)
    saved = np.array([float(f"{v:.9g}") for v in losses])
    t = calibrate(saved, np.ones(200, int) * 0, CalibrationConfig(method="synthetic_recall", recall=1.0), synthetic=saved)
    assert (losses > t.value).all() and (saved > t.value).all()
