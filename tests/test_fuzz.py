"""Property tests: the config loader and the manifest parser accept or refuse clearly, never crash."""

import dataclasses
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from twostage_ad.config import Config, ConfigError
from twostage_ad.config_io import apply_overrides, config_from_dict
from twostage_ad.data.records import DataError, read_manifest

SECTIONS = {f.name: [g.name for g in dataclasses.fields(f.type if isinstance(f.type, type) else type(getattr(Config(), f.name)))]
            for f in dataclasses.fields(Config)}

values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=6,
)
known_keys = st.sampled_from(sorted(SECTIONS)).flatmap(
    lambda section: st.tuples(st.just(section), st.sampled_from(SECTIONS[section] + ["unknown_field"]))
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(known_keys, values), max_size=5))
def test_config_from_any_values_is_valid_or_a_config_error(entries):
    raw: dict = {}
    for (section, key), value in entries:
        raw.setdefault(section, {})[key] = value
    try:
        config = config_from_dict(raw)
    except ConfigError as exc:
        assert str(exc)  # a message, naming what is wrong
    else:
        assert isinstance(config, Config)
        config.validate()


@settings(max_examples=200, deadline=None)
@given(st.one_of(values, st.dictionaries(st.text(max_size=8), values, max_size=3)))
def test_config_of_any_shape_is_valid_or_a_config_error(raw):
    try:
        config_from_dict(raw)
    except ConfigError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(max_size=30), max_size=4))
def test_overrides_are_applied_or_refused_with_a_config_error(overrides):
    try:
        config_from_dict(apply_overrides({}, overrides))
    except ConfigError:
        pass


cells = st.one_of(st.text(max_size=10), st.sampled_from(["0", "1", "train", "val", "test", "a.png", "../x.png", "/etc/passwd"]))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    header=st.lists(st.sampled_from(["image", "label", "split", "mask", "category", "extra"]), min_size=0, max_size=6),
    rows=st.lists(st.lists(cells, min_size=0, max_size=6), max_size=5),
    raw=st.binary(max_size=40),
    use_raw=st.booleans(),
)
def test_manifest_parser_returns_records_or_a_data_error(header, rows, raw, use_raw):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "split.csv"
        if use_raw:
            path.write_bytes(raw)
        else:
            lines = [",".join(header)] + [",".join(c.replace(",", " ").replace("\n", " ") for c in row) for row in rows]
            path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        try:
            records = read_manifest(path)
        except DataError as exc:
            assert str(exc)
        else:
            for record in records:
                assert record.label in (0, 1) and record.split in ("train", "val", "test")
                assert Path(folder) in record.image.parents or record.image.parent == Path(folder)
