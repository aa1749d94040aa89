"""A tiny end-to-end run on the bundled digits, and the run-folder contract (DESIGN §7)."""

import json
import re
import shutil
import subprocess
import sys

import pandas as pd
import pytest

from twostage_ad.config import load_config
from twostage_ad.pipeline import main
from twostage_ad.runs import RunExistsError, load_checkpoint
from twostage_ad.workflow import calibrate_run, run_pipeline


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    config = load_config(None, ["stage1.epochs=2", "stage1.base_width=8", "stage1.max_width=32", "run.overlays=2"])
    return run_pipeline(config, tmp_path_factory.mktemp("runs") / "digits", progress=False)


def test_run_writes_the_contract_files(tiny_run):
    run_dir = tiny_run.run_dir
    for name in ("config.yaml", "thresholds.json", "scores.csv", "metrics.json", "report.html",
                 "checkpoints/stage1.pt", "plots/stage1_loss_distribution.png", "plots/stage1_overlays.png",
                 "plots/stage1_training.png", "maps/stage1_test_maps.npz"):
        assert (run_dir / name).is_file(), name
    scores = pd.read_csv(run_dir / "scores.csv")
    for column in ("image", "label", "split", "category", "stage1_loss", "stage1_recon", "stage1_latent",
                   "stage1_att_topk", "flagged", "decision"):
        assert column in scores.columns, column
    assert set(scores["split"]) == {"val", "test"}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert 0.0 <= metrics["image_auroc"]["stage1"] <= 1.0
    assert metrics["pixel_auroc"]["stage1"] is None and "mask" in metrics["notes"]["pixel_auroc.stage1"]
    test = scores[scores["split"] == "test"]
    assert metrics["flagged_fraction"] == pytest.approx(test["flagged"].mean())
    threshold = json.loads((run_dir / "thresholds.json").read_text())["stage1"]
    assert metrics["thresholds"]["stage1"] == threshold["value"]
    assert (scores["flagged"] == (scores["stage1_loss"] > threshold["value"])).all()
    for key in ("train_stage1", "score", "total"):
        assert metrics["seconds"][key] > 0
    assert load_checkpoint(run_dir / "checkpoints" / "stage1.pt")["epoch"] == 2


def test_html_report_references_only_existing_files(tiny_run):
    page = (tiny_run.run_dir / "report.html").read_text()
    refs = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert refs and all((tiny_run.run_dir / ref).is_file() for ref in refs)


def test_existing_run_folder_is_never_silently_overwritten(tiny_run):
    config = load_config(None, ["stage1.epochs=1"])
    before = (tiny_run.run_dir / "scores.csv").read_bytes()
    with pytest.raises(RunExistsError, match="--overwrite"):
        run_pipeline(config, tiny_run.run_dir, progress=False)
    assert (tiny_run.run_dir / "scores.csv").read_bytes() == before
    assert main(["-q", "run", "--output", str(tiny_run.run_dir), "--set", "stage1.epochs=1"]) == 2


def test_run_folder_contract_and_score_direction(tiny_run):
    # digits are easy: even two tiny epochs must rank other digits above zeros
    assert tiny_run.metrics["image_auroc"]["stage1"] > 0.7


def test_overwrite_moves_the_earlier_run_aside(tiny_run, tmp_path):
    run_dir = tmp_path / "copy"
    shutil.copytree(tiny_run.run_dir, run_dir)
    before = (run_dir / "scores.csv").read_bytes()
    config = load_config(None, ["stage1.epochs=1", "stage1.base_width=4", "stage1.max_width=8"])
    run_pipeline(config, run_dir, overwrite=True, progress=False)
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("copy.replaced-")]
    assert len(aside) == 1 and (aside[0] / "scores.csv").read_bytes() == before
    assert json.loads((run_dir / "thresholds.json").read_text())["history"] == []


def test_calibrate_changes_the_threshold_and_keeps_history(tiny_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run.run_dir, run_dir)
    assert main(["-q", "calibrate", str(run_dir), "--method", "fpr", "--fpr", "0.3"]) == 0
    printed = json.loads(capsys.readouterr().out)
    thresholds = json.loads((run_dir / "thresholds.json").read_text())
    assert thresholds["stage1"]["method"] == "fpr" and thresholds["stage1"]["params"] == {"fpr": 0.3}
    assert thresholds["stage1"]["value"] == printed["value"]
    assert thresholds["history"][-1]["method"] == "quantile"
    scores = pd.read_csv(run_dir / "scores.csv")
    val_normals = scores[(scores["split"] == "val") & (scores["label"] == 0)]
    assert (val_normals["stage1_loss"] > printed["value"]).mean() <= 0.3
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["thresholds"]["stage1"] == printed["value"]
    assert metrics["flagged_fraction"] == pytest.approx(scores.loc[scores["split"] == "test", "flagged"].mean())
    # methods that need labelled anomalies fail clearly (digits' val split holds normals only)
    assert main(["-q", "calibrate", str(run_dir), "--method", "youden"]) == 2
    # with no arguments the run's current method (fpr) is kept; a lone parameter implies its method
    assert calibrate_run(run_dir).method == "fpr"
    assert main(["-q", "calibrate", str(run_dir), "--k", "2.5"]) == 0
    current = json.loads((run_dir / "thresholds.json").read_text())["stage1"]
    assert current["method"] == "meanstd" and current["params"] == {"k": 2.5}
    assert f"<td>thresholds.stage1</td><td>{current['value']:.4f}</td>" in (run_dir / "report.html").read_text()


def test_methods_needing_anomalies_fail_before_training(tmp_path):
    config = load_config(None, ["calibration.method=f1", "stage1.epochs=1"])
    with pytest.raises(ValueError, match="needs labelled anomalies in the validation split"):
        run_pipeline(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_cli_reports_config_errors_without_a_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "twostage_ad.pipeline", "run", "--output", str(tmp_path / "x"), "--set", "stage1.epochs=0"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "stage1.epochs must be an integer >= 1, got 0" in proc.stderr
    assert "Traceback" not in proc.stderr
