"""Make ``oobleck.sim`` importable from the source tree when the installed package predates it.

The editable install maps each ``oobleck.*`` package to its folder explicitly; until it is redone
with ``sim`` in pyproject.toml, load the package from ``sim/`` directly.
"""

import importlib.util
import sys
from pathlib import Path

try:
    import oobleck.sim  # noqa: F401
except ImportError:
    _root = Path(__file__).resolve().parents[2] / "sim"
    _spec = importlib.util.spec_from_file_location(
        "oobleck.sim", _root / "__init__.py", submodule_search_locations=[str(_root)]
    )
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["oobleck.sim"] = _module
    _spec.loader.exec_module(_module)
