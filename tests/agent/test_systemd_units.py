"""The systemd units pass ``systemd-analyze verify`` without a single complaint.

The units point ExecStart at /opt/oobleck/.venv/bin; verify checks that the binary exists, so
the test verifies copies whose ExecStart points at this environment's console scripts instead
(nothing else changes). Warnings (unknown keys, bad values) exit 0, so any output fails too.
"""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "scripts" / "systemd"
INSTALL_BIN = "/opt/oobleck/.venv/bin/"
NAMES = ("oobleck-master.service", "oobleck-agent@.service")

analyze = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(analyze is None, reason="systemd-analyze is not installed on this machine")


def _copy_for_this_environment(tmp_path: Path, name: str, text: str | None = None) -> Path:
    text = (UNITS / name).read_text() if text is None else text
    assert INSTALL_BIN in text
    out = tmp_path / name
    out.write_text(text.replace(INSTALL_BIN, str(Path(sys.executable).parent) + "/"))
    return out


def _verify(*paths: Path) -> subprocess.CompletedProcess:
    return subprocess.run([analyze, "verify", "--man=no", *map(str, paths)], capture_output=True, text=True, timeout=60)


@needs_analyze
def test_units_verify_cleanly(tmp_path):
    result = _verify(*(_copy_for_this_environment(tmp_path, name) for name in NAMES))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", result.stdout + result.stderr


@needs_analyze
def test_verify_would_catch_a_broken_unit(tmp_path):
    text = (UNITS / NAMES[0]).read_text().replace("Restart=on-failure", "Restart=sometimes")
    result = _verify(_copy_for_this_environment(tmp_path, NAMES[0], text))
    assert "restart" in (result.stdout + result.stderr).lower()


@pytest.mark.parametrize("name", NAMES)
def test_units_restart_on_failure_as_an_unprivileged_user(name):
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read_string((UNITS / name).read_text())
    service = parser["Service"]
    assert service["Restart"] == "on-failure"
    assert service["User"] not in ("", "root")
    assert service["ExecStart"].startswith(INSTALL_BIN)
    assert "--config /etc/oobleck/" in service["ExecStart"]


@needs_analyze
@pytest.mark.parametrize(("name", "limit"), [("oobleck-master.service", 4.5), ("oobleck-agent@.service", 6.5)])
def test_units_are_hardened(tmp_path, name, limit):
    """``systemd-analyze security`` scores the units' exposure (0 best, 10 worst)."""
    unit = _copy_for_this_environment(tmp_path, name.replace("@.", "@node0."), (UNITS / name).read_text())
    res = subprocess.run([analyze, "security", "--offline=yes", str(unit)], capture_output=True, text=True, timeout=60)
    found = re.search(r"Overall exposure level for \S+: ([0-9.]+)", res.stdout)
    assert found, res.stdout[-2000:] + res.stderr
    assert float(found.group(1)) <= limit, res.stdout[-3000:]
