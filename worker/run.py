"""The worker's loop across generations: start, train, reconfigure, finish.

:class:`Worker` drives one :class:`~oobleck.worker.engine.TrainingEngine` from the commands of
the agent (:class:`~oobleck.worker.agent_link.AgentLink`); :mod:`oobleck.worker.main` owns the
process (logging, the link, closing). Behaviour:

- ``start``: parse the job spec, convert the plan, take the rank of (node, slot) -- slot ``i``
  of a node holds the ``i``-th rank listed for that node -- join the generation's rendezvous
  (the agent's TCPStore; the generation's keys are derived from the plan's rendezvous secret and
  its values tagged with it: :class:`~oobleck.worker.engine.SecretKeyStore`), build the engine
  and, when the plan says ``restore_from_checkpoint``, load the job's latest checkpoint. Then
  ``report_ready``.
- Training runs from the engine's committed step up to ``spec.steps``. After each step every
  worker reports it (the agent forwards the lowest slot's), logs one line, and checkpoints every
  ``checkpoint.interval_steps`` (in the background: only the copy to host memory stalls).
  Commands are polled between steps.
- ``reconfigure`` with a newer generation: :meth:`TrainingEngine.reconfigure` (new process
  group, new rank, layer copies), then ``report_ready(regroup_s, copy_s)``. The engine's
  committed step is authoritative; a different ``resume_step`` in the plan is logged.
  A plan without this worker: the engine is closed and the worker waits for ``stop`` (the agent
  stops such workers).
- A step that fails on a communication error (a peer died: gloo raises when its socket closes,
  or the collective timeout expires; the engine raises :class:`~oobleck.worker.engine.CommFailed` or the error itself)
  is not committed anywhere; the worker leaves the process group at once
  (:meth:`TrainingEngine.abandon`: gloo closes a group's connections only once nothing refers
  to it, so this is done outside the ``except`` block, whose traceback would keep it alive),
  which makes peers blocked on this rank fail too, and waits up to ``reconfigure_wait_s`` for
  the reconfiguration. A failure while reconfiguring is handled the same way (the next
  generation is awaited). A step every rank voted failed (a local error, group intact) is
  retried up to ``step_retries`` times in a row.
- A generation superseded while its rendezvous runs (a rank, or the agent hosting the store,
  died before everyone arrived): the worker waits for the other ranks and connects to the
  store in short polls, and gives up as soon as the agent has a newer command
  (:class:`~oobleck.worker.engine.RendezvousAbandoned`), instead of at the rendezvous timeout.
- Known limit: a peer that freezes without dying (a whole node stopped: its sockets stay open)
  blocks the survivors' transfers with it until the collective timeout
  (``OOBLECK_COLLECTIVE_TIMEOUT_S``), even once the master has sent the next generation. gloo
  offers no way out: a point-to-point ``Work.wait(timeout)`` fails the receive itself, aborting a
  gloo group does not wake a blocked operation, and destroying it waits for that operation. A
  frozen *worker* is caught by its agent's liveness probe and killed, which unblocks everyone.
- A reconfiguration that finds layers without any surviving copy (:class:`LayersLost`) is only
  accepted with ``restore_from_checkpoint``: every rank then loads the newest checkpoint that all
  ranks see complete. Without a checkpoint, a job still at step 0 starts fresh; otherwise the
  worker fails.
- After the last step: the final checkpoint (if configured) is written completely, then the
  last step is reported (so the master never stops a worker in the middle of it), and
  :meth:`run` returns 0. ``stop`` returns 0 at once (between steps).

Split commits: the commit vote is one all-reduce, so a peer dying exactly while it completes
can leave some ranks past the step and others not. A rank whose vote failed after all its
gradient all-reduces keeps its gradients; at the next reconfiguration it applies the step with
the global gradient norm the committed ranks report (the engine's roll-forward), so nothing is
redone. Ranks without such gradients fall back on
:func:`~oobleck.worker.engine.choose_position`: the newest position at which every layer is
still carried wins and stale layers are copied again; when no position has every layer the
ranks report the layers lost and the job restores from its checkpoint.
"""

from __future__ import annotations

import gc
import logging
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from oobleck.common.jobspec import JobSpec, parse_job_spec
from oobleck.worker import checkpoint as ckpt
from oobleck.worker.agent_link import RECONFIGURE, START, STOP, AgentLink, AgentLinkError, WorkerCommand
from oobleck.worker.engine import LayersLost, StepFailed, StepResult, TrainingEngine
from oobleck.worker.layout import PlanSpec
from oobleck.worker.main import ENV_DEVICE, WorkerSettings
from oobleck.worker.planmsg import dist_init_from_proto, plan_from_proto

log = logging.getLogger(__name__)


HOLD_POLL_S = 0.05  # how often a held worker looks at its hold file (and waits for commands)


class WorkerError(RuntimeError):
    """The worker cannot go on (reported to the agent as a fatal error)."""


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


def choose_device(setting: str, slot: int, cuda_devices: int) -> tuple[str, str]:
    """``(device, backend)`` for a slot: ``cuda:<slot>`` with NCCL when CUDA is wanted or (with
    ``auto``) available, else CPU with gloo."""
    if setting == "cpu" or (setting == "auto" and cuda_devices == 0):
        return "cpu", "gloo"
    if cuda_devices == 0:
        raise WorkerError(f"{ENV_DEVICE}={setting}: no CUDA device is visible")
    if slot >= cuda_devices:
        raise WorkerError(f"slot {slot}: only {cuda_devices} CUDA devices are visible (one per slot)")
    return f"cuda:{slot}", "nccl"


def restorable_steps(directory: str | None, job_id: str) -> list[int]:
    """Steps of the complete checkpoints in ``directory`` that belong to job ``job_id`` (a
    checkpoint or a plan without a job id matches any), newest first."""
    if not directory:
        return []
    steps = []
    for step in ckpt.complete_steps(directory):
        try:
            owner = ckpt.read_manifest(ckpt.step_dir(directory, step))[0].get("job_id") or ""
        except ckpt.CheckpointError:
            owner = ""  # unreadable: found corrupt (and set aside) when it is tried
        if not (owner and job_id and owner != job_id):
            steps.append(step)
    return steps


class Worker:
    """One worker's life: see the module docstring. ``run()`` returns the exit status."""

    def __init__(self, link: AgentLink, settings: WorkerSettings) -> None:
        self.link = link
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
        self._failed_in_a_row = 0
        self._last: tuple[StepResult, float] | None = None  # last step and its samples/s
        self._holding: str | None = None  # where the worker is held by the hold file (logged once)

    # -- lifecycle ------------------------------------------------------------------------------

    def run(self) -> int:
        try:
            cmd = self.link.next_command(self.settings.start_wait_s)
            if cmd is None:
                raise WorkerError(f"no start command from the agent within {self.settings.start_wait_s:g}s")
            if cmd.kind == STOP:
                raise StopRequested(cmd.reason)
            if cmd.kind != START:
                raise WorkerError(f"expected a start command first, got {cmd.kind} (generation {cmd.generation})")
            self._start(cmd)
            while True:
                cmd = self.link.poll_command()
                if cmd is not None:
                    self._handle(cmd)
                elif self.engine is None:
                    self._await_command("this node is not in the current plan")
                elif self.engine.position.step >= self.spec.steps:
                    if self._finish():
                        return 0
                elif self._held("step", f"before step {self.engine.position.step + 1}"):
                    cmd = self.link.next_command(HOLD_POLL_S)
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

    def _held(self, point: str, where: str) -> bool:
        """True while the drill's hold file exists and names ``point`` (``step`` or ``copy``; an
        empty file means ``step``; ``step@N`` holds once N steps are done). See
        ``OOBLECK_WORKER_HOLD_FILE``."""
        path = self.settings.hold_file
        held = False
        if path is not None:
            try:
                points = Path(path).read_text().split() or ["step"]
            except OSError:  # absent (or unreadable): not held
                points = []
            held = point in points
            if point == "step" and not held and self.engine is not None:
                done = self.engine.position.step
                held = any(p.startswith("step@") and p[5:].isdigit() and done >= int(p[5:]) for p in points)
        if not held:
            if self._holding is not None:
                log.info("%s: released (%s)", self._who(), self._holding)
                self._holding = None
            return False
        if self._holding != where:
            self._holding = where
            log.info("%s: held %s by %s", self._who(), where, path)
        return True

    def _hold_before_copy(self) -> None:
        while self._held("copy", f"before the layer copy of generation {self.generation}"):
            time.sleep(HOLD_POLL_S)

    def _superseded(self) -> str | None:
        """Why a generation's rendezvous in progress should be given up: the agent already has a
        newer command (a rank died before arriving; the master moved on)."""
        return "the agent has a newer command waiting" if self.link.has_command() else None

    def _who(self) -> str:
        rank = "-" if self.rank is None else self.rank
        return f"node {self.node_id} slot {self.slot} rank {rank} gen {self.generation}"

    # -- commands -------------------------------------------------------------------------------

    def _handle(self, cmd: WorkerCommand) -> None:
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
            cmd = self.link.next_command(left)
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

    def _start(self, cmd: WorkerCommand) -> None:
        self.spec = parse_job_spec(cmd.job_spec_yaml)
        if cmd.node_id:
            if self.node_id and cmd.node_id != self.node_id:
                log.warning("start names node %d, the environment %d: using the start's", cmd.node_id, self.node_id)
            self.node_id = cmd.node_id
        self.generation = cmd.generation
        plan = plan_from_proto(cmd.plan)
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
        if not self._join(cmd, plan, rank):
            self._await_command(f"joining generation {cmd.generation} failed")

    def _reconfigure(self, cmd: WorkerCommand) -> bool:
        """Move to the generation of ``cmd``; False when it failed on a communication error (the
        process group is left, the caller waits for the next generation)."""
        plan = plan_from_proto(cmd.plan)
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
            return self._join(cmd, plan, rank)
        log.info("%s: reconfiguring to generation %d as rank %d of %d", old, cmd.generation, rank, plan.world_size)
        init = dist_init_from_proto(cmd.plan, self.backend, self.settings.collective_timeout_s)
        t0 = time.perf_counter()
        try:
            phases: dict[str, float] | None = self.engine.reconfigure(
                plan, rank, init, before_copy=self._hold_before_copy
            )
        except LayersLost as exc:
            if not cmd.plan.restore_from_checkpoint:
                raise WorkerError(f"generation {cmd.generation}: {exc}, and the plan does not restore") from exc
            log.warning("%s: %s: restoring every layer from the checkpoint", old, exc)
            phases = {"regroup_s": time.perf_counter() - t0}
        except RuntimeError as exc:
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

    def _join(self, cmd: WorkerCommand, plan: PlanSpec, rank: int) -> bool:
        """Build a new engine for ``plan`` (a fresh process, or one that left and is back);
        layers carried by others are copied in by the constructor."""
        init = dist_init_from_proto(cmd.plan, self.backend, self.settings.collective_timeout_s)
        t0 = time.perf_counter()
        try:
            self.engine = TrainingEngine(
                self.spec,
                plan,
                rank,
                init,
                device=self.device,
                interrupt=self._superseded,
                restore=bool(cmd.plan.restore_from_checkpoint),
            )
        except LayersLost as exc:
            raise WorkerError(f"generation {cmd.generation}: a new process cannot restore lost layers: {exc}") from exc
        except RuntimeError as exc:
            log.warning("%s: joining generation %d failed: %s", self._who(), cmd.generation, exc)
            self.engine = None
        if self.engine is None:  # outside the except block (see _step)
            if dist.is_initialized():
                dist.destroy_process_group()
            gc.collect()  # the half-built engine holds the groups: their connections close with it
            return False
        self.rank = rank
        regroup_s = time.perf_counter() - t0
        restore_s = self._restore_or_leave(cmd)
        if restore_s is None:
            return False
        self._ready(cmd, regroup_s=regroup_s, copy_s=restore_s)
        return True

    def _restore_or_leave(self, cmd: WorkerCommand) -> float | None:
        """Restore when this generation must (see :meth:`_must_restore`); the seconds it took. A
        restore that fails on a communication error leaves the generation *and drops the engine*:
        its state may be half restored, so the process joins the next generation as a new one
        (carrying nothing) rather than offering that state to its peers. None then."""
        if not self._must_restore(cmd):
            return 0.0
        try:
            return self._restore(cmd)
        except WorkerError:
            raise
        except RuntimeError as exc:
            log.warning("%s: restoring generation %d failed: %s", self._who(), cmd.generation, exc)
        engine, self.engine = self.engine, None  # outside the except block (see _step)
        engine.abandon()
        engine.close()
        gc.collect()
        return None

    def _restore(self, cmd: WorkerCommand) -> float:
        """Collective: load the newest checkpoint of this job that every rank sees complete and
        whose files all match its manifest. A corrupt one is reported, set aside (rank 0) and the
        next older one tried. With no checkpoint at all, a job at step 0 starts fresh."""
        engine, spec = self.engine, self.spec
        t0 = time.perf_counter()
        self._wait_checkpoint()
        directory = spec.checkpoint.dir if spec.checkpoint is not None else None
        world = dist.get_world_size()
        seen: list[Any] = [None] * world
        dist.all_gather_object(seen, restorable_steps(directory, engine.plan.job_id))
        # A checkpoint being published right now may be visible to some ranks only.
        common = sorted(set.intersection(*(set(s) for s in seen)), reverse=True)
        tried = []
        for step in common:
            root = ckpt.step_dir(Path(directory), step)
            try:
                engine.load_checkpoint(root)
                problem = None
            except ckpt.CheckpointError as exc:
                problem = (isinstance(exc, ckpt.CheckpointCorrupt), str(exc))
            problems: list[Any] = [None] * world
            dist.all_gather_object(problems, problem)
            bad = [p for p in problems if p is not None]
            if not bad:
                log.info("%s: restored the checkpoint of step %d from %s", self._who(), step, directory)
                return time.perf_counter() - t0
            tried.append(f"{root.name}: {bad[0][1]}")
            log.error("%s: checkpoint %s cannot be restored (%s): trying an older one", self._who(), root, bad[0][1])
            if self.rank == 0 and any(corrupt for corrupt, _ in bad):
                ckpt.quarantine(directory, root)
        if tried:
            raise WorkerError(f"generation {cmd.generation}: no checkpoint could be restored: {'; '.join(tried)}")
        if engine.position.step != 0:
            where = directory or "the job spec names no checkpoint directory"
            raise WorkerError(
                f"generation {cmd.generation}: the plan restores from a checkpoint, but there is none ({where})"
            )
        if cmd.plan.restore_from_checkpoint:
            where = directory or "the job spec names no checkpoint directory"
            log.warning("%s: no checkpoint to restore from (%s): starting from step 0", self._who(), where)
        return time.perf_counter() - t0

    def _must_restore(self, cmd: WorkerCommand) -> bool:
        """The plan says so, or no rank carried any training state into this generation (every
        process is new: a generation that replaced a restoring one before it restored, say).
        Training never starts from scratch while the job has a checkpoint."""
        return bool(cmd.plan.restore_from_checkpoint) or self.engine.fresh

    def _ready(self, cmd: WorkerCommand, *, regroup_s: float, copy_s: float) -> None:
        step = self.engine.position.step
        if step != cmd.plan.resume_step:
            log.warning(
                "%s: the plan resumes at step %d, the committed step is %d: continuing from step %d",
                self._who(),
                cmd.plan.resume_step,
                step,
                step,
            )
        log.info("%s: ready at step %d (regroup %.3fs, copy %.3fs)", self._who(), step, regroup_s, copy_s)
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
        except RuntimeError as exc:  # communication: a peer is gone (or the collective timed out)
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
            except ckpt.CheckpointError:
                raise
            except RuntimeError as exc:
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
