"""The simulator's events: their kinds (handled in :class:`Kind` order at equal times) and the queue.

Time is integer milliseconds. Events are ordered by ``(time, kind)``, then FIFO unless the queue
reproduces the research simulators' binary-heap tie order (``Compat.heap_ties``).
"""

from __future__ import annotations

import heapq
from enum import IntEnum
from typing import Any


class Kind(IntEnum):
    """Event kinds; at equal times they are handled in this order."""

    ADD = 0
    REMOVE = 1
    READY = 2
    GLOBAL_RENDEZVOUS = 3
    LOCAL_RENDEZVOUS = 4
    STEP = 5
    CHECKPOINT = 6


class Event:
    """One scheduled event: ``data`` is whatever its handler needs (a node, a token, ...)."""

    __slots__ = ("data", "kind", "seq", "time")

    def __init__(self, time: int, kind: Kind, seq: int, data: Any) -> None:
        self.time = time
        self.kind = kind
        self.seq = seq
        self.data = data

    def __lt__(self, other: Event) -> bool:
        if self.time != other.time:
            return self.time < other.time
        if self.kind != other.kind:
            return self.kind < other.kind
        return self.seq < other.seq


class EventQueue:
    """A binary heap of events. FIFO among equal ``(time, kind)`` unless ``heap_ties``."""

    def __init__(self, *, heap_ties: bool = False) -> None:
        self._heap: list[Event] = []
        self._seq = 0
        self._heap_ties = heap_ties

    def push(self, time: int, kind: Kind, data: Any = None) -> None:
        self._seq += 1
        heapq.heappush(self._heap, Event(time, kind, 0 if self._heap_ties else self._seq, data))

    def peek(self) -> Event | None:
        return self._heap[0] if self._heap else None

    def pop(self) -> Event:
        return heapq.heappop(self._heap)

    def array(self) -> list[Event]:
        """The heap's backing array (not time order); research compatibility only."""
        return self._heap

    def __len__(self) -> int:
        return len(self._heap)


__all__ = ["Event", "EventQueue", "Kind"]
