"""``benchmarks/synthetic_val.py`` scores a finished run on synthetic copies of its validation normals."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from twostage_ad.config_io import load_config
from twostage_ad.workflow import run_pipeline

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
synthetic_val = pytest.importorskip("synthetic_val")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    config = load_config(None, ["stage1.epochs=1", "stage1.base_width=8", "stage1.max_width=16", "run.overlays=0",
                                "stage2.epochs=1", "stage2.width_divisor=16"])
    return run_pipeline(config, tmp_path_factory.mktemp("runs") / "digits", progress=False).run_dir


def test_the_row_reproduces_the_score_the_run_wrote(tiny_run):
    row = synthetic_val.row_for(tiny_run, None)
    written = json.loads((tiny_run / "metrics.json").read_text())["synthetic_val"]
    assert row["synthetic_images"] == written["images"]
    assert row["synthetic_image_auroc_stage1"] == pytest.approx(written["image_auroc"]["stage1"], abs=1e-6)
    assert row["synthetic_image_auroc_stage2"] == pytest.approx(written["image_auroc"]["stage2"], abs=1e-6)


def test_copies_give_each_validation_normal_several_defects(tiny_run):
    one, three = synthetic_val.row_for(tiny_run, None), synthetic_val.row_for(tiny_run, None, copies=3)
    assert three["copies"] == 3
    assert three["synthetic_images"] > 2 * one["synthetic_images"]  # (a defect that changes no pixel is left out)
    assert three["synthetic_image_auroc_stage1"] != one["synthetic_image_auroc_stage1"]


def test_copy_order_varies_each_normals_kind_and_never_repeats_an_image():
    kinds = 6  # synthetic_defects: image i gets kind i mod 6 and image i + 1's texture
    order = synthetic_val.copy_order(4, 16, seed=0)  # a PIPED class: 4 validation normals
    assert order[:4].tolist() == [0, 1, 2, 3]  # one copy is what `run` scores
    assert all(sorted(order[c * 4:(c + 1) * 4]) == [0, 1, 2, 3] for c in range(16))
    assert (order[1:] != order[:-1]).all()  # no blob textured with its own normal
    for normal in range(4):
        assert len({i % kinds for i in np.flatnonzero(order == normal)}) >= 4  # a plain repeat gives each only 3
    np.testing.assert_array_equal(order, synthetic_val.copy_order(4, 16, seed=0))


def test_a_stage2_scoring_variant_is_rescored_and_a_training_field_is_refused(tiny_run):
    guided = synthetic_val.row_for(tiny_run, None, ["stage2.guidance=attention"])
    unguided = synthetic_val.row_for(tiny_run, None, ["stage2.guidance=none"])
    assert guided["variant"] == "stage2.guidance=attention"
    plain = synthetic_val.row_for(tiny_run, None)  # the run's own guidance, rescored the same way
    assert guided["synthetic_image_auroc_stage2"] == pytest.approx(plain["synthetic_image_auroc_stage2"], abs=1e-6)
    assert guided["synthetic_image_auroc_stage1"] == unguided["synthetic_image_auroc_stage1"]  # stage 1 untouched
    assert guided["synthetic_pixel_auroc_stage2"] != unguided["synthetic_pixel_auroc_stage2"]
    with pytest.raises(SystemExit, match="scoring fields"):
        synthetic_val.row_for(tiny_run, None, ["stage2.epochs=3"])


def test_a_run_with_a_larger_stage2_is_reproduced_at_its_own_decode(tmp_path):
    """``run`` decodes at the larger stage's size and draws the synthetic defects there; the benchmark
    must decode the same way, or stage 2 reads upsampled pixels and the scores differ."""
    config = load_config(None, ["stage1.epochs=1", "stage1.base_width=8", "stage1.max_width=16", "run.overlays=0",
                                "stage2.epochs=1", "stage2.width_divisor=16", "data.image_size=32", "stage2.image_size=64",
                                "stage2.tile_size=32"])
    run_dir = run_pipeline(config, tmp_path / "digits64", progress=False).run_dir
    row = synthetic_val.row_for(run_dir, None)
    written = json.loads((run_dir / "metrics.json").read_text())["synthetic_val"]
    assert row["synthetic_image_auroc_stage1"] == pytest.approx(written["image_auroc"]["stage1"], abs=1e-6)
    assert row["synthetic_image_auroc_stage2"] == pytest.approx(written["image_auroc"]["stage2"], abs=1e-6)
    assert row["synthetic_pixel_auroc_stage2"] == pytest.approx(written["pixel_auroc"]["stage2"], abs=1e-6)
    assert synthetic_val.TwoStageDetector.from_run(run_dir).image_size == 64


def test_a_stage1_screening_variant_drops_the_feature_bank_fitted_under_the_other(tiny_run):
    """The bank keeps the attention term's spread as screened when fitted: a variant with another
    ``screen_topk`` drops it (row_for then refits it on the training images); a map weight keeps it."""
    from twostage_ad.detector import TwoStageDetector

    detector = TwoStageDetector.from_run(tiny_run, device="cpu")
    synthetic_val.apply_variant(detector, ["stage1.feature_map_weight=0.5"])
    assert detector.stage1.features_ is not None and detector.stage1.config.feature_map_weight == 0.5
    synthetic_val.apply_variant(detector, ["stage1.screen_topk=0.05"])
    assert detector.stage1.features_ is None and detector.stage1.config.screen_topk == 0.05
    row = synthetic_val.row_for(tiny_run, None, ["stage1.screen_topk=0.05"])  # refitted, so it scores
    assert np.isfinite(row["synthetic_image_auroc_stage1"])
