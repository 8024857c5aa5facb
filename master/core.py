"""The master: one object the servicers (``oobleck.master.service``) call, composed of parts named
for what they do.

- :mod:`~oobleck.master.sessions`: registration, sessions, heartbeats, deaths, the purge;
- :mod:`~oobleck.master.jobs`: submit, finish, cancel, the operator's node actions;
- :mod:`~oobleck.master.profiling`: measuring a job's profile before planning it;
- :mod:`~oobleck.master.rollout`: reconfiguration, scale-up, pause and restore, acks;
- :mod:`~oobleck.master.ledger` (durability and commands) and :mod:`~oobleck.master.eventlog`;
- pure decisions: :mod:`~oobleck.master.detect`, :mod:`~oobleck.master.scaleup`,
  :mod:`~oobleck.master.generations`, :mod:`~oobleck.master.progress`, and the state machines
  in :mod:`~oobleck.master.states`.

This module holds what ties them together: start-up and restart recovery, the plan in force (one
record: the job's plan; the pipelines are derived from it), progress from step reports, acks,
the detector loop, the views, and the owner of every background task.
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
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

from oobleck.master import messages, planning
from oobleck.master.config import MasterConfig
from oobleck.master.detect import DetectConfig
from oobleck.master.detection import DetectionMixin
from oobleck.master.eventlog import MAX_EVENTS_IN_MEMORY, EventLog
from oobleck.master.jobs import JobsMixin
from oobleck.master.ledger import Ledger
from oobleck.master.metrics import MasterMetrics
from oobleck.master.profiling import ProfilingMixin
from oobleck.master.progress import GenerationProgress
from oobleck.master.records import (
    STATUS_NODES,
    MasterError,
    NodeRuntime,
    PendingCommand,
    RegisterInfo,
    StateUnavailable,
    StatusView,
)
from oobleck.master.reports import ReportsMixin
from oobleck.master.rollout import RolloutMixin
from oobleck.master.scaleup import ScaleUpConfig
from oobleck.master.sessions import SessionsMixin
from oobleck.master.states import ACTIVE_JOB_STATES, JobState, NodeState
from oobleck.master.store import CommandRow, EventRow, JobRow, NodeRow, StoreError

__all__ = ["Master", "MasterError", "RegisterInfo", "StateUnavailable"]

log = logging.getLogger(__name__)

JOB_TASK_ATTEMPTS = 3  # a reconfiguration or settle that fails unexpectedly this often fails the job


class Master(SessionsMixin, DetectionMixin, ReportsMixin, JobsMixin, ProfilingMixin, RolloutMixin):
    def __init__(
        self,
        config: MasterConfig,
        *,
        planner: Any = None,
        clock: Callable[[], float] = time.monotonic,
        metrics: MasterMetrics | None = None,
    ) -> None:
        from oobleck.master.store import AsyncStore

        self.config = config
        self._planner = planner
        self.clock = clock
        self.metrics = metrics or MasterMetrics()
        self.store = AsyncStore(config.state_file)
        self.events = EventLog()
        self.ledger = Ledger(self.store, config, clock, self.metrics, self.events, self._position)
        self.detect_config = DetectConfig(
            config.heartbeat_timeout_s,
            config.session_grace_s,
            config.coalesce_window_s,
            config.restart_grace_s,
            config.attach_timeout_s,
        )
        self.scale_config = ScaleUpConfig(config.scale_up, config.scale_up_delay_s)
        # Membership (see sessions.py).
        self.nodes: dict[int, NodeRuntime] = {}  # every node not purged, in node id order
        self.live: dict[int, NodeRuntime] = {}  # the nodes not dead: what detection and planning look at
        self._next_purge_s = 0.0
        self._terms = (config.heartbeat_interval_s, config.heartbeat_timeout_s)  # only grows while running
        self._terms_sent = self._terms  # the terms last sent to every live node
        # The job and the plan in force: one record, the job's serialized plan; ``pipelines`` is
        # derived from it whenever it changes (``_set_plan``).
        self.job: JobRow | None = None
        self._pipelines: tuple[tuple[int, ...], ...] = ()
        self.ctx: planning.PlanContext | None = None  # planning context, rebuilt from job.plan_json
        self.loss = 0.0
        self.samples_per_s = 0.0
        # Detection and the reconfiguration it starts.
        self._lag_s = 0.0  # the detector loop's lateness: max over the last LAG_WINDOW_S
        self._lags: deque[tuple[float, float]] = deque()  # (when, how late) of recent ticks
        self._pending_since: float | None = None
        self._lost: dict[int, float] = {}  # in-plan nodes declared dead and not yet replanned -> detect_s
        self._drain: set[int] = set()
        self._scale_tried: tuple[int, frozenset[int]] | None = None  # (generation, spares of no use then)
        self._plan_lock = asyncio.Lock()
        self._reconfig_task: asyncio.Task | None = None
        self._job_task_failures = 0  # consecutive unexpected failures of reconfigurations and settles
        self._last_reason = ""
        # Progress of the current generation (step reports) and the reconfiguration's resume.
        self.progress = GenerationProgress(0, frozenset(), 0, 0)
        self._ignored_from: set[int] = set()  # nodes whose ignored reports were logged (once each)
        self._resume_wait: tuple[int, float, dict[str, float]] | None = None
        self._degraded = ""  # why the running job is degraded ("" when it is not)
        self._first_step_generation = 0  # newest generation whose first step report has arrived
        self._first_step_s = 0.0  # ... and when it arrived
        self._progress_dirty = False
        self._death = asyncio.Event()
        self._bg: set[asyncio.Task] = set()
        self.stopping = False

    # -- the plan in force ----------------------------------------------------------------------------
    @property
    def pipelines(self) -> tuple[tuple[int, ...], ...]:
        return self._pipelines

    def _set_plan(self, plan: Any) -> None:
        """The one place the plan in force changes (None: no plan, e.g. while paused): the job's
        plan (persisted with the job, shown by GetStatus) and the pipelines derived from it."""
        assert self.job is not None
        self.job.plan = plan.SerializeToString() if plan is not None else b""
        self._pipelines = tuple(tuple(p.node_ids) for p in plan.pipelines) if plan is not None else ()
        if plan is not None:
            self.metrics.generation.set(plan.generation)

    @property
    def planner(self) -> Any:
        if self._planner is None:
            self._planner = planning.default_planner()
        return self._planner

    @property
    def generation(self) -> int:
        return self.job.generation if self.job else 0

    def _position(self) -> tuple[int, int]:
        return self.generation, self.job.step if self.job else 0

    @property
    def pending(self) -> dict[int, PendingCommand]:
        return self.ledger.pending

    @property
    def store_failure(self) -> str | None:
        return self.ledger.failure

    # -- start-up and restart recovery ------------------------------------------------------------
    async def open(self) -> None:
        snap = await self.store.open()
        now = self.clock()
        self.job = snap.job
        self.ledger.load(snap.pending_commands, snap.next_command_id)
        for row in snap.nodes:
            row.state = NodeState(row.state)
            # Agents reconnect with backoff: everybody gets restart_grace_s to re-attach.
            node = NodeRuntime(row=row, last_seen_s=now, reattach_by_s=now + self.config.restart_grace_s, joined_s=now)
            self.nodes[row.node_id] = node
            if row.state == NodeState.DEAD:
                node.dead_since_s = now  # retention restarts with the master
            else:
                self.live[row.node_id] = node
        job = self.job
        if job is not None:
            job.state = JobState(job.state)
            # Older state files kept the pipelines beside the plan, and a paused job's old plan.
            if job.plan_json.pop("pipelines", None) == [] or job.state == JobState.PAUSED:
                job.plan = b""
            self._pipelines = messages.plan_pipelines(job.plan)
            self.metrics.generation.set(job.generation)
            self.metrics.step.set(job.step)
        self.events.load(
            await self.store.call("events_since", max(0, snap.last_event_id - MAX_EVENTS_IN_MEMORY)), snap.last_event_id
        )
        self._update_node_metrics()
        if job is not None and job.state in ACTIVE_JOB_STATES:
            self._recover_active(job, now)
        if job is not None and job.state == JobState.PAUSED:
            self._spawn(self._resume_after_restart())
        if job is not None and job.state == JobState.PROFILING:  # its Profile command is resent
            self._spawn(self._profile_then_start(job.job_id))
        log.info(
            "state loaded from %s: %d nodes, job %s, generation %d, %d unacked commands",
            self.config.state_file,
            len(self.nodes),
            job.state if job else "none",
            self.generation,
            len(self.pending),
        )

    def _recover_active(self, job: JobRow, now: float) -> None:
        # Deaths and drains recorded before a crash but not yet replanned are replanned now.
        for node_id in {n for p in self.pipelines for n in p}:
            node = self.nodes.get(node_id)
            if node is None or node.row.state == NodeState.DEAD:
                self._lost[node_id] = 0.0
            elif node.row.state == NodeState.DRAINING:
                self._drain.add(node_id)
        if self._lost or self._drain:
            self._pending_since = now
        restoring = bool(job.plan_json.get("restore_pending"))
        self._new_progress({n for p in self.pipelines for n in p}, None if restoring else job.step)
        # Resume waiting for the acks of the generation being installed when the master stopped;
        # its events (reconfigured with the phases, running, resumed) follow as if it had not.
        self._resettle()

    def _resettle(self) -> bool:
        """Wait (again) for the acks of the generation being installed, if it is: after a restart,
        or after the task that waited for them failed. Returns whether it does."""
        job = self.job
        if job is None or job.state not in (JobState.STARTING, JobState.RECONFIGURING):
            return False
        generation = job.generation
        waits = [
            p
            for p in self.pending.values()
            if p.row.kind in ("start", "reconfigure") and p.row.generation == generation
        ]
        if not waits:
            return False
        last = self.events.last("reconfiguring", generation)
        durations = dict(last.durations_s) if last is not None else {}
        reconfiguring = job.state == JobState.RECONFIGURING
        timeout_s = self.config.reconfigure_ack_timeout_s if reconfiguring else self.config.start_ack_timeout_s
        self._spawn_job_task("waiting for the acks", self._settle(generation, waits, timeout_s, durations))
        return True

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

    # -- background tasks: every one has an owner that acts on its failure ---------------------------
    def _spawn(self, coro: Coroutine) -> asyncio.Task:
        """Run ``coro`` in the background; an unexpected failure is logged (a task that must be
        acted on when it fails handles that itself: see ``_owned``)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._bg.add(task)

        def done(t: asyncio.Task) -> None:
            self._bg.discard(t)
            if t.cancelled() or t.exception() is None:
                return
            log.error("background task %s failed", coro.__qualname__, exc_info=t.exception())

        task.add_done_callback(done)
        return task

    def _spawn_job_task(self, what: str, coro: Coroutine, retry: Callable[[], None] | None = None) -> asyncio.Task:
        """A task the job's progress depends on (a reconfiguration, waiting for a generation's
        acks): an unexpected failure is recorded, then retried (``retry``, or waiting for the
        acks again); after JOB_TASK_ATTEMPTS failures in a row the job fails with the error.
        The failure is handled inside the task, so the detector sees it busy until then (nothing
        else, a scale-up say, starts in between)."""
        return self._spawn(self._owned(what, coro, retry))

    async def _owned(self, what: str, coro: Coroutine, retry: Callable[[], None] | None) -> None:
        try:
            await coro
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the owner acts on anything unexpected
            log.error("%s failed", what, exc_info=exc)
            why = f"{what} failed: {type(exc).__name__}: {exc}"
        self._job_task_failures += 1
        n = self._job_task_failures
        if n >= JOB_TASK_ATTEMPTS:
            await self._record("job_task_failed", f"{why} ({n} times in a row): the job fails")
            try:
                await self._finish(JobState.FAILED, why)
            except StateUnavailable as failed:
                log.error("job failed (%s); recording it waits for the state file: %s", why, failed)
            return
        if retry is not None:
            retry()
        await self._record("job_task_failed", f"{why} (attempt {n} of {JOB_TASK_ATTEMPTS}): retried")
        self._resettle()

    # -- views ---------------------------------------------------------------------------------------
    def _counts(self) -> dict[str, int]:
        counts = collections.Counter(str(n.row.state) for n in self.live.values())
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
                view.plan = messages.plan_for_status(job.plan)
        return view

    def status_dict(self) -> dict[str, Any]:
        s = self.status()
        nodes, next_after = self.list_nodes(0, STATUS_NODES)
        return {
            "job_id": s.job_id,
            "state": str(s.state),
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
                    "state": str(n.state),
                    "last_seen_s_ago": round(n.last_seen_s_ago, 3),
                    "attached": self.nodes[n.node_id].session is not None,
                }
                for n in nodes
            ],
        }

    # -- events and durability -------------------------------------------------------------------------
    def _new_event(
        self, kind: str, message: str, *, node_id: int = 0, durations: dict[str, float] | None = None
    ) -> EventRow:
        generation, step = self._position()
        return self.events.new(kind, message, generation=generation, step=step, node_id=node_id, durations=durations)

    def _publish(self, ev: EventRow) -> None:
        self.events.publish(ev)

    async def _record(self, kind: str, message: str, **kw: Any) -> EventRow:
        ev = self._new_event(kind, message, **kw)
        if not await self._save_fact("add_event", ev):
            self.ledger.unsaved_events.append(ev)  # written by the next resync, with this id
        self._publish(ev)
        return ev

    async def events_since(self, since_id: int) -> list[EventRow]:
        recent = self.events.since(since_id)
        if recent is not None:
            return recent
        try:
            return await self.store.call("events_since", since_id)
        except StoreError as exc:
            raise MasterError("UNAVAILABLE", f"events since {since_id}: {exc}") from None

    def watch(self, *, include_steps: bool = False) -> asyncio.Queue:
        return self.events.watch(include_steps=include_steps)

    def unwatch(self, q: asyncio.Queue) -> None:
        self.events.unwatch(q)

    async def _save_fact(self, method: str, *args: Any) -> bool:
        return await self.ledger.save(method, *args)

    def _require_store(self) -> None:
        self.ledger.require()

    def _command(self, node_id: int, kind: str, **body: Any) -> CommandRow:
        return self.ledger.command(node_id, self.generation, kind, **body)

    async def _commit_and_send(
        self, rows: list[CommandRow], events: list[EventRow], nodes: list[NodeRow], save_job: bool = True
    ) -> list[PendingCommand]:
        return await self.ledger.commit_and_send(self.job if save_job else None, nodes, rows, events, self.nodes)

    @contextlib.contextmanager
    def _transaction(self):
        """A persist-then-send transition: refused while the state file cannot be written, and
        its in-memory changes undone when it fails (its commit, or anything else)."""
        self._require_store()
        job, saved = self.job, copy.deepcopy(self.job)
        rows = {i: dataclasses.replace(n.row) for i, n in self.nodes.items()}
        ctx = self.ctx
        try:
            yield
        except BaseException:
            self.job = job
            if job is not None:
                job.__dict__.update(saved.__dict__)
            for node_id, row in rows.items():
                if node_id in self.nodes:
                    self.nodes[node_id].row.__dict__.update(row.__dict__)
            self._pipelines = messages.plan_pipelines(job.plan) if job is not None else ()
            self.ctx = ctx
            self.metrics.generation.set(self.generation)
            self._update_node_metrics()
            raise

    async def retry_store(self) -> None:
        """While the state file cannot be written: every ``state_retry_s`` write everything the
        master holds in one transaction; on success record the recovery and carry on with what
        was deferred (a paused job's restore, the end of a finished job)."""
        if not self.ledger.retry_due():
            return
        failure = await self.ledger.resync(self.job, [n.row for n in self.nodes.values()])
        if failure is None:
            return
        await self._record("state_store_recovered", f"the state file is writable again (after: {failure})")
        job = self.job
        if job is not None and job.state == JobState.PAUSED:
            self._spawn(self._try_resume())
        elif job is not None and job.state in ACTIVE_JOB_STATES and job.step >= job.total_steps > 0:
            self._spawn(self._finish_reached())

    # -- progress (step reports) and acks -----------------------------------------------------------------
    # -- detection ------------------------------------------------------------------------------------------
