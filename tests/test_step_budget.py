"""A stage trains for its epochs, raised to min_steps and capped at max_steps optimiser steps."""

import re

import numpy as np
import pytest
import yaml
from test_resume import _train_until_interrupted

from twostage_ad.config import Config, ConfigError
from twostage_ad.config_io import config_to_dict, load_config
from twostage_ad.migration import stored_section
from twostage_ad.runs import load_run_config
from twostage_ad.stages.attention import AttentionStage
from twostage_ad.stages.patch_scorer import PatchScorerStage
from twostage_ad.stages.training import planned_steps

from conftest import REPO, textured


def save_config_values(path, values) -> None:
    path.write_text(yaml.safe_dump(values), encoding="utf-8")


TINY = ["stage1.base_width=8", "stage1.max_width=16", "stage1.batch_size=4"]


@pytest.mark.parametrize(("epochs", "per_epoch", "min_steps", "max_steps", "expected"), [
    (40, 35, 0, 1400, 1400),   # MTD: 571 images at batch 16, exactly the cap
    (40, 625, 0, 1400, 1400),  # 10 000 images: 2.24 epochs
    (40, 2, 0, 1400, 80),      # 32 images: 40 passes, far below the cap
    (40, 2, 160, 1400, 160),   # ... raised to the floor
    (3, 3, 0, 0, 9),           # no bound
    (3, 3, 20, 10, 10),        # the cap wins (the config refuses this pair; the function stays total)
])
def test_planned_steps_bounds_the_epochs(epochs, per_epoch, min_steps, max_steps, expected):
    assert planned_steps(epochs, per_epoch, min_steps=min_steps, max_steps=max_steps) == expected


def test_the_recipe_gives_a_small_set_its_floor_and_a_large_one_its_cap():
    recipe = Config().validate().stage1

    def steps(n_images: int) -> int:
        return planned_steps(recipe.epochs, n_images // recipe.batch_size, min_steps=recipe.min_steps,
                             max_steps=recipe.max_steps)

    assert steps(32) == 160      # a PIPED class: 80 epochs, not 40
    assert steps(400) == 1000    # 25 steps an epoch, 40 epochs: between the bounds
    assert steps(571) == 1400    # MTD: the cap
    assert steps(10_000) == 1400
    stage2 = Config().validate().stage2
    assert planned_steps(stage2.epochs, 32 // stage2.batch_size, min_steps=stage2.min_steps,
                         max_steps=stage2.max_steps) == 160  # a PIPED class: 80 epochs, not 15


def test_planned_steps_refuses_an_empty_epoch():
    with pytest.raises(ValueError, match="steps_per_epoch must be >= 1, got 0"):
        planned_steps(3, 0)


def _images(n: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.stack([textured(rng, size=32)[..., None] for _ in range(n)])


def _stage1(*settings: str) -> AttentionStage:
    return AttentionStage(config=load_config(None, [*TINY, *settings]).stage1, image_size=32, channels=1, device="cpu")


def _count_updates(monkeypatch, cls) -> list[int]:
    """Count the optimiser updates ``cls`` makes (each ``_train_step`` call)."""
    calls = [0]
    step = cls._train_step

    def counted(self, *args, **kwargs):
        calls[0] += 1
        return step(self, *args, **kwargs)

    monkeypatch.setattr(cls, "_train_step", counted)
    return calls


def test_the_cap_stops_the_last_epoch_part_way_and_a_whole_cap_equals_fewer_epochs(monkeypatch):
    images = _images(12)  # 3 steps an epoch at batch 4
    updates = _count_updates(monkeypatch, AttentionStage)
    capped = _stage1("stage1.epochs=3", "stage1.max_steps=7").fit(images, progress=False)
    assert updates[0] == 7
    assert (capped.steps_, capped.epochs_) == (7, 3)
    assert [h["steps"] for h in capped.history_] == [3, 6, 7]
    six = _stage1("stage1.epochs=3", "stage1.max_steps=6").fit(images, progress=False)
    two_epochs = _stage1("stage1.epochs=2", "stage1.max_steps=0").fit(images, progress=False)
    assert [h["steps"] for h in six.history_] == [3, 6]
    for name, tensor in two_epochs.model_.state_dict().items():
        assert (tensor == six.model_.state_dict()[name]).all(), name
    assert not all((t == capped.model_.state_dict()[n]).all() for n, t in six.model_.state_dict().items())


def test_the_floor_adds_epochs_to_a_small_set(monkeypatch):
    updates = _count_updates(monkeypatch, AttentionStage)
    stage = _stage1("stage1.epochs=1", "stage1.min_steps=5").fit(_images(12), progress=False)
    assert updates[0] == 5
    assert (stage.steps_, stage.epochs_) == (5, 2)
    assert [h["steps"] for h in stage.history_] == [3, 5]


def test_stage2_obeys_its_own_bounds(monkeypatch):
    config = load_config(None, ["stage2.epochs=4", "stage2.max_steps=5", "stage2.width_divisor=16",
                                "stage2.batch_size=4"]).stage2
    updates = _count_updates(monkeypatch, PatchScorerStage)
    stage = PatchScorerStage(config=config, image_size=32, channels=1, device="cpu").fit(_images(8), progress=False)
    assert updates[0] == 5
    assert [h["steps"] for h in stage.history_] == [2, 4, 5]


def test_a_capped_training_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    images = _images(12)
    settings = ("stage1.epochs=3", "stage1.max_steps=7")
    full = _stage1(*settings).fit(images, progress=False)
    _train_until_interrupted(monkeypatch, _stage1(*settings), images, tmp_path / "s1.pt", after_epoch=2)
    updates = _count_updates(monkeypatch, AttentionStage)
    resumed = _stage1(*settings).fit(images, checkpoint_path=tmp_path / "s1.pt", progress=False, resume=True)
    assert updates[0] == 1  # only the partial third epoch
    for name, tensor in full.model_.state_dict().items():
        assert (tensor == resumed.model_.state_dict()[name]).all(), name
    assert [h["steps"] for h in resumed.history_] == [3, 6, 7]
    again = _stage1(*settings).fit(images, checkpoint_path=tmp_path / "s1.pt", progress=False, resume=True)
    assert updates[0] == 1  # finished: nothing more to train
    assert [h["steps"] for h in again.history_] == [3, 6, 7]


@pytest.mark.parametrize(("settings", "message"), [
    (["stage1.max_steps=-1"], "stage1.max_steps must be an integer >= 0 (0: no bound), got -1"),
    (["stage2.min_steps=2.5"], "stage2.min_steps must be an integer, got 2.5"),
    (["stage1.min_steps=500", "stage1.max_steps=100"], "stage1.max_steps must be 0 or >= min_steps (500), got 100"),
])
def test_bad_step_bounds_are_refused_with_the_value(settings, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, settings)


def test_checkpoints_and_runs_from_before_the_bounds_read_as_unbounded(tmp_path):
    assert stored_section("stage1", {"epochs": 40})["max_steps"] == 0
    assert stored_section("stage1", {"epochs": 40})["min_steps"] == 0
    assert stored_section("stage2", {"epochs": 15})["min_steps"] == 0
    values = config_to_dict(load_config(REPO / "pipelines" / "piped.yaml", []))  # the recipe: floor 160, cap 1400
    # a run folder written before the fields
    for section in ("stage1", "stage2"):
        del values[section]["min_steps"], values[section]["max_steps"]
    save_config_values(tmp_path / "config.yaml", values)
    old = load_run_config(tmp_path)
    assert (old.stage1.min_steps, old.stage1.max_steps, old.stage2.min_steps, old.stage2.max_steps) == (0, 0, 0, 0)
    today = load_config(REPO / "pipelines" / "piped.yaml", [])  # a user's config file: today's defaults
    assert (today.stage1.min_steps, today.stage1.max_steps, today.stage2.min_steps, today.stage2.max_steps) == (160, 1400, 160, 600)
