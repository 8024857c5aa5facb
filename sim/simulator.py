"""The shared simulator: replays a trace through the event loop, and runs nodes, rendezvous, steps.

:class:`Simulator` handles what every policy shares (nodes booting, becoming ready and leaving; one
rendezvous at a time; starting, rescheduling and discarding steps; the result at the end of the
trace). A subclass per system (``policy_oobleck``, ``policy_varuna``, ``policy_bamboo``) decides
what a lost node, a completed rendezvous and a completed step do.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from oobleck.sim.compat import INTENT, Compat
from oobleck.sim.events import Event, EventQueue, Kind
from oobleck.sim.inputs import SimInputError, SystemInputs, Trace
from oobleck.sim.results import Result, Step, breakdown

logger = logging.getLogger(__name__)

# Node states
BOOTING, READY, RUNNING, REMOVED = "booting", "ready", "running", "removed"
LIVE = (READY, RUNNING)


@dataclass
class _Rendezvous:
    token: int
    kind: Kind
    duration_s: float


class Simulator:
    """Shared engine: nodes, rendezvous, steps and accounting. Subclasses implement the policy."""

    system = ""

    def __init__(self, inputs: SystemInputs, trace: Trace, compat: Compat = INTENT) -> None:
        if inputs.system != self.system:
            raise SimInputError(f"system: inputs are for {inputs.system!r}, simulator is {self.system!r}")
        self.inp = inputs
        self.trace = trace
        self.compat = compat
        self.legacy = compat.legacy_bookkeeping
        self.stacked = compat.second_rendezvous_stops
        self.q = EventQueue(heap_ties=compat.heap_ties)
        self.now = 0
        self.state: dict[str, str] = {}
        self.incarnation: dict[str, int] = {}
        self.order: dict[str, None] = {}  # live (READY/RUNNING) nodes in the order they became ready
        self.status = "idle"  # idle | rendezvous | running | checkpoint | stopped
        self.version = 0  # configuration version; bumped at every rendezvous completion and stop
        self.step_token = 0
        self.step: Step | None = None
        self.step_ms: int | None = None
        self.steps: list[Step] = []  # every step started, in start order
        self.completed: list[Step] = []  # completed steps, in completion order
        self.first_start_ms: int | None = None
        self.prev_completion_ms: int | None = None  # where the next step's segment starts
        self.last_completion_ms: int | None = None
        self.lookup_nodes: int | None = None  # live nodes at the last step-time lookup
        # Intent: one rendezvous, re-armed by a new failure. Research: every start pushes a completion.
        self.rendezvous: _Rendezvous | None = None
        self.rdzv_token = 0
        self.participants: list[str] = []
        self.rdzv_since: int | None = None
        self.rdzv_intervals: list[tuple[int, int]] = []
        self.ckpt_intervals: list[tuple[int, int]] = []
        self.counts = {"reconfigurations": 0, "restarts": 0, "checkpoints": 0, "failed_checkpoints": 0, "stops": 0}
        self.stop_reason = ""

    # ----------------------------------------------------------------------------------- driver
    def run(self) -> Result:
        for ev in self.trace.events:
            self.q.push(ev.time_ms, Kind.ADD if ev.action == "add" else Kind.REMOVE, ev.node)
        end = self.trace.end_ms
        handlers = {
            Kind.ADD: self._on_add,
            Kind.REMOVE: self._on_remove,
            Kind.READY: self._on_ready,
            Kind.GLOBAL_RENDEZVOUS: self._on_rendezvous_done,
            Kind.LOCAL_RENDEZVOUS: self._on_rendezvous_done,
            Kind.STEP: self._on_step_done,
            Kind.CHECKPOINT: self._on_checkpoint_done,
        }
        while self.q:
            head = self.q.peek()
            if head is None or head.time >= end:  # hard stop: that event is not processed
                break
            ev = self.q.pop()
            self.now = ev.time
            handlers[ev.kind](ev)
        return self._result(end)

    # ----------------------------------------------------------------------------------- nodes
    def live(self) -> list[str]:
        return list(self.order)

    def _on_add(self, ev: Event) -> None:
        node = ev.data
        if self.state.get(node) in (BOOTING, READY, RUNNING):
            return  # already present: a duplicate add changes nothing
        self.state[node] = BOOTING
        self.incarnation[node] = self.incarnation.get(node, 0) + 1
        self.q.push(self.now + round(self.inp.node_startup_s * 1000), Kind.READY, (node, self.incarnation[node]))

    def _on_remove(self, ev: Event) -> None:
        node = ev.data
        was = self.state.get(node)
        if was in (None, REMOVED):
            return
        self.state[node] = REMOVED
        self.order.pop(node, None)
        if was == BOOTING and not self.legacy:
            return  # a node that never joined: nothing to recover
        self.node_lost(node)

    def _on_ready(self, ev: Event) -> None:
        node, incarnation = ev.data
        if self.state.get(node) != BOOTING or self.incarnation[node] != incarnation:
            return
        self.state[node] = READY
        self.order[node] = None
        if self.status in ("idle", "stopped"):
            self.start_rendezvous(Kind.GLOBAL_RENDEZVOUS, self.global_rendezvous_s())
        elif self.status == "rendezvous":
            if self.stacked:
                self.participants.append(node)
            # intent: the participants are the live nodes at completion, so it is in already
        else:
            self.ready_while_running(node)

    # ----------------------------------------------------------------------------------- rendezvous
    def start_rendezvous(self, kind: Kind, duration_s: float) -> None:
        """Start a rendezvous that completes ``duration_s`` from now (under intent: re-arm the pending one)."""
        if self.rdzv_since is None:
            self.rdzv_since = self.now
        if not self.legacy:
            self.discard_step()  # research: steps keep completing until the rendezvous completes
        self.status = "rendezvous"
        when = self.now + round(duration_s * 1000)
        if self.stacked:
            self.participants = self.live()
            self.q.push(when, kind, duration_s)
        else:
            self.rdzv_token += 1
            self.rendezvous = _Rendezvous(self.rdzv_token, kind, duration_s)
            self.q.push(when, kind, self.rdzv_token)

    def _on_rendezvous_done(self, ev: Event) -> None:
        if self.stacked:
            if any(self.state.get(n) not in LIVE for n in self.participants):
                # a participant left: restart for a full timeout from now
                self.participants = self.live()
                self.q.push(self.now + round(ev.data * 1000), ev.kind, ev.data)
                return
            participants, self.participants = self.participants, []
        else:
            if self.rendezvous is None or ev.data != self.rendezvous.token:
                return  # superseded by a later failure
            self.rendezvous = None
            participants = self.live()
        if self.rdzv_since is not None:
            self.rdzv_intervals.append((self.rdzv_since, self.now))
            self.rdzv_since = None
        self.version += 1
        self.discard_step()
        self.configure(participants)

    def stop(self, reason: str) -> None:
        if reason != self.stop_reason:
            logger.debug("t=%d ms %s stops: %s", self.now, self.system, reason)
        self.stop_reason = reason
        self.counts["stops"] += 1
        self.version += 1
        self.discard_step()
        self.status = "stopped"

    # ----------------------------------------------------------------------------------- steps
    def lookup_step_ms(self) -> int | None:
        nodes = len(self.order)
        self.lookup_nodes = nodes
        ms = self.inp.step_ms(nodes)
        return None if ms is None else max(1, ms)

    def start_step(self, at_ms: int) -> None:
        assert self.step_ms is not None
        if self.first_start_ms is None:
            self.first_start_ms = at_ms
            self.prev_completion_ms = at_ms
        assert self.prev_completion_ms is not None
        step = Step(at_ms, at_ms + self.step_ms, self.prev_completion_ms)
        self.steps.append(step)
        self.step = step
        self.step_token += 1
        if self.status != "rendezvous":
            self.status = "running"
        self.q.push(step.end_ms, Kind.STEP, (self.version, self.step_token))

    def reschedule_step(self, new_end_ms: int) -> None:
        assert self.step is not None
        self.step.end_ms = new_end_ms
        self.step_token += 1
        self.q.push(new_end_ms, Kind.STEP, (self.version, self.step_token))

    def discard_step(self) -> None:
        if self.step is not None:
            self.step.outcome = "lost"
            self.step.end_ms = self.now
            self.step = None

    def _on_step_done(self, ev: Event) -> None:
        version, token = ev.data
        if version != self.version or token != self.step_token or self.step is None:
            return
        delayed = self.delayed_completion_ms()
        if delayed is not None:
            self.reschedule_step(delayed)
            return
        step = self.step
        self.step = None
        step.outcome = "useful"
        self.completed.append(step)
        self.prev_completion_ms = self.now
        self.last_completion_ms = self.now
        self.after_step(step)

    def _on_checkpoint_done(self, ev: Event) -> None:
        """Only Varuna schedules checkpoints."""

    # ----------------------------------------------------------------------------------- policy hooks
    def global_rendezvous_s(self) -> float:
        return self.inp.global_rendezvous_s

    def ready_while_running(self, node: str) -> None:
        """A node became ready while training: it idles until the next rendezvous."""

    def delayed_completion_ms(self) -> int | None:
        """Bamboo: the in-flight step finishes later after a failover."""
        return None

    def node_lost(self, node: str) -> None:
        raise NotImplementedError

    def configure(self, participants: list[str]) -> None:
        raise NotImplementedError

    def after_step(self, step: Step) -> None:
        raise NotImplementedError

    # ----------------------------------------------------------------------------------- results
    def _result(self, end_ms: int) -> Result:
        if self.step is not None and not self.legacy:  # in flight at the hard stop: never completed
            self.step.end_ms = min(self.step.end_ms, end_ms)
            self.step.outcome = "lost"
        if self.rdzv_since is not None:
            self.rdzv_intervals.append((self.rdzv_since, end_ms))
        if self.status == "checkpoint":
            self.close_open_checkpoint(end_ms)
        kept = [s for s in self.completed if s.outcome == "useful"]
        samples = self.inp.batch_samples * len(kept)
        w0 = self.first_start_ms
        if w0 is None:
            w1 = w0 = 0
        elif self.legacy:
            w1 = self.last_completion_ms if self.last_completion_ms is not None else w0
        else:
            w1 = end_ms
        window_ms = max(0, w1 - w0)
        tput = samples / (window_ms / 1000) if window_ms > 0 else 0.0
        return Result(
            system=self.system,
            trace=self.trace.name,
            compat=self.compat.name,
            throughput_sps=tput,
            samples=samples,
            steps_completed=len(self.completed),
            steps_kept=len(kept),
            breakdown=breakdown(
                self.steps, self.ckpt_intervals, self.rdzv_intervals, w0, w1, self.redundant_fraction()
            ),
            model=self.inp.source.removeprefix("paper:"),
            **self.counts,
        )

    def close_open_checkpoint(self, end_ms: int) -> None:
        """Varuna: account a checkpoint still being written at the end."""

    def redundant_fraction(self) -> float:
        """Bamboo: the share of useful time spent on redundant computation."""
        return 0.0


__all__ = ["BOOTING", "LIVE", "READY", "REMOVED", "RUNNING", "Simulator"]
