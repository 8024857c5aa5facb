"""One way to configure a daemon: a config dataclass filled from, lowest precedence first, its
field defaults, a YAML ``--config`` file, ``OOBLECK_*`` environment variables and command-line
flags (one per field, ``heartbeat_timeout_s`` -> ``--heartbeat-timeout-s``). The master and the
agent both use it; each keeps its own dataclass, help texts and environment names.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from oobleck.common import validate as v
from oobleck.common.validate import ConfigError


def field_kinds(cls: type) -> dict[str, type]:
    """Field name -> bool, int, float or str (``X | None`` counts as X) for the fields a user sets."""
    hints = typing.get_type_hints(cls)
    kinds = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        hint = hints[f.name]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        kind = args[0] if args else hint
        kinds[f.name] = kind if kind in (bool, int, float) else str
    return kinds


def _metavar(name: str, kind: type) -> str:
    if name.endswith("_per_s"):
        return "PER_SECOND"
    if name.endswith("_s"):
        return "SECONDS"
    if "bytes" in name:
        return "BYTES"
    if kind in (int, float):
        return "N"
    return name.rsplit("_", 1)[-1].upper()


def add_flags(parser: argparse.ArgumentParser, cls: type, help: Mapping[str, str] | None = None) -> None:
    """``--config FILE`` plus one flag per field of ``cls``; flags default to None ("not given")."""
    help = help or {}
    parser.add_argument("--config", metavar="FILE", help="YAML file with the fields below (flags override it)")
    for name, kind in field_kinds(cls).items():
        flag = "--" + name.replace("_", "-")
        text = help.get(name, name)
        if kind is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            parser.add_argument(flag, dest=name, type=kind, default=None, metavar=_metavar(name, kind), help=text)


def from_sources(
    cls: type,
    args: argparse.Namespace | None = None,
    *,
    config_file: str | Path | None = None,
    file_data: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    env_overrides: Mapping[str, str] | None = None,
    required: Iterable[str] = (),
) -> Any:
    """A validated ``cls``: defaults < YAML (``file_data``, or ``config_file``, or ``args.config``)
    < environment (``env_overrides``: variable -> field) < flags in ``args``. A missing
    ``required`` field or a bad value is a :class:`ConfigError` naming it."""
    kinds = field_kinds(cls)
    values: dict[str, Any] = {}
    config_file = config_file or (getattr(args, "config", None) if args is not None else None)
    if file_data is None and config_file:
        file_data = v.load_yaml_config(config_file, set(kinds))
    values.update(file_data or {})
    env = os.environ if environ is None else environ
    for var, name in (env_overrides or {}).items():
        if env.get(var):
            values[name] = env[var]
    if args is not None:
        for name in kinds:
            value = getattr(args, name, None)
            if value is not None:
                values[name] = value
    for name in required:
        if name not in values:
            raise ConfigError(name, f"required (flag --{name.replace('_', '-')} or {name} in --config)")
    for name, value in list(values.items()):  # YAML may give ints for float fields
        if kinds.get(name) is float and isinstance(value, int) and not isinstance(value, bool):
            values[name] = float(value)
    try:
        return cls(**values)
    except TypeError as exc:  # pragma: no cover - unknown keys are rejected when the file is read
        raise ConfigError("config", str(exc)) from exc
