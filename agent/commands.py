"""The master's commands: each applied at most once, in order, and acked or nacked.

Commands arrive as :class:`Command` values (:mod:`oobleck.agent.session` converts the
messages) and are applied one at a time. Command ids are increasing: a command whose id was
already applied gets its remembered ack again, one still being applied is ignored, and one of
a generation older than the newest applied one is refused (:func:`decide_command`, pure). A
bad command is nacked with an error naming the field, never fatal; only the Kill drill ends
the agent. A Start or Reconfigure is acked once every worker reported ready
(:mod:`oobleck.agent.readiness`); the others when applied. Plans are checked by the shared
rules of :mod:`oobleck.common.planrules`, and then this node's ranks against its slots.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Container
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from oobleck.agent.errors import AgentStop, CommandError, KillRequested
from oobleck.agent.profiling import ProfileFailed, run_profiler
from oobleck.agent.readiness import Pending
from oobleck.agent.workers import WorkerOrder
from oobleck.common.jobspec import parse_job_spec
from oobleck.common.planrules import PlanRuleError, PlanShape, check_plan, node_ranks
from oobleck.common.profilekey import node_device
from oobleck.common.validate import ConfigError
from oobleck.common.version import version
from oobleck.common.worker_link import RECONFIGURE, START

if TYPE_CHECKING:
    from oobleck.agent.daemon import Agent

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Command:
    """One command of the master, as plain values."""

    command_id: int
    generation: int
    kind: str | None  # start, reconfigure, stop, drain, profile, kill; None: empty or unknown
    plan: Any = field(default=None, repr=False)  # start, reconfigure: the Plan message, relayed as it came
    shape: PlanShape | None = field(default=None, repr=False)  # ... its values, for the checks
    job_spec_yaml: str = field(default="", repr=False)  # start, profile
    reason: str = ""  # stop, drain, kill


class Dedupe(enum.Enum):
    APPLY = "apply"
    REFUSE = "refuse"  # nack with the reason
    REPEAT_ACK = "repeat ack"  # applied before: send its ack again
    IGNORE = "ignore"  # being applied, or its ack is forgotten
    DROP = "drop"  # cannot be acked (an ack names a positive command id)


def decide_command(
    command: Command, last_command_id: int, last_generation: int, acked: Container[int]
) -> tuple[Dedupe, str]:
    """Pure: what to do with ``command`` given the newest command id and generation applied
    and the command ids whose acks are remembered."""
    cid = command.command_id
    if cid <= 0:
        return Dedupe.DROP, f"ignored a command with command_id {cid} (must be > 0)"
    if cid <= last_command_id:
        if cid in acked:
            return Dedupe.REPEAT_ACK, f"command {cid} delivered again: repeating its ack"
        return Dedupe.IGNORE, f"command {cid} already being applied: ignored"
    if command.kind is None:
        return Dedupe.REFUSE, f"body: empty or unknown command (this agent is {version()})"
    if command.generation < last_generation:
        return Dedupe.REFUSE, f"generation: {command.generation} is older than {last_generation}: ignored"
    return Dedupe.APPLY, f"command {cid}: {command.kind} for generation {command.generation}"


class CommandRunner:
    """Applies the agent's commands in arrival order (the command half of :class:`Agent`)."""

    def __init__(self, agent: Agent) -> None:
        self._agent = agent
        self.queue: asyncio.Queue[Command] = asyncio.Queue()

    async def run(self) -> None:
        while True:
            await self.handle(await self.queue.get())

    async def handle(self, command: Command) -> None:
        a = self._agent
        cid, generation = command.command_id, command.generation
        decision, why = decide_command(command, a.last_command_id, a.last_generation, a.session.acked)
        if decision is Dedupe.DROP:
            log.warning("node %d: %s", a.node_id, why)
            return
        if decision is Dedupe.REPEAT_ACK:
            log.info("node %d: %s", a.node_id, why)
            a.session.repeat_ack(cid)
            return
        if decision is Dedupe.IGNORE:
            log.info("node %d: %s", a.node_id, why)
            return
        a.last_command_id = cid
        if decision is Dedupe.REFUSE:
            a.session.ack(cid, generation, error=why)
            return
        log.info("node %d: %s", a.node_id, why)
        try:
            await self._apply(command)
        except CommandError as exc:
            a.session.ack(cid, generation, error=str(exc))
        except AgentStop:
            raise
        except Exception as exc:  # a bad command must never take the agent down
            log.exception("node %d: command %d failed", a.node_id, cid)
            a.session.ack(cid, generation, error=f"internal error: {exc!r}")

    async def _apply(self, command: Command) -> None:
        a = self._agent
        cid, generation, kind = command.command_id, command.generation, command.kind
        if kind == "start":
            await self._start(command)
        elif kind == "reconfigure":
            await self._reconfigure(command)
        elif kind in ("stop", "drain"):
            await a.stop_workers(f"{kind}: {command.reason or kind}", polite=True)
            a.last_generation = max(a.last_generation, generation)
            a.session.ack(cid, generation)
        elif kind == "profile":
            await self._profile(command)
        elif kind == "kill":
            log.warning("node %d: kill drill (%s): SIGKILL workers", a.node_id, command.reason)
            await a.stop_workers(f"kill: {command.reason}", kill_now=True)
            raise KillRequested()

    def _check_plan(self, where: str, command: Command) -> list[int] | None:
        """Check the command's plan; return this node's ranks, or None when the node is not in it."""
        a = self._agent
        if command.shape is None:
            raise CommandError(f"{where}.plan: missing")
        try:
            check_plan(command.shape, generation=command.generation)
        except PlanRuleError as exc:
            raise CommandError(f"{where}.plan.{exc}") from None
        mine = node_ranks(command.shape, a.node_id)
        if mine is not None and len(mine) != a.config.slots:
            raise CommandError(f"{where}.plan.ranks: node {a.node_id} has {len(mine)} ranks but {a.config.slots} slots")
        return None if mine is None else list(mine)

    async def _start(self, command: Command) -> None:
        a = self._agent
        cid, generation = command.command_id, command.generation
        if a.leaving:
            raise CommandError("start: this node is leaving (its agent received SIGTERM)")
        mine = self._check_plan("start", command)
        if mine is None:
            raise CommandError(f"start.plan.ranks: node {a.node_id} is not in the plan")
        spec_yaml = command.job_spec_yaml or a.job_spec_yaml
        if not spec_yaml:
            raise CommandError("start.job_spec_yaml: empty and no job spec came with registration")
        try:
            parse_job_spec(spec_yaml)
        except ConfigError as exc:
            raise CommandError(f"start.job_spec_yaml: {exc}") from None
        a.job_spec_yaml = spec_yaml
        first = WorkerOrder(START, generation, plan=command.plan, job_spec_yaml=spec_yaml, node_id=a.node_id)
        async with a.pool.lock:
            await a.stop_workers_locked("replaced by a new start", kill_now=False)
            a.failed_reason = ""
            a.last_generation = generation
            try:
                for slot in range(a.config.slots):
                    a.pool.spawn(slot, first, a.worker_env(slot))
            except OSError as exc:
                await a.stop_workers_locked("start failed", kill_now=True)
                raise CommandError(f"worker_command: cannot start {a.config.worker_argv[0]!r}: {exc}") from None
            # Acked when every worker reports ready (joined, layers copied or restored).
            a.pending = Pending(cid, generation, waiting=frozenset(a.pool.workers))
        log.info("node %d: generation %d: started %d workers (ranks %s)", a.node_id, generation, len(mine), mine)

    async def _reconfigure(self, command: Command) -> None:
        a = self._agent
        cid, generation = command.command_id, command.generation
        mine = self._check_plan("reconfigure", command)
        if mine is None:
            await a.stop_workers(f"not in the plan of generation {generation}: spare", polite=True)
            a.last_generation = generation
            a.session.ack(cid, generation)
            return
        live = a.pool.live()
        if len(live) != a.config.slots:
            why = a.failed_reason or "no workers were started"
            raise CommandError(f"reconfigure: {len(live)} of {a.config.slots} workers running ({why})")
        if a.pending is not None:
            log.info("node %d: generation %d supersedes %d", a.node_id, generation, a.pending.generation)
        a.last_generation = generation
        a.pending = Pending(cid, generation, waiting=frozenset(w.slot for w in live))
        order = WorkerOrder(RECONFIGURE, generation, plan=command.plan)
        for worker in live:
            worker.commands.put_nowait(order)

    async def _profile(self, command: Command) -> None:
        a = self._agent
        try:
            parse_job_spec(command.job_spec_yaml)
        except ConfigError as exc:
            raise CommandError(f"profile.job_spec_yaml: {exc}") from None
        try:
            text = await run_profiler(
                command.job_spec_yaml,
                a.work_dir,
                a.config.profile_timeout_s,
                tag=f"profile-{command.command_id}",
                device_key=node_device(a.config.slots, a.session.gpu_memory_bytes),
            )
        except ProfileFailed as exc:
            raise CommandError(f"profile: {exc}") from None
        a.session.ack(command.command_id, command.generation, profile_json=text)
