"""Old configs and checkpoints keep loading, or fail with a message saying what to change."""

import warnings
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch
import yaml

from twostage_ad.config import ConfigError, Stage1Config, Stage2Config
from twostage_ad.config_io import config_from_dict, load_config
from twostage_ad.device import resolve_precision
from twostage_ad.migration import migrate_section, stored_section
from twostage_ad.models.ganomaly2d import GANomaly2D
from twostage_ad.runs import load_checkpoint, save_checkpoint
from twostage_ad.stages.attention import AttentionStage
from twostage_ad.stages.patch_scorer import PatchScorerStage

from conftest import textured

# what pipelines/mtd.yaml held before the precision, layout and batch settings moved to `run`
OLD_RECIPE = """
data: {source: digits, image_size: 32}
augment: {opacity_min: 0.25}
stage1: {epochs: 40, lr_schedule: constant, w_con: 0.0, w_rep: 0.0, w_enc: 0.0, w_adv: 0.0,
         screen_con: 0.0, screen_enc: 0.0, score_bf16: true, amp: false, channels_last: true, score_batch_size: 32}
stage2: {guidance_floor: 0.25, amp: false, channels_last: true, score_batch_size: 32}
"""


def test_an_old_config_loads_with_a_warning_naming_each_new_field(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text(OLD_RECIPE)
    with pytest.warns(FutureWarning) as caught:
        config = load_config(path)
    messages = " ".join(str(w.message) for w in caught)
    assert "stage1.score_bf16 is obsolete: use run.precision" in messages
    assert "stage2.score_batch_size is obsolete: use run.score_batch_size" in messages
    assert "stage1.lr_schedule is obsolete: delete it" in messages
    assert "augment.opacity_min is obsolete: use augment.blob_opacity_min" in messages
    assert config.run.precision == "auto"  # bf16 where native, float32 elsewhere: what score_bf16 meant
    assert (config.run.amp, config.run.channels_last, config.run.score_batch_size) == (False, True, 32)
    assert config.stage1.epochs == 40
    assert config.augment.blob_opacity_min == 0.25


def test_att_balanced_is_a_field_again_read_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert config_from_dict({"stage1": {"att_balanced": False}}).stage1.att_balanced is False


def test_score_bf16_false_reads_as_float32():
    with pytest.warns(FutureWarning):
        assert config_from_dict({"stage1": {"score_bf16": False}}).run.precision == "float32"


@pytest.mark.parametrize("values, message", [
    ({"stage1": {"lr_schedule": "cosine"}}, "stage1.lr_schedule was removed \\(only 'constant' remains\\), got 'cosine': delete the field"),
    ({"stage2": {"guidance_floor": 0.5}}, "stage2.guidance_floor was removed \\(only 0.25 remains\\), got 0.5"),
    ({"stage1": {"score_batch_size": 8}, "run": {"score_batch_size": 16}}, "run.score_batch_size is 16 but the obsolete stage1"),
    ({"augment": {"opacity_min": 0.5, "blob_opacity_min": 0.1}}, "augment.opacity_min \\(0.5\\) is now augment.blob_opacity_min, which says 0.1"),
])
def test_an_old_field_that_cannot_be_read_the_same_is_refused_with_the_fix(values, message):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        with pytest.raises(ConfigError, match=message):
            config_from_dict(values)


def test_stages_that_set_a_run_field_differently_keep_the_first_with_a_warning():
    """An old run folder stays readable (calibrate, report, predict) whatever its stages disagreed on."""
    with pytest.warns(FutureWarning, match="stage1 and stage2 set run.amp differently \\(True vs False\\); using True"):
        assert config_from_dict({"stage1": {"amp": True}, "stage2": {"amp": False}}).run.amp is True


def test_the_seed_data_source_is_read_as_folders(tmp_path):
    config = config_from_dict({"data": {"source": "seed", "path": str(tmp_path)}})
    assert config.data.source == "folders"
    saved = yaml.safe_load(yaml.safe_dump({"data": {"source": config.data.source}}))
    assert saved["data"]["source"] == "folders"


def test_a_checkpoint_scores_whatever_training_only_fields_it_stored(tmp_path):
    """Removed training fields at other values do not stop scoring; a removed scoring field does."""
    rng = np.random.default_rng(0)
    images = np.stack([textured(rng, size=32)[..., None] for _ in range(6)])
    config = load_config(None, ["stage1.epochs=1", "stage1.base_width=8", "stage1.max_width=16", "stage1.batch_size=3"]).stage1
    stage = AttentionStage(config=config, image_size=32, channels=1, device="cpu").fit(images, progress=False)
    stage.save(tmp_path / "s1.pt")
    payload = load_checkpoint(tmp_path / "s1.pt")
    payload["config"].update(lr_schedule="cosine", att_balanced=False, score_bf16=False, amp=False, score_batch_size=7)
    payload["augment"]["opacity_min"] = 0.5
    save_checkpoint(tmp_path / "old.pt", payload)
    loaded = AttentionStage.load(tmp_path / "old.pt", device="cpu")
    assert loaded.config.att_balanced is False  # a field again: kept as stored
    np.testing.assert_array_equal(loaded.score(images, progress=False).loss, stage.score(images, progress=False).loss)
    # resuming it would train differently from what it stored: refused
    with pytest.raises(ValueError, match="its config differs"):
        AttentionStage(config=config, image_size=32, channels=1, device="cpu").fit(
            images, checkpoint_path=tmp_path / "old.pt", progress=False, resume=True)

    scorer = PatchScorerStage(config=load_config(None, ["stage2.epochs=1", "stage2.width_divisor=16"]).stage2,
                              image_size=32, channels=1, device="cpu").fit(images, progress=False)
    scorer.save(tmp_path / "s2.pt")
    payload = load_checkpoint(tmp_path / "s2.pt")
    payload["config"]["guidance_floor"] = 0.5
    save_checkpoint(tmp_path / "s2-old.pt", payload)
    with pytest.raises(ValueError, match="guidance_floor was removed"):
        PatchScorerStage.load(tmp_path / "s2-old.pt", device="cpu")


def test_a_stage2_checkpoint_from_before_the_defect_head_loads_as_the_latent_scorer(tmp_path):
    rng = np.random.default_rng(0)
    images = np.stack([textured(rng, size=32)[..., None] for _ in range(6)])
    config = load_config(None, ["stage2.epochs=1", "stage2.width_divisor=16", "stage2.score=latent", "stage2.guidance=none"]).stage2
    scorer = PatchScorerStage(config=config, image_size=32, channels=1, device="cpu").fit(images, progress=False)
    scorer.fit_normalisation(images[:2]).save(tmp_path / "s2.pt")
    payload = load_checkpoint(tmp_path / "s2.pt")
    del payload["config"]["score"], payload["config"]["head_width"], payload["config"]["w_head"], payload["config"]["head_lr"]
    save_checkpoint(tmp_path / "s2-old.pt", payload)
    loaded = PatchScorerStage.load(tmp_path / "s2-old.pt", device="cpu")
    assert loaded.config.score == "latent" and isinstance(loaded.model_, GANomaly2D)
    np.testing.assert_array_equal(loaded.score(images, progress=False).scores, scorer.score(images, progress=False).scores)


def test_a_stage1_checkpoint_from_before_the_maps_own_bank_keeps_its_map(tmp_path):
    """A checkpoint that stores no ``feature_map_stride`` drew its map from the screening's cells: it still does
    (the field's default, 0), and the map bank it lacks is not asked for."""
    rng = np.random.default_rng(0)
    images = np.stack([textured(rng, size=32)[..., None] for _ in range(6)])
    config = load_config(None, ["stage1.epochs=1", "stage1.base_width=8", "stage1.max_width=16", "stage1.batch_size=3",
                                "stage1.feature_stride=4", "stage1.feature_map_stride=8", "stage1.feature_bank_size=32"]).stage1
    stage = AttentionStage(config=config, image_size=32, channels=1, device="cpu").fit(images, progress=False)
    assert stage.map_features_ is not None  # the map's 4×4 bottleneck cells beside the screening's 8×8
    stage.save(tmp_path / "s1.pt")
    payload = load_checkpoint(tmp_path / "s1.pt")
    del payload["config"]["feature_map_stride"], payload["feature_map_normality"]
    save_checkpoint(tmp_path / "old.pt", payload)
    loaded = AttentionStage.load(tmp_path / "old.pt", device="cpu")
    assert loaded.config.feature_map_stride == 0 and loaded.map_features_ is None
    stage.config = replace(config, feature_map_stride=0)
    stage.fit_missing_statistics(images)
    np.testing.assert_array_equal(loaded.score(images, progress=False).anomaly_maps, stage.score(images, progress=False).anomaly_maps)


def test_migrate_section_moves_and_drops_without_touching_the_rest():
    values, moved = migrate_section("stage1", {"epochs": 3, "score_bf16": True, "lr_schedule": "constant"})
    assert values == {"epochs": 3} and moved == {"precision": "auto"}
    values, moved = migrate_section("augment", {"opacity_min": 0.1, "kinds": ["blob"]})
    assert values == {"blob_opacity_min": 0.1, "kinds": ["blob"]} and moved == {}


@pytest.mark.parametrize("native", [False, True])
def test_the_shipped_recipe_scores_in_bf16_only_where_it_is_native_and_never_warns(monkeypatch, native):
    monkeypatch.setattr("twostage_ad.device.has_fast_bf16", lambda device: native)
    recipe = load_config(None, ["stage1.w_con=0", "stage1.w_rep=0", "stage1.w_enc=0", "stage1.w_adv=0",
                                "stage1.screen_con=0", "stage1.screen_enc=0"])
    assert recipe.run.precision == "auto"
    stage = AttentionStage(config=recipe.stage1, image_size=32, channels=1, device="cpu", precision=recipe.run.precision)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert stage.scoring_precision() == ("bf16" if native else "float32")
    # with reconstruction terms in the screening loss, auto stays float32 even where bf16 is native
    assert resolve_precision("auto", torch.device("cpu"), bf16_allowed=False) == "float32"
    # an explicit bf16 without native support runs, with a warning
    if not native:
        with pytest.warns(RuntimeWarning, match="no native bf16"):
            assert resolve_precision("bf16", torch.device("cpu")) == "bf16"


def test_a_run_folder_written_before_a_field_reads_as_it_was_trained(tmp_path):
    from twostage_ad.config_io import config_to_dict
    from twostage_ad.runs import load_run_config

    saved = config_to_dict(load_config(None, ["data.channels=1", "data.bit_depth=12"]))
    del saved["data"]["bit_depth"], saved["stage1"]["max_seconds"]  # fields an older version did not write
    del saved["stage1"]["tile_size"], saved["stage2"]["tile_size"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    config = load_run_config(tmp_path)
    assert config.data.bit_depth == 16  # 16-bit files were read by their mode's full range then
    assert config.stage1.max_seconds == 0.0  # no time budget then
    assert config.stage1.tile_size == config.stage2.tile_size == 0  # whole images at any size then (today: 128-px tiles)


def test_a_checkpoint_from_before_the_tile_default_keeps_the_whole_image():
    for section, cls in (("stage1", Stage1Config), ("stage2", Stage2Config)):
        stored = asdict(cls())
        del stored["tile_size"]  # a checkpoint written before the field: trained on whole images at any size
        assert stored_section(section, stored)["tile_size"] == 0
