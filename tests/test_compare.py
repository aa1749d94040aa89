"""``compare``: finished runs of one data set side by side, the choice made on the synthetic
validation score alone, runs of different data refused."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import yaml

from twostage_ad.compare import compare_runs
from twostage_ad.pipeline import main

TINY = ["stage1.epochs=2", "stage1.base_width=8", "stage1.max_width=32", "stage2.epochs=2", "stage2.width_divisor=16",
        "run.overlays=0"]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """A tiny digits run and a copy whose synthetic stage-1 score is 0.01 below the run's own and
    whose test scores are perfect."""
    from twostage_ad.config_io import load_config
    from twostage_ad.workflow import run_pipeline

    root = tmp_path_factory.mktemp("compare")
    first = run_pipeline(load_config(None, TINY), root / "first", progress=False).run_dir
    second = root / "second"
    shutil.copytree(first, second)
    metrics = json.loads((second / "metrics.json").read_text())
    metrics["synthetic_val"]["image_auroc"]["stage1"] -= 0.01
    metrics["image_auroc"] = {"stage1": 1.0, "stage2": 1.0, "cascade": 1.0}  # test scores the choice must not look at
    (second / "metrics.json").write_text(json.dumps(metrics))
    return first, second


def test_the_choice_is_the_highest_synthetic_score_not_the_test(two_runs) -> None:
    first, second = two_runs
    table = compare_runs([first, second])
    metrics = json.loads((first / "metrics.json").read_text())
    row = table.iloc[0]
    assert row["synthetic_stage1"] == metrics["synthetic_val"]["image_auroc"]["stage1"]
    assert row["test_cascade"] == metrics["image_auroc"]["cascade"]
    assert row["train_s"] == pytest.approx(metrics["seconds"]["train_stage1"] + metrics["seconds"]["train_stage2"])
    assert (row["decode"], row["stage1_tile"], row["stage2_size"]) == (32, 0, 32)  # the digits demo: whole 32-px images
    assert table["choice"].tolist() == [True, False]  # the copy: 0.01 lower on synthetic defects, perfect on the test
    assert compare_runs([second, first])["choice"].tolist() == [False, True]  # the run, not the position


def test_a_run_without_a_synthetic_score_is_left_out_of_the_choice(two_runs, tmp_path) -> None:
    first, second = two_runs
    bare = tmp_path / "bare"
    shutil.copytree(first, bare)
    metrics = json.loads((bare / "metrics.json").read_text())
    metrics["synthetic_val"] = None  # fewer than 2 validation normals
    (bare / "metrics.json").write_text(json.dumps(metrics))
    table = compare_runs([bare, second])
    assert np.isnan(table["synthetic_stage1"][0]) and table["choice"].tolist() == [False, True]
    assert not compare_runs([bare])["choice"].any()


def test_a_relative_data_path_names_the_same_data_as_its_absolute_form(tmp_path, monkeypatch) -> None:
    from twostage_ad.config_io import load_config

    monkeypatch.chdir(tmp_path)
    config = load_config(None, ["data.source=folders", "data.path=sets/parts"])
    assert config.data.path == str(tmp_path / "sets" / "parts")  # recorded absolute in the run folder


def test_the_command_prints_and_writes_the_table(two_runs, tmp_path, capsys) -> None:
    first, second = two_runs
    assert main(["-q", "compare", str(first), str(second), "--output", str(tmp_path / "runs.csv")]) == 0
    printed = capsys.readouterr().out
    assert main(["-q", "compare", str(first), "--output", str(tmp_path / "runs.csv")]) == 2  # not without --overwrite
    assert f"choice without test labels (highest synthetic_stage1): {first}" in printed
    assert pd.read_csv(tmp_path / "runs.csv")["run"].tolist() == [str(first), str(second)]


def test_runs_of_other_data_or_unfinished_runs_are_refused(two_runs, tmp_path) -> None:
    first, _ = two_runs
    other = tmp_path / "other"
    shutil.copytree(first, other)
    config = yaml.safe_load((other / "config.yaml").read_text())
    config["data"]["category"] = "elsewhere"
    (other / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match="trained on different data, so their synthetic scores do not compare"):
        compare_runs([first, other])
    (other / "metrics.json").unlink()
    with pytest.raises(FileNotFoundError, match="is not a finished run: metrics.json is missing"):
        compare_runs([other])
    assert main(["-q", "compare", str(first), str(tmp_path / "nothing")]) == 2
