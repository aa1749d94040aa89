"""Plain values (as YAML gives them) checked against a config dataclass's field annotations.

Each value must have its field's type (an int is accepted for a float; NaN and inf are not); an
unknown field names the known ones. Errors are :class:`~twostage_ad.config.ConfigError` naming
the field and quoting the value.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Any

from twostage_ad.config import ConfigError

__all__ = ["section_from_dict"]



def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, field_name: str) -> Any:
    """Check ``value`` against the annotation ``tp``; allow int -> float; reject NaN / inf."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _coerce(value, non_none[0], field_name)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{field_name} must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{field_name}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{field_name} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{field_name} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{field_name} must be a number, got {value!r}")
        if not math.isfinite(float(value)):
            raise ConfigError(f"{field_name} must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{field_name} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{field_name}: unsupported type {_type_name(tp)}")  # pragma: no cover


def section_from_dict(cls: type, values: Mapping[str, Any], prefix: str) -> Any:
    if not isinstance(values, Mapping):
        raise ConfigError(f"{prefix} must be a mapping of fields, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown field {prefix}.{unknown[0]} (known fields of {prefix}: {', '.join(sorted(known))})")
    kwargs = {}
    for name, value in values.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = section_from_dict(tp, value, f"{prefix}.{name}")
        else:
            kwargs[name] = _coerce(value, tp, f"{prefix}.{name}")
    return cls(**kwargs)
