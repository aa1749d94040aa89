"""Old configs and checkpoints keep loading: fields that were removed, moved or renamed.

A config (YAML, a run's ``config.yaml``) is migrated with a warning naming each replacement; a
checkpoint's stored stage config quietly (its training-only fields no longer matter to scoring).
A removed field set to anything but the one value that remains is refused with the fix.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from twostage_ad.config import SOURCE_ALIASES, ConfigError

__all__ = ["FORMER_DEFAULTS", "MOVED_FIELDS", "REMOVED_FIELDS", "RENAMED_FIELDS", "migrate_config", "migrate_section",
           "stored_run_config", "stored_section"]

# section -> {field: (the one value that remains, whether it changes scores)}
REMOVED_FIELDS: dict[str, dict[str, tuple[Any, bool]]] = {
    "stage1": {"lr_schedule": ("constant", False)},
    "stage2": {"guidance_floor": (0.25, True)},
}
# section -> {field: its new name in the same section}
RENAMED_FIELDS: dict[str, dict[str, str]] = {
    "augment": {"opacity_min": "blob_opacity_min"},  # it only ever set the blob's opacity floor
}
# section -> {field: the run field that replaces it}
MOVED_FIELDS: dict[str, dict[str, str]] = {
    "stage1": {"amp": "amp", "channels_last": "channels_last", "score_batch_size": "score_batch_size", "score_bf16": "precision"},
    "stage2": {"amp": "amp", "channels_last": "channels_last", "score_batch_size": "score_batch_size"},
}


# section -> {field: its default before it changed (most with the real-data recipe becoming the package
# default; tile_size when tiles became the default above 128 px)}: what a run folder or checkpoint that does
# not store the field was trained with
FORMER_DEFAULTS: dict[str, dict[str, Any]] = {
    "data": {"bit_depth": 16},  # 16-bit files were read by their mode's full range
    "stage1": {"attention_kv_max_tokens": None, "final_up": "upsample_conv", "epochs": 10, "w_con": 1.0, "w_enc": 1.0,
               "w_adv": 0.1, "w_rep": 1.0, "screen_con": 1.0, "screen_enc": 1.0,
               "position_normality": "none", "screen_feature": 0.0, "min_steps": 0, "max_steps": 0, "max_seconds": 0.0,
               "tile_size": 0},
    "stage2": {"score": "latent", "min_steps": 0, "max_steps": 0, "max_seconds": 0.0, "tile_size": 0},
}


def stored_run_config(values: Mapping[str, Any]) -> dict[str, Any]:
    """A run folder's resolved ``config.yaml`` as it was written: a stage field it lacks did not
    exist then and takes the value it had (:data:`FORMER_DEFAULTS`), not today's default, so an
    older run resumes and reports what it trained with (a user's config file, by contrast, means
    today's default by a missing field)."""
    values = dict(values)
    for section in FORMER_DEFAULTS:
        if isinstance(values.get(section), Mapping):
            values[section] = _with_former_defaults(section, values[section])
    return values


def _with_former_defaults(section: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` with each field it lacks at its :data:`FORMER_DEFAULTS` value."""
    return {**FORMER_DEFAULTS.get(section, {}), **values}


def stored_section(section: str, values: Mapping[str, Any], *, strict: bool = False) -> dict[str, Any]:
    """A section as a checkpoint stored it -> this version's fields: missing fields take the value
    they had when it was written (:data:`FORMER_DEFAULTS`), then :func:`migrate_section`."""
    return migrate_section(section, _with_former_defaults(section, values), strict=strict)[0]


def migrate_section(section: str, values: Mapping[str, Any], *, strict: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """An old section's fields as this version reads them -> ``(values, {run field: value})``.

    Moved fields are taken out (``stage1.score_bf16: true`` becomes ``run.precision: auto``, bf16
    where it is native); a removed field at the one value that remains is dropped; at another
    value it is an error when ``strict`` (a config, a resume) or when it changes scores (loading
    a checkpoint to score with). A renamed field takes its new name (``augment.opacity_min`` is
    ``augment.blob_opacity_min``). The ``seed`` data source is renamed ``folders``.
    """
    values = dict(values)
    moved: dict[str, Any] = {}
    for name, target in MOVED_FIELDS.get(section, {}).items():
        if name in values:
            value = values.pop(name)
            moved[target] = ("auto" if value else "float32") if name == "score_bf16" else value
    for name, new_name in RENAMED_FIELDS.get(section, {}).items():
        if name in values:
            value = values.pop(name)
            if strict and new_name in values and values[new_name] != value:
                raise ConfigError(f"{section}.{name} ({value!r}) is now {section}.{new_name}, which says {values[new_name]!r}: "
                                  f"delete {section}.{name}")
            values.setdefault(new_name, value)  # a checkpoint that stores both: the new name wins
    for name, (kept, changes_scores) in REMOVED_FIELDS.get(section, {}).items():
        if name in values:
            value = values.pop(name)
            if value != kept and (strict or changes_scores):
                raise ConfigError(f"{section}.{name} was removed (only {kept!r} remains), got {value!r}: delete the field")
    if section == "stage1" and isinstance(values.get("position_normality"), bool):  # YAML true / false (and off / on)
        values["position_normality"] = "standardise" if values["position_normality"] else "none"
    if section == "data" and isinstance(values.get("source"), str) and values["source"] in SOURCE_ALIASES:
        values["source"] = SOURCE_ALIASES[values["source"]]
    return values, moved


def migrate_config(values: Mapping[str, Any]) -> dict[str, Any]:
    """A whole config's old fields -> this version's, with a warning naming each replacement."""
    values = {name: dict(section) if isinstance(section, Mapping) else section for name, section in values.items()}
    into_run: dict[str, tuple[str, Any]] = {}
    for name, section in list(values.items()):
        if not isinstance(section, Mapping) or name not in set(MOVED_FIELDS) | set(REMOVED_FIELDS) | set(RENAMED_FIELDS):
            continue
        old = set(section)
        values[name], moved = migrate_section(name, section)
        for field_name in sorted(old - set(values[name])):
            target = MOVED_FIELDS.get(name, {}).get(field_name)
            renamed = RENAMED_FIELDS.get(name, {}).get(field_name)
            remains = REMOVED_FIELDS.get(name, {}).get(field_name, (None,))[0]
            fix = f"use run.{target}" if target else f"use {name}.{renamed}" if renamed else f"delete it (only {remains!r} remains)"
            warnings.warn(f"{name}.{field_name} is obsolete: {fix}", FutureWarning, stacklevel=3)
        for target, value in moved.items():
            source, earlier = into_run.get(target, (name, value))
            if earlier != value:  # e.g. an old run folder whose stages differed: the first stage's wins
                warnings.warn(f"{source} and {name} set run.{target} differently ({earlier!r} vs {value!r}); using {earlier!r}",
                              FutureWarning, stacklevel=3)
                continue
            into_run[target] = (name, value)
    run = values.get("run")
    if into_run and (run is None or isinstance(run, Mapping)):
        run = dict(run or {})
        for target, (source, value) in into_run.items():
            if target in run and run[target] != value:
                raise ConfigError(f"run.{target} is {run[target]!r} but the obsolete {source} field says {value!r}; keep run.{target}")
            run.setdefault(target, value)
        values["run"] = run
    if isinstance(values.get("data"), Mapping):
        values["data"] = migrate_section("data", values["data"])[0]
    return values
