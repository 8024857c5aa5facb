"""The worker's modules import each other without cycles (sizes and which package may import
which: tests/repo/test_layering.py)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


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


def test_worker_modules_import_each_other_without_cycles() -> None:
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
