"""Real data (../shared/data): slow, run on demand with `pytest -m slow`; skipped when absent."""

import json

import pytest

from twostage_ad.config_io import load_config
from twostage_ad.data.records import load_records, split_records
from twostage_ad.workflow import run_pipeline

from conftest import REPO, SHARED_DATA

pytestmark = pytest.mark.slow


def _require(name: str) -> None:
    if not (SHARED_DATA / name / "split.csv").is_file():
        pytest.skip(f"{SHARED_DATA / name} is not present")


@pytest.mark.parametrize("name, counts", [("mtd", (571, 95, 678)), ("piped", (32, 4, 60))])
def test_manifests_load_with_the_documented_counts(name, counts):
    _require(name)
    config = load_config(REPO / "pipelines" / f"{name}.yaml")
    parts = split_records(load_records(config.data))
    assert (len(parts["train"]), len(parts["val"]), len(parts["test"])) == counts


def test_piped_class_runs_end_to_end_with_pixel_metrics(tmp_path):
    _require("piped")
    config = load_config(REPO / "pipelines" / "piped.yaml", ["stage1.epochs=3", "stage1.min_steps=0", "stage2.epochs=3", "stage2.min_steps=0"])
    result = run_pipeline(config, tmp_path / "piped", progress=False)
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert metrics["counts"]["test_anomalous"] == 48
    for stage in ("stage1", "stage2", "cascade"):
        assert 0.0 <= metrics["image_auroc"][stage] <= 1.0
    for stage in ("stage1", "stage2", "fused"):  # PIPED has pixel masks: every pixel metric is defined
        assert 0.0 <= metrics["pixel_auroc"][stage] <= 1.0
        assert 0.0 <= metrics["pro"][stage] <= 1.0
