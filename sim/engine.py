"""Discrete-event simulation of a training cluster under a node add/remove trace.

One :class:`Simulator` subclass per fault-tolerance policy (Oobleck, Varuna, Bamboo). Time is integer
milliseconds. Events are ordered by ``(time, kind)`` with kinds in :class:`Kind` order; see
``sim/README.md`` for the model and the ``--compat`` presets.
"""

from __future__ import annotations

import heapq
import logging
from dataclasses import asdict, dataclass
from enum import IntEnum
from typing import Any

from oobleck.sim.inputs import SimInputError, SystemInputs, Trace

logger = logging.getLogger(__name__)


class Kind(IntEnum):
    """Event kinds; at equal times they are handled in this order."""

    ADD = 0
    REMOVE = 1
    READY = 2
    GLOBAL_RENDEZVOUS = 3
    LOCAL_RENDEZVOUS = 4
    STEP = 5
    CHECKPOINT = 6


@dataclass(frozen=True)
class Compat:
    """Which accidents of the published (research) simulators to reproduce.

    - ``heap_ties``: events with equal ``(time, kind)`` come out in binary-heap array order instead of
      the order they were scheduled in (FIFO).
    - ``array_checkpoint_check`` (Varuna, research bookkeeping only): a checkpoint fails when any
      pending removal precedes the checkpoint's completion event in the heap *array*, whatever their
      times; otherwise it fails when a removal is due before that event.
    - ``second_rendezvous_stops``: every failure pushes its own rendezvous completion and every
      completion re-packs the participant list and empties it, so a second completion still pending (a
      second failure inside the window) finds nobody and stops training although enough nodes are
      alive; a participant lost before completion restarts the rendezvous for a full timeout from the
      completion time. Intent: one rendezvous, re-armed from the latest failure.
    - ``legacy_bookkeeping``: the research simulators' accounting. Steps keep completing at the old
      rate until a rendezvous or restart completes (the step in flight then is lost); a node removed
      while still booting triggers a reconfiguration / restart (Bamboo: a slowdown); the average runs
      to the last step completion instead of the end of the trace and credits each non-zeroed step's
      segment. Varuna checkpoints after every step that follows a removal (during the restart window,
      on the old configuration), its checkpoint completion event is ``2 * checkpoint_s`` after the
      step, a failed checkpoint zeroes the latest ``k`` steps, and a rollback zeroes the steps whose
      segment starts at or after the last checkpoint. Bamboo never decrements its count of waiting
      nodes and slows down even when an idle node is lost. An out-of-memory Oobleck configuration runs
      an endless step instead of stopping.
    """

    name: str
    heap_ties: bool = False
    array_checkpoint_check: bool = False
    second_rendezvous_stops: bool = False
    legacy_bookkeeping: bool = False


INTENT = Compat("intent")
RESEARCH = Compat("research", True, True, True, True)
# The research simulators with FIFO tie-breaking only: the variant the published README quotes
# (GPT-3-6_7b Varuna on 10m: 0.255 -> 1.02 samples/s).
RESEARCH_FIFO = Compat("research-fifo", False, True, True, True)
COMPAT_PRESETS = {c.name: c for c in (INTENT, RESEARCH, RESEARCH_FIFO)}


def compat_preset(name: str) -> Compat:
    try:
        return COMPAT_PRESETS[name]
    except KeyError:
        raise SimInputError(f"compat: must be one of {', '.join(COMPAT_PRESETS)}, got {name!r}") from None


class _Event:
    __slots__ = ("data", "kind", "seq", "time")

    def __init__(self, time: int, kind: Kind, seq: int, data: Any) -> None:
        self.time = time
        self.kind = kind
        self.seq = seq
        self.data = data

    def __lt__(self, other: _Event) -> bool:
        if self.time != other.time:
            return self.time < other.time
        if self.kind != other.kind:
            return self.kind < other.kind
        return self.seq < other.seq


class EventQueue:
    """A binary heap of events. FIFO among equal ``(time, kind)`` unless ``heap_ties``."""

    def __init__(self, *, heap_ties: bool = False) -> None:
        self._heap: list[_Event] = []
        self._seq = 0
        self._heap_ties = heap_ties

    def push(self, time: int, kind: Kind, data: Any = None) -> None:
        self._seq += 1
        heapq.heappush(self._heap, _Event(time, kind, 0 if self._heap_ties else self._seq, data))

    def peek(self) -> _Event | None:
        return self._heap[0] if self._heap else None

    def pop(self) -> _Event:
        return heapq.heappop(self._heap)

    def array(self) -> list[_Event]:
        """The heap's backing array (not time order); research compatibility only."""
        return self._heap

    def __len__(self) -> int:
        return len(self._heap)


_BOOTING, _READY, _RUNNING, _REMOVED = "booting", "ready", "running", "removed"


@dataclass
class _Step:
    start_ms: int
    end_ms: int
    seg_start_ms: int
    outcome: str = "running"  # "useful" once completed; "lost" when discarded or rolled back


@dataclass(frozen=True)
class Breakdown:
    """Where the averaging window's time went, in seconds (each instant counted once)."""

    window_s: float
    useful_s: float  # steps whose work was kept
    lost_s: float  # steps discarded (in flight at a failure, or rolled back)
    reconfiguration_s: float  # rendezvous, reconfiguration and restart time
    checkpoint_s: float  # checkpoint pauses
    stopped_s: float  # too few nodes (or out of memory) to train
    redundant_s: float = 0.0  # Bamboo: share of useful_s spent on redundant computation


@dataclass(frozen=True)
class Result:
    system: str
    trace: str
    compat: str
    throughput_sps: float
    samples: float
    steps_completed: int
    steps_kept: int
    reconfigurations: int
    restarts: int
    checkpoints: int
    failed_checkpoints: int
    stops: int
    breakdown: Breakdown
    model: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Rendezvous:
    token: int
    kind: Kind
    duration_s: float


_LIVE = (_READY, _RUNNING)


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
        self.step: _Step | None = None
        self.step_ms: int | None = None
        self.steps: list[_Step] = []  # every step started, in start order
        self.completed: list[_Step] = []  # completed steps, in completion order
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

    def _on_add(self, ev: _Event) -> None:
        node = ev.data
        if self.state.get(node) in (_BOOTING, _READY, _RUNNING):
            return  # already present: a duplicate add changes nothing
        self.state[node] = _BOOTING
        self.incarnation[node] = self.incarnation.get(node, 0) + 1
        self.q.push(self.now + round(self.inp.node_startup_s * 1000), Kind.READY, (node, self.incarnation[node]))

    def _on_remove(self, ev: _Event) -> None:
        node = ev.data
        was = self.state.get(node)
        if was in (None, _REMOVED):
            return
        self.state[node] = _REMOVED
        self.order.pop(node, None)
        if was == _BOOTING and not self.legacy:
            return  # a node that never joined: nothing to recover
        self.node_lost(node)

    def _on_ready(self, ev: _Event) -> None:
        node, incarnation = ev.data
        if self.state.get(node) != _BOOTING or self.incarnation[node] != incarnation:
            return
        self.state[node] = _READY
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

    def _on_rendezvous_done(self, ev: _Event) -> None:
        if self.stacked:
            if any(self.state.get(n) not in _LIVE for n in self.participants):
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
        step = _Step(at_ms, at_ms + self.step_ms, self.prev_completion_ms)
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

    def _on_step_done(self, ev: _Event) -> None:
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

    def _on_checkpoint_done(self, ev: _Event) -> None:
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

    def after_step(self, step: _Step) -> None:
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
            breakdown=self._breakdown(w0, w1),
            model=self.inp.source.removeprefix("paper:"),
            **self.counts,
        )

    def close_open_checkpoint(self, end_ms: int) -> None:
        """Varuna: account a checkpoint still being written at the end."""

    def _breakdown(self, w0: int, w1: int) -> Breakdown:
        # Each instant goes to the first active category in this order (research: steps run during a
        # rendezvous, and the step wins).
        cats = ("useful", "lost", "checkpoint", "reconfiguration")
        points: list[tuple[int, int, int]] = []

        def add(start: int, end: int, cat: int) -> None:
            start, end = max(start, w0), min(end, w1)
            if end > start:
                points.append((start, 1, cat))
                points.append((end, -1, cat))

        for s in self.steps:
            if s.outcome != "running":
                add(s.start_ms, s.end_ms, 0 if s.outcome == "useful" else 1)
        for a, b in self.ckpt_intervals:
            add(a, b, 2)
        for a, b in self.rdzv_intervals:
            add(a, b, 3)
        points.sort()
        totals = dict.fromkeys((*cats, "stopped"), 0)
        active = [0] * len(cats)
        prev = w0
        for t, delta, cat in [*points, (w1, 0, 0)]:
            if t > prev:
                top = next((cats[i] for i in range(len(cats)) if active[i] > 0), "stopped")
                totals[top] += t - prev
                prev = t
            active[cat] += delta
        useful_s = totals["useful"] / 1000
        redundant = 1.0 - self.inp.redundancy_overhead_fraction if self.system == "bamboo" else 0.0
        return Breakdown(
            window_s=max(0, w1 - w0) / 1000,
            useful_s=useful_s,
            lost_s=totals["lost"] / 1000,
            reconfiguration_s=totals["reconfiguration"] / 1000,
            checkpoint_s=totals["checkpoint"] / 1000,
            stopped_s=totals["stopped"] / 1000,
            redundant_s=useful_s * redundant,
        )


class OobleckSimulator(Simulator):
    """Pipeline templates: a failure costs the step in flight and one reconfiguration; no checkpoints."""

    system = "oobleck"

    def node_lost(self, node: str) -> None:
        if self.legacy or self.status == "running":
            self.counts["reconfigurations"] += 1
            self.start_rendezvous(Kind.GLOBAL_RENDEZVOUS, self.failure_rendezvous_s())
        elif self.status == "rendezvous":  # a second failure during a reconfiguration: start it over
            self.counts["reconfigurations"] += 1
            self.start_rendezvous(
                self.rendezvous.kind if self.rendezvous else Kind.GLOBAL_RENDEZVOUS, self.failure_rendezvous_s()
            )

    def failure_rendezvous_s(self) -> float:
        return self.inp.reconfiguration_s

    def configure(self, participants: list[str]) -> None:
        if len(participants) < self.inp.min_nodes:
            self.stop(f"{len(participants)} nodes in the rendezvous, fewer than {self.inp.min_nodes}")
            return
        step_ms = self.lookup_step_ms()
        for n in participants:
            self.state[n] = _RUNNING
        if step_ms is None:
            if self.legacy:  # research: an effectively infinite step; the system counts as running
                self.status = "running"
                return
            self.stop(f"out of memory on {self.lookup_nodes} nodes")
            return
        self.step_ms = step_ms
        self.status = "running"
        self.start_step(self.now)

    def after_step(self, step: _Step) -> None:
        self.start_step(self.now)


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

    def after_step(self, step: _Step) -> None:
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

    def _on_checkpoint_done(self, ev: _Event) -> None:
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


class BambooSimulator(Simulator):
    """Redundant computation: a lost stage fails over to its predecessor at a slowdown; restart when it
    cannot (the predecessor, or the lost node, already covers two stages)."""

    system = "bamboo"

    def __init__(self, inputs: SystemInputs, trace: Trace, compat: Compat = INTENT) -> None:
        super().__init__(inputs, trace, compat)
        self.stages_of: dict[str, list[tuple[int, int]]] = {}  # node -> (pipeline, stage) it computes
        self.n_pipelines = 0
        self.waiting_counter = 0  # research bookkeeping only
        self.failover: tuple[int, int] | None = None  # (completed steps, time) of the slowdown's start
        self.failover_delayed = False

    def overloaded(self) -> int:
        return sum(1 for stages in self.stages_of.values() if len(stages) > 1)

    def waiting(self) -> int:
        if self.legacy:
            return self.waiting_counter
        return sum(1 for n in self.order if n not in self.stages_of)

    def ready_while_running(self, node: str) -> None:
        self.waiting_counter += 1

    def node_lost(self, node: str) -> None:
        if not self.legacy and self.status == "rendezvous":
            # a participant lost: the rendezvous starts over for a full timeout
            kind = self.rendezvous.kind if self.rendezvous is not None else Kind.GLOBAL_RENDEZVOUS
            self.start_rendezvous(
                kind, self.inp.restart_s if kind == Kind.GLOBAL_RENDEZVOUS else self.inp.reconfiguration_s
            )
            return
        if not self.legacy and self.status != "running":
            return
        stages = self.stages_of.pop(node, None)
        if stages is not None:
            if len(stages) > 1 or not self._fail_over(stages[0]):
                self.counts["restarts"] += 1
                self.start_rendezvous(Kind.GLOBAL_RENDEZVOUS, self.inp.restart_s)
                return
        elif not self.legacy:
            return  # an idle node: nothing to recover
        if self.status == "running":
            self._slow_down()

    def _fail_over(self, coordinate: tuple[int, int]) -> bool:
        """The lost stage's predecessor takes it over; False when it already covers two (fatal)."""
        p, s = coordinate
        wanted = (p, (s - 1) % self.inp.stages_per_pipeline)
        for stages in self.stages_of.values():
            if wanted in stages:
                if len(stages) > 1:
                    return False
                stages.append(coordinate)
                return True
        return True

    def _slow_down(self) -> None:
        if self.failover is not None or self.step_ms is None:
            return
        self.failover = (len(self.completed), self.now)
        self.failover_delayed = False
        self.step_ms = int(self.step_ms * self.inp.slowdown_factor)

    def delayed_completion_ms(self) -> int | None:
        if self.failover is None or self.failover_delayed or self.failover[0] != len(self.completed):
            return None
        self.failover_delayed = True  # the step in flight at the failure redoes the lost stage's share
        return self.now + int((self.now - self.failover[1]) * (self.inp.slowdown_factor - 1.0))

    def configure(self, participants: list[str]) -> None:
        spp = self.inp.stages_per_pipeline
        n_pipelines = len(participants) // spp if len(participants) >= self.inp.min_nodes else 0
        self.failover = None
        for node in participants:
            self.stages_of.pop(node, None)
        if not self.legacy:
            self.stages_of = {}
        self.n_pipelines = n_pipelines
        self.waiting_counter = len(participants) - n_pipelines * spp
        if n_pipelines == 0:
            self.stop(f"{len(participants)} nodes in the rendezvous, too few for a pipeline of {spp}")
            return
        step_ms = self.lookup_step_ms()
        if step_ms is None:
            self.stop(f"out of memory on {self.lookup_nodes} nodes")
            return
        for i, node in enumerate(participants[: n_pipelines * spp]):
            self.stages_of[node] = [(i // spp, i % spp)]
            self.state[node] = _RUNNING
        self.step_ms = step_ms
        self.status = "running"
        self.start_step(self.now)

    def after_step(self, step: _Step) -> None:
        spp = self.inp.stages_per_pipeline
        o, w, p = self.overloaded(), self.waiting(), self.n_pipelines
        active = spp * p - o
        reconfigure = (o > 0 and w >= o) or (o > 0 and 2 * o / active > 0.05) or (active + w) // spp > p
        if reconfigure:
            self.counts["reconfigurations"] += 1
            self.start_rendezvous(Kind.LOCAL_RENDEZVOUS, self.inp.reconfiguration_s)
        else:
            self.start_step(self.now)


SIMULATORS: dict[str, type[Simulator]] = {
    "oobleck": OobleckSimulator,
    "varuna": VarunaSimulator,
    "bamboo": BambooSimulator,
}


def simulate(inputs: SystemInputs, trace: Trace, compat: Compat | str = INTENT) -> Result:
    """Run one system on one trace; deterministic."""
    if isinstance(compat, str):
        compat = compat_preset(compat)
    return SIMULATORS[inputs.system](inputs, trace, compat).run()


__all__ = [
    "COMPAT_PRESETS",
    "INTENT",
    "RESEARCH",
    "RESEARCH_FIFO",
    "SIMULATORS",
    "Breakdown",
    "Compat",
    "EventQueue",
    "Kind",
    "Result",
    "Simulator",
    "compat_preset",
    "simulate",
]
