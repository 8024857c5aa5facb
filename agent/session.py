"""The agent's session with the master: registration, the ``Session`` stream, its outbox.

``Register`` is retried with a capped, jittered backoff on every error but those retrying
cannot fix (:data:`FATAL_CODES`: the agent exits). Then the ``Session`` stream: a hello, then
heartbeats, reports and acks out, commands and heartbeat terms in. A broken stream
re-registers with the same node id and nonce, so a master restart or a short network break
keeps the node; a session that lasted :data:`STABLE_SESSION_S` resets the backoff. Messages
queued while no session is open are sent on the next one (heartbeats are not, and droppable
reports are dropped); the last step report is sent again at every hello.

Protobuf stops here, on the master's side: commands become
:class:`~oobleck.agent.commands.Command` values, registration answers :class:`Registration`,
and the messages to the master are built here from plain values.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import os
import random
import secrets
import time
from collections.abc import Awaitable, Callable, KeysView
from dataclasses import dataclass
from pathlib import Path

import grpc

from oobleck.agent.commands import Command
from oobleck.agent.config import AgentConfig
from oobleck.agent.errors import FatalError, SessionBroken
from oobleck.agent.workers import StepReport, WorkerState
from oobleck.common.auth import bearer_metadata
from oobleck.common.files import write_json
from oobleck.common.planrules import plan_shape
from oobleck.common.version import PROTOCOL_VERSION, version
from oobleck.protos.v1 import agent_pb2, agent_pb2_grpc

log = logging.getLogger(__name__)

DEFAULT_HEARTBEAT_INTERVAL_S = 0.5
INITIAL_BACKOFF_S = 0.05
STABLE_SESSION_S = 5.0  # a session that lasted this long resets the reconnection backoff
MAX_REMEMBERED_ACKS = 1024
MAX_OUTBOX = 10_000  # droppable reports are dropped beyond this many queued messages
# Register errors that retrying cannot fix: the agent exits (systemd shows why).
FATAL_CODES = frozenset(
    {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT}
)
_STATES = {
    WorkerState.STARTING: agent_pb2.WORKER_STATE_STARTING,
    WorkerState.RUNNING: agent_pb2.WORKER_STATE_RUNNING,
    WorkerState.EXITED: agent_pb2.WORKER_STATE_EXITED,
    WorkerState.HUNG: agent_pb2.WORKER_STATE_HUNG,
}


@dataclass(frozen=True)
class Registration:
    """The master's answer to ``Register``."""

    node_id: int
    job_spec_yaml: str  # empty while no job is submitted


def command_from_message(msg: agent_pb2.Command) -> Command:
    body = msg.WhichOneof("body")
    if body is None:
        return Command(msg.command_id, msg.generation, None)
    inner = getattr(msg, body)
    plan = inner.plan if body in ("start", "reconfigure") and inner.HasField("plan") else None
    return Command(
        msg.command_id,
        msg.generation,
        body,
        plan=plan,
        shape=None if plan is None else plan_shape(plan),
        job_spec_yaml=inner.job_spec_yaml if body in ("start", "profile") else "",
        reason=inner.reason if body in ("stop", "drain", "kill") else "",
    )


def _interval(value: float) -> float | None:
    return value if math.isfinite(value) and 0 < value <= 60 else None


class MasterSession:
    """Registration and the session stream of one agent. ``on_registered`` runs at every
    registration before ``node_id`` changes (it may raise to stop the agent); ``on_command``
    takes each command; ``progress()`` is ``(last_generation, last_command_id)`` for the hello."""

    def __init__(
        self,
        config: AgentConfig,
        token: str,
        *,
        on_registered: Callable[[Registration], Awaitable[None]],
        on_command: Callable[[Command], None],
        progress: Callable[[], tuple[int, int]],
    ) -> None:
        self.config = config
        self._metadata = bearer_metadata(token)
        self._on_registered = on_registered
        self._on_command = on_command
        self._progress = progress
        self.nonce = secrets.token_hex(16)
        self.node_id = 0
        self.store_port = 0
        self.gpu_memory_bytes = 0
        self._heartbeat_interval_s = DEFAULT_HEARTBEAT_INTERVAL_S
        self._acks: collections.OrderedDict[int, agent_pb2.CommandAck] = collections.OrderedDict()
        self._outbox: asyncio.Queue[agent_pb2.AgentMessage] = asyncio.Queue()
        self._unsent: collections.deque[agent_pb2.AgentMessage] = collections.deque()
        self._connected = False
        self._heartbeat_seq = 0
        self._last_step: agent_pb2.StepReport | None = None  # re-sent at every (re)attach

    @property
    def acked(self) -> KeysView[int]:
        """The command ids whose acks are remembered."""
        return self._acks.keys()

    def set_token(self, token: str) -> bool:
        """Use ``token`` from the next call on; returns whether it changed."""
        metadata = bearer_metadata(token)
        changed, self._metadata = metadata != self._metadata, metadata
        return changed

    # -- registration and the stream -------------------------------------------------------

    async def run(self, channel: grpc.aio.Channel) -> None:
        """Register, keep the session, re-register when it breaks; forever."""
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        backoff = INITIAL_BACKOFF_S
        while True:
            try:
                response = await stub.Register(
                    self._register_request(), timeout=self.config.rpc_timeout_s, metadata=self._metadata
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() in FATAL_CODES:
                    raise FatalError(f"master refused registration: {exc.code().name}: {exc.details()}") from None
                log.warning("register with %s failed (%s); retrying", self.config.master, exc.code().name)
                await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
                backoff = min(backoff * 2, self.config.reconnect_max_backoff_s)
                continue
            await self._registered(response)
            started = time.monotonic()
            retry_now = False
            try:
                await self._session(stub)
            except SessionBroken as exc:
                log.warning("node %d: session broken (%s); re-registering", self.node_id, exc)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                    raise FatalError(f"master refused the session: {exc.details()}") from None
                retry_now = exc.code() == grpc.StatusCode.FAILED_PRECONDITION
                log.warning("node %d: session ended: %s: %s", self.node_id, exc.code().name, exc.details())
            if time.monotonic() - started > STABLE_SESSION_S:
                backoff = INITIAL_BACKOFF_S
            if not retry_now:
                await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
                backoff = min(backoff * 2, self.config.reconnect_max_backoff_s)

    def _register_request(self) -> agent_pb2.RegisterRequest:
        return agent_pb2.RegisterRequest(
            node_name=self.config.node_name,
            address=self.config.address,
            slots=self.config.slots,
            gpu_memory_bytes=self.gpu_memory_bytes,
            software_version=version(),
            nonce=self.nonce,
            store_port=self.store_port,
            node_id=self.node_id,
            protocol_version=PROTOCOL_VERSION,
        )

    async def _registered(self, response: agent_pb2.RegisterResponse) -> None:
        if response.software_version and response.software_version != version():
            log.warning(
                "master runs %s (protocol %d), this agent %s (protocol %d)",
                response.software_version, response.protocol_version, version(), PROTOCOL_VERSION,
            )  # fmt: skip
        await self._on_registered(Registration(response.node_id, response.job_spec_yaml))
        first = self.node_id == 0
        self.node_id = response.node_id
        self._heartbeat_interval_s = _interval(response.heartbeat_interval_s) or DEFAULT_HEARTBEAT_INTERVAL_S
        log.info(
            "node %d (%s) %s with %s; heartbeat every %.2fs; master generation %d",
            self.node_id,
            self.config.node_name,
            "registered" if first else "re-registered",
            self.config.master,
            self._heartbeat_interval_s,
            response.generation,
        )
        if self.config.ready_file:
            info = {"pid": os.getpid(), "node_id": self.node_id, "store_port": self.store_port}
            await asyncio.to_thread(write_json, Path(self.config.ready_file), info)

    async def _session(self, stub: agent_pb2_grpc.AgentServiceStub) -> None:
        call = stub.Session(metadata=self._metadata)
        try:
            last_generation, last_command_id = self._progress()
            hello = agent_pb2.SessionHello(
                node_id=self.node_id,
                nonce=self.nonce,
                last_generation=last_generation,
                last_command_id=last_command_id,
            )
            await call.write(agent_pb2.AgentMessage(hello=hello))
            if self._last_step is not None:
                await call.write(agent_pb2.AgentMessage(step=self._last_step))
            self._connected = True
            try:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(self._reader(call), name="session-reader")
                    tg.create_task(self._writer(call), name="session-writer")
                    tg.create_task(self._heartbeats(), name="heartbeats")
            except* (SessionBroken, grpc.aio.AioRpcError) as group:
                raise group.exceptions[0] from None
        finally:
            self._connected = False
            call.cancel()

    async def _reader(self, call) -> None:
        while True:
            message = await call.read()
            if message is grpc.aio.EOF:
                raise SessionBroken("the master closed the session")
            body = message.WhichOneof("body")
            if body == "command":
                self._on_command(command_from_message(message.command))
            elif body == "terms":
                interval = _interval(message.terms.interval_s)
                if interval is not None:
                    log.info("node %d: heartbeat every %.2fs from now on", self.node_id, interval)
                    self._heartbeat_interval_s = interval
            else:
                log.warning("ignored a master message with an unknown body")

    async def _writer(self, call) -> None:
        while True:
            message = self._unsent.popleft() if self._unsent else await self._outbox.get()
            try:
                await call.write(message)
            except BaseException as exc:
                if message.WhichOneof("body") != "heartbeat":
                    self._unsent.appendleft(message)  # sent again on the next session
                if isinstance(exc, Exception):
                    raise SessionBroken(f"write failed: {exc!r}") from None
                raise

    async def _heartbeats(self) -> None:
        while True:
            self._heartbeat_seq += 1
            self._outbox.put_nowait(agent_pb2.AgentMessage(heartbeat=agent_pb2.Heartbeat(seq=self._heartbeat_seq)))
            await asyncio.sleep(self._heartbeat_interval_s)

    # -- the outbox ------------------------------------------------------------------------

    def _send(self, message: agent_pb2.AgentMessage, *, droppable: bool = False) -> None:
        if droppable and (not self._connected or self._outbox.qsize() >= MAX_OUTBOX):
            return
        self._outbox.put_nowait(message)

    async def flush(self, timeout_s: float) -> None:
        """Wait (briefly) until every queued message has been written to the master."""
        deadline = time.monotonic() + timeout_s
        while (self._unsent or not self._outbox.empty()) and self._connected and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    def new_node(self) -> None:
        """The master gave a new node id: forget what was queued or remembered for the old node
        (a queued NodeFailure would fail the new one)."""
        self._unsent.clear()
        while not self._outbox.empty():
            self._outbox.get_nowait()
        self._last_step = None
        self._acks.clear()

    # -- messages to the master ------------------------------------------------------------

    def ack(
        self,
        command_id: int,
        generation: int,
        *,
        error: str = "",
        phases: tuple[float, float] | None = None,
        profile_json: str = "",
        step: int | None = None,
    ) -> None:
        """Ack (or nack, with ``error``) a command; ``phases``: (regroup_s, copy_s)."""
        ack = agent_pb2.CommandAck(
            command_id=command_id,
            generation=generation,
            ok=not error,
            error=error,
            profile_json=profile_json,
            step=step,
        )
        if phases is not None:
            ack.phases.CopyFrom(agent_pb2.PhaseTimes(regroup_s=phases[0], copy_s=phases[1]))
        if error:
            log.warning("node %d: command %d (generation %d) refused: %s", self.node_id, command_id, generation, error)
        self._acks[command_id] = ack
        while len(self._acks) > MAX_REMEMBERED_ACKS:
            self._acks.popitem(last=False)
        self._send(agent_pb2.AgentMessage(ack=ack))

    def repeat_ack(self, command_id: int) -> bool:
        """Send the remembered ack of ``command_id`` again; False when it is forgotten."""
        previous = self._acks.get(command_id)
        if previous is not None:
            self._send(agent_pb2.AgentMessage(ack=previous))
        return previous is not None

    def report_worker(self, slot: int, pid: int, state: WorkerState, exit_code: int = 0, detail: str = "") -> None:
        report = agent_pb2.WorkerReport(slot=slot, pid=pid, state=_STATES[state], exit_code=exit_code, detail=detail)
        self._send(agent_pb2.AgentMessage(worker=report))

    def report_step(self, report: StepReport) -> None:
        """Dropped while the master is unreachable, but the latest one is kept and sent again
        at the next session: a job that finished while the master was down is completed from it."""
        step = agent_pb2.StepReport(
            generation=report.generation,
            step=report.step,
            loss=report.loss,
            samples_per_s=report.samples_per_s,
            samples=report.samples,
        )
        self._last_step = step
        self._send(agent_pb2.AgentMessage(step=step), droppable=True)

    def node_failure(self, reason: str) -> None:
        self._send(agent_pb2.AgentMessage(failure=agent_pb2.NodeFailure(reason=reason)))

    def leaving(self, reason: str, deadline_s: float) -> None:
        self._send(agent_pb2.AgentMessage(leaving=agent_pb2.Leaving(reason=reason, deadline_s=deadline_s)))
