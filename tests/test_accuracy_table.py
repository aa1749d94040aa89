"""The accuracy benchmark's table keeping: re-run rows replace earlier ones, peers not run keep
their earlier values, and the per-data-set mean counts a peer only where it ran on every class."""

from __future__ import annotations

import argparse
import sys

import numpy as np
import pandas as pd
import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
accuracy = pytest.importorskip("accuracy")


def _row(category: str, seed: int, commit: str, stage1: float, **peers: float) -> dict:
    ours = dict.fromkeys(accuracy.OURS, 0.5) | {"image_auroc_stage1": stage1}
    return {"dataset": "piped", "class": category, "seed": seed, "commit": commit, **ours, **peers}


def test_rerun_row_replaces_ours_and_keeps_earlier_peer_values() -> None:
    earlier = accuracy.earlier_rows_from(pd.DataFrame([
        _row("A", 0, "old", 0.7, peer_image_auroc=0.55),  # an older table's GANomaly column name
        _row("B", 0, "old", 0.8, peer_image_auroc=0.45),
    ]))
    new = pd.DataFrame([_row("A", 0, "new", 0.9, draem_image_auroc=0.6)])
    merged = accuracy.merge_rows(earlier, new).set_index("class")
    assert merged.loc["A", "commit"] == "new" and merged.loc["A", "image_auroc_stage1"] == 0.9
    assert merged.loc["A", "ganomaly_image_auroc"] == 0.55  # carried over: the peer did not run now
    assert merged.loc["A", "draem_image_auroc"] == 0.6
    assert merged.loc["B", "commit"] == "old" and merged.loc["B", "ganomaly_image_auroc"] == 0.45
    assert np.isnan(merged.loc["B", "draem_image_auroc"])


def test_class_mean_counts_a_peer_only_on_seeds_where_it_ran_on_every_class() -> None:
    runs = accuracy.merge_rows(pd.DataFrame(), pd.DataFrame([
        _row("A", 0, "c", 1.0, draem_image_auroc=0.6), _row("B", 0, "c", 0.8, draem_image_auroc=0.8),
        _row("A", 1, "c", 0.9, draem_image_auroc=0.2), _row("B", 1, "c", 0.7),  # seed 1: DRAEM missing on B
    ]))
    summary = accuracy.summarise(runs).set_index("class")
    mean = summary.loc["mean of 2 classes"]
    assert mean["image_auroc_stage1_mean"] == pytest.approx((0.9 + 0.8) / 2)  # seed means 0.9 and 0.8
    assert mean["draem_image_auroc_mean"] == pytest.approx(0.7) and mean["draem_seeds"] == 1
    assert summary.loc["A", "draem_seeds"] == 2


def test_rows_record_how_their_thresholds_were_calibrated(tmp_path) -> None:
    """The flagged share depends on the calibration method, so each row and the table's header say it;
    rows of older tables (no column) count as unrecorded."""
    (tmp_path / "thresholds.json").write_text('{"stage1": {"method": "conformal"}, "stage2": {"method": "quantile"}}')
    assert accuracy.calibration_of(tmp_path) == "conformal/quantile"
    assert accuracy.calibration_of(tmp_path / "missing") == "unknown"
    earlier = accuracy.earlier_rows_from(pd.DataFrame([_row("A", 0, "old", 0.7)]))  # no calibration column
    new = pd.DataFrame([_row("B", 0, "new", 0.8) | {"calibration": "conformal/quantile"}])
    runs = accuracy.merge_rows(earlier, new)
    args = argparse.Namespace(peer_epochs=15, peer_batch_size=16, draem_batch_size=8)
    header = accuracy.markdown(accuracy.summarise(runs), runs, args).split("\n\n")[1]
    assert "thresholds τ₁/τ₂ by conformal/quantile (1 rows), unrecorded (1 rows)" in header
