"""Fault injection behind one typed interface: :class:`Faults` is called at the named
:class:`FaultPoint` s of a step and of a reconfiguration. Two kinds exist: :class:`FailAt` (tests:
raise at a point of a step) and :class:`HoldFile`, the drill's hold file
(``OOBLECK_WORKER_HOLD_FILE``) that pauses a worker at a point.

While that file exists and its words include ``step`` (or it is empty), the worker starts no new
step (it keeps applying commands); ``step@N`` does the same once N steps are done (training runs
up to step N and holds there); while they include ``copy``, a reconfiguration waits after joining
the new process group, before the layer copy. Deleting the file (or rewriting it) lets the worker
go on. This makes "the cluster changes between these two steps" or "a node dies while layers are
being copied" reproducible. Unset (the default): nothing is checked.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)

HOLD_POLL_S = 0.05  # how often a held worker looks at its hold file (and waits for commands)


class FaultPoint(enum.StrEnum):
    BACKWARD_DONE = "backward_done"  # a step's backward is done, before its gradient sync (n: the step)
    VOTED = "voted"  # a step's commit vote is cast, before it is applied (n: the step)
    BEFORE_COPY = "before_copy"  # a reconfiguration joined the new group, before the copy (n: generation)


class Faults(Protocol):
    def at(self, point: FaultPoint, n: int) -> None:
        """Called when the worker reaches ``point``; raising there injects a fault."""


@dataclass
class FailAt:
    """Raise ``RuntimeError(message)`` when ``point`` is reached at step ``step`` (the first time
    only, with ``once``)."""

    step: int
    point: FaultPoint
    message: str
    once: bool = True
    fired: bool = False

    def at(self, point: FaultPoint, n: int) -> None:
        if point == self.point and n == self.step and not (self.once and self.fired):
            self.fired = True
            raise RuntimeError(self.message)


class HoldFile:
    """The drill's hold file of one worker (``path`` None: never held). ``who()`` names the
    worker in the log lines that say when it is held and released."""

    def __init__(self, path: str | None, who: Callable[[], str]) -> None:
        self.path = path
        self._who = who
        self._holding: str | None = None  # where the worker is held (logged once)

    def held(self, point: str, where: str, done_steps: int | None = None) -> bool:
        """True while the file exists and names ``point`` (``step`` or ``copy``; an empty file
        means ``step``; ``step@N`` holds once ``done_steps`` >= N)."""
        held = False
        if self.path is not None:
            try:
                points = Path(self.path).read_text().split() or ["step"]
            except OSError:  # absent (or unreadable): not held
                points = []
            held = point in points
            if point == "step" and not held and done_steps is not None:
                held = any(p.startswith("step@") and p[5:].isdigit() and done_steps >= int(p[5:]) for p in points)
        if not held:
            if self._holding is not None:
                log.info("%s: released (%s)", self._who(), self._holding)
                self._holding = None
            return False
        if self._holding != where:
            self._holding = where
            log.info("%s: held %s by %s", self._who(), where, self.path)
        return True

    def at(self, point: FaultPoint, n: int) -> None:
        if point == FaultPoint.BEFORE_COPY:
            self.wait_before_copy(n)

    def wait_before_copy(self, generation: int) -> None:
        while self.held("copy", f"before the layer copy of generation {generation}"):
            time.sleep(HOLD_POLL_S)
