"""Limits that keep the code base livable, checked on every hand-written module: size, which
daemon may import which package, and where protobuf may be imported (the wire's edge)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PY_FOLDERS = ("master", "agent", "worker", "common", "cli", "sim", "native", "scripts")
MAX_PY_LINES = 500
MAX_C_LINES = 800
# The modules at the wire's edge: the only ones of each package that import generated *_pb2 code.
PB2_EDGE = {
    "master": {"service.py", "planning.py", "messages.py"},
    "agent": {"channel.py", "session.py"},
    "worker": {"agent_link.py", "planmsg.py"},
    "cli": {"admin.py", "follow.py", "launch.py"},
    "common": set(),
    "sim": set(),
    "native": set(),
}
# A daemon never imports another daemon's package (shared contracts live in common/).
FORBIDDEN = {
    "master": ("oobleck.worker", "oobleck.agent"),
    "agent": ("oobleck.worker", "oobleck.master"),
    "cli": ("oobleck.worker", "oobleck.agent", "oobleck.master"),
    "worker": ("oobleck.master", "oobleck.agent"),
    "common": ("oobleck.worker", "oobleck.agent", "oobleck.master", "oobleck.cli"),
}


def python_modules():
    for folder in PY_FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if "_pb2" in path.name or "__pycache__" in path.parts:
                continue
            yield path


def imported_modules(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return names


def test_no_module_is_too_long():
    long = [
        f"{p.relative_to(ROOT)}: {n} lines"
        for p in python_modules()
        if (n := len(p.read_text().splitlines())) > MAX_PY_LINES
    ]
    long += [
        f"{p.relative_to(ROOT)}: {n} lines"
        for p in sorted((ROOT / "native").rglob("*.[ch]"))
        if (n := len(p.read_text().splitlines())) > MAX_C_LINES
    ]
    assert not long, f"over {MAX_PY_LINES} lines (Python) / {MAX_C_LINES} (C): split them by concern: {long}"


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_daemon_imports_another_daemons_package(package):
    bad = [
        f"{p.relative_to(ROOT)} imports {name}"
        for p in sorted((ROOT / package).rglob("*.py"))
        for name in imported_modules(p)
        if any(name == f or name.startswith(f + ".") for f in FORBIDDEN[package])
    ]
    assert not bad, bad


@pytest.mark.parametrize("package", sorted(PB2_EDGE))
def test_protobuf_is_imported_only_at_the_edge(package):
    bad = [
        str(p.relative_to(ROOT))
        for p in sorted((ROOT / package).rglob("*.py"))
        if "_pb2" not in p.name
        and p.name not in PB2_EDGE[package]
        and any(name.endswith(("_pb2", "_pb2_grpc")) for name in imported_modules(p))
    ]
    assert not bad, f"only {sorted(PB2_EDGE[package])} of {package}/ may import *_pb2: {bad}"


def test_the_limits_see_what_they_claim_to():
    # A check that reads nothing would pass: it must see the daemons' big modules and imports.
    modules = {str(p.relative_to(ROOT)) for p in python_modules()}
    assert {"master/core.py", "agent/daemon.py", "worker/engine.py", "common/jobspec.py"} <= modules
    assert "oobleck.protos.v1.admin_pb2" in imported_modules(ROOT / "master" / "service.py")
