"""The two state machines of the master: a node's state and the job's state.

Both are string enums (their values are what the state file, events, ``/api/status`` and the
CLI show), and both change in one place only: :func:`move_node` and :func:`move_job`, which
refuse a transition the tables below do not allow (a bug, raised as :class:`IllegalTransition`
before anything changed).
"""

from __future__ import annotations

import enum
from typing import Any


class NodeState(enum.StrEnum):
    ALIVE = "alive"  # in the current plan
    SPARE = "spare"  # registered, not in the plan
    DRAINING = "draining"  # an operator's drain: leaves the plan at the next generation
    DRAINED = "drained"  # kept out of every plan until undrained
    DEAD = "dead"  # declared dead; a restarted agent registers as a new node


class JobState(enum.StrEnum):
    PROFILING = "PROFILING"  # measuring the model's profile on a node before planning
    STARTING = "STARTING"  # the first generation (or a restore) is being installed
    RUNNING = "RUNNING"
    RECONFIGURING = "RECONFIGURING"  # a new generation is being installed
    PAUSED = "PAUSED"  # too few nodes: restores from the latest checkpoint once enough are back
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


# A node's plan-holding states (a death of one of them needs a new generation).
IN_PLAN_STATES = frozenset({NodeState.ALIVE, NodeState.DRAINING})
# States of a node that is registered and not dead.
LIVE_STATES = frozenset(NodeState) - {NodeState.DEAD}
ACTIVE_JOB_STATES = frozenset({JobState.STARTING, JobState.RUNNING, JobState.RECONFIGURING})
TERMINAL_JOB_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})

_N = NodeState
NODE_TRANSITIONS: dict[NodeState, frozenset[NodeState]] = {
    # a plan takes spares (first plan, scale-up, restore); an operator drains an idle one
    _N.SPARE: frozenset({_N.SPARE, _N.ALIVE, _N.DRAINED, _N.DEAD}),
    # a plan leaves it out, a job ends or pauses (spare); an operator drains it (draining)
    _N.ALIVE: frozenset({_N.ALIVE, _N.SPARE, _N.DRAINING, _N.DEAD}),
    # its agent acked the drain (drained); the job ended first (spare)
    _N.DRAINING: frozenset({_N.DRAINING, _N.DRAINED, _N.SPARE, _N.DEAD}),
    _N.DRAINED: frozenset({_N.DRAINED, _N.SPARE, _N.DEAD}),
    _N.DEAD: frozenset(),
}

_J = JobState
_ENDS = frozenset({_J.SUCCEEDED, _J.FAILED, _J.CANCELLED})
JOB_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    _J.PROFILING: frozenset({_J.STARTING}) | _ENDS,
    _J.STARTING: frozenset({_J.RUNNING, _J.RECONFIGURING, _J.PAUSED}) | _ENDS,
    _J.RUNNING: frozenset({_J.RECONFIGURING, _J.PAUSED}) | _ENDS,
    _J.RECONFIGURING: frozenset({_J.RUNNING, _J.RECONFIGURING, _J.PAUSED}) | _ENDS,
    _J.PAUSED: frozenset({_J.STARTING}) | _ENDS,
    _J.SUCCEEDED: frozenset(),
    _J.FAILED: frozenset(),
    _J.CANCELLED: frozenset(),
}


class IllegalTransition(RuntimeError):
    """A state change the tables do not allow: a bug in the master."""


def move_node(row: Any, to: NodeState, reason: str = "") -> None:
    """Set a node row's state and reason (``row`` has ``state``, ``reason``, ``node_id``)."""
    to = NodeState(to)
    if to not in NODE_TRANSITIONS[NodeState(row.state)]:
        raise IllegalTransition(f"node {row.node_id}: {row.state} -> {to} is not a transition")
    row.state, row.reason = to, reason


def move_job(job: Any, to: JobState, reason: str = "") -> None:
    """Set the job's state and reason (``job`` has ``state``, ``reason``, ``job_id``)."""
    to = JobState(to)
    if to not in JOB_TRANSITIONS[JobState(job.state)]:
        raise IllegalTransition(f"job {job.job_id}: {job.state} -> {to} is not a transition")
    job.state, job.reason = to, reason
