"""``benchmarks/rescore.py fusion --synthetic`` ranks fusion rules without a test label."""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import pytest

from twostage_ad.config import Config
from twostage_ad.config_io import save_config

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
rescore = pytest.importorskip("rescore")


def _run_folder(tmp_path, rng):
    """40 validation normals and 5 labelled validation anomalies, and one synthetic-defect copy per
    normal that stage 1 separates perfectly and stage 2 scores below every normal."""
    save_config(Config().validate(), tmp_path / "config.yaml")
    val = pd.DataFrame({"image": [f"v{i}" for i in range(45)], "label": [0] * 40 + [1] * 5, "split": "val",
                        "stage1_loss": np.r_[rng.normal(0, 1, 40), np.full(5, 100.0)],
                        "stage2_score": rng.normal(0, 1, 45)})
    test = pd.DataFrame({"image": [f"t{i}" for i in range(20)], "label": [0, 1] * 10, "split": "test",
                         "stage1_loss": rng.normal(0, 1, 20), "stage2_score": rng.normal(0, 1, 20)})
    pd.concat([val, test]).to_csv(tmp_path / "scores.csv", index=False)
    pd.DataFrame({"kind": "blob", "defect_pixels": 50, "stage1_loss": rng.uniform(10, 20, 40),
                  "stage2_score": np.full(40, -10.0)}).to_csv(tmp_path / "synthetic_scores.csv", index=False)
    return tmp_path


def test_synthetic_fusion_scores_normals_against_their_synthetic_copies(tmp_path):
    run = _run_folder(tmp_path, np.random.default_rng(0))
    val = pd.read_csv(run / "scores.csv").query("split == 'val'")
    labels, stage1, stage2 = rescore._synthetic_set(run, val, pd.read_csv(run / "synthetic_scores.csv"))
    assert labels.tolist() == [0] * 40 + [1] * 40  # the labelled validation anomalies are left out
    assert stage1.max() < 100.0 and len(stage2) == 80
    row = rescore.fusion_row(run, synthetic=True)
    assert row["scored"] == "synthetic"
    assert row["auroc_w0"] == 1.0 and row["auroc_max"] == 1.0  # stage 1 alone, or its max with stage 2, separates them
    # by stage 2 alone, the flagged normals (a tenth at q = 0.9) rank above every flagged copy
    assert row["auroc_stage2"] <= 0.925
    assert rescore.fusion_row(run)["scored"] == "test"


def test_synthetic_fusion_needs_the_synthetic_scores(tmp_path):
    run = _run_folder(tmp_path, np.random.default_rng(0))
    (run / "synthetic_scores.csv").unlink()
    with pytest.raises(SystemExit, match="has no synthetic_scores.csv"):
        rescore.fusion_row(run, synthetic=True)
