"""What the master writes to its state file, and the commands it owes acks for.

Rules kept here:
- A fact that is already true in memory (a death, an ack, progress, an event) is written with
  :meth:`Ledger.save`; while the state file cannot be written it is not tried, and the next
  resync (:meth:`Ledger.resync`) writes it.
- A transition (a plan and its commands) is written in one transaction before any command is
  sent (:meth:`Ledger.commit_and_send`); while the file fails, transitions are refused
  (:class:`~oobleck.master.records.StateUnavailable`).
- Commands carry globally increasing, durable ids; an unacked one is re-sent when its node
  re-attaches (``Master.attach``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any

from oobleck.master import messages
from oobleck.master.config import MasterConfig
from oobleck.master.eventlog import EventLog
from oobleck.master.metrics import MasterMetrics
from oobleck.master.records import NodeRuntime, PendingCommand, StateUnavailable
from oobleck.master.store import AsyncStore, CommandRow, EventRow, JobRow, NodeRow, StoreError

log = logging.getLogger(__name__)


class Ledger:
    def __init__(
        self,
        store: AsyncStore,
        config: MasterConfig,
        clock: Callable[[], float],
        metrics: MasterMetrics,
        events: EventLog,
        position: Callable[[], tuple[int, int]],
    ) -> None:
        self.store = store
        self.position = position  # the job's (generation, step): what new events carry
        self.config = config
        self.clock = clock
        self.metrics = metrics
        self.events = events
        self.pending: dict[int, PendingCommand] = {}  # command id -> unacked command
        self.next_command_id = 1
        # While the state file cannot be written: why, when to try again, and what waits for it.
        self.failure: str | None = None
        self.retry_at = 0.0
        self.unsaved_events: list[EventRow] = []
        self.unsaved_acks: list[tuple[int, bool, str]] = []

    def load(self, pending: list[CommandRow], next_command_id: int) -> None:
        loop = asyncio.get_running_loop()
        self.next_command_id = next_command_id
        for row in pending:
            self.pending[row.command_id] = PendingCommand(row, loop.create_future())
            self.next_command_id = max(self.next_command_id, row.command_id + 1)

    # -- durability ----------------------------------------------------------------------------------
    async def save(self, method: str, *args: Any) -> bool:
        """Write a fact that is already true in memory; returns whether it is durable now."""
        if self.failure is not None:
            return False
        try:
            await self.store.call(method, *args)
        except StoreError as exc:
            self.failed(exc)
            return False
        return True

    def failed(self, exc: StoreError) -> None:
        first = self.failure is None
        self.failure = str(exc)
        self.retry_at = self.clock() + self.config.state_retry_s
        self.metrics.state_store_ok.set(0)
        self.metrics.state_write_failures.inc()
        if first:
            log.error("%s: refusing state changes; retrying every %gs", exc, self.config.state_retry_s)
            generation, step = self.position()
            ev = self.events.new(
                "state_write_failed",
                f"{exc}: the master keeps serving and refuses state changes until it can write again",
                generation=generation,
                step=step,
            )
            self.unsaved_events.append(ev)
            # Published after whatever failed to be written (an event with a lower id, which its
            # caller publishes next): watchers see events in id order.
            asyncio.get_running_loop().call_soon(self.events.publish, ev)

    def require(self) -> None:
        """Refuse a transition while the state file cannot be written."""
        if self.failure is not None:
            raise StateUnavailable(self.failure)

    def retry_due(self) -> bool:
        return self.failure is not None and self.clock() >= self.retry_at

    async def resync(self, job: JobRow | None, nodes: list[NodeRow]) -> str | None:
        """Write everything the master holds in one transaction. Returns the failure it recovered
        from, or None when the file still fails (or did not fail)."""
        if self.failure is None:
            return None
        events, acks = list(self.unsaved_events), list(self.unsaved_acks)
        dead = [n.node_id for n in nodes if n.state == "dead"]
        try:
            await self.store.call("resync", job, nodes, acks, dead, events)
        except StoreError as exc:
            self.failure = str(exc)
            self.retry_at = self.clock() + self.config.state_retry_s
            self.metrics.state_write_failures.inc()
            return None
        del self.unsaved_events[: len(events)]
        del self.unsaved_acks[: len(acks)]
        failure, self.failure = self.failure, None
        self.metrics.state_store_ok.set(1)
        log.warning("state file %s is writable again (it failed with: %s)", self.config.state_file, failure)
        return failure

    # -- commands -------------------------------------------------------------------------------------
    def command(self, node_id: int, generation: int, kind: str, **body: Any) -> CommandRow:
        """A new command row (see :func:`~oobleck.master.messages.command` for ``body``)."""
        cmd_id = self.next_command_id
        self.next_command_id += 1
        return CommandRow(cmd_id, node_id, generation, kind, messages.command(cmd_id, generation, kind, **body))

    def deliver(self, rows: list[CommandRow], nodes: Mapping[int, NodeRuntime]) -> list[PendingCommand]:
        """Track ``rows`` as pending and send each to its node's session (if attached)."""
        loop = asyncio.get_running_loop()
        out = []
        for row in rows:
            pc = PendingCommand(row, loop.create_future())
            self.pending[row.command_id] = pc
            out.append(pc)
            node = nodes.get(row.node_id)
            if node is not None and node.session is not None:
                node.session.send(messages.command_message(row.payload))
        return out

    def resend(self, node: NodeRuntime) -> None:
        """Every unacked command of ``node``, again, to its new session: also those the agent has
        seen (it repeats the ack it gave, phases and ready step included, or acks once done)."""
        for cmd_id in sorted(p for p, pc in self.pending.items() if pc.row.node_id == node.row.node_id):
            payload = self.pending[cmd_id].row.payload
            node.session.send(messages.command_message(payload))

    async def commit_and_send(
        self,
        job: JobRow | None,
        nodes: list[NodeRow],
        rows: list[CommandRow],
        events: list[EventRow],
        runtimes: Mapping[int, NodeRuntime],
    ) -> list[PendingCommand]:
        """Persist the job (when given), node states, commands and events in one transaction, then
        publish the events and send the commands. Raises :class:`StateUnavailable` (nothing
        sent) when the state file cannot be written."""
        self.require()
        try:
            await self.store.call("commit_plan", job, nodes, rows, events)
        except StoreError as exc:
            self.failed(exc)
            raise StateUnavailable(str(exc)) from None
        for ev in events:
            self.events.publish(ev)
        return self.deliver(rows, runtimes)
