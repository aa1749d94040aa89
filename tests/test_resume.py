"""A run killed during training and resumed ends exactly where an uninterrupted run ends."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from twostage_ad.config_io import load_config
from twostage_ad.pipeline import main
from twostage_ad.runs import load_checkpoint, save_checkpoint
from twostage_ad.stages.attention import AttentionStage
from twostage_ad.workflow import run_pipeline

from conftest import textured

SETTINGS = ["stage1.epochs=12", "stage1.base_width=8", "stage1.max_width=16", "stage2.epochs=3",
            "stage2.width_divisor=16", "run.overlays=0"]


class _Interrupt(Exception):
    pass


def _train_until_interrupted(monkeypatch, stage, images, checkpoint, *, after_epoch):
    """Train ``stage`` until its checkpoint for ``after_epoch`` is written, then stop as a kill would."""
    cls = type(stage)
    save = cls.save

    def save_then_stop(self, path, *, epoch=None, training_state=None):
        save(self, path, epoch=epoch, training_state=training_state)
        if epoch == after_epoch:
            raise _Interrupt

    with monkeypatch.context() as patch:
        patch.setattr(cls, "save", save_then_stop)
        with pytest.raises(_Interrupt):
            stage.fit(images, checkpoint_path=checkpoint, progress=False)
    assert load_checkpoint(checkpoint)["epoch"] == after_epoch


def _epoch(path):
    try:
        return load_checkpoint(path)["epoch"]
    except (FileNotFoundError, ValueError):
        return 0


def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
    reference = run_pipeline(load_config(None, SETTINGS), tmp_path / "reference", progress=False)
    run_dir = tmp_path / "killed"
    args = [sys.executable, "-m", "twostage_ad.pipeline", "-q", "run", "--output", str(run_dir)]
    for item in SETTINGS:
        args += ["--set", item]
    # same thread count as this process: a different one changes float summation order, not a resume bug
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = run_dir / "checkpoints" / "stage1.pt"
    deadline = time.time() + 600  # room for a CPU several times slower; the loop ends at epoch 2
    while _epoch(checkpoint) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    killed_at = _epoch(checkpoint)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 2 <= killed_at < 12, f"the run was not caught mid-training (epoch {killed_at})"
    assert not (run_dir / "scores.csv").exists()
    # starting again without --resume refuses; with --resume it continues from the last complete epoch
    assert main(["-q", "run", "--output", str(run_dir)]) == 2
    resumed = run_pipeline(None, run_dir, progress=False, resume=True)
    assert resumed.metrics["epochs"] == {"stage1": 12, "stage2": 3}
    columns = ["stage1_loss", "stage2_score", "cascade_score", "decision"]
    pd.testing.assert_frame_equal(resumed.scores[columns], reference.scores[columns])


def test_resume_refuses_a_different_config(tmp_path):
    run_pipeline(load_config(None, SETTINGS[:1] + ["stage1.epochs=1", "stage2.epochs=1", "run.overlays=0"]),
                 tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match="stage1.epochs is 5 here but 1"):
        run_pipeline(load_config(None, ["stage1.epochs=5", "stage2.epochs=1", "run.overlays=0"]), tmp_path / "run",
                     progress=False, resume=True)
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        run_pipeline(None, tmp_path / "nothing", progress=False, resume=True)


def test_stage1_resume_is_bit_exact(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    images = np.stack([textured(rng, size=32)[..., None] for _ in range(12)])
    config = load_config(None, ["stage1.epochs=3", "stage1.base_width=8", "stage1.max_width=16", "stage1.batch_size=4"]).stage1
    full = AttentionStage(config=config, image_size=32, channels=1, device="cpu").fit(images, progress=False)
    _train_until_interrupted(monkeypatch, AttentionStage(config=config, image_size=32, channels=1, device="cpu"),
                             images, tmp_path / "s1.pt", after_epoch=2)
    resumed = AttentionStage(config=config, image_size=32, channels=1, device="cpu").fit(
        images, checkpoint_path=tmp_path / "s1.pt", progress=False, resume=True)
    for name, tensor in full.model_.state_dict().items():
        assert (tensor == resumed.model_.state_dict()[name]).all(), name
    assert [h["total"] for h in resumed.history_] == [h["total"] for h in full.history_]


def test_a_checkpoint_from_before_new_config_fields_still_resumes(tmp_path, monkeypatch):
    """Fields added to the config since a checkpoint was written take their defaults when resuming."""
    rng = np.random.default_rng(0)
    images = np.stack([textured(rng, size=32)[..., None] for _ in range(8)])
    config = load_config(None, ["stage1.epochs=2", "stage1.base_width=8", "stage1.max_width=16", "stage1.batch_size=4"]).stage1
    _train_until_interrupted(monkeypatch, AttentionStage(config=config, image_size=32, channels=1, device="cpu"),
                             images, tmp_path / "s1.pt", after_epoch=1)
    payload = load_checkpoint(tmp_path / "s1.pt")
    for name in ("attention_kv_max_tokens", "final_up"):  # as an older version wrote it
        del payload["config"][name]
    save_checkpoint(tmp_path / "s1.pt", payload)
    resumed = AttentionStage(config=config, image_size=32, channels=1, device="cpu").fit(
        images, checkpoint_path=tmp_path / "s1.pt", progress=False, resume=True)
    assert len(resumed.history_) == 2
    # a stored value that differs from this run's still refuses
    payload["config"]["final_up"] = "conv_upsample"
    save_checkpoint(tmp_path / "s1.pt", payload)
    with pytest.raises(ValueError, match="its config differs"):
        AttentionStage(config=config, image_size=32, channels=1, device="cpu").fit(
            images, checkpoint_path=tmp_path / "s1.pt", progress=False, resume=True)


@pytest.mark.parametrize("stage_name", ["stage1", "stage2"])
def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, stage_name):
    from twostage_ad.stages.patch_scorer import PatchScorerStage

    rng = np.random.default_rng(0)
    images = np.stack([textured(rng, size=32)[..., None] for _ in range(8)])
    config = load_config(None, ["stage1.base_width=8", "stage1.max_width=16", "stage1.epochs=3", "stage2.epochs=3",
                                "stage2.width_divisor=16"])
    if stage_name == "stage1":
        cls, stage = AttentionStage, AttentionStage(config=config.stage1, image_size=32, channels=1, device="cpu")
    else:
        cls, stage = PatchScorerStage, PatchScorerStage(config=config.stage2, image_size=32, channels=1, device="cpu")
    step = cls._train_step
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        losses = step(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] > 1:  # from the second epoch on (one batch of 8 per epoch)
            losses["total"] = float("nan")
        return losses

    monkeypatch.setattr(cls, "_train_step", poisoned)
    with pytest.raises(FloatingPointError, match=f"{stage_name.replace('stage', 'stage ')} loss became nan in epoch 2; lower {stage_name}.lr"):
        stage.fit(images, checkpoint_path=tmp_path / "ckpt.pt", progress=False)
    assert load_checkpoint(tmp_path / "ckpt.pt")["epoch"] == 1  # the last good epoch, loadable


def test_stage2_resume_is_bit_exact_and_refuses_other_images(tmp_path, monkeypatch):
    from twostage_ad.stages.patch_scorer import PatchScorerStage

    rng = np.random.default_rng(0)
    images = np.stack([textured(rng, size=32)[..., None] for _ in range(12)])
    config = load_config(None, ["stage2.epochs=3", "stage2.width_divisor=16", "stage2.batch_size=4"]).stage2
    full = PatchScorerStage(config=config, image_size=32, channels=1, device="cpu").fit(images, progress=False)
    _train_until_interrupted(monkeypatch, PatchScorerStage(config=config, image_size=32, channels=1, device="cpu"),
                             images, tmp_path / "s2.pt", after_epoch=2)
    with pytest.raises(ValueError, match="training images differ"):
        PatchScorerStage(config=config, image_size=32, channels=1, device="cpu").fit(
            images[:-1], checkpoint_path=tmp_path / "s2.pt", progress=False, resume=True)
    resumed = PatchScorerStage(config=config, image_size=32, channels=1, device="cpu").fit(
        images, checkpoint_path=tmp_path / "s2.pt", progress=False, resume=True)
    for name, tensor in full.model_.state_dict().items():
        assert torch.equal(tensor, resumed.model_.state_dict()[name]), name
    assert [h["total"] for h in resumed.history_] == [h["total"] for h in full.history_]


def test_a_run_from_before_the_tile_default_resumes_with_todays_config(tmp_path):
    """A folder that stores ``tile_size: 0`` (written before tiles became the default) resumes under
    a config that leaves ``tile_size`` at 128: at the demo's 32-px decode both mean the whole image
    (a real tile change is refused: ``test_settings_that_mean_the_same_are_the_same_run``)."""
    settings = [*SETTINGS, "stage1.epochs=1", "stage2.epochs=1"]
    finished = run_pipeline(load_config(None, settings), tmp_path / "run", progress=False)
    stored = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    stored["stage1"]["tile_size"] = stored["stage2"]["tile_size"] = 0
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(stored))
    for name in ("stage1", "stage2"):  # its checkpoints stored 0 too
        payload = load_checkpoint(tmp_path / "run" / "checkpoints" / f"{name}.pt")
        payload["config"]["tile_size"] = 0
        save_checkpoint(tmp_path / "run" / "checkpoints" / f"{name}.pt", payload)
    resumed = run_pipeline(load_config(None, settings), tmp_path / "run", progress=False, resume=True)
    pd.testing.assert_series_equal(resumed.scores["stage1_loss"], finished.scores["stage1_loss"])


def test_settings_that_mean_the_same_are_the_same_run(tmp_path, monkeypatch):
    from twostage_ad.config_io import config_to_dict
    from twostage_ad.runs import same_setting

    monkeypatch.chdir(tmp_path)
    stored = config_to_dict(load_config(None, ["data.image_size=64"]))
    stored["data"]["path"], stored["stage1"]["tile_size"] = "sets/parts", 0  # as an older run recorded them
    given = config_to_dict(load_config(None, ["data.image_size=64"]))
    given["data"]["path"] = str(tmp_path / "sets" / "parts")
    assert same_setting(given, stored, "data", "path") and same_setting(given, stored, "stage1", "tile_size")  # 128 >= 64
    given["data"]["path"], given["stage1"]["tile_size"] = str(tmp_path / "other"), 32
    assert not same_setting(given, stored, "data", "path") and not same_setting(given, stored, "stage1", "tile_size")
