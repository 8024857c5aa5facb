"""The node's worker processes: spawn, stop, probe, and the channel's view of them.

One worker per slot, each in its own session (:mod:`oobleck.agent.processes`). Commands for a
worker wait in its queue as :class:`WorkerOrder` values until the worker's ``Attach`` stream
(:mod:`oobleck.agent.channel`) turns them into messages. Every state change is handed to the
pool's ``report`` callback (the agent tells the master). Liveness is decided by the pure
:func:`~oobleck.agent.supervision.decide_worker`; what a failure means for the node is the
agent's business (:meth:`WorkerPool.check` only returns the failed worker).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from oobleck.agent.config import AgentConfig
from oobleck.agent.processes import kill_processes_now, spawn_worker, stop_processes
from oobleck.agent.supervision import LivenessConfig, Verdict, WorkerProbe, decide_worker, read_proc_state
from oobleck.common.worker_link import (
    ENV_AGENT_PID,
    ENV_AGENT_SOCKET,
    ENV_HEARTBEAT_INTERVAL_S,
    ENV_NODE_ID,
    ENV_SLOT,
    ENV_WORK_DIR,
    STOP,
)

log = logging.getLogger(__name__)


class WorkerState(enum.Enum):
    """A worker's state as the master is told it."""

    STARTING = "starting"
    RUNNING = "running"
    EXITED = "exited"
    HUNG = "hung"


@dataclass(frozen=True)
class WorkerOrder:
    """A command for one worker (the channel turns it into a ``WorkerCommand`` message)."""

    kind: str  # START, RECONFIGURE or STOP (oobleck.common.worker_link)
    generation: int
    plan: Any = field(default=None, repr=False)  # the master's Plan message, relayed as it came
    job_spec_yaml: str = field(default="", repr=False)  # start only
    node_id: int = 0  # start only
    reason: str = ""  # stop only


@dataclass(frozen=True)
class StepReport:
    """A worker's report of a finished training step."""

    slot: int
    generation: int
    step: int
    loss: float
    samples_per_s: float
    samples: int


@dataclass(eq=False)
class Worker:
    slot: int
    proc: subprocess.Popen
    started_at: float
    commands: asyncio.Queue[WorkerOrder] = field(default_factory=asyncio.Queue)
    last_heartbeat_at: float | None = None
    attached: bool = False
    stopping: bool = False  # its exit is expected: not a failure
    exit_reported: bool = False
    ready: bool = False  # reported ready for a generation: its start-up allowance is over


def worker_env(
    socket_path: Path, node_id: int, slot: int, work_dir: Path, heartbeat_interval_s: float
) -> dict[str, str]:
    """A worker's environment: the agent's, and how to reach the agent (common.worker_link)."""
    env = dict(os.environ)
    env.update(
        {
            ENV_AGENT_SOCKET: str(socket_path),
            ENV_AGENT_PID: str(os.getpid()),
            ENV_NODE_ID: str(node_id),
            ENV_SLOT: str(slot),
            ENV_WORK_DIR: str(work_dir),
            ENV_HEARTBEAT_INTERVAL_S: f"{heartbeat_interval_s:g}",
        }
    )
    return env


#: ``report(worker, state, exit_code, detail)``: tell the master.
Report = Callable[[Worker, WorkerState, int, str], None]


class WorkerPool:
    """The agent's workers by slot. ``lock`` serialises starting, stopping and failing them."""

    def __init__(self, config: AgentConfig, report: Report, node_id: Callable[[], int]) -> None:
        self._config = config
        self._report = report
        self._node_id = node_id  # for log lines
        self._liveness = LivenessConfig(config.liveness_timeout_s, config.startup_timeout_s)
        self.workers: dict[int, Worker] = {}
        self.lock = asyncio.Lock()

    def live(self) -> list[Worker]:
        """The workers not being stopped."""
        return [w for w in self.workers.values() if not w.stopping]

    def spawn(self, slot: int, first: WorkerOrder, env: Mapping[str, str]) -> Worker:
        """Start the worker of ``slot`` with ``first`` waiting in its queue (raises OSError)."""
        proc = spawn_worker(self._config.worker_argv, env)
        worker = Worker(slot=slot, proc=proc, started_at=time.monotonic())
        worker.commands.put_nowait(first)
        self.workers[slot] = worker
        log.info("node %d: slot %d: worker pid %d spawned", self._node_id(), slot, proc.pid)
        self._report(worker, WorkerState.STARTING, 0, "")
        return worker

    async def stop_locked(
        self,
        reason: str,
        generation: int,
        *,
        kill_now: bool,
        only: list[Worker] | None = None,
        polite: bool = False,
    ) -> None:
        """Stop every worker, or those of ``only`` that are still workers here (the caller
        holds ``lock``). ``polite`` (the master's Stop or Drain, or a plan without this node):
        the workers get ``stop_grace_s`` to act on the stop order and exit 0 before SIGTERM."""
        workers = list(self.workers.values())
        if only is not None:
            workers = [w for w in workers if w in only]
        if not workers:
            return
        log.info("node %d: stopping %d workers (%s)", self._node_id(), len(workers), reason)
        stop = WorkerOrder(STOP, generation, reason=reason)
        for worker in workers:
            if not worker.stopping:
                worker.stopping = True
                worker.commands.put_nowait(stop)
        grace_s = self._config.stop_grace_s if polite else 0.0
        await stop_processes([w.proc for w in workers], self._config.stop_timeout_s, kill_now=kill_now, grace_s=grace_s)
        for worker in workers:
            if not worker.exit_reported:
                worker.exit_reported = True
                self._report(worker, WorkerState.EXITED, worker.proc.returncode or 0, reason)
            if self.workers.get(worker.slot) is worker:
                del self.workers[worker.slot]

    def check(self, now: float) -> tuple[Worker, Verdict, str] | None:
        """Probe every running worker; a finished one (status 0) is reported, the first failed
        or hung one returned with its verdict and the reason."""
        for worker in list(self.workers.values()):
            if worker.stopping:
                continue
            exit_code = worker.proc.poll()
            # /proc is a pseudo file system (no disk I/O): read on the loop.
            proc_state = read_proc_state(worker.proc.pid) if exit_code is None else None
            probe = WorkerProbe(worker.started_at, worker.last_heartbeat_at, exit_code, proc_state, worker.ready)
            verdict, reason = decide_worker(now, probe, self._liveness)
            if verdict is Verdict.FINISHED:
                worker.stopping = True
                worker.exit_reported = True
                log.info("node %d: slot %d: worker finished", self._node_id(), worker.slot)
                self._report(worker, WorkerState.EXITED, 0, reason)
            elif verdict in (Verdict.EXITED, Verdict.HUNG):
                return worker, verdict, reason
        return None

    def attach(self, slot: int, pid: int) -> Worker:
        """The worker of ``slot`` opening its command stream (LookupError: none expected)."""
        worker = self.workers.get(slot)
        if worker is None or worker.stopping:
            raise LookupError(f"slot {slot}: no worker of this agent expects to attach")
        if worker.attached:
            raise LookupError(f"slot {slot}: a worker is already attached")
        if pid != worker.proc.pid:
            log.warning("slot %d: attach from pid %d, spawned pid %d (a wrapper?)", slot, pid, worker.proc.pid)
        worker.attached = True
        worker.last_heartbeat_at = time.monotonic()
        log.info("node %d: slot %d: worker pid %d attached", self._node_id(), slot, worker.proc.pid)
        self._report(worker, WorkerState.RUNNING, 0, "")
        return worker

    def touch(self, slot: int) -> Worker | None:
        """The running worker of ``slot``, now known alive (any call proves the process runs)."""
        worker = self.workers.get(slot)
        if worker is None or worker.stopping:
            return None
        worker.last_heartbeat_at = time.monotonic()
        return worker

    def reporting_slot(self) -> int | None:
        """The slot whose step reports are forwarded (the lowest running one)."""
        live = [w.slot for w in self.live()]
        return min(live) if live else None

    def kill_now(self) -> None:
        """Synchronous last resort: SIGKILL every worker."""
        kill_processes_now([w.proc for w in self.workers.values()])
