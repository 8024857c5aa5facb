"""Profiling a job before it is planned, when its spec has no ``profile:`` and the cache has
none for its model and node kind (a part of :class:`~oobleck.master.core.Master`).

The job is PROFILING while the first plannable node's agent measures the profile (a ``Profile``
command, acked with the profile). A measured profile is cached next to the state file when it
arrives, whoever still waits for it; a measurement that is under way is joined, never repeated.
If the measuring node dies, another one measures; any other failure fails the job with the reason.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from typing import Any

from oobleck.master import messages, planning, profiles
from oobleck.master.records import MasterError, NodeLost, PendingCommand, StateUnavailable
from oobleck.master.states import JobState, move_job
from oobleck.master.store import JobRow

log = logging.getLogger(__name__)


class ProfilingMixin:
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
                state=JobState.PROFILING,
                reason=f"measuring the profile of {spec.model.name} on node {node.node_id}",
                generation=self.generation,
                plan=b"",
                plan_json={},
                step=0,
                total_steps=spec.steps,
            )
            self._set_plan(None)
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
            if job is None or job.job_id != job_id or job.state != JobState.PROFILING:
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
                except NodeLost as lost:
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
                    move_job(self.job, JobState.FAILED, why)
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
            row = self._command(node.node_id, "profile", spec_yaml=spec_yaml)
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
                raise NodeLost(node_id)
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

            yaml_text = messages.profile_spec_of(pc.row.payload)
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
