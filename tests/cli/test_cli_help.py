"""Every console script has a real --help, and lists exactly the subcommands it implements."""

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from oobleck.cli import ctl

BIN = Path(sys.executable).parent
SCRIPTS = {
    "oobleck-master": "The Oobleck master",
    "oobleck-agent": "The Oobleck agent",
    "oobleck-launch": "Launch an Oobleck training job",
    "oobleckctl": "Administer an Oobleck job cluster",
    "oobleck-sim": "Simulate a training cluster under a node add/remove trace",
}


@pytest.mark.parametrize(("script", "fragment"), SCRIPTS.items())
def test_help_runs_and_describes_the_command(script, fragment):
    result = subprocess.run([str(BIN / script), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: {script}")
    assert fragment in result.stdout
    assert "--version" in result.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_version(script):
    result = subprocess.run([str(BIN / script), "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert result.stdout.strip().startswith(f"{script} 0.1.0")


def _subcommands(parser: argparse.ArgumentParser) -> set[str]:
    names = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            names.update(action.choices)
    return names


def test_oobleckctl_help_lists_exactly_its_subcommands():
    implemented = _subcommands(ctl.build_parser())
    assert implemented == {
        "status",
        "nodes",
        "events",
        "submit",
        "drain-node",
        "undrain-node",
        "kill-node",
        "cancel",
        "plan",
    }
    result = subprocess.run([str(BIN / "oobleckctl"), "--help"], capture_output=True, text=True, timeout=60)
    section = result.stdout.split("commands:", 1)[1]
    # Every command line: 4 spaces, the name, then its help; continuation lines are indented deeper.
    listed = {line.split()[0] for line in section.splitlines() if line.startswith("    ") and line[4] != " "}
    assert listed == implemented


def test_unknown_option_is_a_usage_error():
    result = subprocess.run([str(BIN / "oobleckctl"), "--frobnicate"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "unrecognized arguments: --frobnicate" in result.stderr
