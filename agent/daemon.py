"""The agent daemon: its lifecycle, and the glue between the master, the commands and the workers.

Long-lived tasks under one ``asyncio.TaskGroup``, each owned by :func:`~oobleck.agent.tasks.owned`
(a failure is logged at ERROR and stops the agent with status 1):

- master: registration and the session stream (:mod:`oobleck.agent.session`);
- commands: applied one at a time, each at most once (:mod:`oobleck.agent.commands`);
- supervisor: probes the workers every ``probe_interval_s`` (:mod:`oobleck.agent.workers`,
  deciding with the pure :func:`~oobleck.agent.supervision.decide_worker`); a failed or hung
  worker makes the node failed (WorkerReport + NodeFailure) and the other workers are stopped;
- signals: SIGTERM / SIGINT while training is a leave notice (the master drains the node),
  otherwise or a second time they stop the workers (SIGTERM -> deadline -> SIGKILL) and exit 0;
  a Kill drill SIGKILLs them and exits 1 without acking;
- background: the watcher of the side tasks (:class:`~oobleck.agent.tasks.Background`).

Workers talk to the agent through :mod:`oobleck.agent.channel` on a Unix socket; their ready
reports are folded by the pure :func:`~oobleck.agent.readiness.decide_ready`. The agent also
hosts a torch TCPStore for the rendezvous of generations whose plan starts on this node
(:mod:`oobleck.agent.store`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from pathlib import Path

from oobleck.agent import channel as worker_channel
from oobleck.agent.commands import CommandRunner
from oobleck.agent.config import AgentConfig
from oobleck.agent.errors import FatalError, KillRequested, ShutdownRequested
from oobleck.agent.probes import gpu_memory_bytes, parse_gpu_memory_mib
from oobleck.agent.readiness import Pending, Readiness, ReadyReport, decide_ready
from oobleck.agent.session import MasterSession, Registration
from oobleck.agent.store import create_store, store_listen_host
from oobleck.agent.supervision import Verdict
from oobleck.agent.tasks import Background, owned
from oobleck.agent.workdir import WorkDir
from oobleck.agent.workers import StepReport, Worker, WorkerPool, WorkerState, worker_env
from oobleck.common.auth import TokenFileError, read_token_file
from oobleck.common.tls import ClientTls, aio_channel, is_loopback_host, split_host_port

log = logging.getLogger(__name__)

# Names other modules and tests imported from here before the split.
__all__ = ["Agent", "_create_store", "parse_gpu_memory_mib", "store_listen_host"]
_create_store = create_store

LEAVE_POLL_S = 0.1  # while leaving: how often the agent looks whether its workers are out of the plan
LEAVE_FLUSH_S = 1.0  # ... and how long it waits for its last messages to reach the master


class Agent:
    """One node's agent. ``await Agent(config, token).run()`` returns the exit status."""

    def __init__(self, config: AgentConfig, token: str) -> None:
        self.config = config
        self.session = MasterSession(
            config,
            token,
            on_registered=self._on_registered,
            on_command=self._on_command,
            progress=lambda: (self.last_generation, self.last_command_id),
        )
        self.pool = WorkerPool(config, self._report_worker, lambda: self.node_id)
        self.commands = CommandRunner(self)
        self.background = Background()
        self.last_command_id = 0
        self.last_generation = 0
        self.job_spec_yaml = ""
        self.pending: Pending | None = None  # a Start or Reconfigure waiting for its workers
        self.failed_reason = ""
        self.leaving = False  # SIGTERM received: no new start is accepted
        self.work_dir = Path()
        self.socket_path = Path()
        self._stop_requested: asyncio.Event | None = None
        self._store = None

    @property
    def node_id(self) -> int:
        return self.session.node_id

    # -- top level -------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._stop_requested = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop_requested.set)
        loop.add_signal_handler(signal.SIGHUP, self._request_token_reload)
        status = 0
        killed = False
        server = None
        channel = None
        dirs = None
        try:
            dirs = await asyncio.to_thread(WorkDir.prepare, self.config.work_dir)
            self.work_dir, self.socket_path = dirs.path, dirs.socket_path
            server = await worker_channel.start_server(self, str(self.socket_path))
            master_host, _ = split_host_port(self.config.master)
            try:
                self._store, self.session.store_port, where = await asyncio.to_thread(
                    create_store,
                    self.config.address,
                    self.config.store_port,
                    master_on_loopback=is_loopback_host(master_host),
                )
            except (OSError, RuntimeError) as exc:  # torch's DistNetworkError is a RuntimeError
                log.error("rendezvous store: cannot listen on port %d: %s", self.config.store_port, exc)
                return 1
            self.session.gpu_memory_bytes = await asyncio.to_thread(gpu_memory_bytes)
            log.info("rendezvous store listening on %s, port %d", where, self.session.store_port)
            tls = None
            if self.config.tls:
                tls = ClientTls(self.config.tls_ca_file, self.config.tls_cert_file, self.config.tls_key_file)
            # The token goes as explicit per-call metadata rather than through the channel's
            # interceptor: grpc.aio files a multi-kind client interceptor under unary-unary only,
            # and intercepted streams leave pending tasks behind when cancelled.
            channel = aio_channel(self.config.master, token=None, tls=tls, allow_insecure=self.config.allow_insecure)
            try:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(owned("master", self.session.run(channel)), name="master")
                    tg.create_task(owned("commands", self.commands.run()), name="commands")
                    tg.create_task(owned("supervisor", self._supervise_loop()), name="supervisor")
                    tg.create_task(owned("signals", self._wait_for_stop()), name="signals")
                    tg.create_task(owned("background", self.background.watch()), name="background")
            except* ShutdownRequested:
                log.info("shutting down (signal)")
            except* KillRequested:
                log.warning("kill drill: workers killed, exiting with status 1")
                status, killed = 1, True
            except* FatalError as group:
                log.error("%s", group.exceptions[0])
                status = 1
        finally:
            await self.stop_workers("agent shutting down", kill_now=killed)
            await self.background.cancel()
            if server is not None:
                await server.stop(grace=0.2)
            if channel is not None:
                await channel.close()
            self._store = None
            if dirs is not None:
                await asyncio.to_thread(dirs.clean_up)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
        return status

    def _request_token_reload(self) -> None:
        """SIGHUP: re-read the token file (off the event loop); later calls use the new token (the
        master accepts the old one for its rotation grace period)."""
        self.background.start(self._reload_token(), "token-reload")

    async def _reload_token(self) -> None:
        try:
            token = await asyncio.to_thread(read_token_file, self.config.token_file)
        except TokenFileError as exc:
            log.error("token not reloaded (the current one stays in use): %s", exc)
            return
        changed = self.session.set_token(token)
        log.warning("token file re-read: %s", "a new token" if changed else "unchanged")

    def emergency_cleanup(self) -> None:
        """Synchronous last resort (the event loop died): SIGKILL every worker."""
        self.pool.kill_now()

    async def _wait_for_stop(self) -> None:
        """The first SIGTERM / SIGINT while this node trains is a pre-emption or maintenance
        notice: the agent tells the master it is leaving (the master drains it at a step
        boundary, so no step is lost) and exits once its workers are out of the plan, or after
        ``leave_timeout_s``. A second signal, or a node without workers, exits at once."""
        assert self._stop_requested is not None
        await self._stop_requested.wait()
        self._stop_requested.clear()
        if self.pool.live() and self.config.leave_timeout_s > 0:
            self.leaving = True
            wait_s = self.config.leave_timeout_s
            log.warning(
                "node %d: SIGTERM: leaving; asking the master to drain this node (up to %gs)", self.node_id, wait_s
            )
            self.session.leaving("agent received SIGTERM (pre-emption or maintenance)", wait_s)
            deadline = time.monotonic() + wait_s
            # Until the master's drain (or a plan without this node) has stopped the workers.
            while self.pool.workers and not self._stop_requested.is_set() and time.monotonic() < deadline:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop_requested.wait(), LEAVE_POLL_S)
            if self.pool.workers:
                log.warning("node %d: not drained within %gs: stopping the workers", self.node_id, wait_s)
            else:
                log.info("node %d: drained: leaving", self.node_id)
                await self.session.flush(LEAVE_FLUSH_S)  # the drain's ack
        raise ShutdownRequested()

    # -- the master's side -----------------------------------------------------------------

    async def _on_registered(self, reg: Registration) -> None:
        """Before the session takes the node id the master answered."""
        if self.node_id and reg.node_id != self.node_id and self.leaving:
            # Declared dead while leaving: this node is going away, it does not join again.
            raise ShutdownRequested()
        if self.node_id and reg.node_id != self.node_id:
            # The master declared this node dead or lost its state: a new node to it, whose
            # command ids and generations start afresh. Messages still queued belong to the old
            # node (a NodeFailure would fail the new one): dropped. The old workers are stopped
            # in the background: stopping may take up to stop_timeout_s (a node failure may be
            # stopping them already, holding the workers lock), and the new node must open its
            # session and heartbeat at once or the master declares it dead too.
            log.warning("master gave node id %d (was %d): joining as a spare", reg.node_id, self.node_id)
            self.session.new_node()
            self.pending = None
            old = list(self.pool.workers.values())
            why = f"node id changed from {self.node_id} to {reg.node_id}"
            self.background.start(self.stop_workers(why, only=old), "stop-old-workers")
            self.last_command_id = 0
            self.last_generation = 0
        if reg.job_spec_yaml:
            self.job_spec_yaml = reg.job_spec_yaml

    def _on_command(self, command) -> None:
        self.commands.queue.put_nowait(command)

    def _report_worker(self, worker: Worker, state: WorkerState, exit_code: int = 0, detail: str = "") -> None:
        self.session.report_worker(worker.slot, worker.proc.pid, state, exit_code, detail)

    # -- workers ---------------------------------------------------------------------------

    def worker_env(self, slot: int) -> dict[str, str]:
        """The environment of the worker of ``slot``: the agent's, and how to reach it."""
        return worker_env(self.socket_path, self.node_id, slot, self.work_dir, self.config.worker_heartbeat_interval_s)

    async def stop_workers(
        self, reason: str, *, kill_now: bool = False, only: list[Worker] | None = None, polite: bool = False
    ) -> None:
        async with self.pool.lock:
            await self.stop_workers_locked(reason, kill_now=kill_now, only=only, polite=polite)

    async def stop_workers_locked(
        self, reason: str, *, kill_now: bool, only: list[Worker] | None = None, polite: bool = False
    ) -> None:
        """Stop every worker (nothing is pending then), or those of ``only`` that are still
        this agent's workers; the caller holds the pool's lock."""
        if only is None:
            self.pending = None
        await self.pool.stop_locked(reason, self.last_generation, kill_now=kill_now, only=only, polite=polite)

    async def _supervise_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.probe_interval_s)
            failed = self.pool.check(time.monotonic())
            if failed is not None:
                await self._node_failure(*failed)

    async def _node_failure(self, worker: Worker, verdict: Verdict, reason: str) -> None:
        async with self.pool.lock:
            if self.pool.workers.get(worker.slot) is not worker or worker.stopping:
                return  # replaced or stopped meanwhile
            detail = f"slot {worker.slot} (pid {worker.proc.pid}): {reason}"
            log.error("node %d: generation %d: node failed: %s", self.node_id, self.last_generation, detail)
            state = WorkerState.HUNG if verdict is Verdict.HUNG else WorkerState.EXITED
            worker.exit_reported = verdict is Verdict.EXITED
            self._report_worker(worker, state, worker.proc.returncode or 0, reason)
            self.session.node_failure(detail)
            self.failed_reason = detail
            pending, self.pending = self.pending, None
            if pending is not None:  # the start or reconfiguration cannot complete on this node
                self.session.ack(pending.command_id, pending.generation, error=f"node failed: {detail}")
            await self.stop_workers_locked(f"node failure: {detail}", kill_now=False)

    # -- worker channel callbacks (called by oobleck.agent.channel) ------------------------

    def worker_for_attach(self, slot: int, pid: int) -> Worker:
        return self.pool.attach(slot, pid)

    def on_worker_heartbeat(self, slot: int) -> None:
        self.pool.touch(slot)

    def on_worker_step(self, report: StepReport) -> None:
        if self.pool.touch(report.slot) is None or report.slot != self.pool.reporting_slot():
            return  # only the lowest slot's reports go to the master: every step once
        self.session.report_step(report)

    def on_worker_ready(self, report: ReadyReport) -> None:
        worker = self.pool.touch(report.slot)
        if worker is None:
            return
        worker.ready = True
        log.info(
            "node %d: slot %d: ready for generation %d (regroup %.3fs, copy %.3fs)",
            self.node_id, report.slot, report.generation, report.regroup_s, report.copy_s,
        )  # fmt: skip
        state, decision, _ = decide_ready(self.pending, report)
        if decision is Readiness.READY:
            assert state is not None
            self.pending = None
            phases = (state.regroup_s, state.copy_s)
            self.session.ack(state.command_id, state.generation, phases=phases, step=state.step)
        else:
            self.pending = state

    def on_worker_error(self, slot: int, generation: int, message: str, fatal: bool) -> None:
        worker = self.pool.touch(slot)
        if worker is None:
            return
        log.error(
            "node %d: slot %d: generation %d: worker error%s: %s",
            self.node_id, slot, generation, " (fatal)" if fatal else "", message,
        )  # fmt: skip
        if not fatal:
            self._report_worker(worker, WorkerState.RUNNING, 0, message)
            return
        pending = self.pending
        if pending is not None and pending.generation == generation:
            self.pending = None
            self.session.ack(pending.command_id, pending.generation, error=f"slot {slot}: {message}")
        self.background.start(self._node_failure(worker, Verdict.EXITED, f"worker error: {message}"), "node-failure")
