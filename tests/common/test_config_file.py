"""The daemons' shared YAML config-file loader: every failure is a ConfigError naming the problem."""

import pytest

from oobleck.common.validate import ConfigError, load_yaml_config

KNOWN = {"listen", "heartbeat_timeout_s"}


def test_known_fields_load_and_an_empty_file_is_empty(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("listen: 127.0.0.1:0\nheartbeat_timeout_s: 2\n")
    assert load_yaml_config(path, KNOWN) == {"listen": "127.0.0.1:0", "heartbeat_timeout_s": 2}
    path.write_text("")
    assert load_yaml_config(path, KNOWN) == {}


@pytest.mark.parametrize(
    ("text", "field", "fragment"),
    [
        ("listen: [oops", "config", "malformed YAML"),
        ("- a\n- b\n", "config", "expected a mapping, got a list"),
        ("lisen: x\n", "lisen", "unknown field"),
    ],
)
def test_bad_files(tmp_path, text, field, fragment):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_yaml_config(path, KNOWN)
    assert info.value.field == field and fragment in str(info.value)


def test_unreadable_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_yaml_config(tmp_path / "missing.yaml", KNOWN)
