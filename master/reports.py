"""What nodes report about the job: step reports (progress of the current generation, see
:mod:`~oobleck.master.progress`) and command acks (a part of :class:`~oobleck.master.core.Master`).
"""

from __future__ import annotations

import logging

from oobleck.master.progress import STALE, GenerationProgress
from oobleck.master.records import Ack, NodeRuntime
from oobleck.master.states import ACTIVE_JOB_STATES, NodeState, move_node

log = logging.getLogger(__name__)


class ReportsMixin:
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
            self.events.publish_step(self.progress.generation, committed, loss, samples_per_s)
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
            self.ledger.unsaved_acks.append((command_id, ok, error))
        if not ok:
            log.warning("node %d: command %d (%s) failed: %s", node_id, command_id, pc.row.kind, error)
        node = self.nodes.get(node_id)
        if pc.row.kind == "drain" and node is not None and node.row.state == NodeState.DRAINING:
            move_node(node.row, NodeState.DRAINED, node.row.reason)  # out of every plan until undrained
            await self._save_fact("save_node", node.row)
            self._update_node_metrics()
        pc.profile_json = profile_json
        if pc.row.kind == "profile" and ok:
            self._spawn(self._cache_profile(pc))
        if not pc.future.done():
            pc.future.set_result(Ack(ok, error, dict(phases or {}), step))
