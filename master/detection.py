"""Detection glue: the liveness facts handed to :func:`~oobleck.master.detect.decide` and the
spares handed to :func:`~oobleck.master.scaleup.decide_scale_up`, the detector loop that carries
out their answers (deaths, one reconfiguration per coalescing window, scale-up), and the purge
of dead nodes (a part of :class:`~oobleck.master.core.Master`).
"""

from __future__ import annotations

import asyncio
import logging
import time

from oobleck.master import membership
from oobleck.master.detect import DetectState, NodeLiveness, decide
from oobleck.master.records import Ack, ids_text
from oobleck.master.scaleup import ScaleUpState, decide_scale_up
from oobleck.master.states import ACTIVE_JOB_STATES, IN_PLAN_STATES, JobState, NodeState, move_node

log = logging.getLogger(__name__)

LAG_WINDOW_S = 2.0  # how long a late detector tick extends the heartbeat timeouts
PURGE_EVERY_S = 1.0


class DetectionMixin:
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

                def again() -> None:  # the deaths and drains are handled by the next attempt
                    for node_id, detect_s in lost.items():
                        self._lost.setdefault(node_id, detect_s)
                    self._drain.update(drain)
                    if self._pending_since is None:
                        self._pending_since = self.clock()

                self._reconfig_task = self._spawn_job_task("reconfiguration", self._reconfigure(lost, drain), again)
        elif decision.reconfigure:
            # A reconfiguration is in flight, or the state file cannot be written (a new plan
            # could not be persisted): keep the deaths pending for the next round.
            self._pending_since = decision.pending_since_s
        else:
            added, why = decide_scale_up(now, self.scale_state(), self.scale_config)
            if added:
                log.info("detector: %s", why)
                self._reconfig_task = self._spawn(self._owned_scale_up(added))

    async def _owned_scale_up(self, added: tuple[int, ...]) -> None:
        """A scale-up whose failure is recorded and not retried onto these spares in this
        generation (the job runs on as it is)."""
        generation = self.generation
        try:
            await self._scale_up(added)
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the owner acts on anything unexpected
            log.error("scale-up onto %s failed", list(added), exc_info=exc)
            why = f"{type(exc).__name__}: {exc}"
        self._scale_tried = (generation, frozenset(added))
        await self._record("scale_up_failed", f"spares {list(added)} stay spares: {why}")
        self._resettle()

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
                n.row.state in IN_PLAN_STATES,
                n.reattach_by_s,
                n.timeout_s,
                n.attached,
            )
            for n in self.live.values()
            if n.failed_reason is not None
            or n.detached_since_s is not None
            or n.reattach_by_s is not None
            or now - n.last_seen_s >= (n.timeout_s or default_s)
        )
        return DetectState(live, self._pending_since, self._lag_s)

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
        running = job is not None and job.state == JobState.RUNNING
        if not running or busy:  # no scale-up now: do not look at every node
            return ScaleUpState(job_running=running, busy=busy, spares=(), tried=None)
        plan_slots = {self.nodes[n].row.slots for p in self.pipelines for n in p if n in self.nodes}
        spares = tuple(
            (n.row.node_id, n.joined_s)
            for n in self.live.values()
            if n.row.state == NodeState.SPARE
            and n.failed_reason is None
            and not n.leaving
            and n.session is not None
            and n.row.slots in plan_slots
        )
        tried = None
        if self._scale_tried is not None and job is not None and self._scale_tried[0] == job.generation:
            tried = self._scale_tried[1]
        return ScaleUpState(job_running=running, busy=busy, spares=spares, tried=tried)

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
                 ids_text(gone))  # fmt: skip

    async def _declare_dead(self, node_id: int, why: str) -> None:
        await self._declare_dead_many([(node_id, why)])

    async def _declare_dead_many(self, deaths: list[tuple[int, str]] | tuple[tuple[int, str], ...]) -> None:
        """Declare nodes dead: in memory at once, then their rows, dropped commands and events in
        one write (a thousand deaths in one tick cost one transaction, not a thousand)."""
        now = self.clock()
        rows, events, spares_lost = [], [], False
        for node_id, why in deaths:
            node = self.nodes.get(node_id)
            if node is None or node.row.state == NodeState.DEAD:
                continue
            detect_s = max(0.0, now - node.last_seen_s)
            was = node.row.state
            move_node(node.row, NodeState.DEAD, why)
            node.dead_since_s = now
            self.live.pop(node_id, None)
            if node.session is not None:
                node.session.close("FAILED_PRECONDITION", f"node {node_id} declared dead: {why}")
                node.session = None
            for cmd_id in [c for c, pc in self.pending.items() if pc.row.node_id == node_id]:
                pc = self.pending.pop(cmd_id)
                if not pc.future.done():
                    pc.future.set_result(Ack(False, "node dead"))
            in_plan = was in IN_PLAN_STATES and any(node_id in p for p in self.pipelines)
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
            self.ledger.unsaved_events.extend(events)  # written by the next resync (with the nodes)
        for ev in events:
            self._publish(ev)
        if spares_lost:  # an idle spare gone (a plan node's death is judged after the next generation)
            await self._check_degraded()

    async def _fail_nodes(self, nodes: list[int], why: str) -> None:
        deaths = []
        for node_id in nodes:
            node = self.nodes.get(node_id)
            if node is not None and node.row.state != NodeState.DEAD:
                node.failed_reason = why
                deaths.append((node_id, why))
        await self._declare_dead_many(deaths)
