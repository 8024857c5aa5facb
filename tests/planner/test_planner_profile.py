"""Profile parsing and the C validation path reaching Python as typed exceptions."""

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from oobleck.planner import (
    PROFILE_FORMAT,
    InvalidInputError,
    LayerProfile,
    PlannerError,
    Profile,
    load_profile,
    native_version,
    parse_profile,
    validate_profile,
)


def layer_dict(i=0, **overrides):
    base = {
        "name": f"l{i}",
        "forward_ms": 1.0 + i,
        "backward_ms": 2.0 + i,
        "param_bytes": 1000 * (i + 1),
        "activation_bytes": 100,
        "output_bytes": 10,
    }
    base.update(overrides)
    return base


def profile_dict(layers):
    return {"format": PROFILE_FORMAT, "model": "m", "microbatch_size": 2, "layers": layers}


def test_native_library_loads():
    assert native_version() == "0.1.0"


def test_valid_profile_is_accepted_and_round_trips():
    data = profile_dict([layer_dict(i) for i in range(4)])
    profile = parse_profile(data)
    assert profile.num_layers == 4
    assert profile.layers[2].param_bytes == 3000
    assert isinstance(profile.layers[2].param_bytes, int)
    assert parse_profile(json.loads(profile.to_json())) == profile


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("forward_ms", -1.0, "layer 2: forward_ms must be >= 0, got -1"),
        ("backward_ms", float("nan"), "layer 2: backward_ms must be a number, got NaN"),
        ("forward_ms", float("inf"), "layer 2: forward_ms must be finite"),
        ("param_bytes", -5, "layer 2: param_bytes must be >= 0, got -5"),
        ("activation_bytes", 1.5, "layer 2: activation_bytes must be a whole number of bytes, got 1.5"),
        ("output_bytes", 2.0**60, "layer 2: output_bytes is implausibly large"),
    ],
)
def test_c_validation_error_reaches_python_with_c_message(field, value, expected):
    layers = [layer_dict(i) for i in range(4)]
    layers[2][field] = value
    with pytest.raises(InvalidInputError) as info:
        parse_profile(profile_dict(layers))
    assert str(info.value).startswith(expected)
    assert info.value.code == 1  # OBK_EINVAL from the C side
    assert isinstance(info.value, PlannerError)
    assert isinstance(info.value, ValueError)


def test_zero_layers_rejected_by_c():
    with pytest.raises(InvalidInputError, match="at least one layer, got 0"):
        validate_profile(Profile(model="m", microbatch_size=1, layers=()))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(format="other/1"), "format: expected 'oobleck-profile/1'"),
        (lambda d: d.update(microbatch_size=0), "microbatch_size: expected an integer >= 1"),
        (lambda d: d.update(layers={}), "layers: expected a list"),
        (lambda d: d["layers"][1].pop("output_bytes"), r"layers\[1\]\.output_bytes: missing"),
        (lambda d: d["layers"][0].update(forward_ms="1"), r"layers\[0\]\.forward_ms: expected a number, got str"),
        (lambda d: d["layers"][0].update(forward_ms=True), r"layers\[0\]\.forward_ms: expected a number"),
        (lambda d: d["layers"][1].update(extra=1), r"layers\[1\]: unknown field\(s\) extra"),
        (lambda d: d["layers"].append(3), r"layers\[2\]: expected an object"),
    ],
)
def test_structural_errors_name_the_field(mutate, message):
    data = profile_dict([layer_dict(0), layer_dict(1)])
    mutate(data)
    with pytest.raises(InvalidInputError, match=message):
        parse_profile(data)


def test_load_profile_reports_malformed_json_and_missing_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "oobleck-profile/1", "layers": [}')
    with pytest.raises(InvalidInputError, match=r"bad\.json: malformed JSON at line 1"):
        load_profile(bad)
    with pytest.raises(InvalidInputError, match="cannot read profile"):
        load_profile(tmp_path / "missing.json")
    good = tmp_path / "good.json"
    good.write_text(json.dumps(profile_dict([layer_dict(0)])))
    assert load_profile(good).layers[0].name == "l0"


finite = st.floats(min_value=0, max_value=1e6, allow_nan=False, allow_infinity=False)
whole = st.integers(min_value=0, max_value=2**50)
layer_st = st.builds(
    LayerProfile,
    name=st.just("x"),
    forward_ms=finite,
    backward_ms=finite,
    param_bytes=whole,
    activation_bytes=whole,
    output_bytes=whole,
)
bad_value = st.one_of(
    st.floats(max_value=-1e-9, allow_nan=False, allow_infinity=False),
    st.just(math.nan),
    st.just(math.inf),
    st.just(-math.inf),
)


@given(st.lists(layer_st, min_size=1, max_size=40))
def test_any_valid_profile_is_accepted(layers):
    validate_profile(Profile(model="m", microbatch_size=1, layers=tuple(layers)))


@given(
    st.lists(layer_st, min_size=1, max_size=20),
    st.data(),
    st.sampled_from(["forward_ms", "backward_ms", "param_bytes", "activation_bytes", "output_bytes"]),
    bad_value,
)
def test_first_bad_value_is_reported_with_its_layer(layers, data, field, value):
    index = data.draw(st.integers(min_value=0, max_value=len(layers) - 1))
    raw = [vars(layer).copy() for layer in layers]
    raw[index][field] = value
    bad = tuple(LayerProfile(**r) for r in raw)
    with pytest.raises(InvalidInputError, match=rf"^layer {index}: {field} must"):
        validate_profile(Profile(model="m", microbatch_size=1, layers=bad))
