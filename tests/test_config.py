from pathlib import Path

import pytest
import yaml

from twostage_ad.config import Config, ConfigError
from twostage_ad.config_io import apply_overrides, config_to_dict, load_config, save_config

REPO = Path(__file__).resolve().parents[1]


def test_default_config_is_the_digits_pipeline_file():
    assert load_config(None) == load_config(REPO / "pipelines" / "digits.yaml")


@pytest.mark.parametrize("name", ["mtd", "piped"])
def test_the_real_data_recipe_is_the_package_default(name):
    """The shipped real-data configs say where the data is; every method setting is the default."""
    config, default = config_to_dict(load_config(REPO / "pipelines" / f"{name}.yaml")), config_to_dict(Config().validate())
    for section in config:
        if section not in ("data", "run"):
            assert config[section] == default[section], section
    assert {k for k in config["run"] if config["run"][k] != default["run"][k]} == {"name"}


@pytest.mark.parametrize("name", ["digits", "mtd", "piped"])
def test_shipped_pipelines_load(name):
    config = load_config(REPO / "pipelines" / f"{name}.yaml")
    assert config.run.name == name


def test_relative_data_path_is_resolved_against_the_config_file(tmp_path):
    (tmp_path / "cfg").mkdir()
    path = tmp_path / "cfg" / "x.yaml"
    path.write_text("data: {source: manifest, path: ../data/split.csv}\n")
    config = load_config(path)
    assert Path(config.data.path) == (tmp_path / "data" / "split.csv").resolve()


def test_overrides_parse_yaml_values():
    config = load_config(None, ["stage1.epochs=7", "stage1.lr=0.001", "augment.kinds=[crack, blob]", "run.device=cpu"])
    assert config.stage1.epochs == 7
    assert config.stage1.lr == pytest.approx(0.001)
    assert config.augment.kinds == ["crack", "blob"]
    assert config.run.device == "cpu"


def test_int_is_accepted_for_float_fields():
    assert load_config(None, ["stage1.lr=1"]).stage1.lr == 1.0


@pytest.mark.parametrize(
    "override, message",
    [
        ("stage1.epochs=-3", "stage1.epochs must be an integer >= 1, got -3"),
        ("stage1.epochs=abc", "stage1.epochs must be an integer, got 'abc'"),
        ("stage1.lr=.nan", "stage1.lr must be a finite number, got nan"),
        ("data.image_size=100", "data.image_size must be a power of two from 32 to 512, got 100"),
        ("data.image_size=1024", "data.image_size must be a power of two from 32 to 512, got 1024"),
        ("data.source=folder", "data.source must be one of"),
        ("stage1.nope=1", "unknown field stage1.nope"),
        ("bogus.x=1", "unknown config section 'bogus'"),
        ("augment.kinds=[scratch]", "augment.kinds must be a non-empty list"),
        ("calibration.q=1.5", "calibration.q must be in (0, 1), got 1.5"),
        ("run.device=tpu", "run.device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
        ("data.source=manifest", "data.path must be a folder or CSV path"),
        ("run.amp=yes please", "run.amp must be true or false"),
        ("epochs=3", "must look like section.field"),
        ("stage1.bottleneck_size=16", "stage1.bottleneck_size must be at most data.image_size / 4 = 8"),
        ("stage1.base_width=2", "stage1.base_width must be an integer >= 4"),
        ("run.seed=-1", "run.seed must be an integer >= 0, got -1"),
        ("stage1.attention_kv_max_tokens=0", "stage1.attention_kv_max_tokens must be an integer >= 1 or null, got 0"),
        ("stage1.final_up=bicubic", "stage1.final_up must be upsample_conv or conv_upsample, got 'bicubic'"),
        ("stage1.ensemble_size=0", "stage1.ensemble_size must be an integer >= 1, got 0"),
        ("stage1.feature_map_stride=12", "stage1.feature_map_stride must be 0 (feature_stride's) or a power of two >= 2, got 12"),
        ("cascade.map_weight=-0.5", "cascade.map_weight must be a finite number >= 0, got -0.5"),
    ],
)
def test_bad_values_name_the_field_and_value(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert message in str(info.value)


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_saved_config_round_trips(tmp_path):
    config = load_config(None, ["stage1.epochs=4", "data.category=x"])
    save_config(config, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == config
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["stage1"]["epochs"] == 4


def test_apply_overrides_creates_sections():
    values = apply_overrides({}, ["run.seed=3"])
    assert values == {"run": {"seed": 3}}
    assert config_to_dict(load_config(None, ["run.seed=3"]))["run"]["seed"] == 3


def test_real_data_pipelines_share_one_recipe():
    """MTD and PIPED differ in their data only: no method setting tuned to one of them."""
    mtd, piped = (config_to_dict(load_config(REPO / "pipelines" / f"{name}.yaml")) for name in ("mtd", "piped"))
    for section in mtd:
        if section not in ("data", "run"):
            assert mtd[section] == piped[section], section
    assert {k for k in mtd["run"] if mtd["run"][k] != piped["run"][k]} == {"name"}


def test_attention_only_training_cannot_screen_with_the_untrained_reconstruction():
    with pytest.raises(ConfigError, match="stage1.screen_con must be 0 when w_con, w_rep, w_enc and w_adv are all 0"):
        load_config(None, ["stage1.w_con=0", "stage1.w_rep=0", "stage1.w_enc=0", "stage1.w_adv=0"])


def test_ensembles_train_the_attention_head_only():
    with pytest.raises(ConfigError, match="stage1.w_con must be 0 with ensemble_size 3 \\(ensembles train the attention head only\\), got 1.0"):
        load_config(None, ["stage1.ensemble_size=3"])
    recipe = load_config(REPO / "pipelines" / "mtd.yaml", ["stage1.ensemble_size=3"])
    assert recipe.stage1.ensemble_size == 3


def test_bf16_scoring_needs_attention_only_screening():
    with pytest.raises(ConfigError, match="stage1.screen_con must be 0 with run.precision bf16"):
        load_config(None, ["run.precision=bf16", "stage1.screen_enc=0"])
    with pytest.raises(ConfigError, match="stage1.screen_enc must be 0 with run.precision bf16"):
        load_config(None, ["run.precision=bf16", "stage1.screen_con=0"])
    assert load_config(None, ["run.precision=bf16", "stage1.screen_con=0", "stage1.screen_enc=0"]).run.precision == "bf16"
