"""Small helpers for turning decoded YAML/JSON into validated values.

Every error is a :class:`ConfigError` whose message starts with the dotted field path
(``optimizer.lr: must be > 0, got -1``), so users see which field to fix.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration or job-spec field is missing, of the wrong type or out of range."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}" if field else problem)
        self.field = field
        self.problem = problem


def join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def mapping(value: Any, field: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(field or "document", f"expected a mapping, got {_kind(value)}")
    for key in value:
        if not isinstance(key, str):
            raise ConfigError(field or "document", f"keys must be strings, got {key!r}")
    return value


def reject_unknown(value: Mapping[str, Any], known: set[str] | frozenset[str], field: str) -> None:
    unknown = sorted(set(value) - set(known))
    if unknown:
        where = join(field, unknown[0])
        raise ConfigError(where, f"unknown field (known: {', '.join(sorted(known))})")


def string(value: Any, field: str, *, choices: tuple[str, ...] | None = None, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise ConfigError(field, f"expected a string, got {_kind(value)}")
    if not allow_empty and not value.strip():
        raise ConfigError(field, "must not be empty")
    if choices is not None and value not in choices:
        raise ConfigError(field, f"must be one of {', '.join(choices)}, got {value!r}")
    return value


INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


def integer(value: Any, field: str, *, min_value: int | None = None, max_value: int | None = None) -> int:
    """An integer within bounds; always within a signed 64-bit integer (what the master's state
    file, protobuf and torch store), so that no value fails later, after memory was changed."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(field, f"expected an integer, got {_kind(value)}")
    lo = INT64_MIN if min_value is None else max(min_value, INT64_MIN)
    hi = INT64_MAX if max_value is None else min(max_value, INT64_MAX)
    if value < lo:
        raise ConfigError(field, f"must be >= {lo}, got {_short(value)}")
    if value > hi:
        raise ConfigError(field, f"must be <= {hi}, got {_short(value)}")
    return value


def _short(value: int) -> str:
    text = str(value)
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} digits)"


def number(
    value: Any,
    field: str,
    *,
    min_value: float | None = None,
    max_value: float | None = None,
    exclusive_min: bool = False,
) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(field, f"expected a number, got {_kind(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise ConfigError(field, f"must be finite, got {value}")
    if min_value is not None:
        if exclusive_min and value <= min_value:
            raise ConfigError(field, f"must be > {min_value:g}, got {value:g}")
        if not exclusive_min and value < min_value:
            raise ConfigError(field, f"must be >= {min_value:g}, got {value:g}")
    if max_value is not None and value > max_value:
        raise ConfigError(field, f"must be <= {max_value:g}, got {value:g}")
    return value


def boolean(value: Any, field: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(field, f"expected true or false, got {_kind(value)}")
    return value


def _kind(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"a boolean ({value})"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    if isinstance(value, str):
        return f"a string ({value!r})"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    return type(value).__name__


def load_yaml_config(path: str | Path, known: set[str] | frozenset[str]) -> dict[str, Any]:
    """A daemon's YAML config file as a dict of known top-level fields (empty file: ``{}``).

    Unreadable files, malformed YAML, a non-mapping document and unknown fields are ConfigErrors.
    """
    import yaml

    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError("config", f"cannot read {str(path)!r}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError("config", f"{path}: malformed YAML: {exc}") from None
    if data is None:
        return {}
    data = dict(mapping(data, "config"))
    reject_unknown(data, known, "")
    return data
