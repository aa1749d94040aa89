"""Configuration I/O: YAML files, nested plain values and ``--set section.field=value`` overrides.

The dataclasses and their validation live in :mod:`twostage_ad.config`; this module turns files
and strings into a validated :class:`~twostage_ad.config.Config` and back.
"""

from __future__ import annotations

import dataclasses
import typing
import warnings
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from twostage_ad.config import DEMO_CONFIG, Config, ConfigError

__all__ = ["config_from_dict", "config_to_dict", "apply_overrides", "load_config", "save_config"]


def config_from_dict(values: Mapping[str, Any] | None) -> Config:
    """Build and validate a :class:`Config` from nested plain values (as YAML gives)."""
    values = values or {}
    if not isinstance(values, Mapping):
        raise ConfigError(f"a config must be a mapping of sections, got {values!r}")
    from twostage_ad.config_types import section_from_dict  # both import this module
    from twostage_ad.migration import migrate_config

    values = migrate_config(values)
    hints = typing.get_type_hints(Config)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise ConfigError(f"unknown config section {unknown[0]!r} (known: {', '.join(hints)})")
    sections = {name: section_from_dict(hints[name], values[name] or {}, name) for name in values}
    return Config(**sections).validate()


def config_to_dict(config: Config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=c`` strings to nested ``values`` in place; ``c`` is parsed as YAML."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.field=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) != 2 or not all(parts):
            raise ConfigError(f"override key {key!r} must look like section.field (e.g. stage1.epochs)")
        section, name = parts
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from exc
        current = values.setdefault(section, {})
        if current is None:
            current = values[section] = {}
        current[name] = value
    return values


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the embedded digits demo when ``path`` is None) and apply overrides.

    A config file overrides the package defaults (the real-data recipe) field by field.

    Relative ``data.path`` values are resolved against the YAML file's folder, so configs work
    from any working directory (given as an override: against the working directory), and run
    folders record where their data was.
    """
    values: dict[str, Any] = {}
    if path is None:
        values = yaml.safe_load(resources.files("twostage_ad").joinpath(DEMO_CONFIG).read_text(encoding="utf-8"))
    else:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections, got {loaded!r}")
        values = loaded or {}
        data = values.get("data") or {}
        if isinstance(data, dict) and isinstance(data.get("path"), str) and not Path(data["path"]).is_absolute():
            data["path"] = str((path.parent / data["path"]).resolve())
            values["data"] = data
    apply_overrides(values, list(overrides or []))
    data = values.get("data")
    if any(item.split("=", 1)[0].strip() == "data.path" for item in overrides or []) and isinstance(data, dict) \
            and isinstance(data.get("path"), str) and not Path(data["path"]).is_absolute():
        data["path"] = str(Path(data["path"]).expanduser().resolve())  # --set data.path: against the working directory
    config = config_from_dict(values)
    if path is None and config.data.source != "digits":
        warnings.warn(f"data.source {config.data.source!r} without a config file: the digits demo's stage settings apply "
                      "(reconstruction objectives, 10 epochs); start from pipelines/mtd.yaml or any config file for the "
                      "real-data recipe", UserWarning, stacklevel=2)
    return config


def save_config(config: Config, path: str | Path) -> None:
    from twostage_ad.runs import write_text_atomic

    write_text_atomic(path, yaml.safe_dump(config_to_dict(config), sort_keys=False))
