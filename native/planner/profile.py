"""Model profiles (``oobleck-profile/1``): parsing, validation and serialisation.

Parsing checks the JSON structure and types (errors name the field path, e.g.
``layers[3].forward_ms``); value checks (negative times, NaN, fractional bytes, zero layers)
are done by the C planner, so the planner and every caller agree on what is valid.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from oobleck.planner import native
from oobleck.planner._native import lib
from oobleck.planner.errors import InvalidInputError

PROFILE_FORMAT = "oobleck-profile/1"
_LAYER_NUMBERS = ("forward_ms", "backward_ms", "param_bytes", "activation_bytes", "output_bytes")


@dataclass(frozen=True)
class LayerProfile:
    name: str
    forward_ms: float
    backward_ms: float
    param_bytes: int
    activation_bytes: int
    output_bytes: int


@dataclass(frozen=True)
class Profile:
    model: str
    microbatch_size: int
    layers: tuple[LayerProfile, ...]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PROFILE_FORMAT,
            "model": self.model,
            "microbatch_size": self.microbatch_size,
            "layers": [asdict(layer) for layer in self.layers],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidInputError(f"{where}: expected a number, got {type(value).__name__} {value!r}")
    return float(value)


def _as_int_if_whole(value: float) -> int | float:
    # Byte counts are integers; a fractional or non-finite one is kept as is for the C
    # validator to reject with the layer index.
    if math.isfinite(value) and value == math.floor(value):
        return int(value)
    return value


def parse_profile(data: Any) -> Profile:
    """Build a validated :class:`Profile` from decoded JSON. Raises InvalidInputError."""
    if not isinstance(data, dict):
        raise InvalidInputError(f"profile: expected a JSON object, got {type(data).__name__}")
    fmt = data.get("format")
    if fmt != PROFILE_FORMAT:
        raise InvalidInputError(f"format: expected {PROFILE_FORMAT!r}, got {fmt!r}")
    model = data.get("model", "")
    if not isinstance(model, str):
        raise InvalidInputError(f"model: expected a string, got {type(model).__name__}")
    mbs = data.get("microbatch_size")
    if isinstance(mbs, bool) or not isinstance(mbs, int) or mbs < 1:
        raise InvalidInputError(f"microbatch_size: expected an integer >= 1, got {mbs!r}")
    raw_layers = data.get("layers")
    if not isinstance(raw_layers, list):
        raise InvalidInputError(f"layers: expected a list, got {type(raw_layers).__name__}")
    layers = []
    for i, raw in enumerate(raw_layers):
        if not isinstance(raw, dict):
            raise InvalidInputError(f"layers[{i}]: expected an object, got {type(raw).__name__}")
        unknown = sorted(set(raw) - {"name", *_LAYER_NUMBERS})
        if unknown:
            raise InvalidInputError(f"layers[{i}]: unknown field(s) {', '.join(unknown)}")
        name = raw.get("name", f"layer{i}")
        if not isinstance(name, str):
            raise InvalidInputError(f"layers[{i}].name: expected a string, got {name!r}")
        values = {}
        for key in _LAYER_NUMBERS:
            if key not in raw:
                raise InvalidInputError(f"layers[{i}].{key}: missing")
            values[key] = _number(raw[key], f"layers[{i}].{key}")
        layers.append(
            LayerProfile(
                name=name,
                forward_ms=values["forward_ms"],
                backward_ms=values["backward_ms"],
                param_bytes=_as_int_if_whole(values["param_bytes"]),
                activation_bytes=_as_int_if_whole(values["activation_bytes"]),
                output_bytes=_as_int_if_whole(values["output_bytes"]),
            )
        )
    profile = Profile(model=model, microbatch_size=mbs, layers=tuple(layers))
    validate_profile(profile)
    return profile


def load_profile(path: str | Path) -> Profile:
    """Read and validate a profile file. Malformed JSON is an InvalidInputError naming the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise InvalidInputError(f"{path}: cannot read profile: {exc.strerror or exc}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"{path}: malformed JSON at line {exc.lineno}: {exc.msg}") from exc
    return parse_profile(data)


def layers_to_c(layers: tuple[LayerProfile, ...]) -> Any:
    """A C array ``obk_layer[]`` for ``layers`` (owned by the returned cdata)."""
    arr = native.new("obk_layer[]", max(len(layers), 1))
    for i, layer in enumerate(layers):
        arr[i].forward_ms = layer.forward_ms
        arr[i].backward_ms = layer.backward_ms
        arr[i].param_bytes = layer.param_bytes
        arr[i].activation_bytes = layer.activation_bytes
        arr[i].output_bytes = layer.output_bytes
    return arr


def validate_profile(profile: Profile) -> None:
    """Check every layer's values in C; raises InvalidInputError with the C message."""
    native.call(lib.obk_validate_profile, layers_to_c(profile.layers), len(profile.layers))
