"""The master's state machine: membership, sessions, commands, detection and reconfiguration.

gRPC-free except for the Plan/Command messages that travel to agents unchanged. Servicers
(``oobleck.master.service``) validate requests and call the ``on_*`` / ``admin_*`` methods here.
Rules kept throughout:
- SQLite and the planner never run on the event loop (``AsyncStore``, ``asyncio.to_thread``).
- A plan and its commands are persisted in one transaction before any command is sent.
- Commands carry globally increasing, durable ids; unacked ones are re-sent on re-attach.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import copy
import dataclasses
import json
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from oobleck.common.text import escape_control
from oobleck.master import membership, planning, profiles
from oobleck.master.config import MasterConfig
from oobleck.master.detect import DetectConfig, DetectState, NodeLiveness, decide
from oobleck.master.metrics import MasterMetrics
from oobleck.master.progress import STALE, GenerationProgress
from oobleck.master.scaleup import ScaleUpConfig, ScaleUpState, decide_scale_up
from oobleck.master.store import AsyncStore, CommandRow, EventRow, JobRow, NodeRow, StoreError
from oobleck.protos.v1 import agent_pb2, plan_pb2

log = logging.getLogger(__name__)

ACTIVE_JOB_STATES = ("STARTING", "RUNNING", "RECONFIGURING")
TERMINAL_JOB_STATES = ("SUCCEEDED", "FAILED", "CANCELLED")
STATUS_NODES = 1000  # nodes listed in /api/status (ListNodes pages through all)
PURGE_EVERY_S = 1.0
LAG_WINDOW_S = 2.0  # how long a late detector tick extends the heartbeat timeouts
MAX_EVENTS_IN_MEMORY = 10_000
WATCH_QUEUE_SIZE = 1_000


def _ids(ids: list[int], shown: int = 20) -> str:
    """A list of node ids for a log line, the first ``shown`` of them."""
    return str(ids) if len(ids) <= shown else f"{ids[:shown]} and {len(ids) - shown} more"


def degradation(pipelines: int, ft: int, idle: list[int]) -> str:
    """Why a running job with ``pipelines`` pipelines and the live nodes ``idle`` left out is
    degraded ("" when it is not)."""
    reasons = []
    if pipelines < ft + 1:
        reasons.append(
            f"{pipelines} pipeline{'s' if pipelines != 1 else ''}, fewer than ft+1 = {ft + 1}: one more failure "
            "may lose every copy of some layer (a checkpoint restore)"
        )
    if idle:
        reasons.append(f"nodes {idle} idle: no mix of templates uses them")
    return "; ".join(reasons)


class MasterError(Exception):
    """A request the master refuses; ``code`` is a grpc.StatusCode name."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _NodeLost(Exception):
    """The node measuring a profile died (the measurement moves to another node)."""

    def __init__(self, node_id: int) -> None:
        super().__init__(f"node {node_id} died")
        self.node_id = node_id


class StateUnavailable(MasterError):
    """The state file cannot be written: a state change is refused (and undone in memory)."""

    def __init__(self, failure: str) -> None:
        super().__init__(
            "UNAVAILABLE",
            f"the master cannot write its state ({failure}); it refuses state changes until a write "
            "succeeds again (free space or fix the state file's permissions; it retries on its own)",
        )


@dataclass
class RegisterInfo:
    node_name: str
    address: str
    slots: int
    gpu_memory_bytes: int
    software_version: str
    nonce: str
    store_port: int
    node_id: int
    identity: str = ""  # under mTLS: the client certificate's identity ("" without mTLS)


@dataclass
class RegisterResult:
    node_id: int
    lease_s: float
    heartbeat_interval_s: float
    heartbeat_timeout_s: float
    job_spec_yaml: str
    generation: int


@dataclass
class _Close:
    code: str | None = None
    message: str = ""


class SessionHandle:
    """The outgoing side of one agent session: messages queued for the stream writer."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[agent_pb2.MasterMessage | _Close] = asyncio.Queue()

    def send(self, msg: agent_pb2.MasterMessage) -> None:
        self.queue.put_nowait(msg)

    def close(self, code: str | None = None, message: str = "") -> None:
        self.queue.put_nowait(_Close(code, message))


@dataclass
class NodeRuntime:
    row: NodeRow
    last_seen_s: float
    detached_since_s: float | None = None
    failed_reason: str | None = None
    session: SessionHandle | None = None
    reattach_by_s: float | None = None  # set when state is loaded after a restart; cleared on attach
    joined_s: float = 0.0  # when it registered (or the master loaded it): for the scale-up delay
    leaving: bool = False  # its agent announced it is going away (pre-emption notice)
    dead_since_s: float | None = None  # when it was declared dead (or loaded dead): purged after retention
    timeout_s: float | None = None  # the heartbeat timeout it was given (None: the config's)
    interval_s: float | None = None  # ... and the interval


@dataclass
class AckOutcome:
    """The acks of one generation's start / reconfigure commands (see ``Master._await_acks``)."""

    bad: list[int] = field(default_factory=list)  # nodes that nacked, died or missed the deadline
    errors: dict[int, str] = field(default_factory=dict)  # node -> why (nack message, or no ack in time)
    ok_nodes: list[int] = field(default_factory=list)
    steps: dict[int, int] = field(default_factory=dict)  # node -> position its workers are ready at
    phases: dict[str, float] = field(default_factory=lambda: {"regroup": 0.0, "copy": 0.0})  # max over nodes
    complete: bool = False  # every node acked ok


@dataclass(frozen=True)
class Ack:
    """What a node answered to a command (or what the master concluded: node dead, timed out)."""

    ok: bool
    error: str = ""
    phases: dict[str, float] = field(default_factory=dict)
    step: int | None = None  # start / reconfigure: the position the node's workers are ready at


@dataclass
class PendingCommand:
    row: CommandRow
    future: asyncio.Future = field(repr=False)  # resolves to an Ack
    profile_json: str = field(default="", repr=False)  # what a Profile command's ack carried
    profile_key: str | None = field(default=None, repr=False)  # a Profile command's cache key ("": none)


@dataclass
class StatusView:
    job_id: str = ""
    state: str = "NONE"
    reason: str = ""
    generation: int = 0
    step: int = 0
    total_steps: int = 0
    loss: float = 0.0
    samples_per_s: float = 0.0
    nodes_alive: int = 0
    nodes_dead: int = 0
    spares: int = 0
    plan: plan_pb2.Plan | None = None


@dataclass
class NodeView:
    node_id: int
    name: str
    address: str
    slots: int
    state: str
    last_seen_s_ago: float
    reason: str


class Master:
    def __init__(
        self,
        config: MasterConfig,
        *,
        planner: Any = None,
        clock: Callable[[], float] = time.monotonic,
        metrics: MasterMetrics | None = None,
    ) -> None:
        self.config = config
        self._planner = planner
        self.clock = clock
        self.metrics = metrics or MasterMetrics()
        self.store = AsyncStore(config.state_file)
        self.detect_config = DetectConfig(
            config.heartbeat_timeout_s, config.session_grace_s, config.coalesce_window_s, config.restart_grace_s
        )
        self.scale_config = ScaleUpConfig(config.scale_up, config.scale_up_delay_s)
        self._scale_tried: tuple[int, frozenset[int]] | None = None  # (generation, spares of no use then)
        self.nodes: dict[int, NodeRuntime] = {}  # every node not purged, in node id order
        self.live: dict[int, NodeRuntime] = {}  # the nodes not dead: what detection and planning look at
        self._next_purge_s = 0.0
        self._lag_s = 0.0  # the detector loop's lateness: max over the last LAG_WINDOW_S
        self._lags: deque[tuple[float, float]] = deque()  # (when, how late) of recent ticks
        self._terms = (config.heartbeat_interval_s, config.heartbeat_timeout_s)  # only grows while running
        self._terms_sent = self._terms  # the terms last sent to every live node
        self.job: JobRow | None = None
        self.pipelines: tuple[tuple[int, ...], ...] = ()
        self.ctx: planning.PlanContext | None = None
        self.pending: dict[int, PendingCommand] = {}
        self.loss = 0.0
        self.samples_per_s = 0.0
        self._next_command_id = 1
        self._pending_since: float | None = None
        self._lost: dict[int, float] = {}  # in-plan nodes declared dead and not yet replanned -> detect_s
        self._drain: set[int] = set()
        self._plan_lock = asyncio.Lock()
        self._reconfig_task: asyncio.Task | None = None
        self._resume_wait: tuple[int, float, dict[str, float]] | None = None
        self.progress = GenerationProgress(0, frozenset(), 0, 0)  # the current generation's step reports
        self._ignored_from: set[int] = set()  # nodes whose ignored reports were logged (once each)
        self._degraded = ""  # why the running job is degraded ("" when it is not)
        self._first_step_generation = 0  # newest generation whose first step report has arrived
        self._first_step_s = 0.0  # ... and when it arrived
        # Durability (see _save_fact): while the state file cannot be written, facts stay in
        # memory and are written by the next successful resync; transitions are refused.
        self.store_failure: str | None = None
        self._store_retry_at = 0.0
        self._unsaved_events: list[EventRow] = []
        self._unsaved_acks: list[tuple[int, bool, str]] = []
        self._next_event_id = 1
        self._events: deque[EventRow] = deque(maxlen=MAX_EVENTS_IN_MEMORY)
        self._watchers: set[asyncio.Queue] = set()
        self._step_watchers: set[asyncio.Queue] = set()  # the watchers that also want step events
        self._death = asyncio.Event()
        self._progress_dirty = False
        self._last_reason = ""
        self._bg: set[asyncio.Task] = set()
        self.stopping = False

    # -- start-up ---------------------------------------------------------------------------------
    @property
    def planner(self) -> Any:
        if self._planner is None:
            self._planner = planning.default_planner()
        return self._planner

    async def open(self) -> None:
        snap = await self.store.open()
        now = self.clock()
        self.job = snap.job
        self._next_command_id = snap.next_command_id
        for row in snap.nodes:
            # Agents reconnect with backoff: everybody gets restart_grace_s to re-attach.
            node = NodeRuntime(row=row, last_seen_s=now, reattach_by_s=now + self.config.restart_grace_s, joined_s=now)
            self.nodes[row.node_id] = node
            if row.state == "dead":
                node.dead_since_s = now  # retention restarts with the master
            else:
                self.live[row.node_id] = node
        if self.job is not None:
            self.pipelines = tuple(tuple(p) for p in self.job.plan_json.get("pipelines", ()))
            self.metrics.generation.set(self.job.generation)
            self.metrics.step.set(self.job.step)
        loop = asyncio.get_running_loop()
        for row in snap.pending_commands:
            self.pending[row.command_id] = PendingCommand(row, loop.create_future())
            self._next_command_id = max(self._next_command_id, row.command_id + 1)
        for ev in await self.store.call("events_since", max(0, snap.last_event_id - MAX_EVENTS_IN_MEMORY)):
            self._events.append(ev)
        self._next_event_id = snap.last_event_id + 1
        self._update_node_metrics()
        if self.job is not None and self.job.state in ACTIVE_JOB_STATES:
            # Deaths and drains recorded before a crash but not yet replanned are replanned now.
            for node_id in {n for p in self.pipelines for n in p}:
                node = self.nodes.get(node_id)
                if node is None or node.row.state == "dead":
                    self._lost[node_id] = 0.0
                elif node.row.state == "draining":
                    self._drain.add(node_id)
            if self._lost or self._drain:
                self._pending_since = now
            restoring = bool(self.job.plan_json.get("restore_pending"))
            self._new_progress({n for p in self.pipelines for n in p}, None if restoring else self.job.step)
            # Resume waiting for the acks of the generation being installed when the master
            # stopped; its events (reconfigured with the phases, running, resumed) follow as if
            # the master had not stopped.
            generation = self.job.generation
            waits = [
                p
                for p in self.pending.values()
                if p.row.kind in ("start", "reconfigure") and p.row.generation == generation
            ]
            if waits and self.job.state in ("STARTING", "RECONFIGURING"):
                durations = next(
                    (dict(e.durations_s) for e in reversed(self._events)
                     if e.kind == "reconfiguring" and e.generation == generation),
                    {},
                )  # fmt: skip
                timeout_s = (
                    self.config.reconfigure_ack_timeout_s
                    if self.job.state == "RECONFIGURING"
                    else self.config.start_ack_timeout_s
                )
                self._spawn(self._settle(generation, waits, timeout_s, durations))
        if self.job is not None and self.job.state == "PAUSED":
            self._spawn(self._resume_after_restart())
        if self.job is not None and self.job.state == "PROFILING":  # its Profile command is resent
            self._spawn(self._profile_then_start(self.job.job_id))
        log.info(
            "state loaded from %s: %d nodes, job %s, generation %d, %d unacked commands",
            self.config.state_file,
            len(self.nodes),
            self.job.state if self.job else "none",
            self.job.generation if self.job else 0,
            len(self.pending),
        )

    async def close(self) -> None:
        for task in list(self._bg):
            task.cancel()
        for task in list(self._bg):
            with contextlib.suppress(BaseException):
                await task
        if self._reconfig_task is not None:
            self._reconfig_task.cancel()
            with contextlib.suppress(BaseException):
                await self._reconfig_task
        self.end_sessions()
        await self.store.close()

    def attached_sessions(self) -> int:
        return sum(1 for n in self.live.values() if n.session is not None)

    def end_sessions(self) -> None:
        self.stopping = True
        for node in self.live.values():
            if node.session is not None:
                node.session.close("UNAVAILABLE", "master shutting down")

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._bg.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._bg.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())

    # -- views ---------------------------------------------------------------------------------------
    @property
    def generation(self) -> int:
        return self.job.generation if self.job else 0

    def _counts(self) -> dict[str, int]:
        counts = collections.Counter(n.row.state for n in self.live.values())
        counts["dead"] = len(self.nodes) - len(self.live)
        return counts

    def _update_node_metrics(self) -> None:
        self.metrics.set_node_counts(self._counts())

    def status(self) -> StatusView:
        counts = self._counts()
        alive = sum(counts.get(state, 0) for state in ("alive", "spare", "draining", "drained"))
        view = StatusView(nodes_alive=alive, nodes_dead=counts.get("dead", 0), spares=counts.get("spare", 0))
        if self.job is not None:
            job = self.job
            view.job_id, view.state, view.reason, view.generation = job.job_id, job.state, job.reason, job.generation
            view.step, view.total_steps = job.step, job.total_steps
            view.loss, view.samples_per_s = self.loss, self.samples_per_s
            if job.plan:
                view.plan = plan_pb2.Plan.FromString(job.plan)
                view.plan.rendezvous.ClearField("secret")  # for the plan's nodes only, never shown
        return view

    def list_nodes(self, after_node_id: int = 0, limit: int = 1_000_000) -> tuple[list[NodeView], int]:
        """A page of nodes in id order: (at most ``limit`` nodes with id > ``after_node_id``,
        the id to continue after, 0 when this is the last page)."""
        now = self.clock()
        nodes, next_after = membership.page(self.nodes.values(), after_node_id, limit, key=lambda n: n.row.node_id)
        views = [
            NodeView(
                n.row.node_id,
                n.row.name,
                n.row.address,
                n.row.slots,
                n.row.state,
                max(0.0, now - n.last_seen_s),
                n.row.reason or n.failed_reason or "",
            )
            for n in nodes
        ]
        return views, next_after

    def status_dict(self) -> dict[str, Any]:
        s = self.status()
        nodes, next_after = self.list_nodes(0, STATUS_NODES)
        return {
            "job_id": s.job_id,
            "state": s.state,
            "reason": s.reason,
            "generation": s.generation,
            "step": s.step,
            "total_steps": s.total_steps,
            "loss": s.loss,
            "samples_per_s": s.samples_per_s,
            "nodes_alive": s.nodes_alive,
            "nodes_dead": s.nodes_dead,
            "spares": s.spares,
            "pipelines": [list(p) for p in self.pipelines],
            "detector": self._last_reason,
            "state_store": "ok" if self.store_failure is None else f"failing: {self.store_failure}",
            "nodes_total": len(self.nodes),
            "nodes_truncated": bool(next_after),  # the first STATUS_NODES; ListNodes pages through all
            "nodes": [
                {
                    "node_id": n.node_id,
                    "name": n.name,
                    "state": n.state,
                    "last_seen_s_ago": round(n.last_seen_s_ago, 3),
                    "attached": self.nodes[n.node_id].session is not None,
                }
                for n in nodes
            ],
        }

    # -- events ----------------------------------------------------------------------------------------
    def _new_event(
        self, kind: str, message: str, *, node_id: int = 0, durations: dict[str, float] | None = None
    ) -> EventRow:
        event_id, self._next_event_id = self._next_event_id, self._next_event_id + 1
        return EventRow(
            event_id,
            time.time(),
            kind,
            node_id,
            self.generation,
            self.job.step if self.job else 0,
            escape_control(message.encode("utf-8", "backslashreplace").decode("utf-8")),
            dict(durations or {}),
        )

    def _publish(self, ev: EventRow) -> None:
        self._events.append(ev)
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
            if q.qsize() >= WATCH_QUEUE_SIZE:
                # A watcher that does not keep up is dropped (its stream ends), never waited for.
                self._watchers.discard(q)
                q.put_nowait(None)
            else:
                q.put_nowait(ev)

    async def _record(self, kind: str, message: str, **kw: Any) -> EventRow:
        ev = self._new_event(kind, message, **kw)
        if not await self._save_fact("add_event", ev):
            self._unsaved_events.append(ev)  # written by the next resync, with this id
        self._publish(ev)
        return ev

    async def events_since(self, since_id: int) -> list[EventRow]:
        if self._events and since_id >= self._events[0].id - 1:
            return [e for e in self._events if e.id > since_id]
        try:
            return await self.store.call("events_since", since_id)
        except StoreError as exc:
            raise MasterError("UNAVAILABLE", f"events since {since_id}: {exc}") from None

    # -- durability --------------------------------------------------------------------------------
    async def _save_fact(self, method: str, *args: Any) -> bool:
        """Write a fact that is already true in memory (a death, an ack, progress, an event).
        While the state file cannot be written it is not tried: the resync writes it later.
        Returns whether it is durable now."""
        if self.store_failure is not None:
            return False
        try:
            await self.store.call(method, *args)
        except StoreError as exc:
            self._store_failed(exc)
            return False
        return True

    def _store_failed(self, exc: StoreError) -> None:
        first = self.store_failure is None
        self.store_failure = str(exc)
        self._store_retry_at = self.clock() + self.config.state_retry_s
        self.metrics.state_store_ok.set(0)
        self.metrics.state_write_failures.inc()
        if first:
            log.error("%s: refusing state changes; retrying every %gs", exc, self.config.state_retry_s)
            ev = self._new_event(
                "state_write_failed",
                f"{exc}: the master keeps serving and refuses state changes until it can write again",
            )
            self._unsaved_events.append(ev)
            # Published after whatever failed to be written (an event with a lower id, which its
            # caller publishes next): watchers see events in id order.
            asyncio.get_running_loop().call_soon(self._publish, ev)

    def _require_store(self) -> None:
        if self.store_failure is not None:
            raise StateUnavailable(self.store_failure)

    def _snapshot(self) -> tuple:
        job = self.job
        rows = {i: dataclasses.replace(n.row) for i, n in self.nodes.items()}
        return job, copy.deepcopy(job), rows, self.pipelines, self.ctx

    def _rollback(self, snapshot: tuple) -> None:
        """Undo the in-memory changes of a transition whose commit failed."""
        job, saved, rows, pipelines, ctx = snapshot
        self.job = job
        if job is not None:
            job.__dict__.update(saved.__dict__)
        for node_id, row in rows.items():
            if node_id in self.nodes:
                self.nodes[node_id].row.__dict__.update(row.__dict__)
        self.pipelines, self.ctx = pipelines, ctx
        self.metrics.generation.set(self.generation)
        self._update_node_metrics()

    @contextlib.contextmanager
    def _transaction(self):
        """A persist-then-send transition: refused while the state file cannot be written, and
        its in-memory changes undone when its commit fails (raises :class:`StateUnavailable`)."""
        self._require_store()
        snapshot = self._snapshot()
        try:
            yield
        except StateUnavailable:
            self._rollback(snapshot)
            raise

    async def retry_store(self) -> None:
        """While the state file cannot be written: every ``state_retry_s`` write everything the
        master holds in one transaction; on success record the recovery and carry on with what
        was deferred (a paused job's restore, the end of a finished job)."""
        if self.store_failure is None or self.clock() < self._store_retry_at:
            return
        events, acks = list(self._unsaved_events), list(self._unsaved_acks)
        rows = [n.row for n in self.nodes.values()]
        dead = [n.row.node_id for n in self.nodes.values() if n.row.state == "dead"]
        try:
            await self.store.call("resync", self.job, rows, acks, dead, events)
        except StoreError as exc:
            self.store_failure = str(exc)
            self._store_retry_at = self.clock() + self.config.state_retry_s
            self.metrics.state_write_failures.inc()
            return
        del self._unsaved_events[: len(events)]
        del self._unsaved_acks[: len(acks)]
        failure, self.store_failure = self.store_failure, None
        self.metrics.state_store_ok.set(1)
        log.warning("state file %s is writable again (it failed with: %s)", self.config.state_file, failure)
        await self._record("state_store_recovered", f"the state file is writable again (after: {failure})")
        job = self.job
        if job is not None and job.state == "PAUSED":
            self._spawn(self._try_resume())
        elif job is not None and job.state in ACTIVE_JOB_STATES and job.step >= job.total_steps > 0:
            self._spawn(self._finish_reached())

    def watch(self, *, include_steps: bool = False) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue()
        self._watchers.add(q)
        if include_steps:
            self._step_watchers.add(q)
        return q

    def unwatch(self, q: asyncio.Queue) -> None:
        self._watchers.discard(q)
        self._step_watchers.discard(q)

    def _publish_step(self, generation: int, step: int, loss: float, samples_per_s: float) -> None:
        if not self._step_watchers:
            return
        ev = EventRow(0, time.time(), "step", 0, generation, step, "", {}, loss, samples_per_s)
        for q in list(self._step_watchers):
            if q in self._watchers and q.qsize() < WATCH_QUEUE_SIZE:
                q.put_nowait(ev)

    # -- registration and sessions ----------------------------------------------------------------
    async def on_register(self, info: RegisterInfo) -> RegisterResult:
        now = self.clock()
        known = self.nodes.get(info.node_id) if info.node_id else None
        if known is not None and known.row.identity and known.row.identity != info.identity:
            raise MasterError(
                "PERMISSION_DENIED",
                f"node_id: node {known.row.node_id} is bound to another client certificate; register without "
                "node_id to join as a new node",
            )
        if known is not None and known.row.state != "dead" and known.row.nonce == info.nonce:
            row = known.row
            row.address, row.store_port = info.address, info.store_port
            known.last_seen_s = now
            await self._save_fact("save_node", row)
            log.info("node %d (%s) re-registered", row.node_id, row.name)
        else:
            if known is not None and known.row.state != "dead":
                # Same id, another nonce: a restarted agent -- or someone else. A live session
                # (attached and heartbeating) is never displaced: the id is re-claimed only once
                # the old session is gone (its stream closed, or its heartbeats stopped).
                if known.session is not None and now - known.last_seen_s <= self.config.heartbeat_timeout_s:
                    raise MasterError(
                        "ALREADY_EXISTS",
                        f"node_id: node {known.row.node_id} is alive under another registration (its session "
                        "is attached and heartbeating); a restarted agent registers once that session is gone",
                    )
                known.failed_reason = "agent restarted (new nonce)"
            live = len(self.live)
            if live >= self.config.max_nodes:
                raise MasterError("RESOURCE_EXHAUSTED", f"max_nodes: the master already has {live} live nodes")
            row = NodeRow(
                0,
                info.node_name,
                info.address,
                info.slots,
                info.gpu_memory_bytes,
                info.software_version,
                info.nonce,
                info.store_port,
                "spare",
                "",
                info.identity,
            )
            self._require_store()  # a new node needs a durable id
            event = self._new_event("node_registered", f"{row.name} ({row.slots} slots) registered")
            try:
                row = await self.store.call("register_node", row, event)  # one commit: the node and its event
            except StoreError as exc:
                self._store_failed(exc)
                raise StateUnavailable(str(exc)) from None
            self.nodes[row.node_id] = self.live[row.node_id] = NodeRuntime(
                row=row, last_seen_s=self.clock(), joined_s=self.clock()
            )
            self._update_node_metrics()
            self._publish(event)
            if self.job is not None and self.job.state == "PAUSED":
                self._spawn(self._try_resume())
        interval_s, timeout_s = self._heartbeat_terms()
        self.nodes[row.node_id].interval_s, self.nodes[row.node_id].timeout_s = interval_s, timeout_s
        return RegisterResult(
            row.node_id,
            timeout_s,
            interval_s,
            timeout_s,
            self.job.spec_yaml if self.job and self.job.state not in TERMINAL_JOB_STATES else "",
            self.generation,
        )

    def _heartbeat_terms(self) -> tuple[float, float]:
        """The heartbeat interval and timeout for a node registering now: longer in a large
        cluster (see :func:`~oobleck.master.membership.heartbeat_terms`), never shorter than
        before while the master runs. When they grew by a quarter since last sent, every live
        node gets them (its new timeout applies before the message leaves), so that the nodes
        that joined a small cluster do not keep heartbeating at its rate."""
        c = self.config
        terms = membership.heartbeat_terms(
            len(self.live), c.heartbeat_interval_s, c.heartbeat_timeout_s, c.heartbeat_budget_per_s
        )
        self._terms = max(self._terms, terms)
        if self._terms[0] >= 1.25 * self._terms_sent[0]:
            self._terms_sent = self._terms
            interval_s, timeout_s = self._terms
            msg = agent_pb2.MasterMessage(terms=agent_pb2.HeartbeatTerms(interval_s=interval_s, timeout_s=timeout_s))
            for node in self.live.values():
                node.interval_s, node.timeout_s = interval_s, timeout_s
                if node.session is not None:
                    node.session.send(msg)
            log.info("%d live nodes: heartbeat every %.2fs, timeout %.2fs", len(self.live), interval_s, timeout_s)
        return self._terms

    def session_node(self, node_id: int, nonce: str, identity: str = "") -> NodeRuntime:
        if self.stopping:
            raise MasterError("UNAVAILABLE", "master shutting down; re-attach after it restarts")
        node = self.nodes.get(node_id)
        if node is None:
            raise MasterError("FAILED_PRECONDITION", f"hello.node_id: unknown node {node_id}; register first")
        if node.row.state == "dead":
            raise MasterError("FAILED_PRECONDITION", f"hello.node_id: node {node_id} was declared dead; register again")
        if node.row.nonce != nonce:
            raise MasterError("FAILED_PRECONDITION", f"hello.nonce: does not match node {node_id}'s registration")
        if node.row.identity and node.row.identity != identity:
            why = f"hello.node_id: node {node_id} is bound to another client certificate"
            raise MasterError("PERMISSION_DENIED", why)
        return node

    def attach(self, node: NodeRuntime, last_command_id: int) -> SessionHandle:
        handle = SessionHandle()
        if node.session is not None:
            node.session.close("ABORTED", "replaced by a newer session of the same node")
        node.session = handle
        node.detached_since_s = None
        node.reattach_by_s = None
        node.last_seen_s = self.clock()
        if node.interval_s is not None and node.interval_s > self.config.heartbeat_interval_s:
            terms = agent_pb2.HeartbeatTerms(interval_s=node.interval_s, timeout_s=node.timeout_s or 0.0)
            handle.send(agent_pb2.MasterMessage(terms=terms))  # what it was told, in case it missed it
        for cmd_id in sorted(p for p, pc in self.pending.items() if pc.row.node_id == node.row.node_id):
            # Unacked commands are sent again, also those the agent has seen (cmd_id <=
            # last_command_id): it repeats the ack it gave (phases and ready step included: the
            # one sent before was lost with the old session or master), or acks once it is done.
            pc = self.pending[cmd_id]
            handle.send(agent_pb2.MasterMessage(command=agent_pb2.Command.FromString(pc.row.payload)))
        log.info("node %d session attached (last acked command %d)", node.row.node_id, last_command_id)
        return handle

    def detach(self, node: NodeRuntime, handle: SessionHandle) -> None:
        if node.session is handle:
            node.session = None
            if node.row.state != "dead":
                node.detached_since_s = self.clock()
                log.info("node %d session broke; grace %.2fs", node.row.node_id, self.config.session_grace_s)

    def on_heartbeat(self, node: NodeRuntime) -> None:
        node.last_seen_s = self.clock()

    def on_failure(self, node: NodeRuntime, reason: str) -> None:
        node.last_seen_s = self.clock()
        if node.failed_reason is None and node.row.state != "dead":
            node.failed_reason = reason or "reported by agent"

    async def on_leaving(self, node: NodeRuntime, reason: str, deadline_s: float) -> None:
        """The node's agent received a pre-emption or maintenance notice (SIGTERM): drain it at a
        step boundary, as an operator's drain would, so that no step is lost; its agent exits
        once its workers are out of the plan. A node outside the plan just leaves."""
        node.last_seen_s = self.clock()
        node_id = node.row.node_id
        job = self.job
        in_plan = any(node_id in p for p in self.pipelines)
        if node.row.state == "dead" or node.leaving:
            return
        node.leaving = True
        if not in_plan or job is None or job.state not in ACTIVE_JOB_STATES:
            await self._record("node_leaving", f"{node.row.name} is leaving ({reason}); not in a plan", node_id=node_id)
            return
        self._drain.add(node_id)
        if self._pending_since is None:
            self._pending_since = self.clock()
        await self._record(
            "node_leaving",
            f"{node.row.name} is leaving ({reason}): drained at the next step boundary (it waits {deadline_s:g}s)",
            node_id=node_id,
        )

    def on_worker_report(self, node: NodeRuntime, slot: int, state: str, exit_code: int, detail: str) -> None:
        node.last_seen_s = self.clock()
        log.debug("node %d slot %d: %s exit=%d %s", node.row.node_id, slot, state, exit_code, detail)

    def on_step(self, node: NodeRuntime, generation: int, step: int, loss: float, samples_per_s: float) -> None:
        node.last_seen_s = self.clock()
        job = self.job
        if job is None or job.state not in ACTIVE_JOB_STATES:
            return
        node_id = node.row.node_id
        reason, why = self.progress.judge(node_id, generation, step)
        if reason is not None:
            self.metrics.reports_ignored.labels(reason=reason).inc()
            if reason != STALE and node_id not in self._ignored_from:  # once per node: no log flood
                self._ignored_from.add(node_id)
                log.warning("node %d: step report ignored (further ones are only counted): %s", node_id, why)
            return
        self.progress.record(node_id, step, loss, samples_per_s)
        self._follow_progress()
        if self._first_step_generation < generation:
            self._first_step_generation, self._first_step_s = generation, self.clock()
            if self._resume_wait is not None and self._resume_wait[0] == generation:
                self._resumed(generation, self._first_step_s - self._resume_wait[1])

    def _follow_progress(self) -> None:
        """Set the job's step (and the loss and throughput shown) to what the current generation's
        plan nodes have all reached; end the job once that is its last step."""
        job = self.job
        progress = self.progress.committed()
        if job is None or progress is None or progress[0] == job.step:
            return
        committed, loss, samples_per_s = progress
        if committed > job.step:
            self.loss, self.samples_per_s = loss, samples_per_s
            self.metrics.loss.set(loss)
            self.metrics.samples_per_s.set(samples_per_s)
            self._publish_step(self.progress.generation, committed, loss, samples_per_s)
        job.step = committed
        self._progress_dirty = True
        self.metrics.step.set(committed)
        if committed >= job.total_steps > 0:
            self._spawn(self._finish_reached())

    def _new_progress(self, nodes, start: int | None) -> None:
        """A generation was installed: its reports count from here (``start``: the step it starts
        from, None when the workers' acks will tell)."""
        job = self.job
        total = job.total_steps if job is not None else 0
        self.progress = GenerationProgress(self.generation, frozenset(nodes), start, total)
        self._ignored_from.clear()

    async def on_ack(
        self,
        node: NodeRuntime,
        command_id: int,
        generation: int,
        ok: bool,
        error: str,
        phases: dict[str, float],
        profile_json: str = "",
        step: int | None = None,
    ) -> None:
        node.last_seen_s = self.clock()
        await self._apply_ack(node.row.node_id, command_id, generation, ok, error, phases, profile_json, step)

    async def _apply_ack(
        self,
        node_id: int,
        command_id: int,
        generation: int,
        ok: bool,
        error: str,
        phases: dict[str, float] | None,
        profile_json: str = "",
        step: int | None = None,
    ) -> None:
        pc = self.pending.get(command_id)
        if pc is None:
            log.info("node %d acked command %d which is not pending (ignored)", node_id, command_id)
            return
        if pc.row.node_id != node_id:
            log.warning("node %d acked command %d of node %d (ignored)", node_id, command_id, pc.row.node_id)
            return
        del self.pending[command_id]
        if not await self._save_fact("ack_command", command_id, ok, error):
            self._unsaved_acks.append((command_id, ok, error))
        if not ok:
            log.warning("node %d: command %d (%s) failed: %s", node_id, command_id, pc.row.kind, error)
        if pc.row.kind == "drain" and node_id in self.nodes and self.nodes[node_id].row.state == "draining":
            row = self.nodes[node_id].row
            row.state = "drained"  # out of every plan until undrained
            await self._save_fact("save_node", row)
            self._update_node_metrics()
        pc.profile_json = profile_json
        if pc.row.kind == "profile" and ok:
            self._spawn(self._cache_profile(pc))
        if not pc.future.done():
            pc.future.set_result(Ack(ok, error, dict(phases or {}), step))

    # -- commands ----------------------------------------------------------------------------------------
    def _command(self, node_id: int, kind: str, **body: Any) -> CommandRow:
        cmd_id = self._next_command_id
        self._next_command_id += 1
        msg = agent_pb2.Command(command_id=cmd_id, generation=self.generation, **body)
        return CommandRow(cmd_id, node_id, self.generation, kind, msg.SerializeToString())

    def _deliver(self, rows: list[CommandRow]) -> list[PendingCommand]:
        loop = asyncio.get_running_loop()
        out = []
        for row in rows:
            pc = PendingCommand(row, loop.create_future())
            self.pending[row.command_id] = pc
            out.append(pc)
            node = self.nodes.get(row.node_id)
            if node is not None and node.session is not None:
                node.session.send(agent_pb2.MasterMessage(command=agent_pb2.Command.FromString(row.payload)))
        return out

    async def _commit_and_send(
        self, rows: list[CommandRow], events: list[EventRow], nodes: list[NodeRow], save_job: bool = True
    ) -> list[PendingCommand]:
        """Persist job/plan, node states, commands and events in one transaction, then send.
        Raises :class:`StateUnavailable` (nothing sent) when the state file cannot be written."""
        self._require_store()
        try:
            await self.store.call("commit_plan", self.job if save_job else None, nodes, rows, events)
        except StoreError as exc:
            self._store_failed(exc)
            raise StateUnavailable(str(exc)) from None
        for ev in events:
            self._publish(ev)
        return self._deliver(rows)

    # -- detection -----------------------------------------------------------------------------------------
    def detect_state(self, now: float | None = None) -> DetectState:
        """Facts for :func:`~oobleck.master.detect.decide`: the live nodes that may be dead at
        ``now`` (a reported failure, a broken session, a pending re-attach, or silent for their
        timeout); the others cannot be, and are left out so that a tick costs little in a large
        cluster."""
        now = self.clock() if now is None else now
        default_s = self.config.heartbeat_timeout_s
        live = tuple(
            NodeLiveness(
                n.row.node_id,
                n.last_seen_s,
                n.detached_since_s,
                n.failed_reason,
                n.row.state in ("alive", "draining"),
                n.reattach_by_s,
                n.timeout_s,
            )
            for n in self.live.values()
            if n.failed_reason is not None
            or n.detached_since_s is not None
            or n.reattach_by_s is not None
            or now - n.last_seen_s >= (n.timeout_s or default_s)
        )
        return DetectState(live, self._pending_since, self._lag_s)

    async def detect_once(self) -> None:
        now = self.clock()
        decision, reason = decide(now, self.detect_state(now), self.detect_config)
        if reason != self._last_reason:
            log.info("detector: %s", reason)
            self._last_reason = reason
        if decision.dead:
            await self._declare_dead_many(decision.dead)
        self._pending_since = decision.pending_since_s
        idle = self._reconfig_task is None or self._reconfig_task.done()
        if decision.reconfigure and idle and self.store_failure is None:
            self._pending_since = None
            lost = dict(self._lost)
            drain = set(self._drain)
            self._lost.clear()
            self._drain.clear()
            if lost or drain:
                self._reconfig_task = asyncio.get_running_loop().create_task(self._reconfigure(lost, drain))
        elif decision.reconfigure:
            # A reconfiguration is in flight, or the state file cannot be written (a new plan
            # could not be persisted): keep the deaths pending for the next round.
            self._pending_since = decision.pending_since_s
        else:
            added, why = decide_scale_up(now, self.scale_state(), self.scale_config)
            if added:
                log.info("detector: %s", why)
                self._reconfig_task = asyncio.get_running_loop().create_task(self._scale_up(added))

    def scale_state(self) -> ScaleUpState:
        """Facts for :func:`~oobleck.master.scaleup.decide_scale_up`: live spares with the plan's slot
        count (the planner assumes identical nodes), and whether the job is running steadily."""
        job = self.job
        busy = (
            self.store_failure is not None
            or self._pending_since is not None
            or bool(self._lost or self._drain)
            or (self._reconfig_task is not None and not self._reconfig_task.done())
        )
        running = job is not None and job.state == "RUNNING"
        if not running or busy:  # no scale-up now: do not look at every node
            return ScaleUpState(job_running=running, busy=busy, spares=(), tried=None)
        plan_slots = {self.nodes[n].row.slots for p in self.pipelines for n in p if n in self.nodes}
        spares = tuple(
            (n.row.node_id, n.joined_s)
            for n in self.live.values()
            if n.row.state == "spare"
            and n.failed_reason is None
            and not n.leaving
            and n.session is not None
            and n.row.slots in plan_slots
        )
        tried = None
        if self._scale_tried is not None and job is not None and self._scale_tried[0] == job.generation:
            tried = self._scale_tried[1]
        return ScaleUpState(job_running=running, busy=busy, spares=spares, tried=tried)

    def _note_lag(self, now: float, lag_s: float) -> None:
        """Record how late a detector tick ran (the event loop's backlog) and keep the window's
        maximum in ``_lag_s`` (see :attr:`DetectState.master_lag_s`)."""
        self._lags.append((now, lag_s))
        while self._lags and now - self._lags[0][0] > LAG_WINDOW_S:
            self._lags.popleft()
        self._lag_s = max(lag for _, lag in self._lags)
        self.metrics.loop_lag.set(self._lag_s)

    async def detector_loop(self) -> None:
        tick_s = self.config.detect_tick_s
        while True:
            before = time.monotonic()
            await asyncio.sleep(tick_s)
            after = time.monotonic()
            self._note_lag(after, max(0.0, after - before - tick_s))
            await self.detect_once()
            if self._progress_dirty and self.job is not None:
                self._progress_dirty = False
                await self._save_fact("update_progress", self.job.step, self.job.state, self.job.reason)
            await self.retry_store()
            await self.purge_dead()

    async def purge_dead(self) -> None:
        """Forget dead nodes older than ``dead_node_retention_s`` that nothing refers to: first in
        the state file, then in memory (at most once per second; not while the file fails)."""
        now = self.clock()
        if now < self._next_purge_s or self.store_failure is not None or len(self.nodes) == len(self.live):
            return
        self._next_purge_s = now + PURGE_EVERY_S
        keep = {n for p in self.pipelines for n in p} | set(self._lost)
        keep |= {pc.row.node_id for pc in self.pending.values()}
        dead = {i: n.dead_since_s or now for i, n in self.nodes.items() if i not in self.live}
        gone = membership.purgeable(now, dead, keep, self.config.dead_node_retention_s)
        if not gone:
            return
        if not await self._save_fact("delete_nodes", gone):
            return
        for node_id in gone:
            self.nodes.pop(node_id, None)
        self.metrics.nodes_purged.inc(len(gone))
        self._update_node_metrics()
        log.info("purged %d dead nodes (dead for over %gs): %s", len(gone), self.config.dead_node_retention_s,
                 _ids(gone))  # fmt: skip

    async def _declare_dead(self, node_id: int, why: str) -> None:
        await self._declare_dead_many([(node_id, why)])

    async def _declare_dead_many(self, deaths: list[tuple[int, str]] | tuple[tuple[int, str], ...]) -> None:
        """Declare nodes dead: in memory at once, then their rows, dropped commands and events in
        one write (a thousand deaths in one tick cost one transaction, not a thousand)."""
        now = self.clock()
        rows, events, spares_lost = [], [], False
        for node_id, why in deaths:
            node = self.nodes.get(node_id)
            if node is None or node.row.state == "dead":
                continue
            detect_s = max(0.0, now - node.last_seen_s)
            was = node.row.state
            node.row.state, node.row.reason = "dead", why
            node.dead_since_s = now
            self.live.pop(node_id, None)
            if node.session is not None:
                node.session.close("FAILED_PRECONDITION", f"node {node_id} declared dead: {why}")
                node.session = None
            for cmd_id in [c for c, pc in self.pending.items() if pc.row.node_id == node_id]:
                pc = self.pending.pop(cmd_id)
                if not pc.future.done():
                    pc.future.set_result(Ack(False, "node dead"))
            in_plan = was in ("alive", "draining") and any(node_id in p for p in self.pipelines)
            if in_plan and self.job is not None and self.job.state in ACTIVE_JOB_STATES:
                self._lost[node_id] = detect_s
                if self._pending_since is None:
                    self._pending_since = now
            spares_lost = spares_lost or not in_plan
            rows.append(node.row)
            if node.leaving and not in_plan:  # announced (pre-emption notice), drained first: not a failure
                events.append(self._new_event("node_left", f"{node.row.name} left ({why})", node_id=node_id))
            else:
                events.append(self._new_event("node_dead", why, node_id=node_id, durations={"detect": detect_s}))
        if not rows:
            return
        self._death.set()
        self._update_node_metrics()
        if not await self._save_fact("declare_dead", rows, events):
            self._unsaved_events.extend(events)  # written by the next resync (with the nodes)
        for ev in events:
            self._publish(ev)
        if spares_lost:  # an idle spare gone (a plan node's death is judged after the next generation)
            await self._check_degraded()

    # -- job start ------------------------------------------------------------------------------------------
    def _planning_nodes(self) -> list[planning.NodeInfo]:
        return [
            planning.NodeInfo(n.row.node_id, n.row.address, n.row.slots, n.row.gpu_memory_bytes, n.row.store_port)
            for n in sorted(self.live.values(), key=lambda n: n.row.node_id)
            if n.row.state in ("alive", "spare") and n.failed_reason is None and not n.leaving
        ]

    def _cluster_params(self) -> planning.ClusterParams:
        c = self.config
        return planning.ClusterParams(
            c.cpu_memory_bytes_per_slot,
            c.intra_node_bytes_per_s,
            c.inter_node_bytes_per_s,
            c.optimizer_state_factor,
            c.reserved_bytes,
        )

    async def submit_job(self, spec_yaml: str) -> tuple[str, int]:
        """Accept a job: planned and started at once when its profile is known (``profile:`` or
        the cache); otherwise the job is PROFILING and starts when a node has measured it (a
        failed measurement fails the job). Submitting the same spec again while its job is not
        over answers with that job: a client's retry never starts or measures anything twice."""
        async with self._plan_lock:
            job = self.job
            if job is not None and job.state not in TERMINAL_JOB_STATES:
                if job.spec_yaml == spec_yaml:
                    return job.job_id, job.generation
                raise MasterError(
                    "FAILED_PRECONDITION",
                    f"job {job.job_id} is {job.state}; cancel it before submitting another",
                )
            self._require_store()
            spec, model = await self._parse_spec(spec_yaml)
            candidates, _ = planning.plannable_nodes(self._planning_nodes())
            if not candidates:
                raise MasterError("FAILED_PRECONDITION", "no live nodes are registered; start agents first")
            needed = (spec.ft + 1) * (spec.min_nodes or 0)  # with min_nodes: known before any profile
            if len(candidates) < needed:
                raise MasterError(
                    "FAILED_PRECONDITION",
                    f"cannot plan the job on {len(candidates)} nodes: too few nodes for ft: {len(candidates)} "
                    f"nodes < (ft+1)*min_nodes = ({spec.ft}+1)*{spec.min_nodes} = {needed}",
                )
            if spec.profile is not None:
                profile, source = await self._profile_file(spec)
            else:
                found = await self._cached_profile(spec, candidates[0])
                if found is None:
                    return await self._submit_profiling(spec, spec_yaml, candidates[0])
                profile, source = found
            return await self._start_job(uuid.uuid4().hex[:12], spec, spec_yaml, model, profile, source)

    async def _parse_spec(self, spec_yaml: str) -> tuple[Any, Any]:
        from oobleck.common.jobspec import parse_job_spec
        from oobleck.common.validate import ConfigError
        from oobleck.worker.config import validate_model_config  # imports no torch

        try:
            spec = await asyncio.to_thread(parse_job_spec, spec_yaml)
            return spec, validate_model_config(spec)
        except ConfigError as exc:
            raise MasterError("INVALID_ARGUMENT", f"job_spec_yaml: {exc}") from None

    async def _profile_file(self, spec: Any) -> tuple[Any, str]:
        """The profile named by the spec's ``profile:`` (only inside the profile directory)."""
        planner = self.planner
        directory = profiles.profile_dir(self.config)
        try:
            data = await asyncio.to_thread(profiles.read_profile_file, directory, spec.profile)
            return await asyncio.to_thread(planner.parse_profile, data), repr(spec.profile)
        except profiles.ProfileFileError as exc:
            raise MasterError("INVALID_ARGUMENT", f"profile: {exc}") from None
        except (ValueError, TypeError, planner.PlannerError) as exc:
            raise MasterError("INVALID_ARGUMENT", f"profile: {spec.profile!r} is not a valid profile: {exc}") from None

    async def _start_job(
        self, job_id: str, spec: Any, spec_yaml: str, model: Any, profile: Any, source: str
    ) -> tuple[str, int]:
        """Plan the job on the plannable nodes and send its first generation (``_plan_lock`` held)."""
        planner = self.planner
        if profile.num_layers != model.num_layers:
            raise MasterError(
                "INVALID_ARGUMENT",
                f"profile: {source} has {profile.num_layers} layers but the model "
                f"({spec.model.name}, {model.num_blocks} blocks) has {model.num_layers}; profile this model",
            )
        candidates, odd = planning.plannable_nodes(self._planning_nodes())
        if not candidates:
            raise MasterError("FAILED_PRECONDITION", "no live nodes are registered; start agents first")
        generation = self.generation + 1
        try:
            ctx = await asyncio.to_thread(
                planning.make_context,
                planner,
                profile,
                candidates,
                self._cluster_params(),
                ft=spec.ft,
                microbatches=spec.num_microbatches,
                min_nodes=spec.min_nodes,
            )
            layout = await asyncio.to_thread(planning.first_layout, planner, ctx, candidates, generation=generation)
        except planner.InfeasibleError as exc:
            raise MasterError("FAILED_PRECONDITION", f"cannot plan the job on {len(candidates)} nodes: {exc}") from None
        except planner.PlannerError as exc:
            raise MasterError("INVALID_ARGUMENT", f"planner rejected the job: {exc}") from None
        layout.plan.job_id = job_id
        kind = "job_planned" if self._is_profiling(job_id) else "job_submitted"  # submitted when it began profiling
        with self._transaction():
            self.ctx = ctx
            self.job = JobRow(
                job_id=job_id,
                spec_yaml=spec_yaml,
                state="STARTING",
                reason="waiting for workers to start",
                generation=generation,
                plan=layout.plan.SerializeToString(),
                plan_json={"pipelines": [list(p) for p in layout.pipelines], **ctx.to_json()},
                step=0,
                total_steps=spec.steps,
            )
            self.pipelines = layout.pipelines
            self.loss = self.samples_per_s = 0.0
            self.metrics.generation.set(generation)
            self.metrics.step.set(0)
            in_plan = set(layout.nodes)
            changed = []
            for n in self.nodes.values():
                if n.row.state in ("alive", "spare"):
                    n.row.state = "alive" if n.row.node_id in in_plan else "spare"
                    n.row.reason = "" if n.row.node_id in in_plan else "not in the plan"
                    changed.append(n.row)
            rows = [
                self._command(n, "start", start=agent_pb2.Start(plan=layout.plan, job_spec_yaml=spec_yaml))
                for n in layout.nodes
            ]
            ev = self._new_event(
                kind,
                f"job {job_id} ({spec.name}): {len(layout.pipelines)} pipelines over {len(in_plan)} nodes, "
                f"{len(candidates) - len(in_plan) + len(odd)} spares, profile: {source}",
            )
            waits = await self._commit_and_send(rows, [ev], changed)
        self._new_progress(layout.nodes, 0)
        self._update_node_metrics()
        self._spawn(self._settle(generation, waits, self.config.start_ack_timeout_s, {}))
        return job_id, generation

    def _is_profiling(self, job_id: str) -> bool:
        """Whether job ``job_id`` was PROFILING (its ``job_submitted`` event is already out)."""
        return self.job is not None and self.job.job_id == job_id and self.job.state == "PROFILING"

    # -- profiling ------------------------------------------------------------------------------------------
    def _profile_key(self, spec: Any, node_id: int) -> str | None:
        node = self.nodes.get(node_id)
        return None if node is None else profiles.cache_key(spec, node.row.slots, node.row.gpu_memory_bytes)

    async def _cached_profile(self, spec: Any, node: planning.NodeInfo) -> tuple[Any, str] | None:
        """The cached profile for ``spec`` on a node like ``node``; None when it must be measured
        (a bad cache entry is removed)."""
        planner = self.planner
        path = profiles.cache_path(self.config.state_file, profiles.cache_key(spec, node.slots, node.gpu_memory_bytes))
        data = await asyncio.to_thread(profiles.read_cached, path)
        if data is None:
            return None
        try:
            return await asyncio.to_thread(planner.parse_profile, data), f"cached profile {path}"
        except (ValueError, TypeError, planner.PlannerError) as exc:
            log.warning("cached profile %s is not a valid oobleck-profile/1 (measuring again): %s", path, exc)
            await asyncio.to_thread(path.unlink, True)
            return None

    async def _submit_profiling(self, spec: Any, spec_yaml: str, node: planning.NodeInfo) -> tuple[str, int]:
        """Record the job as PROFILING (``_plan_lock`` held) and start measuring in the background."""
        job_id = uuid.uuid4().hex[:12]
        with self._transaction():
            self.job = JobRow(
                job_id=job_id,
                spec_yaml=spec_yaml,
                state="PROFILING",
                reason=f"measuring the profile of {spec.model.name} on node {node.node_id}",
                generation=self.generation,
                plan=b"",
                plan_json={},
                step=0,
                total_steps=spec.steps,
            )
            self.pipelines = ()
            self.loss = self.samples_per_s = 0.0
            ev = self._new_event(
                "job_submitted", f"job {job_id} ({spec.name}): profiling {spec.model.name} first (no profile: given)"
            )
            await self._commit_and_send([], [ev], [])
        self._spawn(self._profile_then_start(job_id))
        return job_id, self.generation

    async def _profile_then_start(self, job_id: str) -> None:
        """Owner of a PROFILING job: measure its profile (on another node if the measuring one
        dies), then plan and start it; any failure fails the job with the reason."""
        try:
            job = self.job
            if job is None or job.job_id != job_id or job.state != "PROFILING":
                return
            spec, model = await self._parse_spec(job.spec_yaml)
            deadline = self.clock() + self.config.profile_timeout_s
            while True:
                candidates, _ = planning.plannable_nodes(self._planning_nodes())
                if not candidates:
                    raise MasterError("FAILED_PRECONDITION", "profile: no live node is left to measure the profile on")
                found = await self._cached_profile(spec, candidates[0])
                if found is not None:
                    profile, source = found
                    break
                try:
                    profile, source = await self._measure(spec, job.spec_yaml, candidates[0], deadline)
                    break
                except _NodeLost as lost:
                    log.warning("profiling node %d died; measuring on another node", lost.node_id)
            async with self._plan_lock:
                if self._is_profiling(job_id):
                    await self._start_job(job_id, spec, job.spec_yaml, model, profile, source)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the job fails visibly, whatever went wrong
            why = exc.message if isinstance(exc, MasterError) else f"profiling failed: {exc!r}"
            if not isinstance(exc, MasterError):
                log.exception("job %s: profiling failed", job_id)
            await self._fail_profiling(job_id, why)

    async def _fail_profiling(self, job_id: str, why: str) -> None:
        async with self._plan_lock:
            if not self._is_profiling(job_id):
                return
            try:
                with self._transaction():
                    self.job.state, self.job.reason = "FAILED", why
                    await self._commit_and_send([], [self._new_event("job_failed", why)], [])
            except StateUnavailable as exc:
                log.error("job %s failed (%s); recording it waits for the state file: %s", job_id, why, exc)

    async def _measure(self, spec: Any, spec_yaml: str, node: planning.NodeInfo, deadline: float) -> tuple[Any, str]:
        """Have ``node``'s agent measure the profile, joining a measurement of the same key that is
        already under way. The ack caches the profile whoever waits (see :meth:`_apply_ack`)."""
        key = profiles.cache_key(spec, node.slots, node.gpu_memory_bytes)
        pc = None
        for p in [p for p in self.pending.values() if p.row.kind == "profile"]:
            if await self._pending_profile_key(p) == key and p.row.command_id in self.pending:
                pc = p
                break
        if pc is None:
            row = self._command(node.node_id, "profile", profile=agent_pb2.Profile(job_spec_yaml=spec_yaml))
            what = f"measuring {spec.model.name} on node {node.node_id}"
            ev = self._new_event("profiling", what, node_id=node.node_id)
            (pc,) = await self._commit_and_send([row], [ev], [], False)
            pc.profile_key = key
        node_id = pc.row.node_id
        timeout_s = max(0.0, deadline - self.clock())
        try:
            ack = await asyncio.wait_for(asyncio.shield(pc.future), timeout=timeout_s)
        except TimeoutError:
            raise MasterError(
                "DEADLINE_EXCEEDED",
                f"profile: node {node_id} did not finish profiling within {self.config.profile_timeout_s:g}s "
                "(profile_timeout_s; its result is still cached when it arrives); set `profile:` to a "
                "measured profile or raise the timeout",
            ) from None
        if not ack.ok:
            if ack.error == "node dead":
                raise _NodeLost(node_id)
            raise MasterError("FAILED_PRECONDITION", f"profile: profiling on node {node_id} failed: {ack.error}")
        planner = self.planner
        try:
            data = json.loads(pc.profile_json)
            return planner.parse_profile(data), f"the profile measured on node {node_id}"
        except (ValueError, TypeError, planner.PlannerError) as exc:
            raise MasterError(
                "FAILED_PRECONDITION",
                f"profile: node {node_id} returned a profile that is not oobleck-profile/1: {exc}",
            ) from None

    async def _pending_profile_key(self, pc: PendingCommand) -> str | None:
        """The cache key of a pending Profile command (from its spec and node; computed once)."""
        if pc.profile_key is None:
            from oobleck.common.jobspec import parse_job_spec
            from oobleck.common.validate import ConfigError

            yaml_text = agent_pb2.Command.FromString(pc.row.payload).profile.job_spec_yaml
            try:
                spec = await asyncio.to_thread(parse_job_spec, yaml_text)
            except ConfigError:
                return None
            pc.profile_key = self._profile_key(spec, pc.row.node_id) or ""
        return pc.profile_key or None

    async def _cache_profile(self, pc: PendingCommand) -> None:
        """A node's measured profile goes into the cache when it arrives, even when nobody waits
        for it any more (the submit that asked timed out, the job was cancelled): a retry finds it."""
        key = await self._pending_profile_key(pc)
        if key is None:
            return
        try:
            data = json.loads(pc.profile_json)
            self.planner.parse_profile(data)
        except Exception as exc:  # a bad profile is never cached
            log.warning("node %d returned an unusable profile (not cached): %s", pc.row.node_id, exc)
            return
        path = profiles.cache_path(self.config.state_file, key)
        try:
            await asyncio.to_thread(profiles.write_cached, path, data)
            log.info("profile measured on node %d cached at %s", pc.row.node_id, path)
        except OSError as exc:  # a full disk costs the cache, not the job
            log.warning("profile measured on node %d not cached: %s", pc.row.node_id, exc)

    async def _await_acks(self, waits: list[PendingCommand], timeout_s: float) -> AckOutcome:
        """Wait for acks until the deadline, or until the first failed one (a nack, or its node
        declared dead: the generation cannot complete, and waiting for the others, which are
        blocked on that node, would only delay the next one). Nodes still pending after a
        failure are neither bad nor ok."""
        futures = {pc.future: pc.row.node_id for pc in waits}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        pending = set(futures)
        while pending:
            done, pending = await asyncio.wait(
                pending, timeout=max(0.0, deadline - loop.time()), return_when=asyncio.FIRST_COMPLETED
            )
            if not done or any(not f.result().ok for f in done):
                break
        out = AckOutcome()
        timed_out = loop.time() >= deadline
        for fut, node_id in futures.items():
            if not fut.done():
                if timed_out:
                    out.bad.append(node_id)
                    out.errors[node_id] = f"no ack within {timeout_s:g}s"
                continue
            ack: Ack = fut.result()
            if not ack.ok:
                out.bad.append(node_id)
                out.errors[node_id] = ack.error
                continue
            out.ok_nodes.append(node_id)
            if ack.step is not None:
                out.steps[node_id] = ack.step
            for k in ("regroup", "copy"):
                out.phases[k] = max(out.phases[k], float(ack.phases.get(k, 0.0)))
        out.complete = not out.bad and len(out.ok_nodes) == len(waits)
        return out

    async def _fail_nodes(self, nodes: list[int], why: str) -> None:
        deaths = []
        for node_id in nodes:
            node = self.nodes.get(node_id)
            if node is not None and node.row.state != "dead":
                node.failed_reason = why
                deaths.append((node_id, why))
        await self._declare_dead_many(deaths)

    async def _settle(
        self, generation: int, waits: list[PendingCommand], timeout_s: float, durations: dict[str, float]
    ) -> None:
        """Wait for the acks of generation ``generation``'s start / reconfigure commands (each ack
        means the node's workers are ready: joined, layers copied or restored). All ok: the job
        runs, its step follows the position the workers are ready at (a restore or redone steps
        move it back), a pending restore obligation is fulfilled, and ``running`` (first start,
        restore) or ``reconfigured`` is recorded with the phases. Otherwise the nodes that missed
        the deadline are failed and the detector starts the next generation."""
        outcome = await self._await_acks(waits, timeout_s)
        job = self.job
        if job is None or job.generation != generation or job.state not in ("STARTING", "RECONFIGURING"):
            return  # superseded, paused or ended meanwhile
        reconfiguring = job.state == "RECONFIGURING"
        durations = {**durations, **outcome.phases} if reconfiguring else durations
        if reconfiguring:
            self.metrics.observe_phases(durations)
        if not outcome.complete:
            dead = sorted(n for n in outcome.bad if self.nodes[n].row.state == "dead")
            missing = sorted(n for n in outcome.bad if self.nodes[n].row.state != "dead")
            for node_id in missing:
                await self._fail_nodes([node_id], f"generation {generation}: {outcome.errors.get(node_id, 'no ack')}")
            if reconfiguring:
                parts = [f"nodes {dead} died during it" if dead else "", f"no ack from {missing}" if missing else ""]
                await self._record(
                    "reconfigure_incomplete",
                    f"generation {generation} superseded: " + "; ".join(p for p in parts if p),
                    durations=durations,
                )
            return  # the detector starts the next generation for the nodes that died
        ready = sorted(set(outcome.steps.values()))
        if len(ready) > 1:
            log.warning("generation %d: nodes are ready at different steps %s", generation, ready)
        restored = bool(job.plan_json.pop("restore_pending", False))
        if ready and self.progress.generation == generation:
            # The generation started where its workers are ready (a restore, or steps redone
            # after a split commit, move the step back); reports may already be past it.
            if ready[0] != job.step:
                log.info("generation %d: workers ready at step %d (the master had %d)", generation, ready[0], job.step)
            self.progress.start = ready[0]
            self._follow_progress()
        elif self.progress.start is None:
            self.progress.start = job.step  # agents that do not report the ready step
        job.state, job.reason = "RUNNING", ""
        acked_at = self.clock()
        start_step = job.step  # step reports may move it on while the job is saved
        await self._save_fact("save_job", job)
        if reconfiguring:
            what = f"generation {generation} acked by {len(waits)} nodes"
            what += f" (restored at step {start_step})" if restored else ""
            await self._record("reconfigured", what, durations=durations)
            # "resumed" follows "reconfigured" in the event log, even when a step of the new
            # generation was reported while the acks were processed or the above was written.
            if self._first_step_generation >= generation:
                self._resumed(generation, self._first_step_s - acked_at)
            else:
                self._resume_wait = (generation, acked_at, durations)
        else:
            what = f"restored at step {start_step}" if restored else "ready"
            await self._record("running", f"all nodes acked generation {generation} ({what})")
        await self._check_degraded()

    # -- reconfiguration ------------------------------------------------------------------------------------
    async def _ensure_ctx(self) -> planning.PlanContext:
        if self.ctx is None:
            assert self.job is not None
            self.ctx = await asyncio.to_thread(planning.context_from_json, self.planner, self.job.plan_json)
        return self.ctx

    def _node_infos(self) -> dict[int, planning.NodeInfo]:
        return {
            n.row.node_id: planning.NodeInfo(
                n.row.node_id, n.row.address, n.row.slots, n.row.gpu_memory_bytes, n.row.store_port
            )
            for n in self.nodes.values()
        }

    async def _reconfigure(self, lost: dict[int, float], drain: set[int]) -> None:
        async with self._plan_lock:
            job = self.job
            if job is None or job.state not in ACTIVE_JOB_STATES:
                return
            gone = set(lost) | drain
            gone &= {n for p in self.pipelines for n in p}
            if not gone:
                return
            detect_s = max(lost.values(), default=0.0)
            t0 = self.clock()
            generation = job.generation + 1
            planner = self.planner
            try:
                ctx = await self._ensure_ctx()
                try:
                    layout = await asyncio.to_thread(
                        planning.next_layout,
                        planner,
                        ctx,
                        self.pipelines,
                        sorted(gone),
                        self._node_infos(),
                        generation=generation,
                        resume_step=job.step,
                    )
                except planner.InfeasibleError as exc:
                    layout, infeasible = None, exc
                reason = f"lost nodes {sorted(lost)}" + (f", draining {sorted(drain)}" if drain else "")
                durations = {"detect": detect_s, "plan": self.clock() - t0}
                if layout is None:
                    await self._pause(f"not enough nodes after losing {sorted(gone)}: {infeasible}")
                else:
                    await self._roll_out(layout, reason, durations, drain=drain, left=set(lost) | drain)
            except StateUnavailable as exc:
                # Nothing was sent: the deaths stay pending until the state file is writable.
                log.warning("reconfiguration after losing %s deferred: %s", sorted(gone), exc.message)
                self._lost.update(lost)
                self._drain |= drain
                if self._pending_since is None:
                    self._pending_since = self.clock()

    async def _scale_up(self, added: tuple[int, ...]) -> None:
        """Grow the running plan onto the spares ``added`` (see :mod:`oobleck.master.scaleup`)."""
        async with self._plan_lock:
            job = self.job
            if job is None or job.state != "RUNNING" or self._lost or self._drain:
                return
            added = tuple(n for n in added if self.nodes[n].row.state == "spare" and not self.nodes[n].failed_reason)
            if not added:
                return
            t0 = self.clock()
            planner = self.planner
            try:
                ctx = await self._ensure_ctx()
                layout = await asyncio.to_thread(
                    planning.grow_layout,
                    planner,
                    ctx,
                    self.pipelines,
                    added,
                    self._node_infos(),
                    generation=job.generation + 1,
                    resume_step=job.step,
                )
            except planner.PlannerError as exc:
                self._scale_tried = (job.generation, frozenset(added))
                await self._record("scale_up_skipped", f"spares {list(added)} stay spares: {exc}")
                await self._check_degraded()
                return
            joined = sorted(set(layout.nodes) - {n for p in self.pipelines for n in p})
            try:
                await self._roll_out(layout, f"scaling up onto nodes {joined}", {"plan": self.clock() - t0})
            except StateUnavailable as exc:  # nothing sent; tried again once the state file is writable
                log.warning("scale-up onto %s deferred: %s", joined, exc.message)

    async def _roll_out(
        self,
        layout: planning.PlannedLayout,
        reason: str,
        durations: dict[str, float],
        *,
        drain: set[int] = frozenset(),
        left: set[int] = frozenset(),
    ) -> None:
        """Persist and send the next generation (caller holds the plan lock): ``reconfigure`` to
        the nodes of the current plan that are not ``left`` behind (dead or drained), including
        those the new plan leaves out (their agents stop their workers and keep them as spares),
        ``start`` to nodes that join from the spares, ``drain`` to drained nodes; then wait for
        the acks and settle (or let the detector start the next generation for the nodes that
        missed the deadline)."""
        job = self.job
        assert job is not None
        generation = layout.plan.generation
        with self._transaction():
            layout.plan.job_id = job.job_id
            # A restore obligation lasts until a generation's workers report ready (see _settle):
            # a generation that replaces a restoring one before it restored restores too.
            if job.plan_json.get("restore_pending"):
                layout.plan.restore_from_checkpoint = True
            elif layout.plan.restore_from_checkpoint:
                job.plan_json = {**job.plan_json, "restore_pending": True}
            old_nodes = [n for p in self.pipelines for n in p]
            job.generation, job.state, job.reason = generation, "RECONFIGURING", reason
            job.plan = layout.plan.SerializeToString()
            job.plan_json = {**job.plan_json, "pipelines": [list(p) for p in layout.pipelines]}
            self.pipelines = layout.pipelines
            self.metrics.generation.set(generation)
            t1 = self.clock()
            in_plan = set(layout.nodes)
            joining = [n for n in layout.nodes if n not in set(old_nodes)]
            staying = [n for n in old_nodes if n not in left]
            changed = []
            for node_id in drain:
                n = self.nodes[node_id]
                if n.row.state != "dead":
                    n.row.state, n.row.reason = "draining", "drained by operator"
                    changed.append(n.row)
            for node_id in staying:
                n = self.nodes[node_id]
                if node_id not in in_plan and n.row.state == "alive":
                    n.row.state, n.row.reason = "spare", "left out of the new plan"
                    changed.append(n.row)
            for node_id in joining:
                n = self.nodes[node_id]
                n.row.state, n.row.reason = "alive", ""
                changed.append(n.row)
            rows = [
                self._command(n, "reconfigure", reconfigure=agent_pb2.Reconfigure(plan=layout.plan))
                for n in staying
                if self.nodes[n].row.state != "dead"
            ]
            rows += [
                self._command(n, "start", start=agent_pb2.Start(plan=layout.plan, job_spec_yaml=job.spec_yaml))
                for n in joining
            ]
            rows += [
                self._command(n, "drain", drain=agent_pb2.Drain(reason="drained by operator"))
                for n in drain
                if self.nodes[n].row.state == "draining"
            ]
            ev = self._new_event(
                "reconfiguring",
                f"generation {generation}: {len(layout.pipelines)} pipelines over {len(in_plan)} nodes "
                f"({reason}; {layout.reason or 'replanned'})",
                durations=durations,
            )
            waits = await self._commit_and_send(rows, [ev], changed)
        self._new_progress(layout.nodes, None if layout.plan.restore_from_checkpoint else job.step)
        self.metrics.reconfigurations.inc()
        self._update_node_metrics()
        durations = {**durations, "notify": self.clock() - t1}
        recon_waits = [w for w in waits if w.row.kind in ("reconfigure", "start")]
        await self._settle(generation, recon_waits, self.config.reconfigure_ack_timeout_s, durations)

    async def _check_degraded(self) -> None:
        """Record (once per change) whether the running job is degraded: fewer pipelines than
        ``ft + 1`` (one more failure may lose every copy of some layer), or live nodes left idle
        (no template mix uses them); ``oobleck_degraded`` follows."""
        job = self.job
        if job is None or job.state != "RUNNING":
            return
        reason = degradation(
            len(self.pipelines),
            int(job.plan_json.get("ft", 0)),
            sorted(
                n.row.node_id
                for n in self.nodes.values()
                if n.row.state == "spare" and n.session is not None and n.failed_reason is None and not n.leaving
            ),
        )
        if reason == self._degraded:
            return
        self._degraded = reason
        if reason:
            await self._record("degraded", f"generation {job.generation}: {reason}")
        else:
            await self._record("degraded_cleared", f"generation {job.generation}: ft+1 pipelines, no idle node")
        self.metrics.degraded.set(1 if self._degraded else 0)  # after the event: it explains the metric

    def _resumed(self, generation: int, resume_s: float) -> None:
        self._resume_wait = None
        resume_s = max(0.0, resume_s)
        self.metrics.observe_phases({"resume": resume_s})
        self._spawn(self._record("resumed", f"first step of generation {generation}", durations={"resume": resume_s}))

    async def _pause(self, reason: str) -> None:
        job = self.job
        assert job is not None
        with self._transaction():
            job.state, job.reason = "PAUSED", reason
            survivors = [n for p in self.pipelines for n in p if self.nodes[n].row.state == "alive"]
            changed = []
            for node_id in survivors:
                self.nodes[node_id].row.state, self.nodes[node_id].row.reason = "spare", "job paused"
                changed.append(self.nodes[node_id].row)
            self.pipelines = ()
            job.plan_json = {**job.plan_json, "pipelines": []}
            rows = [self._command(n, "stop", stop=agent_pb2.Stop(reason=reason)) for n in survivors]
            await self._commit_and_send(rows, [self._new_event("job_paused", reason)], changed)
        self._new_progress((), job.step)
        self._update_node_metrics()
        # Nodes may have registered while the failed generation was being handled (a node whose
        # workers failed re-registers as a spare at once): try to restore now, not only on the
        # next registration.
        self._spawn(self._try_resume())

    async def _resume_after_restart(self) -> None:
        # Give the agents one heartbeat timeout to re-attach, then see whether they suffice.
        await asyncio.sleep(self.config.heartbeat_timeout_s)
        await self._try_resume()

    async def _try_resume(self) -> None:
        """A PAUSED job restarts from its checkpoint once the registered nodes can hold a plan."""
        async with self._plan_lock:
            job = self.job
            if job is None or job.state != "PAUSED":
                return
            candidates, _ = planning.plannable_nodes(self._planning_nodes())
            if not candidates:
                return
            planner = self.planner
            generation = job.generation + 1
            try:
                ctx = await self._ensure_ctx()
                layout = await asyncio.to_thread(
                    planning.first_layout,
                    planner,
                    ctx,
                    candidates,
                    generation=generation,
                    # The workers resume from the newest checkpoint they all hold; the master
                    # does not read checkpoints, so the step is unknown (0) until they report.
                    resume_step=0,
                    restore_from_checkpoint=True,
                )
            except planner.PlannerError as exc:
                log.info("job still paused: %s", exc)
                return
            if self.store_failure is not None:
                log.warning("job still paused: the state file cannot be written (%s)", self.store_failure)
                return  # retried once it can (retry_store)
            try:
                with self._transaction():
                    waits = await self._install_restore(layout)
            except StateUnavailable as exc:  # nothing sent: retried once the state file is writable
                log.warning("job still paused: %s", exc.message)
                return
            self._new_progress(layout.nodes, None)
            self._update_node_metrics()
            self._spawn(self._settle(generation, waits, self.config.start_ack_timeout_s, {}))

    async def _install_restore(self, layout: planning.PlannedLayout) -> list[PendingCommand]:
        """Persist and send the generation that restores a paused job from its checkpoint."""
        job = self.job
        generation = layout.plan.generation
        layout.plan.job_id = job.job_id
        job.generation, job.state, job.reason = generation, "STARTING", "restoring from checkpoint"
        # The step stays the last one known until the workers report the restored position
        # (their acks, see _settle); the master does not read checkpoints itself.
        job.plan = layout.plan.SerializeToString()
        job.plan_json = {**job.plan_json, "pipelines": [list(p) for p in layout.pipelines], "restore_pending": True}
        self.pipelines = layout.pipelines
        self.metrics.generation.set(generation)
        changed = []
        for node_id in layout.nodes:
            self.nodes[node_id].row.state, self.nodes[node_id].row.reason = "alive", ""
            changed.append(self.nodes[node_id].row)
        rows = [
            self._command(n, "start", start=agent_pb2.Start(plan=layout.plan, job_spec_yaml=job.spec_yaml))
            for n in layout.nodes
        ]
        ev = self._new_event("job_resumed", f"generation {generation} restores from the latest checkpoint")
        return await self._commit_and_send(rows, [ev], changed)

    async def _finish_reached(self) -> None:
        """The job reached its last step: it succeeded (retried by retry_store when the state
        file could not be written)."""
        job = self.job
        if job is None:
            return
        try:
            await self._finish("SUCCEEDED", f"reached step {job.step} of {job.total_steps}")
        except StateUnavailable as exc:
            log.warning("job %s reached its last step; recording that waits for the state file: %s", job.job_id, exc)

    async def _finish(self, state: str, reason: str) -> None:
        """End the job (stop its workers). Raises :class:`StateUnavailable` when that cannot be
        persisted (nothing changes then)."""
        async with self._plan_lock:
            job = self.job
            if job is None or job.state not in (*ACTIVE_JOB_STATES, "PAUSED", "PROFILING"):
                return
            with self._transaction():
                job.state, job.reason = state, reason
                plan_nodes = [n for p in self.pipelines for n in p if self.nodes[n].row.state in ("alive", "draining")]
                changed = []
                for node_id in plan_nodes:
                    self.nodes[node_id].row.state, self.nodes[node_id].row.reason = "spare", f"job {state.lower()}"
                    changed.append(self.nodes[node_id].row)
                rows = [self._command(n, "stop", stop=agent_pb2.Stop(reason=reason)) for n in plan_nodes]
                await self._commit_and_send(rows, [self._new_event(f"job_{state.lower()}", reason)], changed)
            self._lost.clear()
            self._drain.clear()
            self._pending_since = None
            self._update_node_metrics()

    # -- admin -------------------------------------------------------------------------------------------------
    def _existing(self, node_id: int) -> NodeRuntime:
        node = self.nodes.get(node_id)
        if node is None:
            raise MasterError("NOT_FOUND", f"node_id: no node {node_id} (see `oobleckctl nodes`)")
        return node

    async def drain_node(self, node_id: int) -> None:
        """Keep node ``node_id`` out of every plan until :meth:`undrain_node`: a spare at once; a
        node of the running plan after the next generation moved its work elsewhere."""
        node = self._existing(node_id)
        self._require_store()
        if node.row.state in ("dead", "drained", "draining"):
            raise MasterError("FAILED_PRECONDITION", f"node_id: node {node_id} is {node.row.state}")
        if node.row.state == "spare":
            await self._set_node_state(node, "drained", "drained by operator", "node_drained", "operator drained it")
            return
        if self.job is None or self.job.state not in ACTIVE_JOB_STATES:
            raise MasterError(
                "FAILED_PRECONDITION", f"node_id: node {node_id} is {node.row.state}, not part of a running plan"
            )
        self._drain.add(node_id)
        if self._pending_since is None:
            self._pending_since = self.clock()
        await self._record("drain_requested", f"operator drains node {node_id}", node_id=node_id)

    async def undrain_node(self, node_id: int) -> None:
        """A drained node becomes a spare again (a running job may scale up onto it)."""
        node = self._existing(node_id)
        if node.row.state != "drained":
            raise MasterError("FAILED_PRECONDITION", f"node_id: node {node_id} is {node.row.state}, not drained")
        await self._set_node_state(node, "spare", "", "node_undrained", "operator undrained it: a spare again")

    async def _set_node_state(self, node: NodeRuntime, state: str, reason: str, kind: str, message: str) -> None:
        """An operator's change of one node's state, persisted before it counts."""
        with self._transaction():
            node.row.state, node.row.reason = state, reason
            event = self._new_event(kind, f"{node.row.name}: {message}", node_id=node.row.node_id)
            await self._commit_and_send([], [event], [node.row], save_job=False)
        node.joined_s = self.clock()  # a spare again: the scale-up delay starts now
        self._update_node_metrics()

    async def kill_node(self, node_id: int) -> None:
        node = self._existing(node_id)
        if node.row.state == "dead":
            raise MasterError("FAILED_PRECONDITION", f"node_id: node {node_id} is already dead")
        row = self._command(node_id, "kill", kill=agent_pb2.Kill(reason="fault drill requested by operator"))
        await self._commit_and_send(
            [row], [self._new_event("kill_requested", "fault drill", node_id=node_id)], [], False
        )

    async def cancel_job(self, reason: str) -> None:
        if self.job is None or self.job.state in TERMINAL_JOB_STATES:
            raise MasterError("FAILED_PRECONDITION", "no job to cancel")
        await self._finish("CANCELLED", reason or "cancelled by operator")
