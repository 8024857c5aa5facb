"""When a node is ready for a generation: the pure aggregation of its workers' ready reports.

A Start or Reconfigure is acked once every worker of the node has reported ready for the
command's generation (joined the rendezvous, copied or restored its layers): an ack means
"ready to train", not "spawned". The ack carries the slowest worker's regroup and copy times
and the furthest step a worker is ready at (after any restore). Reports for another
generation, from a slot that is not awaited, or repeated, change nothing.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class ReadyReport:
    """One worker's report that it is ready for ``generation``."""

    slot: int
    generation: int
    regroup_s: float = 0.0
    copy_s: float = 0.0
    step: int | None = None  # the training position it is ready at, if it said


@dataclass(frozen=True)
class Pending:
    """A Start or Reconfigure waiting for its workers' ready reports."""

    command_id: int
    generation: int
    waiting: frozenset[int]  # the slots still to report
    regroup_s: float = 0.0
    copy_s: float = 0.0
    step: int | None = None  # the position the workers are ready at (after any restore)


class Readiness(enum.Enum):
    IGNORED = "ignored"  # the report changes nothing
    WAITING = "waiting"  # counted; other workers are still to report
    READY = "ready"  # every worker is ready: ack the command with the returned totals


def decide_ready(pending: Pending | None, report: ReadyReport) -> tuple[Pending | None, Readiness, str]:
    """Pure: fold one ready report into ``pending``; returns the new pending state (on READY:
    the totals the ack carries; the caller then has nothing pending), the decision and why."""
    if pending is None:
        return None, Readiness.IGNORED, "no start or reconfiguration is waiting"
    if report.generation != pending.generation:
        why = f"generation {report.generation}, waiting for generation {pending.generation}"
        return pending, Readiness.IGNORED, why
    if report.slot not in pending.waiting:
        return pending, Readiness.IGNORED, f"slot {report.slot} is not awaited"
    step = pending.step
    if report.step is not None:
        step = report.step if step is None else max(step, report.step)
    new = replace(
        pending,
        waiting=pending.waiting - {report.slot},
        regroup_s=max(pending.regroup_s, report.regroup_s),
        copy_s=max(pending.copy_s, report.copy_s),
        step=step,
    )
    if new.waiting:
        return new, Readiness.WAITING, f"{len(new.waiting)} of the node's workers still to report"
    return new, Readiness.READY, "every worker of the node is ready"
