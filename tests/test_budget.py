"""The training-budget benchmark's premise: the checkpoint it keeps after epoch N of a longer
training holds exactly the weights an N-epoch training ends with."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from twostage_ad.config import Stage1Config
from twostage_ad.runs import load_checkpoint
from twostage_ad.stages.attention import AttentionStage

from conftest import REPO, textured

sys.path.insert(0, str(REPO / "benchmarks"))
keep_snapshots = pytest.importorskip("budget").keep_snapshots


def _stage(epochs: int) -> AttentionStage:
    config = Stage1Config(min_steps=0, epochs=epochs, batch_size=4, base_width=8, max_width=16, feature_bank_size=64)
    return AttentionStage(config=config, image_size=32, channels=1, device="cpu", seed=3)


def test_snapshot_after_epoch_two_of_three_equals_a_two_epoch_training(tmp_path) -> None:
    rng = np.random.default_rng(0)
    images = np.stack([textured(rng, 32) for _ in range(10)])[..., None]
    with keep_snapshots("stage1", [2], tmp_path / "snapshots"):
        longer = _stage(3).fit(images, checkpoint_path=tmp_path / "three.pt", progress=False)
    assert sorted(p.name for p in (tmp_path / "snapshots").iterdir()) == ["stage1-e2.pt"]  # epoch 3 not listed
    snapshot = load_checkpoint(tmp_path / "snapshots" / "stage1-e2.pt")
    assert snapshot["epoch"] == 2
    two = _stage(2).fit(images, progress=False)
    for name, value in two.model_.state_dict().items():
        torch.testing.assert_close(snapshot["model"][name], value, rtol=0, atol=0, msg=name)
    three = longer.model_.state_dict()
    assert any(not torch.equal(three[name], value) for name, value in two.model_.state_dict().items())  # epoch 3 moved them
