"""The Python API on a finished run, and the predict CLI: same numbers as the run, same as each other."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import twostage_ad
from twostage_ad.config_io import load_config
from twostage_ad.data.images import decode_records
from twostage_ad.data.records import DataError, load_records, split_records
from twostage_ad.detector import TwoStageDetector, expand_image_paths
from twostage_ad.pipeline import main
from twostage_ad.workflow import run_pipeline

TINY = ["stage1.epochs=2", "stage1.base_width=8", "stage1.max_width=32", "stage2.epochs=2",
        "stage2.width_divisor=16", "run.overlays=0"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    config = load_config(None, TINY)
    result = run_pipeline(config, tmp_path_factory.mktemp("runs") / "digits", progress=False)
    test = decode_records(split_records(load_records(config.data, seed=config.run.seed))["test"], 32, 1, progress=False)
    return result, test


@pytest.fixture(scope="module")
def folder(run, tmp_path_factory):
    """The first 40 test digits as PNG files, plus one file that is not an image."""
    _, test = run
    root = tmp_path_factory.mktemp("images")
    for i in range(40):
        Image.fromarray(test.images[i, :, :, 0]).save(root / f"img_{i:03d}.png")
    (root / "broken.png").write_bytes(b"not a png at all")
    return root


def test_api_reproduces_the_run_scores(run):
    result, test = run
    detector = twostage_ad.TwoStageDetector.from_run(result.run_dir, device="cpu")
    predictions = detector.predict(test.images, progress=False)
    frame = predictions.to_frame()
    saved = result.scores[result.scores["split"] == "test"].reset_index(drop=True)
    for column in ("stage1_loss", "cascade_score"):
        np.testing.assert_allclose(frame[column], saved[column], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(frame["flagged"], saved["flagged"])
    np.testing.assert_array_equal(frame["decision"], saved["decision"])
    flagged = frame["flagged"].to_numpy()
    np.testing.assert_allclose(frame.loc[flagged, "stage2_score"], saved.loc[flagged, "stage2_score"], rtol=1e-5)
    assert frame.loc[~flagged, "stage2_score"].isna().all()  # stage 2 ran on flagged images only
    first = predictions.images[0]
    assert first.stage1_map.shape == (32, 32) and predictions.images_per_s > 0
    assert (first.stage2_map is None) == (not first.flagged)


def test_all_stages_scores_every_image_with_the_same_decisions(run):
    result, test = run
    detector = TwoStageDetector.from_run(result.run_dir, device="cpu")
    everything = detector.predict(test.images[:30], all_stages=True, progress=False, maps=False).to_frame()
    deployed = detector.predict(test.images[:30], progress=False, maps=False).to_frame()
    assert everything["stage2_score"].notna().all()
    np.testing.assert_array_equal(everything["decision"], deployed["decision"])


def test_cli_and_api_give_the_same_numbers_and_skip_unreadable_files(run, folder, tmp_path, capsys):
    result, _ = run
    out = tmp_path / "predictions.csv"
    assert main(["-q", "predict", str(result.run_dir), str(folder), "--output", str(out), "--maps", str(tmp_path / "maps.npz")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 40 and summary["images_per_s"] > 0
    assert [u["image"] for u in summary["unreadable"]] == [str(folder / "broken.png")]
    cli = pd.read_csv(out)
    assert cli.loc[cli["error"].notna(), "image"].tolist() == [str(folder / "broken.png")]
    api = TwoStageDetector.from_run(result.run_dir).predict(sorted(folder.glob("img_*.png")), progress=False).to_frame()
    cli = cli[cli["error"].isna()].reset_index(drop=True)
    assert cli["image"].tolist() == api["image"].tolist()
    for column in ("stage1_loss", "stage2_score", "cascade_score", "decision"):
        np.testing.assert_allclose(cli[column].to_numpy(float), api[column].to_numpy(float), rtol=1e-6)
    maps = np.load(tmp_path / "maps.npz")
    assert maps["stage1"].shape == (40, 32, 32) and maps["fused"].shape == (40, 32, 32)
    fusion = TwoStageDetector.from_run(result.run_dir, device="cpu").cascade.map_fusion
    ran = ~np.isnan(maps["stage2"][:, 0, 0])
    np.testing.assert_allclose(maps["fused"], fusion.apply(maps["stage1"], np.where(ran[:, None, None], maps["stage2"], 0).astype(np.float32)),
                               rtol=1e-2, atol=1e-2)  # stage 2's map was stored as float16
    # an existing output is never overwritten silently
    assert main(["-q", "predict", str(result.run_dir), str(folder), "--output", str(out)]) == 2
    assert main(["-q", "predict", str(result.run_dir), str(folder / "img_00*.png"), "--output", str(out), "--overwrite"]) == 0
    assert len(pd.read_csv(out)) == 10


def test_inputs_that_match_nothing_are_refused(tmp_path):
    with pytest.raises(DataError, match="neither a file, a folder nor a glob"):
        expand_image_paths([tmp_path / "missing.png"])
    with pytest.raises(DataError, match="matches no image file"):
        expand_image_paths([str(tmp_path / "*.png")])


def test_array_input_must_have_the_run_size(run):
    result, _ = run
    detector = TwoStageDetector.from_run(result.run_dir, device="cpu")
    with pytest.raises(ValueError, match=r"uint8 N×32×32×1 .* got uint8 \(2, 64, 64, 1\)"):
        detector.predict(np.zeros((2, 64, 64, 1), np.uint8))


def test_unfinished_run_is_refused(run, tmp_path):
    result, _ = run
    partial = tmp_path / "partial"
    shutil.copytree(result.run_dir, partial)
    (partial / "thresholds.json").unlink()
    with pytest.raises(FileNotFoundError, match="thresholds.json is missing"):
        TwoStageDetector.from_run(partial)


def test_a_detector_fits_from_arrays_and_predicts_what_fit_scored():
    """The Python API needs no run folder: fit on arrays, then predict gives fit's validation scores."""
    from twostage_ad.config_io import load_config as load

    from conftest import textured

    rng = np.random.default_rng(0)
    train = np.stack([textured(rng, size=32)[..., None] for _ in range(12)])
    val = np.stack([textured(rng, size=32)[..., None] for _ in range(8)])
    config = load(None, [*TINY, "data.channels=1"])
    detector = TwoStageDetector.from_config(config, device="cpu")
    with pytest.raises(RuntimeError, match="not calibrated"):
        detector.predict(val, progress=False)
    detector.fit(train, val, np.zeros(len(val), int), config.calibration, progress=False)
    predicted = detector.predict(val, all_stages=True, progress=False)
    fitted = detector.validation_
    np.testing.assert_allclose([p.stage1_loss for p in predicted.images], fitted.stage1.loss, rtol=1e-5)
    np.testing.assert_allclose([p.stage2_score for p in predicted.images], fitted.stage2.scores, rtol=1e-5)
    assert [p.flagged for p in predicted.images] == list(fitted.decided.flagged)
    # the cascade's map: stage 1's in the validation normals' σ units plus 0.1 × stage 2's
    maps1 = np.stack([p.stage1_map for p in predicted.images])
    mean, std = float(maps1.astype(np.float64).mean()), float(maps1.astype(np.float64).std())  # every val image is normal
    assert detector.cascade.map_fusion.stage1_mean == pytest.approx(mean, rel=1e-4)
    assert detector.cascade.map_fusion.stage1_std == pytest.approx(std, rel=1e-4)
    for p in predicted.images[:3]:
        np.testing.assert_allclose(p.fused_map, (p.stage1_map - mean) / std + 0.1 * p.stage2_map, rtol=1e-3, atol=1e-3)
    # the deployment path runs stage 2 on the flagged images only, with the same decisions
    deployed = detector.predict(val, progress=False)
    assert [p.decision for p in deployed.images] == [p.decision for p in predicted.images]
    assert [p.stage2_score is None for p in deployed.images] == [not f for f in fitted.decided.flagged]
    for p in deployed.images:  # stage 2's term is 0 where it did not run
        if p.stage2_map is None:
            np.testing.assert_allclose(p.fused_map, (p.stage1_map - mean) / std, rtol=1e-3, atol=1e-3)
    # a label-free high-recall screen: synthetic defects on the validation normals, passed in
    from dataclasses import replace

    from twostage_ad.calibration import CalibrationError

    by_synthetic = replace(config.calibration, method="synthetic_recall", recall=0.9)
    with pytest.raises(CalibrationError, match="needs the scores of validation normals with synthetic defects"):
        detector.calibrate(by_synthetic)
    synthetic = detector.score_synthetic(val, config.augment, progress=False)[0]
    detector.calibrate(by_synthetic, synthetic=synthetic)
    assert detector.cascade.stage1.method == "synthetic_recall"
    assert np.mean(synthetic.stage1.loss > detector.cascade.stage1.value) >= 0.9


def test_predict_in_chunks_gives_what_one_chunk_gives(run, folder, monkeypatch):
    import twostage_ad.detector as detector_module

    result, _ = run
    files = sorted(folder.glob("img_*.png"))[:20]
    files.insert(9, folder / "broken.png")  # an unreadable file inside the second chunk
    detector = TwoStageDetector.from_run(result.run_dir, device="cpu")
    whole = detector.predict(files, progress=False, maps=False)
    monkeypatch.setattr(detector_module, "MAX_CHUNK_BYTES", 7 * 32 * 32 * (1 + detector_module.BYTES_PER_PIXEL_OF_MAPS))
    chunked = detector.predict(files, progress=False, maps=False)  # chunks of 7 files
    pd.testing.assert_frame_equal(chunked.to_frame(), whole.to_frame())
    assert [name for name, _ in chunked.failed] == [str(folder / "broken.png")] and len(chunked) == 20
