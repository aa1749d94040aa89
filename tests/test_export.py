"""Exported stages (TorchScript, ONNX) compute what the eager stages compute."""

import json

import numpy as np
import pytest
import torch

from twostage_ad.config_io import load_config
from twostage_ad.data.images import to_tensor
from twostage_ad.detector import TwoStageDetector
from twostage_ad.export import export_run
from twostage_ad.pipeline import main
from twostage_ad.workflow import run_pipeline


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    config = load_config(None, ["stage1.epochs=1", "stage1.base_width=8", "stage1.max_width=16", "stage2.epochs=1",
                                "stage2.width_divisor=16", "run.overlays=0"])
    run_dir = run_pipeline(config, tmp_path_factory.mktemp("runs") / "digits", progress=False).run_dir
    written = export_run(run_dir)
    detector = TwoStageDetector.from_run(run_dir, device="cpu")
    images = (np.random.default_rng(0).random((5, 32, 32, 1)) * 255).astype(np.uint8)
    first = detector.stage1.score(images, progress=False)
    second = detector.stage2.score(images, stage1_maps=first.anomaly_maps, progress=False)
    return run_dir, written, images, first, second


def test_torchscript_agrees_with_eager(exported):
    run_dir, written, images, first, second = exported
    assert written["torchscript"] == [str(run_dir / "export" / "stage1.ts"), str(run_dir / "export" / "stage2.ts")]
    stage1, stage2 = (torch.jit.load(p) for p in written["torchscript"])
    x = to_tensor(images)
    with torch.inference_mode():
        loss, anomaly = stage1(x)
        score, maps = stage2(x, anomaly)
    np.testing.assert_allclose(loss.numpy(), first.loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(anomaly.numpy(), first.anomaly_maps, atol=1e-6)
    np.testing.assert_allclose(score.numpy(), second.scores, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(maps.numpy(), second.maps, rtol=1e-5, atol=1e-5)
    constants = json.loads((run_dir / "export" / "cascade.json").read_text())
    assert constants["thresholds"]["stage1"]["value"] == pytest.approx(TwoStageDetector.from_run(run_dir).cascade.stage1.value)
    assert constants["bit_depth"] == 16  # digits: no 16-bit file; a deployment reads 16-bit files by it


def test_onnx_agrees_with_eager(exported):
    ort = pytest.importorskip("onnxruntime")
    _, written, images, first, second = exported
    stage1, stage2 = (ort.InferenceSession(p) for p in written["onnx"])
    x = to_tensor(images).numpy()
    loss, anomaly = stage1.run(None, {"image": x})
    feed = {"image": x, "stage1_anomaly_map": anomaly}
    score, maps = stage2.run(None, {i.name: feed[i.name] for i in stage2.get_inputs()})
    np.testing.assert_allclose(loss, first.loss, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(score, second.scores, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(maps, second.maps, rtol=1e-4, atol=1e-4)


def test_export_cli_and_bad_format(exported, tmp_path, capsys):
    run_dir = exported[0]
    assert main(["-q", "export", str(run_dir), "--output", str(tmp_path / "out"), "--format", "torchscript"]) == 0
    assert json.loads(capsys.readouterr().out) == {"torchscript": [str(tmp_path / "out" / "stage1.ts"), str(tmp_path / "out" / "stage2.ts")]}
    with pytest.raises(ValueError, match="formats must be drawn from"):
        export_run(run_dir, tmp_path / "x", ("tflite",))


def test_exported_stage1_of_an_attention_only_recipe_is_finite(tmp_path):
    """The real-data recipe skips x̂: its NaN recon / latent components must not reach the exported loss."""
    from types import SimpleNamespace

    from twostage_ad.config import Stage1Config
    from twostage_ad.export import Stage1Scorer
    from twostage_ad.stages.attention import AttentionStage

    config = Stage1Config(min_steps=0, epochs=1, base_width=8, max_width=16, batch_size=4, w_con=0.0, w_rep=0.0, w_enc=0.0, w_adv=0.0,
                          screen_con=0.0, screen_enc=0.0)
    images = (np.random.default_rng(0).random((8, 32, 32, 1)) * 255).astype(np.uint8)
    stage = AttentionStage(config=config, image_size=32, channels=1, device="cpu").fit(images, progress=False)
    scorer = Stage1Scorer(SimpleNamespace(stage1=stage))
    with torch.inference_mode():
        loss, _ = scorer(to_tensor(images))
    assert torch.isfinite(loss).all()
    np.testing.assert_allclose(loss.numpy(), stage.score(images, progress=False).loss, rtol=1e-5, atol=1e-6)


def test_an_ensemble_stage1_exports_to_onnx_and_agrees_with_eager(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    config = load_config(None, ["stage1.epochs=1", "stage1.base_width=8", "stage1.max_width=16", "stage1.ensemble_size=2",
                                "stage1.w_con=0", "stage1.w_rep=0", "stage1.w_enc=0", "stage1.w_adv=0", "stage1.screen_con=0",
                                "stage1.screen_enc=0", "stage2.epochs=1", "stage2.width_divisor=16", "run.overlays=0",
                                "run.precision=float32"])  # the export is float32; auto may score in bf16
    run_dir = run_pipeline(config, tmp_path / "ensemble", progress=False).run_dir
    written = export_run(run_dir, formats=("onnx",))
    stage1 = TwoStageDetector.from_run(run_dir, device="cpu").stage1
    assert len(stage1.model_.members) == 2
    images = (np.random.default_rng(0).random((5, 32, 32, 1)) * 255).astype(np.uint8)
    eager = stage1.score(images, progress=False)
    loss, anomaly = ort.InferenceSession(written["onnx"][0]).run(None, {"image": to_tensor(images).numpy()})
    np.testing.assert_allclose(loss, eager.loss, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(anomaly, eager.anomaly_maps, atol=1e-5)
