"""``benchmarks/thresholds.py`` measures threshold methods on held-out validation normals, no label needed."""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import pytest

from twostage_ad.config import CalibrationConfig

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import thresholds  # noqa: E402  (benchmarks/ is not a package)


def test_subsets_are_all_combinations_when_few_and_seeded_draws_otherwise():
    every = thresholds.calibration_subsets(4, 3, 200, np.random.default_rng(0))
    assert len(every) == 4 and {tuple(s) for s in every} == {(0, 1, 2), (0, 1, 3), (0, 2, 3), (1, 2, 3)}
    drawn = thresholds.calibration_subsets(95, 8, 50, np.random.default_rng(0))
    assert len(drawn) == 50 and all(len(set(s)) == 8 and s.max() < 95 for s in drawn)
    again = thresholds.calibration_subsets(95, 8, 50, np.random.default_rng(0))
    assert all((a == b).all() for a, b in zip(drawn, again))


def test_held_out_normals_show_the_quantiles_excess_false_positives_on_four_normals():
    rng = np.random.default_rng(1)
    s1, s2 = rng.normal(size=400), rng.normal(size=400)
    syn1, syn2 = s1 + 3.0, s2 + 3.0  # every synthetic copy far above its normal
    subsets = thresholds.calibration_subsets(400, 4, 300, rng)
    rates = {m: thresholds.held_out_rates(s1, s2, syn1, syn2, CalibrationConfig(method=m, q=0.9), "stage2", subsets)
             for m in ("conformal", "quantile")}
    assert rates["conformal"]["screen_fpr"] == pytest.approx(0.10, abs=0.02)
    assert rates["quantile"]["screen_fpr"] == pytest.approx(0.24, abs=0.03)
    # both gates must pass for the cascade, so it rejects fewer normals than either (independent scores here)
    assert rates["conformal"]["cascade_fpr"] < 0.5 * rates["conformal"]["screen_fpr"]
    assert rates["conformal"]["synthetic_screen_recall"] > 0.8 and rates["conformal"]["draws"] == 300
    assert rates["quantile"]["synthetic_cascade_recall"] > rates["conformal"]["synthetic_cascade_recall"]


def test_test_rates_use_the_test_labels_only_for_the_rates():
    val = pd.DataFrame({"stage1_loss": [0.0, 1.0, 2.0, 3.0], "stage2_score": [0.0, 1.0, 2.0, 3.0], "label": 0})
    test = pd.DataFrame({"stage1_loss": [0.5, 2.95, 10.0, 10.0], "stage2_score": [0.5, 2.95, 10.0, 0.0], "label": [0, 0, 1, 1]})
    rates = thresholds.test_rates(val, test, CalibrationConfig(method="quantile", q=0.9), "stage2")
    assert rates["tau1"] == pytest.approx(2.7) and rates["tau2"] == pytest.approx(2.7)  # 2 + 0.7·(3 − 2)
    assert rates["test_screen_fpr"] == 0.5 and rates["test_cascade_fpr"] == 0.5  # 2.95 passes both
    assert rates["test_screen_recall"] == 1.0 and rates["test_cascade_recall"] == 0.5  # stage 2 rejects the second
    assert thresholds.test_rates(val, test, CalibrationConfig(method="conformal", q=0.9), "stage2")["test_cascade_fpr"] == 0.0
