"""Following a submitted job: step lines, the reconfiguration timeline and the final summary.

:class:`Follower` reads the master's event stream (``WatchEvents`` with one progress event per
committed step, on a thread) and polls ``GetStatus`` every ``poll_s`` for the job's state.
Everything is printed from the calling thread, in order. It returns when the job reaches a
terminal state (SUCCEEDED, FAILED, CANCELLED), or raises :class:`FollowError` when the master stays unreachable.
"""

from __future__ import annotations

import json
import logging
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

import grpc

from oobleck.protos.v1 import admin_pb2

log = logging.getLogger(__name__)

#: Reconfiguration phases in the order they happen (master event ``durations_s`` keys).
PHASES = ("detect", "plan", "notify", "regroup", "copy", "resume")
TERMINAL_STATES = ("SUCCEEDED", "FAILED", "CANCELLED")
RPC_TIMEOUT_S = 10.0


class FollowError(RuntimeError):
    """The job could not be followed (master unreachable, job replaced, timeout)."""


def state_name(state: int) -> str:
    return admin_pb2.JobState.Name(state).removeprefix("JOB_STATE_")


def last_plan_node(status: admin_pb2.GetStatusResponse) -> int | None:
    """The node the demo kills by default: the last node of the last pipeline of the plan."""
    for pipeline in reversed(status.plan.pipelines):
        if pipeline.node_ids:
            return int(pipeline.node_ids[-1])
    return None


def existing_event_id(stub, timeout_s: float = RPC_TIMEOUT_S) -> int:
    """The id of the master's newest event (0 if none), so following starts after it."""
    last = 0
    for ev in stub.WatchEvents(admin_pb2.WatchEventsRequest(since_id=0, follow=False), timeout=timeout_s):
        last = max(last, ev.id)
    return last


@dataclass
class Reconfiguration:
    generation: int
    step: int
    lost_nodes: list[int] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)
    outcome: str = "in progress"

    def to_dict(self) -> dict[str, Any]:
        phases = {k: round(self.phases[k], 4) for k in PHASES if k in self.phases}
        phases.update({k: round(v, 4) for k, v in self.phases.items() if k not in PHASES})
        return {
            "generation": self.generation,
            "step": self.step,
            "lost_nodes": self.lost_nodes,
            "phases_s": phases,
            "total_s": round(sum(self.phases.get(k, 0.0) for k in PHASES), 4),
            "outcome": self.outcome,
        }


def phases_text(phases: dict[str, float]) -> str:
    return " | ".join(f"{k} {phases[k]:.3f}s" for k in PHASES if k in phases)


@dataclass
class FaultPlan:
    """Kill one node once the job reports ``step >= at_step`` (``node_id`` None: last plan node)."""

    at_step: int
    node_id: int | None
    kill: Callable[[int], list[int]]  # node id -> pids killed (empty for an RPC drill)
    done: bool = False
    record: dict[str, Any] | None = None


class EventStream:
    """A thread that watches the master's events (step events included) from ``since_id`` on and
    hands each to ``on_event``; a broken stream is watched again from the last event seen, every
    ``retry_s``. :meth:`stop` cancels the call in flight and joins the thread."""

    def __init__(
        self, stub, since_id: int, on_event: Callable[[admin_pb2.Event], None], *, retry_s: float = 0.5
    ) -> None:
        self.stub = stub
        self.since_id = since_id
        self.on_event = on_event
        self.retry_s = retry_s
        self._done = threading.Event()
        self._call = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="watch-events", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        since = self.since_id
        while not self._done.is_set():
            call = self.stub.WatchEvents(admin_pb2.WatchEventsRequest(since_id=since, follow=True, include_steps=True))
            with self._lock:
                self._call = call
            if self._done.is_set():
                call.cancel()
                return
            try:
                for ev in call:
                    since = max(since, ev.id)  # step events carry id 0
                    self.on_event(ev)
            except grpc.RpcError as exc:
                if self._done.is_set() or exc.code() == grpc.StatusCode.CANCELLED:
                    return
                log.debug("event stream ended (%s); watching again from event %d", exc.code(), since)
            self._done.wait(self.retry_s)

    def stop(self, timeout_s: float = 5.0) -> None:
        self._done.set()
        with self._lock:
            if self._call is not None:
                self._call.cancel()
        if self._thread.ident is not None:
            self._thread.join(timeout=timeout_s)


class Follower:
    def __init__(
        self,
        stub,
        job_id: str,
        *,
        since_id: int = 0,
        poll_s: float = 0.2,
        json_lines: bool = False,
        out: TextIO | None = None,
        fault: FaultPlan | None = None,
        check: Callable[[], None] | None = None,
        timeout_s: float = 0.0,
        unreachable_s: float = 30.0,
    ) -> None:
        self.stub = stub
        self.job_id = job_id
        self.since_id = since_id
        self.poll_s = poll_s
        self.json_lines = json_lines
        self.out = out or sys.stdout
        self.fault = fault
        self.check = check
        self.timeout_s = timeout_s
        self.unreachable_s = unreachable_s
        self.t0 = time.monotonic()
        self.status: admin_pb2.GetStatusResponse | None = None
        self.reconfigurations: dict[int, Reconfiguration] = {}
        self._lost: list[int] = []
        self._last_step = -1
        self._final_event: str | None = None
        self._events: queue.Queue = queue.Queue()
        self._stream: EventStream | None = None

    # -- output ----------------------------------------------------------------------------------
    def emit(self, text: str, record: dict[str, Any]) -> None:
        stamp = f"[{time.monotonic() - self.t0:7.2f}s]"
        line = json.dumps(record, sort_keys=True) if self.json_lines else f"{stamp} {text}"
        print(line, file=self.out, flush=True)

    # -- handlers ---------------------------------------------------------------------------------
    def _step_line(self, step: int, loss: float, samples_per_s: float, generation: int) -> None:
        if step <= self._last_step or step <= 0:
            return
        self._last_step = step
        total = self.status.total_steps if self.status is not None else 0
        self.emit(
            f"step {step}/{total} loss {loss:.4f} samples/s {samples_per_s:.1f} gen {generation}",
            {
                "type": "step",
                "step": step,
                "total_steps": total,
                "loss": loss,
                "samples_per_s": samples_per_s,
                "generation": generation,
            },
        )

    def on_event(self, ev: admin_pb2.Event) -> None:
        kind, durations = ev.kind, dict(ev.durations_s)
        if kind == "step":  # one per committed step (not stored by the master)
            self._step_line(int(ev.step), ev.loss, ev.samples_per_s, int(ev.generation))
            return
        rec_base = {"type": "event", "kind": kind, "id": ev.id, "generation": ev.generation, "step": ev.step}
        rec_base.update({"node_id": ev.node_id, "message": ev.message, "durations_s": durations})
        if kind == "node_dead":
            self._lost.append(int(ev.node_id))
            detect = f" (detect {durations['detect']:.3f}s)" if "detect" in durations else ""
            self.emit(f"node {ev.node_id} dead at step {ev.step}: {ev.message}{detect}", rec_base)
            return
        if kind == "reconfiguring":
            rec = Reconfiguration(int(ev.generation), int(ev.step), sorted(set(self._lost)), durations)
            self._lost.clear()
            self.reconfigurations[rec.generation] = rec
            self.emit(
                f"reconfiguring -> generation {ev.generation}: {ev.message}  [{phases_text(durations)}]", rec_base
            )
            return
        rec = self.reconfigurations.get(int(ev.generation))
        if kind in ("reconfigured", "reconfigure_incomplete") and rec is not None:
            rec.phases.update(durations)
            rec.outcome = "acked" if kind == "reconfigured" else "incomplete"
            self.emit(f"{kind} generation {ev.generation}: {ev.message}  [{phases_text(rec.phases)}]", rec_base)
            return
        if kind == "resumed" and rec is not None:
            rec.phases.update(durations)
            rec.outcome = "resumed"
            total = sum(rec.phases.get(k, 0.0) for k in PHASES)
            self.emit(
                f"resumed generation {ev.generation} at step {ev.step}: timeline {phases_text(rec.phases)}"
                f"  (total {total:.3f}s)",
                {**rec_base, "reconfiguration": rec.to_dict()},
            )
            return
        if kind.startswith("job_") and kind.removeprefix("job_").upper() in TERMINAL_STATES:
            self._final_event = kind
        self.emit(f"{kind}: {ev.message}" + (f"  [{phases_text(durations)}]" if durations else ""), rec_base)

    def on_status(self, s: admin_pb2.GetStatusResponse) -> None:
        self.status = s
        if s.job_id and s.job_id != self.job_id:
            raise FollowError(f"the master now runs job {s.job_id}, not {self.job_id}")
        # Step events give a line per step; the polled status covers a stream that reconnects.
        self._step_line(int(s.step), s.loss, s.samples_per_s, int(s.generation))
        fault = self.fault
        if (
            fault is not None
            and not fault.done
            and s.step >= fault.at_step
            and state_name(s.state) in ("RUNNING", "RECONFIGURING")
        ):
            fault.done = True
            node_id = fault.node_id if fault.node_id is not None else last_plan_node(s)
            if node_id is None:
                raise FollowError("--kill-node-at-step: the plan has no nodes to kill")
            pids = fault.kill(node_id)
            fault.record = {"node_id": node_id, "step": int(s.step), "generation": int(s.generation), "pids": pids}
            how = f"SIGKILL agent and workers, pids {pids}" if pids else "KillNode fault drill"
            self.emit(
                f"fault injection: killing node {node_id} at step {s.step} ({how})", {"type": "fault", **fault.record}
            )

    # -- main loop --------------------------------------------------------------------------------
    def _poll_status(self, last_ok: float) -> float:
        try:
            s = self.stub.GetStatus(admin_pb2.GetStatusRequest(), timeout=RPC_TIMEOUT_S)
        except grpc.RpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                if time.monotonic() - last_ok > self.unreachable_s:
                    raise FollowError(f"master unreachable for {self.unreachable_s:g}s: {exc.details()}") from None
                return last_ok
            raise
        self.on_status(s)
        return time.monotonic()

    def run(self) -> admin_pb2.GetStatusResponse:
        """Follow until the job is in a terminal state; returns the last status."""
        self._stream = EventStream(self.stub, self.since_id, self._events.put)
        self._stream.start()
        try:
            next_poll = time.monotonic()
            last_ok = time.monotonic()
            while True:
                now = time.monotonic()
                try:
                    ev = self._events.get(timeout=max(0.0, next_poll - now))
                    self.on_event(ev)
                    continue
                except queue.Empty:
                    pass
                next_poll = time.monotonic() + self.poll_s
                if self.check is not None:
                    self.check()
                if self.timeout_s and time.monotonic() - self.t0 > self.timeout_s:
                    raise FollowError(f"--timeout-s: the job did not finish within {self.timeout_s:g}s")
                last_ok = self._poll_status(last_ok)
                if self.status is not None and state_name(self.status.state) in TERMINAL_STATES:
                    self._drain_final_events()
                    return self.status
        finally:
            self._stream.stop()

    def _drain_final_events(self, grace_s: float = 1.0) -> None:
        """Print the events that were in flight when the terminal state was seen."""
        deadline = time.monotonic() + grace_s
        while self._final_event is None:
            try:
                self.on_event(self._events.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                break
        while True:
            try:
                self.on_event(self._events.get_nowait())
            except queue.Empty:
                break

    def summary(self, *, state: str | None = None, wall_s: float, extra: dict[str, Any] | None = None) -> dict:
        s = self.status
        out: dict[str, Any] = {
            "type": "summary",
            "job_id": self.job_id,
            "state": state or (state_name(s.state) if s is not None else "UNKNOWN"),
            "reason": s.reason if s is not None else "",
            "steps": int(s.step) if s is not None else 0,
            "total_steps": int(s.total_steps) if s is not None else 0,
            "final_loss": float(s.loss) if s is not None else None,
            "generations": int(s.generation) if s is not None else 0,
            "reconfigurations": [r.to_dict() for _, r in sorted(self.reconfigurations.items())],
            "fault": self.fault.record if self.fault is not None else None,
            "wall_s": round(wall_s, 3),
        }
        out.update(extra or {})
        return out
