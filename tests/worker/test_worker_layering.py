"""How the worker package sits among the others: the daemons and the CLI share contracts with it
through oobleck.common only, its modules import each other without cycles, and stay small."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MAX_LINES = 500
#: Imports of oobleck.worker left in the master until it is moved (validate_model_config:
#: oobleck.common.modelconfig). Remove an entry once its import is gone.
PENDING = {"master/core.py"}


def _imports(path: Path) -> set[str]:
    """Modules ``path`` imports (at any level, except under ``if TYPE_CHECKING:``)."""
    tree = ast.parse(path.read_text(), str(path))
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and getattr(child.test, "id", "") == "TYPE_CHECKING":
                continue
            if isinstance(child, ast.Import):
                out.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                out.add(child.module)
                out.update(f"{child.module}.{a.name}" for a in child.names)
            visit(child)

    visit(tree)
    return out


def test_daemons_and_cli_do_not_import_the_worker() -> None:
    offenders = []
    for folder in ("master", "agent", "cli", "common"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel not in PENDING and any(m.startswith("oobleck.worker") for m in _imports(path)):
                offenders.append(rel)
    assert offenders == []


def test_worker_modules_import_each_other_without_cycles_and_stay_small() -> None:
    modules = {p.stem: p for p in (ROOT / "worker").glob("*.py") if p.stem not in ("__init__", "__main__")}
    graph = {
        name: {m.split(".")[2] for m in _imports(path) if m.startswith("oobleck.worker.")} & set(modules)
        for name, path in modules.items()
    }
    done: set[str] = set()

    def walk(name: str, stack: tuple[str, ...]) -> None:
        assert name not in stack, f"import cycle: {' -> '.join((*stack, name))}"
        if name in done:
            return
        for dep in sorted(graph[name]):
            walk(dep, (*stack, name))
        done.add(name)

    for name in sorted(modules):
        walk(name, ())
    sizes = {name: len(path.read_text().splitlines()) for name, path in modules.items()}
    assert {n: s for n, s in sizes.items() if s > MAX_LINES} == {}
