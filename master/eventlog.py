"""The master's event log in memory and its watchers (``WatchEvents`` streams, the status page).

Events get increasing ids when they are created; the newest ``max_in_memory`` are kept for
watchers and ``events_since`` (older ones are read from the state file). Writing an event to the
state file is the caller's business (see ``Master._record``): an event is published once it is
durable, or once the master knows it will be written by the next resync.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

from oobleck.common.text import escape_control
from oobleck.master.store import EventRow

log = logging.getLogger(__name__)

MAX_EVENTS_IN_MEMORY = 10_000
WATCH_QUEUE_SIZE = 1_000


class EventLog:
    def __init__(self, max_in_memory: int = MAX_EVENTS_IN_MEMORY, watch_queue_size: int = WATCH_QUEUE_SIZE) -> None:
        self.next_id = 1
        self.recent: deque[EventRow] = deque(maxlen=max_in_memory)
        self._queue_size = watch_queue_size
        self._watchers: set[asyncio.Queue] = set()
        self._step_watchers: set[asyncio.Queue] = set()  # the watchers that also want step events

    def load(self, events: list[EventRow], last_id: int) -> None:
        """After a restart: the newest events of the state file, and the last id it holds."""
        self.recent.extend(events)
        self.next_id = last_id + 1

    def new(
        self,
        kind: str,
        message: str,
        *,
        generation: int,
        step: int,
        node_id: int = 0,
        durations: dict[str, float] | None = None,
    ) -> EventRow:
        """An event with the next id; control characters in ``message`` are escaped (node-supplied
        strings reach it)."""
        event_id, self.next_id = self.next_id, self.next_id + 1
        text = escape_control(message.encode("utf-8", "backslashreplace").decode("utf-8"))
        return EventRow(event_id, time.time(), kind, node_id, generation, step, text, dict(durations or {}))

    def publish(self, ev: EventRow) -> None:
        self.recent.append(ev)
        durations = " ".join(f"{k}={v:.3f}s" for k, v in ev.durations_s.items())
        log.info(
            "event %s node=%d generation=%d step=%d: %s %s",
            ev.kind,
            ev.node_id,
            ev.generation,
            ev.step,
            ev.message,
            durations,
        )
        for q in list(self._watchers):
            if q.qsize() >= self._queue_size:
                # A watcher that does not keep up is dropped (its stream ends), never waited for.
                self._watchers.discard(q)
                q.put_nowait(None)
            else:
                q.put_nowait(ev)

    def publish_step(self, generation: int, step: int, loss: float, samples_per_s: float) -> None:
        """A step event for the watchers that asked for them (never stored)."""
        if not self._step_watchers:
            return
        ev = EventRow(0, time.time(), "step", 0, generation, step, "", {}, loss, samples_per_s)
        for q in list(self._step_watchers):
            if q in self._watchers and q.qsize() < self._queue_size:
                q.put_nowait(ev)

    def watch(self, *, include_steps: bool = False) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue()
        self._watchers.add(q)
        if include_steps:
            self._step_watchers.add(q)
        return q

    def unwatch(self, q: asyncio.Queue) -> None:
        self._watchers.discard(q)
        self._step_watchers.discard(q)

    def since(self, since_id: int) -> list[EventRow] | None:
        """The events after ``since_id`` in id order (the state file's order) when memory holds
        all of them, else None. Memory holds them in the order they were published, which may
        differ: an event's id is taken when it is created, and it is published once written
        (``state_write_failed`` can overtake an event whose write was under way)."""
        if self.recent and since_id >= min(e.id for e in self.recent) - 1:
            return sorted((e for e in self.recent if e.id > since_id), key=lambda e: e.id)
        return None

    def last(self, kind: str, generation: int) -> EventRow | None:
        """The newest event of ``kind`` for ``generation`` held in memory."""
        return next((e for e in reversed(self.recent) if e.kind == kind and e.generation == generation), None)
