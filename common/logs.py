"""Logging set-up for entry points. Library modules only call ``logging.getLogger(__name__)``."""

from __future__ import annotations

import logging
import os
import sys

LOG_LEVEL_ENV = "OOBLECK_LOG_LEVEL"
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: str | int | None = None, *, stream=None) -> None:
    """Configure the root logger once for a process (entry points only).

    ``level`` defaults to ``$OOBLECK_LOG_LEVEL`` or INFO. Calling it again replaces the handler.
    """
    if level is None:
        level = os.environ.get(LOG_LEVEL_ENV, "INFO")
    if isinstance(level, str):
        name = level.upper()
        resolved = logging.getLevelName(name)
        if not isinstance(resolved, int):
            raise ValueError(f"log level: unknown level {level!r} (use DEBUG, INFO, WARNING or ERROR)")
        level = resolved
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(logging.Formatter(_FORMAT))
    root.addHandler(handler)
    root.setLevel(level)
