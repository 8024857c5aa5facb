"""Varuna's policy: a checkpoint every k steps; any failure restarts the job from the last checkpoint.

Under ``legacy_bookkeeping`` it reproduces the research simulator's checkpoint and rollback accounting
(see :class:`oobleck.sim.compat.Compat`).
"""

from __future__ import annotations

from oobleck.sim.compat import INTENT, Compat
from oobleck.sim.events import Event, Kind
from oobleck.sim.inputs import SystemInputs, Trace
from oobleck.sim.policy_oobleck import OobleckSimulator
from oobleck.sim.results import Step


class VarunaSimulator(OobleckSimulator):
    """Checkpoint every k steps; any failure restarts the job from the last checkpoint."""

    system = "varuna"

    def __init__(self, inputs: SystemInputs, trace: Trace, compat: Compat = INTENT) -> None:
        super().__init__(inputs, trace, compat)
        self.counter = 0
        self.removed_since_step = False
        self.last_ckpt_ms: int | None = None  # research: segments starting at/after this are rolled back
        self.ckpt_counter = 0  # intent: step counter at the last successful checkpoint
        self.ckpt_index = 0  # intent: len(self.completed) at the last successful checkpoint
        self.ckpt_token = 0
        self.ckpt_open: tuple[int, int] | None = None  # intent: (token, start_ms) of the checkpoint running

    def global_rendezvous_s(self) -> float:
        return self.inp.restart_s_at(self.lookup_nodes)  # a (re)start of the whole job

    def failure_rendezvous_s(self) -> float:
        return self.inp.restart_s_at(self.lookup_nodes)

    def node_lost(self, node: str) -> None:
        if self.legacy:
            self.removed_since_step = True
            if not self.inp.no_rollback:
                for s in self.completed:
                    if self.last_ckpt_ms is None or s.seg_start_ms >= self.last_ckpt_ms:
                        s.outcome = "lost"
            self.counts["restarts"] += 1
            self.start_rendezvous(Kind.GLOBAL_RENDEZVOUS, self.failure_rendezvous_s())
            return
        if self.status not in ("running", "rendezvous", "checkpoint"):
            return
        if self.ckpt_open is not None:  # the checkpoint being written is incomplete: it fails
            self.ckpt_intervals.append((self.ckpt_open[1], self.now))
            self.ckpt_open = None
            self.counts["failed_checkpoints"] += 1
        self.discard_step()
        if not self.inp.no_rollback:
            for s in self.completed[self.ckpt_index :]:
                s.outcome = "lost"
            self.counter = self.ckpt_counter
        self.counts["restarts"] += 1
        self.start_rendezvous(Kind.GLOBAL_RENDEZVOUS, self.failure_rendezvous_s())

    def after_step(self, step: Step) -> None:
        self.counter += 1
        k = self.inp.checkpoint_interval_steps
        ckpt_ms = round(self.inp.checkpoint_s * 1000)
        if self.legacy:
            self._after_step_research(k, ckpt_ms)
            return
        if self.counter % k != 0:
            self.start_step(self.now)
            return
        self.counts["checkpoints"] += 1
        self.ckpt_token += 1
        self.ckpt_open = (self.ckpt_token, self.now)
        self.status = "checkpoint"
        self.q.push(self.now + ckpt_ms, Kind.CHECKPOINT, (self.version, self.ckpt_token))

    def _after_step_research(self, k: int, ckpt_ms: int) -> None:
        if self.counter % k != 0 and not self.removed_since_step:
            self.start_step(self.now)
            return
        self.removed_since_step = False
        self.counts["checkpoints"] += 1
        resume_ms = self.now + ckpt_ms
        done_ms = resume_ms + ckpt_ms  # the research simulators' checkpoint-done event
        self.q.push(done_ms, Kind.CHECKPOINT, None)
        if self._checkpoint_fails(done_ms):
            if not self.inp.no_rollback:
                self.counts["failed_checkpoints"] += 1
                self.counter = max(0, self.counter - k)
                for s in self.completed[-k:]:
                    s.outcome = "lost"
        else:
            self.last_ckpt_ms = resume_ms
        self.ckpt_intervals.append((self.now, resume_ms))
        self.prev_completion_ms = resume_ms  # the next segment starts after the pause
        self.start_step(resume_ms)

    def _checkpoint_fails(self, done_ms: int) -> bool:
        if self.compat.array_checkpoint_check:
            for ev in self.q.array():
                if ev.kind == Kind.REMOVE:
                    return True
                if ev.kind == Kind.CHECKPOINT:
                    return False
            return False
        return any(ev.kind == Kind.REMOVE and ev.time <= done_ms for ev in self.q.array())

    def _on_checkpoint_done(self, ev: Event) -> None:
        if self.legacy or ev.data is None or self.ckpt_open is None:
            return
        version, token = ev.data
        if version != self.version or token != self.ckpt_open[0]:
            return
        self.ckpt_intervals.append((self.ckpt_open[1], self.now))
        self.ckpt_open = None
        self.ckpt_counter = self.counter
        self.ckpt_index = len(self.completed)
        self.status = "running"
        self.start_step(self.now)

    def close_open_checkpoint(self, end_ms: int) -> None:
        if self.ckpt_open is not None:
            self.ckpt_intervals.append((self.ckpt_open[1], end_ms))


__all__ = ["VarunaSimulator"]
