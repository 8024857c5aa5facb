"""The worker's loop across generations: start, train, reconfigure, finish.

:class:`Worker` drives one :class:`~oobleck.worker.engine.TrainingEngine` from the agent's
commands (dataclasses from :class:`~oobleck.worker.commands.Inbox`) and reports to the agent
through its :class:`~oobleck.worker.agent_link.AgentLink`; :mod:`oobleck.worker.main` owns the
process (logging, the link, closing). What it does in each case (start, steps, reconfiguration,
a peer gone, a bug, the end) is described in docs/worker.md. In short:

- Training runs from the engine's committed step up to ``spec.steps``; after each step every
  worker reports it, logs one line, and checkpoints every ``checkpoint.interval_steps`` (in the
  background). Commands are applied between steps.
- A :class:`~oobleck.worker.failures.PeerGone` (a step, reconfiguration, restore or final
  checkpoint that failed communicating with peers) leaves the process group at once and waits up
  to ``reconfigure_wait_s`` for the next generation. A step every rank voted failed is retried
  up to ``step_retries`` times. Any other exception is a bug: it ends the worker (exit 1, the
  agent is told with the traceback).
- ``stop`` returns 0 (between steps); after the last step the final checkpoint is written, the
  last step reported and :meth:`Worker.run` returns 0.
"""

from __future__ import annotations

import gc
import logging
import time

import torch
import torch.distributed as dist

from oobleck.common.jobspec import JobSpec, parse_job_spec
from oobleck.worker import checkpoint as ckpt
from oobleck.worker.agent_link import AgentLink, AgentLinkError
from oobleck.worker.commands import RECONFIGURE, START, STOP, Command, Inbox
from oobleck.worker.drills import HOLD_POLL_S, HoldFile
from oobleck.worker.engine import TrainingEngine
from oobleck.worker.exchange import LayersLost
from oobleck.worker.failures import PeerGone, WorkerError
from oobleck.worker.layout import PlanSpec
from oobleck.worker.restore import restore_newest
from oobleck.worker.settings import WorkerSettings, choose_device
from oobleck.worker.step import StepFailed, StepResult

log = logging.getLogger(__name__)


class StopRequested(Exception):
    """The agent asked this worker to stop."""


def rank_of(plan: PlanSpec, node_id: int, slot: int) -> int | None:
    """This worker's global rank under ``plan``: the ``slot``-th rank of node ``node_id``;
    None when the node is not in the plan."""
    ranks = plan.ranks.get(node_id)
    if ranks is None:
        return None
    if not 0 <= slot < len(ranks):
        raise WorkerError(f"plan.ranks: node {node_id} has {len(ranks)} ranks, this worker is slot {slot}")
    return ranks[slot]


class Worker:
    """One worker's life: see the module docstring. ``run()`` returns the exit status."""

    def __init__(self, link: AgentLink, settings: WorkerSettings) -> None:
        self.link = link
        self.inbox = Inbox(link)
        self.settings = settings
        self.slot = link.slot
        self.node_id = link.node_id
        self.generation = 0
        self.rank: int | None = None
        self.spec: JobSpec | None = None
        self.engine: TrainingEngine | None = None
        cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
        self.device, self.backend = choose_device(settings.device, self.slot, cuda)
        if self.device == "cpu" and settings.torch_threads is not None:
            torch.set_num_threads(settings.torch_threads)
        self.hold = HoldFile(settings.hold_file, self._who)
        self._failed_in_a_row = 0
        self._last: tuple[StepResult, float] | None = None  # last step and its samples/s

    # -- lifecycle ------------------------------------------------------------------------------

    def run(self) -> int:
        try:
            cmd = self.inbox.next(self.settings.start_wait_s)
            if cmd is None:
                raise WorkerError(f"no start command from the agent within {self.settings.start_wait_s:g}s")
            if cmd.kind == STOP:
                raise StopRequested(cmd.reason)
            if cmd.kind != START:
                raise WorkerError(f"expected a start command first, got {cmd.kind} (generation {cmd.generation})")
            self._start(cmd)
            while True:
                cmd = self.inbox.poll()
                if cmd is not None:
                    self._handle(cmd)
                elif self.engine is None:
                    self._await_command("this node is not in the current plan")
                elif self.engine.position.step >= self.spec.steps:
                    if self._finish():
                        return 0
                elif self.hold.held("step", f"before step {self.engine.position.step + 1}", self.engine.position.step):
                    cmd = self.inbox.next(HOLD_POLL_S)
                    if cmd is not None:
                        self._handle(cmd)
                else:
                    self._step()
        except StopRequested as stop:
            log.info("%s: stopped by the agent (%s)", self._who(), stop)
            return 0

    def close(self) -> None:
        """Close the engine (waits for a background checkpoint). Safe to call twice."""
        engine, self.engine = self.engine, None
        if engine is not None:
            engine.close()

    def _superseded(self) -> str | None:
        """Why a generation's rendezvous in progress should be given up: the agent already has a
        newer command (a rank died before arriving; the master moved on)."""
        return "the agent has a newer command waiting" if self.inbox.waiting() else None

    def _who(self) -> str:
        rank = "-" if self.rank is None else self.rank
        return f"node {self.node_id} slot {self.slot} rank {rank} gen {self.generation}"

    # -- commands -------------------------------------------------------------------------------

    def _handle(self, cmd: Command) -> None:
        """Apply a command received between steps."""
        if cmd.kind == STOP:
            raise StopRequested(cmd.reason or "stop")
        if cmd.generation <= self.generation:
            log.info("%s: ignored %s for generation %d (not newer)", self._who(), cmd.kind, cmd.generation)
        elif cmd.kind != RECONFIGURE:
            log.warning("%s: ignored %s for generation %d while running", self._who(), cmd.kind, cmd.generation)
        elif not self._reconfigure(cmd):
            self._await_command(f"reconfiguration to generation {cmd.generation} failed")

    def _await_command(self, why: str) -> None:
        """Wait (up to ``reconfigure_wait_s``) for a newer generation and join it; stop raises
        StopRequested."""
        wait_s = self.settings.reconfigure_wait_s
        log.warning("%s: %s: waiting up to %gs for a reconfiguration", self._who(), why, wait_s)
        deadline = time.monotonic() + wait_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WorkerError(f"{why}, and no reconfiguration arrived within {wait_s:g}s")
            cmd = self.inbox.next(left)
            if cmd is None:
                continue
            if cmd.kind == STOP:
                raise StopRequested(cmd.reason or "stop")
            if cmd.kind != RECONFIGURE or cmd.generation <= self.generation:
                log.info("%s: ignored %s for generation %d", self._who(), cmd.kind, cmd.generation)
                continue
            if self._reconfigure(cmd):
                return
            why = f"reconfiguration to generation {cmd.generation} failed"
            deadline = time.monotonic() + wait_s

    # -- generations ----------------------------------------------------------------------------

    def _start(self, cmd: Command) -> None:
        self.spec = parse_job_spec(cmd.job_spec_yaml)
        if cmd.node_id:
            if self.node_id and cmd.node_id != self.node_id:
                log.warning("start names node %d, the environment %d: using the start's", cmd.node_id, self.node_id)
            self.node_id = cmd.node_id
        self.generation = cmd.generation
        plan = cmd.plan.plan
        rank = rank_of(plan, self.node_id, self.slot)
        if rank is None:
            raise WorkerError(f"plan.ranks: node {self.node_id} is not in the plan of generation {cmd.generation}")
        log.info(
            "%s: starting job %r (%d steps) as rank %d of %d on %s (%s)",
            self._who(),
            self.spec.name,
            self.spec.steps,
            rank,
            plan.world_size,
            self.device,
            self.backend,
        )
        if not self._join(cmd, rank):
            self._await_command(f"joining generation {cmd.generation} failed")

    def _reconfigure(self, cmd: Command) -> bool:
        """Move to the generation of ``cmd``; False when it failed on a communication error (the
        process group is left, the caller waits for the next generation)."""
        plan = cmd.plan.plan
        rank = rank_of(plan, self.node_id, self.slot)
        old = self._who()
        self.generation = cmd.generation
        if rank is None:
            log.info("%s: not in the plan of generation %d: leaving, waiting for stop", old, cmd.generation)
            self.rank = None
            if self.engine is not None:
                self.engine.abandon()
                self.close()
            return True
        if self.engine is None:
            return self._join(cmd, rank)
        log.info("%s: reconfiguring to generation %d as rank %d of %d", old, cmd.generation, rank, plan.world_size)
        init = cmd.plan.rendezvous.dist_init(self.backend, self.settings.collective_timeout_s)
        t0 = time.perf_counter()
        try:
            phases: dict[str, float] | None = self.engine.reconfigure(plan, rank, init)
        except LayersLost as exc:
            if not cmd.plan.restore_from_checkpoint:
                raise WorkerError(f"generation {cmd.generation}: {exc}, and the plan does not restore") from exc
            log.warning("%s: %s: restoring every layer from the checkpoint", old, exc)
            phases = {"regroup_s": time.perf_counter() - t0}
        except PeerGone as exc:
            log.warning("%s: reconfiguration to generation %d failed: %s", old, cmd.generation, exc)
            phases = None
        if phases is None:  # outside the except block (see _step)
            self.engine.abandon()
            return False
        self.rank = rank
        restore_s = self._restore_or_leave(cmd)
        if restore_s is None:
            return False
        self._ready(cmd, regroup_s=phases.get("regroup_s", 0.0), copy_s=phases.get("exchange_s", 0.0) + restore_s)
        return True

    def _join(self, cmd: Command, rank: int) -> bool:
        """Build a new engine for the plan of ``cmd`` (a fresh process, or one that left and is
        back); layers carried by others are copied in by the constructor."""
        init = cmd.plan.rendezvous.dist_init(self.backend, self.settings.collective_timeout_s)
        t0 = time.perf_counter()
        try:
            self.engine = TrainingEngine(
                self.spec,
                cmd.plan.plan,
                rank,
                init,
                device=self.device,
                interrupt=self._superseded,
                restore=cmd.plan.restore_from_checkpoint,
            )
        except LayersLost as exc:
            raise WorkerError(f"generation {cmd.generation}: a new process cannot restore lost layers: {exc}") from exc
        except PeerGone as exc:
            log.warning("%s: joining generation %d failed: %s", self._who(), cmd.generation, exc)
            self.engine = None
        if self.engine is None:  # outside the except block (see _step)
            if dist.is_initialized():
                dist.destroy_process_group()
            gc.collect()  # the half-built engine holds the groups: their connections close with it
            return False
        self.engine.faults = self.hold  # its later reconfigurations wait before the copy while held
        self.rank = rank
        regroup_s = time.perf_counter() - t0
        restore_s = self._restore_or_leave(cmd)
        if restore_s is None:
            return False
        self._ready(cmd, regroup_s=regroup_s, copy_s=restore_s)
        return True

    def _restore_or_leave(self, cmd: Command) -> float | None:
        """Restore when this generation must: the plan says so, or no rank carried any training
        state into it (every process is new: a generation that replaced a restoring one before
        it restored, say); training never starts from scratch while the job has a checkpoint.
        Returns the seconds it took. A restore that fails on a communication error leaves the
        generation *and drops the engine*: its state may be half restored, so the process joins
        the next generation as a new one (carrying nothing) rather than offering that state to
        its peers. None then."""
        if not (cmd.plan.restore_from_checkpoint or self.engine.fresh):
            return 0.0
        t0 = time.perf_counter()
        try:
            self._wait_checkpoint()
            directory = self.spec.checkpoint.dir if self.spec.checkpoint is not None else None
            restore_newest(
                self.engine,
                directory,
                generation=cmd.generation,
                required=cmd.plan.restore_from_checkpoint,
                who=self._who(),
            )
            return time.perf_counter() - t0
        except PeerGone as exc:
            log.warning("%s: restoring generation %d failed: %s", self._who(), cmd.generation, exc)
        engine, self.engine = self.engine, None  # outside the except block (see _step)
        engine.abandon()
        engine.close()
        gc.collect()
        return None

    def _ready(self, cmd: Command, *, regroup_s: float, copy_s: float) -> None:
        step = self.engine.position.step
        if step != cmd.plan.resume_step:
            log.warning(
                "%s: the plan resumes at step %d, the committed step is %d: continuing from step %d",
                self._who(),
                cmd.plan.resume_step,
                step,
                step,
            )
        exchanged = self.engine.last_exchange
        log.info(
            "%s: ready at step %d (regroup %.3fs, copy %.3fs; received %d layers, %d copies in all)",
            self._who(),
            step,
            regroup_s,
            copy_s,
            exchanged.get("received", 0),
            exchanged.get("copies", 0),
        )
        self.link.report_ready(cmd.generation, regroup_s=regroup_s, copy_s=copy_s, step=step)

    # -- steps ----------------------------------------------------------------------------------

    def _step(self) -> None:
        engine, spec = self.engine, self.spec
        step = engine.position.step
        t0 = time.perf_counter()
        try:
            result = engine.train_step()
        except StepFailed as exc:
            self._failed_in_a_row += 1
            if self._failed_in_a_row > self.settings.step_retries:
                raise WorkerError(f"step {step + 1} failed {self._failed_in_a_row} times in a row: {exc}") from exc
            log.warning("%s: %s: retrying", self._who(), exc)
            return
        except PeerGone as exc:  # a peer is gone (or the collective timed out)
            log.warning("%s: step %d abandoned: %s", self._who(), step + 1, exc)
            result = None
        if result is None:
            # Outside the except block: its traceback would keep the process groups alive, and
            # their connections open, which is what peers blocked on this rank wait for.
            engine.abandon()
            self._await_command(f"step {step + 1} failed")
            return
        self._failed_in_a_row = 0
        elapsed = time.perf_counter() - t0
        rate = result.samples / elapsed if elapsed > 0 else 0.0
        self._last = (result, rate)
        log.info(
            "%s: step %d/%d loss %.5f grad-norm %.4f %.1f samples/s (%.3fs)",
            self._who(),
            result.step,
            spec.steps,
            result.loss,
            result.grad_norm,
            rate,
            elapsed,
        )
        if result.step >= spec.steps:
            return  # reported by _finish, after the final checkpoint
        if spec.checkpoint is not None and result.step % spec.checkpoint.interval_steps == 0:
            self._wait_checkpoint()
            engine.save_checkpoint(spec.checkpoint.dir, wait=False)
        self._report(result, rate)

    def _finish(self) -> bool:
        """The last step is done: final checkpoint, last report. False when the checkpoint failed on
        a communication error and a new generation was joined (then it is retried)."""
        engine, spec = self.engine, self.spec
        if spec.checkpoint is not None:
            self._wait_checkpoint()
            try:
                path = engine.save_checkpoint(spec.checkpoint.dir, wait=True)
            except PeerGone as exc:
                log.warning("%s: final checkpoint failed: %s", self._who(), exc)
                path = None
            if path is None:  # outside the except block (see _step)
                engine.abandon()
                self._await_command("the final checkpoint failed")
                return False
            log.info("%s: final checkpoint %s", self._who(), path)
        if self._last is not None and self._last[0].step == engine.position.step:
            result, rate = self._last
            self._report(result, rate)
        else:  # reached through a reconfiguration or a restore: nothing trained here since
            self._report_position()
        log.info("%s: finished %d steps", self._who(), engine.position.step)
        return True

    def _report(self, result: StepResult, rate: float) -> None:
        try:
            self.link.report_step(
                self.generation,
                result.step,
                loss=result.loss,
                samples_per_s=rate,
                samples=result.step * self.spec.global_batch_size,
            )
        except AgentLinkError as exc:  # progress reports are best effort; the heartbeat is separate
            log.warning("%s: step report failed: %s", self._who(), exc)

    def _report_position(self) -> None:
        step = self.engine.position.step
        try:
            self.link.report_step(self.generation, step, samples=step * self.spec.global_batch_size)
        except AgentLinkError as exc:
            log.warning("%s: step report failed: %s", self._who(), exc)

    def _wait_checkpoint(self) -> None:
        """Join this rank's background checkpoint; a failed one is reported, training goes on."""
        try:
            self.engine.wait_checkpoint()
        except ckpt.CheckpointError as exc:
            log.error("%s: %s", self._who(), exc)
            try:
                self.link.report_error(self.generation, str(exc), fatal=False)
            except AgentLinkError as report_exc:
                log.warning("%s: could not report the checkpoint failure: %s", self._who(), report_exc)
