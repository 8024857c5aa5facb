"""Worker liveness: facts gathered by a probe, and the pure decision made from them.

A worker is *failed* when its process exited with a non-zero status or was killed by a signal,
and *hung* when its process is stopped (``T``/``t`` in ``/proc/<pid>/stat``) or its side-thread
heartbeat has been silent for ``liveness_timeout_s``. A worker blocked in a collective keeps
heartbeating from its side thread, so it is not hung. A worker that exits with status 0 has
finished its job: not a failure.

Start-up is covered whole: until a worker reports ready for its first generation (imported
torch, joined the rendezvous, copied or restored its layers) and for up to ``startup_timeout_s``
after its spawn, silence is not a hang -- importing torch on a loaded machine can starve the
heartbeat thread for many seconds. Past that allowance the heartbeat rule applies again.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

from oobleck.common import procs


class Verdict(enum.Enum):
    ALIVE = "alive"
    FINISHED = "finished"  # exited with status 0
    EXITED = "exited"  # exited with an error or was killed
    HUNG = "hung"


@dataclass(frozen=True)
class WorkerProbe:
    """What the agent knows about one worker at one instant (monotonic seconds)."""

    started_at: float
    last_heartbeat_at: float | None  # None before the first heartbeat
    exit_code: int | None  # None while running; negative = killed by that signal
    proc_state: str | None  # one-letter state from /proc/<pid>/stat, None if unknown
    ready: bool = False  # it has reported ready for a generation (its start-up is over)


@dataclass(frozen=True)
class LivenessConfig:
    liveness_timeout_s: float
    startup_timeout_s: float


def decide_worker(now: float, probe: WorkerProbe, config: LivenessConfig) -> tuple[Verdict, str]:
    """Pure: the verdict on one worker and a human-readable reason."""
    if probe.exit_code is not None:
        if probe.exit_code == 0:
            return Verdict.FINISHED, "exited with status 0"
        if probe.exit_code < 0:
            return Verdict.EXITED, f"killed by signal {-probe.exit_code}"
        return Verdict.EXITED, f"exited with status {probe.exit_code}"
    if probe.proc_state in ("T", "t"):
        return Verdict.HUNG, f"process is stopped (state {probe.proc_state})"
    since_start = now - probe.started_at
    if not probe.ready and since_start <= config.startup_timeout_s:
        return Verdict.ALIVE, "starting"
    if probe.last_heartbeat_at is None:
        limit = config.startup_timeout_s
        return Verdict.HUNG, f"no heartbeat {since_start:.1f}s after start (startup_timeout_s={limit:g})"
    silent = now - probe.last_heartbeat_at
    if silent > config.liveness_timeout_s:
        return Verdict.HUNG, f"heartbeat silent for {silent:.1f}s (liveness_timeout_s={config.liveness_timeout_s:g})"
    return Verdict.ALIVE, "heartbeating"


def read_proc_state(pid: int, proc_root: Path = procs.PROC) -> str | None:
    """The one-letter process state of ``pid`` (``R``, ``S``, ``T``, ``Z``...), None if unreadable."""
    return procs.state(pid, proc_root)
