"""Job control: submit (plan and start, or profile first), finish, cancel, and the operator's
node actions (drain, undrain, kill drill) -- a part of :class:`~oobleck.master.core.Master`.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

from oobleck.master import generations, planning, profiles
from oobleck.master.records import MasterError, NodeRuntime, StateUnavailable
from oobleck.master.states import ACTIVE_JOB_STATES, TERMINAL_JOB_STATES, JobState, NodeState, move_job, move_node
from oobleck.master.store import JobRow

log = logging.getLogger(__name__)


class JobsMixin:
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
        from oobleck.common.modelconfig import validate_model_config  # imports no torch
        from oobleck.common.validate import ConfigError

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
                state=JobState.STARTING,
                reason="waiting for workers to start",
                generation=generation,
                plan=b"",
                plan_json=ctx.to_json(),
                step=0,
                total_steps=spec.steps,
            )
            self._set_plan(layout.plan)
            self.loss = self.samples_per_s = 0.0
            self.metrics.step.set(0)
            in_plan = set(layout.nodes)
            change = generations.install(self._states(), (), layout.nodes, spares_reason=generations.NOT_IN_PLAN)
            changed, rows = self._apply(change, layout.plan)
            ev = self._new_event(
                kind,
                f"job {job_id} ({spec.name}): {len(layout.pipelines)} pipelines over {len(in_plan)} nodes, "
                f"{len(candidates) - len(in_plan) + len(odd)} spares, profile: {source}",
            )
            waits = await self._commit_and_send(rows, [ev], changed)
        self._new_progress(layout.nodes, 0)
        self._update_node_metrics()
        self._spawn_job_task(
            "waiting for the acks", self._settle(generation, waits, self.config.start_ack_timeout_s, {})
        )
        return job_id, generation

    def _is_profiling(self, job_id: str) -> bool:
        """Whether job ``job_id`` was PROFILING (its ``job_submitted`` event is already out)."""
        return self.job is not None and self.job.job_id == job_id and self.job.state == JobState.PROFILING

    async def _finish_reached(self) -> None:
        """The job reached its last step: it succeeded (retried by retry_store when the state
        file could not be written)."""
        job = self.job
        if job is None:
            return
        try:
            await self._finish(JobState.SUCCEEDED, f"reached step {job.step} of {job.total_steps}")
        except StateUnavailable as exc:
            log.warning("job %s reached its last step; recording that waits for the state file: %s", job.job_id, exc)

    async def _finish(self, state: JobState, reason: str) -> None:
        """End the job (stop its workers). Raises :class:`StateUnavailable` when that cannot be
        persisted (nothing changes then)."""
        async with self._plan_lock:
            job = self.job
            if job is None or job.state not in (*ACTIVE_JOB_STATES, JobState.PAUSED, JobState.PROFILING):
                return
            with self._transaction():
                move_job(job, state, reason)
                plan = [n for p in self.pipelines for n in p]
                why = f"job {state.lower()}"
                change = generations.release(self._states(), plan, why, (NodeState.ALIVE, NodeState.DRAINING))
                changed, rows = self._apply(change, stop_reason=reason)
                await self._commit_and_send(rows, [self._new_event(f"job_{state.lower()}", reason)], changed)
            self._lost.clear()
            self._drain.clear()
            self._pending_since = None
            self._update_node_metrics()

    async def drain_node(self, node_id: int) -> None:
        """Keep node ``node_id`` out of every plan until :meth:`undrain_node`: a spare at once; a
        node of the running plan after the next generation moved its work elsewhere."""
        node = self._existing(node_id)
        self._require_store()
        if node.row.state in (NodeState.DEAD, NodeState.DRAINED, NodeState.DRAINING):
            raise MasterError("FAILED_PRECONDITION", f"node_id: node {node_id} is {node.row.state}")
        if node.row.state == NodeState.SPARE:
            await self._set_node_state(
                node, NodeState.DRAINED, "drained by operator", "node_drained", "operator drained it"
            )
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
        if node.row.state != NodeState.DRAINED:
            raise MasterError("FAILED_PRECONDITION", f"node_id: node {node_id} is {node.row.state}, not drained")
        await self._set_node_state(node, NodeState.SPARE, "", "node_undrained", "operator undrained it: a spare again")

    async def _set_node_state(self, node: NodeRuntime, state: NodeState, reason: str, kind: str, message: str) -> None:
        """An operator's change of one node's state, persisted before it counts."""
        with self._transaction():
            move_node(node.row, state, reason)
            event = self._new_event(kind, f"{node.row.name}: {message}", node_id=node.row.node_id)
            await self._commit_and_send([], [event], [node.row], save_job=False)
        node.joined_s = self.clock()  # a spare again: the scale-up delay starts now
        self._update_node_metrics()

    async def kill_node(self, node_id: int) -> None:
        node = self._existing(node_id)
        if node.row.state == NodeState.DEAD:
            raise MasterError("FAILED_PRECONDITION", f"node_id: node {node_id} is already dead")
        row = self._command(node_id, "kill", reason="fault drill requested by operator")
        await self._commit_and_send(
            [row], [self._new_event("kill_requested", "fault drill", node_id=node_id)], [], False
        )

    async def cancel_job(self, reason: str) -> None:
        if self.job is None or self.job.state in TERMINAL_JOB_STATES:
            raise MasterError("FAILED_PRECONDITION", "no job to cancel")
        await self._finish(JobState.CANCELLED, reason or "cancelled by operator")
