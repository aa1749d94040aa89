"""A stage stops training after the step that spends its ``max_seconds``, and says so."""

import re
import types

import numpy as np
import pytest
from test_resume import _train_until_interrupted

import twostage_ad.stages.training as training
from twostage_ad.config import Config, ConfigError
from twostage_ad.config_io import load_config
from twostage_ad.migration import stored_section
from twostage_ad.stages.attention import AttentionStage
from twostage_ad.stages.patch_scorer import PatchScorerStage
from twostage_ad.workflow import run_pipeline

from conftest import textured

TINY = ["stage1.base_width=8", "stage1.max_width=16", "stage1.batch_size=4", "stage1.min_steps=0"]


def _images(n: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.stack([textured(rng, size=32)[..., None] for _ in range(n)])


def _stage1(*settings: str) -> AttentionStage:
    return AttentionStage(config=load_config(None, [*TINY, *settings]).stage1, image_size=32, channels=1, device="cpu")


@pytest.fixture
def one_second_a_step(monkeypatch) -> list[int]:
    """The training clock advances by exactly 1 s per optimiser step; returns the step counter."""
    clock = [0.0]
    calls = [0]
    monkeypatch.setattr(training, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    for cls in (AttentionStage, PatchScorerStage):
        step = cls._train_step

        def timed(self, *args, _step=step, **kwargs):
            clock[0] += 1.0
            calls[0] += 1
            return _step(self, *args, **kwargs)

        monkeypatch.setattr(cls, "_train_step", timed)
    return calls


def test_the_budget_stops_after_the_step_that_spends_it(one_second_a_step):
    images = _images(12)  # 3 steps an epoch at batch 4; 3 epochs = 9 steps planned
    stopped = _stage1("stage1.epochs=3", "stage1.max_steps=0", "stage1.max_seconds=4.5").fit(images, progress=False)
    assert one_second_a_step[0] == 5  # 5 s spent after step 5
    assert stopped.out_of_time_
    assert (stopped.steps_, stopped.epochs_) == (5, 2)
    assert [h["steps"] for h in stopped.history_] == [3, 5]
    assert [h.get("out_of_time") for h in stopped.history_] == [None, 1.0]
    capped = _stage1("stage1.epochs=3", "stage1.max_steps=5", "stage1.max_seconds=0").fit(images, progress=False)
    for name, tensor in capped.model_.state_dict().items():  # the same 5 steps as a step cap of 5
        assert (tensor == stopped.model_.state_dict()[name]).all(), name


def test_a_budget_spent_on_the_last_planned_step_is_a_complete_training(one_second_a_step):
    stage = _stage1("stage1.epochs=3", "stage1.max_steps=0", "stage1.max_seconds=9").fit(_images(12), progress=False)
    assert one_second_a_step[0] == 9
    assert not stage.out_of_time_
    assert (stage.steps_, stage.epochs_) == (9, 3)
    assert all("out_of_time" not in h for h in stage.history_)


def test_stage2_obeys_its_own_budget(one_second_a_step):
    config = load_config(None, ["stage2.epochs=4", "stage2.min_steps=0", "stage2.max_seconds=3", "stage2.width_divisor=16",
                                "stage2.batch_size=4"]).stage2
    stage = PatchScorerStage(config=config, image_size=32, channels=1, device="cpu").fit(_images(8), progress=False)
    assert one_second_a_step[0] == 3
    assert stage.out_of_time_ and stage.steps_ == 3
    assert [h["steps"] for h in stage.history_] == [2, 3]


def test_a_training_stopped_by_its_budget_resumes_as_complete(tmp_path, one_second_a_step):
    images = _images(12)
    settings = ("stage1.epochs=3", "stage1.max_steps=0", "stage1.max_seconds=4.5")
    stopped = _stage1(*settings).fit(images, checkpoint_path=tmp_path / "s1.pt", progress=False)
    assert one_second_a_step[0] == 5
    resumed = _stage1(*settings).fit(images, checkpoint_path=tmp_path / "s1.pt", progress=False, resume=True)
    assert one_second_a_step[0] == 5  # nothing more trained
    assert resumed.out_of_time_ and (resumed.steps_, resumed.epochs_) == (5, 2)
    assert resumed.history_ == stopped.history_
    for name, tensor in stopped.model_.state_dict().items():
        assert (tensor == resumed.model_.state_dict()[name]).all(), name


def test_an_interrupted_training_resumes_with_the_seconds_it_had_spent(tmp_path, monkeypatch, one_second_a_step):
    images = _images(12)
    settings = ("stage1.epochs=3", "stage1.max_steps=0", "stage1.max_seconds=4.5")
    uninterrupted = _stage1(*settings).fit(images, progress=False)
    _train_until_interrupted(monkeypatch, _stage1(*settings), images, tmp_path / "s1.pt", after_epoch=1)
    one_second_a_step[0] = 0
    resumed = _stage1(*settings).fit(images, checkpoint_path=tmp_path / "s1.pt", progress=False, resume=True)
    assert one_second_a_step[0] == 2  # 3 s spent before the interruption, 2 more steps spend the rest
    assert resumed.out_of_time_ and [h["steps"] for h in resumed.history_] == [3, 5]
    for name, tensor in uninterrupted.model_.state_dict().items():
        assert (tensor == resumed.model_.state_dict()[name]).all(), name


def test_a_run_reports_a_stage_that_ran_out_of_time_and_resumes_as_complete(tmp_path):
    settings = ["stage1.epochs=2", "stage1.base_width=8", "stage1.max_width=16", "stage1.min_steps=0",
                "stage2.epochs=2", "stage2.width_divisor=16", "stage2.min_steps=0", "stage2.max_seconds=0.000001",
                "run.overlays=0"]
    result = run_pipeline(load_config(None, settings), tmp_path / "run", progress=False)
    metrics = result.metrics
    assert metrics["out_of_time"] == {"stage1": False, "stage2": True}
    assert metrics["steps"]["stage2"] == 1
    assert metrics["steps"]["stage1"] > 1
    assert "stage2.max_seconds=0" in metrics["notes"]["stage2.out_of_time"]
    assert "stage1.out_of_time" not in metrics["notes"]
    # stage 2's final checkpoint (with its map statistics) holds no training state: resuming must not need one
    resumed = run_pipeline(None, tmp_path / "run", resume=True, progress=False)
    assert resumed.metrics["steps"] == metrics["steps"]
    assert resumed.metrics["image_auroc"] == metrics["image_auroc"]
    assert AttentionStage.load(tmp_path / "run" / "checkpoints" / "stage1.pt").out_of_time_ is False
    assert PatchScorerStage.load(tmp_path / "run" / "checkpoints" / "stage2.pt").out_of_time_ is True


def test_the_recipe_budgets_both_stages_to_15_minutes():
    config = Config().validate()
    assert (config.stage1.max_seconds, config.stage2.max_seconds) == (600.0, 300.0)


@pytest.mark.parametrize(("settings", "message"), [
    (["stage1.max_seconds=-1"], "stage1.max_seconds must be a finite number of seconds >= 0 (0: no bound), got -1"),
    (["stage2.max_seconds=.inf"], "stage2.max_seconds must be a finite number, got inf"),
    (["stage2.max_seconds=soon"], "stage2.max_seconds must be a number, got 'soon'"),
])
def test_bad_time_budgets_are_refused_with_the_value(settings, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, settings)


@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf"), True])
def test_a_config_built_in_python_refuses_a_bad_budget(value):
    config = Config()
    config.stage2.max_seconds = value
    with pytest.raises(ConfigError, match=re.escape("stage2.max_seconds must be a finite number of seconds >= 0")):
        config.validate()


def test_checkpoints_and_runs_from_before_the_budget_read_as_unbounded():
    assert stored_section("stage1", {"epochs": 40})["max_seconds"] == 0
    assert stored_section("stage2", {"epochs": 15})["max_seconds"] == 0


def test_the_first_epoch_warns_when_the_budget_will_stop_training(caplog, one_second_a_step):
    with caplog.at_level("WARNING", logger="twostage_ad.stages.training"):
        _stage1("stage1.epochs=3", "stage1.max_steps=0", "stage1.max_seconds=4.5").fit(_images(12), progress=False)
    early = [r.getMessage() for r in caplog.records if "takes" in r.getMessage()]
    assert early == ["stage 1 takes 1.00 s a step here: its 9 steps need about 9 s, so its time budget stage1.max_seconds=4.5 s "
                     "will stop it near step 5 (a new run with stage1.max_seconds=0 trains every step)"]
    caplog.clear()
    with caplog.at_level("WARNING", logger="twostage_ad.stages.training"):
        _stage1("stage1.epochs=3", "stage1.max_steps=0", "stage1.max_seconds=9").fit(_images(12), progress=False)
    assert not [r for r in caplog.records if "takes" in r.getMessage()]  # 9 s for 9 steps: it fits
