"""Generations after the first: reconfiguration after deaths and drains, scale-up onto spares,
pause and restore from a checkpoint, and waiting for a generation's acks (a part of
:class:`~oobleck.master.core.Master`).

Every generation comes into force the same way (:meth:`RolloutMixin._install`): the pure
:func:`~oobleck.master.generations.install` says which nodes change state and which get which
command, and the plan, node states, commands and event are written in one transaction before
any command is sent. :meth:`RolloutMixin._settle` then waits for the acks (each means the node's
workers are ready at a step) and the job runs, or the nodes that missed the deadline are failed
and the detector starts the next generation.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from oobleck.master import generations, planning
from oobleck.master.records import Ack, AckOutcome, PendingCommand, StateUnavailable, degradation
from oobleck.master.states import ACTIVE_JOB_STATES, JobState, NodeState, move_job, move_node
from oobleck.master.store import CommandRow, NodeRow

log = logging.getLogger(__name__)


class RolloutMixin:
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
        if job is None or job.generation != generation or job.state not in (JobState.STARTING, JobState.RECONFIGURING):
            return  # superseded, paused or ended meanwhile
        reconfiguring = job.state == JobState.RECONFIGURING
        durations = {**durations, **outcome.phases} if reconfiguring else durations
        if reconfiguring:
            self.metrics.observe_phases(durations)
        if not outcome.complete:
            dead = sorted(n for n in outcome.bad if self.nodes[n].row.state == NodeState.DEAD)
            missing = sorted(n for n in outcome.bad if self.nodes[n].row.state != NodeState.DEAD)
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
        move_job(job, JobState.RUNNING)
        self._job_task_failures = 0
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

    async def _ensure_ctx(self) -> planning.PlanContext:
        if self.ctx is None:
            assert self.job is not None
            self.ctx = await asyncio.to_thread(planning.context_from_json, self.planner, self.job.plan_json)
        return self.ctx

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
            if job is None or job.state != JobState.RUNNING or self._lost or self._drain:
                return
            added = tuple(
                n for n in added if self.nodes[n].row.state == NodeState.SPARE and not self.nodes[n].failed_reason
            )
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
            job.generation = generation
            move_job(job, JobState.RECONFIGURING, reason)
            self._set_plan(layout.plan)
            t1 = self.clock()
            in_plan = set(layout.nodes)
            change = generations.install(self._states(), old_nodes, layout.nodes, left=left, drain=drain)
            changed, rows = self._apply(change, layout.plan)
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
        if job is None or job.state != JobState.RUNNING:
            return
        reason = degradation(
            len(self.pipelines),
            int(job.plan_json.get("ft", 0)),
            sorted(
                n.row.node_id
                for n in self.nodes.values()
                if n.row.state == NodeState.SPARE
                and n.session is not None
                and n.failed_reason is None
                and not n.leaving
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
            move_job(job, JobState.PAUSED, reason)
            change = generations.release(self._states(), [n for p in self.pipelines for n in p], "job paused")
            changed, rows = self._apply(change, stop_reason=reason)
            self._set_plan(None)  # no plan in force while paused
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
            if job is None or job.state != JobState.PAUSED:
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
            self._spawn_job_task(
                "waiting for the acks", self._settle(generation, waits, self.config.start_ack_timeout_s, {})
            )

    async def _install_restore(self, layout: planning.PlannedLayout) -> list[PendingCommand]:
        """Persist and send the generation that restores a paused job from its checkpoint."""
        job = self.job
        generation = layout.plan.generation
        layout.plan.job_id = job.job_id
        job.generation = generation
        move_job(job, JobState.STARTING, "restoring from checkpoint")
        # The step stays the last one known until the workers report the restored position
        # (their acks, see _settle); the master does not read checkpoints itself.
        job.plan_json = {**job.plan_json, "restore_pending": True}
        self._set_plan(layout.plan)
        changed, rows = self._apply(generations.install(self._states(), (), layout.nodes), layout.plan)
        ev = self._new_event("job_resumed", f"generation {generation} restores from the latest checkpoint")
        return await self._commit_and_send(rows, [ev], changed)

    # -- installing a generation -----------------------------------------------------------------------
    def _states(self) -> dict[int, str]:
        return {n: node.row.state for n, node in self.nodes.items()}

    def _apply(
        self, change: generations.Install, plan: Any = None, *, stop_reason: str = ""
    ) -> tuple[list[NodeRow], list[CommandRow]]:
        """Carry out ``change`` in memory (inside a transaction): the node rows it moved, and the
        command rows for the current generation (not yet persisted or sent)."""
        changed = []
        for node_id, state, reason in change.moves:
            row = self.nodes[node_id].row
            move_node(row, state, reason)
            changed.append(row)
        rows = []
        for node_id, kind in change.commands:
            if kind in ("start", "reconfigure"):
                rows.append(
                    self._command(node_id, kind, plan=plan, spec_yaml=self.job.spec_yaml if kind == "start" else "")
                )
            else:  # drain, stop
                why = generations.DRAINED_BY_OPERATOR if kind == "drain" else stop_reason
                rows.append(self._command(node_id, kind, reason=why))
        return changed, rows
