"""A tiny end-to-end run on the bundled digits, and the run-folder contract (docs/design.md §7)."""

import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from twostage_ad.config_io import load_config
from twostage_ad.pipeline import main
from twostage_ad.runs import RunExistsError, load_checkpoint
from twostage_ad.workflow import calibrate_run, run_pipeline

from conftest import REPO, textured, write_image


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    config = load_config(None, ["stage1.epochs=2", "stage1.base_width=8", "stage1.max_width=32", "run.overlays=2",
                                "stage2.epochs=2", "stage2.width_divisor=16"])
    return run_pipeline(config, tmp_path_factory.mktemp("runs") / "digits", progress=False)


def test_run_writes_the_contract_files(tiny_run):
    run_dir = tiny_run.run_dir
    for name in ("config.yaml", "thresholds.json", "scores.csv", "metrics.json", "report.html", "synthetic_scores.csv",
                 "checkpoints/stage1.pt", "checkpoints/stage2.pt", "plots/stage1_loss_distribution.png",
                 "plots/stage1_overlays.png", "plots/stage1_training.png", "plots/stage2_training.png",
                 "plots/stage2_score_distribution.png", "plots/cascade_score_distribution.png",
                 "plots/stage2_overlays_flagged.png", "plots/roc.png", "maps/test_maps.npz", "history.json",
                 "operating_points.csv", "plots/operating_points.png"):
        assert (run_dir / name).is_file(), name
    # round_trip, as the package reads it: a conformal τ₁ equals one validation loss, and the C
    # parser's default conversion can land that loss an ulp above it
    scores = pd.read_csv(run_dir / "scores.csv", float_precision="round_trip")
    for column in ("image", "label", "split", "category", "stage1_loss", "stage1_recon", "stage1_latent",
                   "stage1_att_topk", "flagged", "stage2_score", "cascade_score", "decision"):
        assert column in scores.columns, column
    assert set(scores["split"]) == {"val", "test"}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for stage in ("stage1", "stage2", "cascade"):
        assert 0.0 <= metrics["image_auroc"][stage] <= 1.0
        assert metrics["images_per_s"][stage] > 0
    for stage in ("stage1", "stage2", "fused"):  # digits have no masks
        assert metrics["pixel_auroc"][stage] is None and "mask" in metrics["notes"][f"pixel_auroc.{stage}"]
        assert metrics["pro"][stage] is None
    assert metrics["stage2_map_stats"]["std"] > 0
    test = scores[scores["split"] == "test"]
    assert metrics["flagged_fraction"] == pytest.approx(test["flagged"].mean())
    thresholds = json.loads((run_dir / "thresholds.json").read_text())
    assert metrics["thresholds"] == {"stage1": thresholds["stage1"]["value"], "stage2": thresholds["stage2"]["value"]}
    assert (scores["flagged"] == (scores["stage1_loss"] > thresholds["stage1"]["value"])).all()
    flagged = scores[scores["flagged"]]
    assert (flagged["decision"] == (flagged["stage2_decision_score"] > thresholds["stage2"]["value"]).astype(int)).all()
    assert scores.loc[~scores["flagged"], "stage2_decision_score"].isna().all()
    assert (scores.loc[~scores["flagged"], "decision"] == 0).all()
    for key in ("train_stage1", "train_stage2", "score", "total"):
        assert metrics["seconds"][key] > 0
    assert load_checkpoint(run_dir / "checkpoints" / "stage1.pt")["epoch"] == 2
    stage2 = load_checkpoint(run_dir / "checkpoints" / "stage2.pt")
    assert stage2["epoch"] == 2 and stage2["map_std"] == metrics["stage2_map_stats"]["std"]
    points = pd.read_csv(run_dir / "operating_points.csv")
    current = points[points["current"]].iloc[0]  # the run's own τ₁ reproduces its headline numbers
    assert current["tau1"] == pytest.approx(thresholds["stage1"]["value"])
    assert current["test_flagged"] == pytest.approx(metrics["flagged_fraction"])
    assert current["cascade_recall"] == pytest.approx(metrics["cascade_recall"])
    assert current["cascade_auroc"] == pytest.approx(metrics["image_auroc"]["cascade"])


def test_html_report_references_only_existing_files(tiny_run):
    page = (tiny_run.run_dir / "report.html").read_text()
    refs = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert refs and all((tiny_run.run_dir / ref).is_file() for ref in refs)
    assert "plots/roc.png" in refs and "scores.csv" in refs
    metrics = json.loads((tiny_run.run_dir / "metrics.json").read_text())
    auroc = metrics["image_auroc_cascade_by_category"]["digit_3"]
    assert re.search(rf"<tr><td>digit_3</td>(<td>[^<]*</td>){{2}}<td>{auroc:.4f}</td><td>—</td><td>—</td></tr>", page)  # no masks: —


def test_report_rebuilds_every_plot_from_saved_files(tiny_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run.run_dir, run_dir)
    shutil.rmtree(run_dir / "checkpoints")  # no model needed
    shutil.rmtree(run_dir / "plots")
    (run_dir / "report.html").unlink()
    assert main(["-q", "report", str(run_dir), "--log-scale", "--examples", "3"]) == 0
    page = (run_dir / "report.html").read_text()
    images = re.findall(r'src="([^"]+)"', page)
    expected = {"plots/roc.png", "plots/stage1_loss_distribution.png", "plots/stage2_score_distribution.png",
                "plots/cascade_score_distribution.png", "plots/stage1_training.png", "plots/stage2_training.png",
                "plots/stage1_overlays.png", "plots/stage2_overlays_flagged.png", "plots/cascade_overlays.png"}
    assert expected <= set(images) and all((run_dir / ref).is_file() for ref in images)
    assert "anomalous, missed" in page  # the confusion table
    assert main(["-q", "report", str(tmp_path / "nope")]) == 2


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
    map_fusion = json.loads((run_dir / "thresholds.json").read_text())["cascade"]["map_fusion"]
    assert map_fusion == json.loads((run_dir / "metrics.json").read_text())["map_fusion"]  # the map the metrics scored
    assert main(["-q", "calibrate", str(run_dir), "--method", "fpr", "--fpr", "0.3"]) == 0
    printed = json.loads(capsys.readouterr().out)["stage1"]
    thresholds = json.loads((run_dir / "thresholds.json").read_text())
    assert thresholds["cascade"]["map_fusion"] == map_fusion  # re-picking thresholds keeps the cascade's map
    assert thresholds["stage1"]["method"] == "fpr" and thresholds["stage1"]["params"] == {"fpr": 0.3}
    assert thresholds["stage2"]["method"] == "fpr"
    assert thresholds["stage1"]["value"] == printed["value"]
    assert [(h["stage"], h["method"]) for h in thresholds["history"]] == [("stage1", "conformal"), ("stage2", "conformal")]
    scores = pd.read_csv(run_dir / "scores.csv", float_precision="round_trip")
    val_normals = scores[(scores["split"] == "val") & (scores["label"] == 0)]
    assert (val_normals["stage1_loss"] > printed["value"]).mean() <= 0.3
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["thresholds"]["stage1"] == printed["value"]
    assert metrics["flagged_fraction"] == pytest.approx(scores.loc[scores["split"] == "test", "flagged"].mean())
    # methods that need labelled anomalies fail clearly (digits' val split holds normals only)
    assert main(["-q", "calibrate", str(run_dir), "--method", "youden"]) == 2
    # with no arguments the run's current method (fpr) is kept; a lone parameter implies its method
    assert calibrate_run(run_dir).stage1.method == "fpr"
    assert main(["-q", "calibrate", str(run_dir), "--k", "2.5"]) == 0
    current = json.loads((run_dir / "thresholds.json").read_text())["stage1"]
    assert current["method"] == "meanstd" and current["params"] == {"k": 2.5}
    assert f"<tr><td>threshold (τ₁; τ₂ on the second-stage score)</td><td>{current['value']:.4f}</td>" in (run_dir / "report.html").read_text()


def test_synthetic_recall_calibrates_on_the_saved_synthetic_defects(tiny_run, tmp_path, caplog):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run.run_dir, run_dir)
    synthetic = pd.read_csv(run_dir / "synthetic_scores.csv", float_precision="round_trip")
    val_normals = (pd.read_csv(run_dir / "scores.csv", float_precision="round_trip").query("split == 'val' and label == 0"))
    assert len(synthetic) == len(val_normals) and set(synthetic.columns) == {"kind", "defect_pixels", "stage1_loss", "stage2_score"}
    assert (synthetic["defect_pixels"] > 0).all()
    assert main(["-q", "calibrate", str(run_dir), "--stage", "1", "--method", "synthetic_recall", "--recall", "0.9"]) == 0
    tau1 = json.loads((run_dir / "thresholds.json").read_text())["stage1"]
    assert tau1["method"] == "synthetic_recall"
    recall = (synthetic["stage1_loss"] > tau1["value"]).mean()
    assert recall >= 0.9 and tau1["stats"]["recall_synthetic"] == pytest.approx(recall)
    assert main(["-q", "calibrate", str(run_dir), "--stage", "1", "--recall", "0.8"]) == 0  # a lone --recall keeps it
    assert json.loads((run_dir / "thresholds.json").read_text())["stage1"]["method"] == "synthetic_recall"
    # a run folder without the file (an older run) is refused with the reason, not silently re-picked
    (run_dir / "synthetic_scores.csv").unlink()
    assert main(["-q", "calibrate", str(run_dir), "--method", "synthetic_recall"]) == 2
    assert "needs the scores of validation normals with synthetic defects" in caplog.text and "synthetic_scores.csv" in caplog.text


def test_calibrating_one_stage_keeps_the_other_and_updates_the_cascade(tiny_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run.run_dir, run_dir)
    before = json.loads((run_dir / "thresholds.json").read_text())
    assert main(["-q", "calibrate", str(run_dir), "--stage", "2", "--q", "0.5"]) == 0
    after = json.loads((run_dir / "thresholds.json").read_text())
    assert after["stage1"]["value"] == before["stage1"]["value"]  # scores.csv round-trips exactly
    assert after["stage1"]["method"] == "conformal"
    # a lone --q keeps the threshold's own method where it takes q (the default conformal here)
    assert after["stage2"]["method"] == "conformal"
    assert after["stage2"]["params"] == {"q": 0.5} and after["stage2"]["value"] < before["stage2"]["value"]
    # a plain calibrate re-picks each threshold with its own current method
    assert main(["-q", "calibrate", str(run_dir)]) == 0
    again = json.loads((run_dir / "thresholds.json").read_text())
    assert again["stage2"]["params"] == {"q": 0.5} and again["stage2"]["value"] == pytest.approx(after["stage2"]["value"])
    assert "cascade_false_positive_rate_val" in again["stage2"]["stats"]
    # a lone --q keeps a quantile threshold a quantile (an old run folder's), and refuses to guess for both
    assert main(["-q", "calibrate", str(run_dir), "--stage", "2", "--method", "quantile", "--q", "0.8"]) == 0
    assert main(["-q", "calibrate", str(run_dir), "--stage", "2", "--q", "0.7"]) == 0
    kept = json.loads((run_dir / "thresholds.json").read_text())["stage2"]
    assert kept["method"] == "quantile" and kept["params"] == {"q": 0.7}
    assert main(["-q", "calibrate", str(run_dir), "--q", "0.9"]) == 2  # τ₁ conformal, τ₂ quantile
    # a lower τ₁ flags more images and changes the cascade's AUROC, recomputed from saved scores
    assert main(["-q", "calibrate", str(run_dir), "--stage", "1", "--q", "0.05"]) == 0
    scores = pd.read_csv(run_dir / "scores.csv", float_precision="round_trip")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    test = scores[scores["split"] == "test"]
    from sklearn.metrics import roc_auc_score

    assert metrics["image_auroc"]["cascade"] == pytest.approx(roc_auc_score(test["label"], test["cascade_score"]))
    assert metrics["flagged_fraction"] == pytest.approx(test["flagged"].mean())


def test_a_run_can_set_the_screen_for_a_recall_on_synthetic_defects(tiny_run, tmp_path):
    """``calibration.method: synthetic_recall`` in a run: τ₁ and τ₂ from the run's own synthetic
    defects on the validation normals, no label needed (the stages reused, so nothing trains)."""
    config = load_config(None, ["calibration.method=synthetic_recall", "calibration.recall=0.9", "run.overlays=0"])
    checkpoints = tiny_run.run_dir / "checkpoints"
    result = run_pipeline(config, tmp_path / "recall", progress=False,
                          stage1_checkpoint=checkpoints / "stage1.pt", stage2_checkpoint=checkpoints / "stage2.pt")
    thresholds = json.loads((result.run_dir / "thresholds.json").read_text())
    synthetic = pd.read_csv(result.run_dir / "synthetic_scores.csv", float_precision="round_trip")
    assert thresholds["stage1"]["method"] == thresholds["stage2"]["method"] == "synthetic_recall"
    assert (synthetic["stage1_loss"] > thresholds["stage1"]["value"]).mean() >= 0.9
    assert result.metrics["synthetic_val"]["stage1_recall_at_threshold"] >= 0.9


def test_trained_stages_can_be_reused(tiny_run, tmp_path):
    config = load_config(None, ["stage1.epochs=1", "stage2.epochs=1", "stage2.score_reduction=topk", "run.overlays=0"])
    checkpoints = tiny_run.run_dir / "checkpoints"
    result = run_pipeline(config, tmp_path / "reuse", progress=False,
                          stage1_checkpoint=checkpoints / "stage1.pt", stage2_checkpoint=checkpoints / "stage2.pt")
    assert result.metrics["seconds"]["train_stage1"] == 0.0 and result.metrics["epochs"] == {"stage1": 2, "stage2": 2}
    assert "stage1.reused" in result.metrics["notes"]
    # same stage-1 network: same screening losses; stage 2's scoring setting comes from the config
    assert result.scores["stage1_loss"].to_numpy() == pytest.approx(tiny_run.scores["stage1_loss"].to_numpy(), rel=1e-5)
    saved = load_config(result.run_dir / "config.yaml")
    assert saved.stage1.base_width == 8 and saved.stage2.width_divisor == 16 and saved.stage2.score_reduction == "topk"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_pipeline(config, tmp_path / "missing", progress=False, stage1_checkpoint=tmp_path / "nope.pt")


def test_reusing_stage1_with_another_screening_refits_the_attention_spread(tiny_run, tmp_path):
    """The feature banks hold the attention term's spread on the training normals as it was screened
    when fitted; a reused stage 1 screened with another ``screen_topk`` gets it refitted, not stale."""
    from twostage_ad.data.images import decode_records
    from twostage_ad.data.records import load_records, split_records
    from twostage_ad.stages.attention import AttentionStage

    config = load_config(None, ["stage1.screen_topk=0.05", "run.overlays=0"])
    result = run_pipeline(config, tmp_path / "share", progress=False,
                          stage1_checkpoint=tiny_run.run_dir / "checkpoints" / "stage1.pt")
    original = AttentionStage.load(tiny_run.run_dir / "checkpoints" / "stage1.pt")
    reused = AttentionStage.load(result.run_dir / "checkpoints" / "stage1.pt")
    assert (original.config.screen_topk, reused.config.screen_topk) == (0.01, 0.05)
    assert reused.features_.attention_mean != pytest.approx(original.features_.attention_mean, rel=1e-3)
    train = decode_records(split_records(load_records(config.data, seed=config.run.seed))["train"], 32, 1, progress=False)
    refitted = reused.fit_feature_normality(train.images)
    assert reused.features_.attention_mean == pytest.approx(refitted.attention_mean, rel=1e-5)


def test_methods_needing_anomalies_fail_before_training(tmp_path):
    config = load_config(None, ["calibration.method=f1", "stage1.epochs=1"])
    with pytest.raises(ValueError, match="needs labelled anomalies in the validation split"):
        run_pipeline(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_cli_reports_config_errors_without_a_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "twostage_ad.pipeline", "run", "--output", str(tmp_path / "x"), "--set", "stage1.epochs=0"],
        capture_output=True, text=True, timeout=600,  # room for a CPU several times slower than this one
    )
    assert proc.returncode == 2
    assert "stage1.epochs must be an integer >= 1, got 0" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_recalibrate_example_runs_on_a_finished_run(tiny_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run.run_dir, run_dir)
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "recalibrate.py"), str(run_dir)],
                          capture_output=True, text=True, timeout=600)  # room for a CPU several times slower
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("τ₁") == 4
    assert json.loads((run_dir / "thresholds.json").read_text())["stage1"]["method"] == "conformal"


def test_run_reports_the_synthetic_validation_score(tiny_run):
    """metrics.json carries the test-label-free score: validation normals vs synthetic defects on them."""
    synthetic = json.loads((tiny_run.run_dir / "metrics.json").read_text())["synthetic_val"]
    val_normals = int(((tiny_run.scores["split"] == "val") & (tiny_run.scores["label"] == 0)).sum())
    assert 0 < synthetic["images"] <= val_normals
    for key in ("stage1", "stage2", "cascade"):
        assert 0.0 <= synthetic["image_auroc"][key] <= 1.0
    assert set(synthetic["image_auroc_stage1_by_kind"]) <= {"cutout", "cutpaste", "blob", "crack", "scratch", "stain"}
    assert 0.0 <= synthetic["stage1_recall_at_threshold"] <= 1.0
    for key in ("stage1", "stage2", "fused"):
        assert 0.0 <= synthetic["pixel_auroc"][key] <= 1.0 and 0.0 <= synthetic["pro"][key] <= 1.0
    fusion = json.loads((tiny_run.run_dir / "metrics.json").read_text())["map_fusion"]
    assert fusion["stage2_weight"] == 0.1 and 0.0 <= fusion["stage1_mean"] <= 1.0 and fusion["stage1_std"] > 0


@pytest.mark.filterwarnings("ignore:data.source 'folders' without a config file")  # tiny settings are given here
def test_a_run_on_large_images_warns_once_that_small_defects_may_vanish(tmp_path, caplog):
    rng = np.random.default_rng(0)
    for split, folder, count in (("train", "0.normal", 8), ("test", "0.normal", 2), ("test", "1.abnormal", 2)):
        for index in range(count):
            write_image(tmp_path / "d" / split / folder / f"{index}.png", textured(rng, size=160))
    config = load_config(None, ["data.source=seed", f"data.path={tmp_path / 'd'}", "data.image_size=32", "run.overlays=0",
                                "stage1.epochs=1", "stage1.base_width=8", "stage1.max_width=16", "stage1.min_steps=0",
                                "stage2.epochs=1", "stage2.width_divisor=16", "stage2.min_steps=0"])
    with caplog.at_level("WARNING", logger="twostage_ad"):
        run_pipeline(config, tmp_path / "run", progress=False)
    warned = [r.getMessage() for r in caplog.records if "larger than stage 1's input" in r.getMessage()]
    assert len(warned) == 1 and "about 5× larger than stage 1's input of 32 px" in warned[0]  # 160 / 32; not per split


@pytest.mark.filterwarnings("ignore:data.source 'folders' without a config file")  # tiny settings are given here
def test_a_run_on_twelve_bit_images_reads_and_scores_them_at_their_bit_depth(tmp_path):
    from twostage_ad.detector import TwoStageDetector

    rng = np.random.default_rng(0)
    for split, folder, count in (("train", "0.normal", 8), ("test", "0.normal", 2), ("test", "1.abnormal", 2)):
        for index in range(count):
            twelve_bit = (textured(rng).astype(np.uint16) * 16)  # 0-4080: 12-bit values in a 16-bit file
            write_image(tmp_path / "d" / split / folder / f"{index}.png", twelve_bit)
    config = load_config(None, ["data.source=seed", f"data.path={tmp_path / 'd'}", "data.image_size=32", "run.overlays=0",
                                "stage1.epochs=1", "stage1.base_width=8", "stage1.max_width=16", "stage1.min_steps=0",
                                "stage2.epochs=1", "stage2.width_divisor=16", "stage2.min_steps=0"])
    result = run_pipeline(config, tmp_path / "run", progress=False)
    assert load_config(result.run_dir / "config.yaml").data.bit_depth == 12  # resolved from the training images
    maps = np.load(result.run_dir / "maps" / "test_maps.npz")["images"]
    assert maps.max() > 150  # decoded at full contrast, not 16× too dark
    detector = TwoStageDetector.from_run(result.run_dir, device="cpu")
    files = sorted((tmp_path / "d" / "test").rglob("*.png"))
    frame = detector.predict(files, progress=False, maps=False).to_frame()
    saved = result.scores[result.scores["split"] == "test"].set_index("image")
    names = [str(f.relative_to(tmp_path / "d")) for f in files]
    np.testing.assert_allclose(frame["stage1_loss"], saved.loc[names, "stage1_loss"], rtol=1e-5, atol=1e-6)
