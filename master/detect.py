"""Failure detection as a pure function of (now, liveness facts, config).

Handlers only record facts (the monotonic time of the last heartbeat, when a session broke, a
reported failure); :func:`decide` turns them into "these nodes are dead" and "run one
reconfiguration now" (after the coalescing window, so simultaneous deaths give one).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DetectConfig:
    heartbeat_timeout_s: float = 2.0
    session_grace_s: float = 1.0
    coalesce_window_s: float = 0.2
    # After a master restart, agents reconnect with backoff: every node gets this long to
    # re-attach before the heartbeat timeout applies to it again.
    restart_grace_s: float = 10.0
    # A node that registered gets this long for its session to attach (no heartbeat can arrive
    # before it does); then the heartbeat timeout applies.
    attach_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if not self.heartbeat_timeout_s > 0:
            raise ValueError(f"heartbeat_timeout_s: must be > 0, got {self.heartbeat_timeout_s!r}")
        if not self.session_grace_s >= 0:
            raise ValueError(f"session_grace_s: must be >= 0, got {self.session_grace_s!r}")
        if not self.coalesce_window_s >= 0:
            raise ValueError(f"coalesce_window_s: must be >= 0, got {self.coalesce_window_s!r}")
        if not self.restart_grace_s >= 0:
            raise ValueError(f"restart_grace_s: must be >= 0, got {self.restart_grace_s!r}")
        if not self.attach_timeout_s >= 0:
            raise ValueError(f"attach_timeout_s: must be >= 0, got {self.attach_timeout_s!r}")


@dataclass(frozen=True)
class NodeLiveness:
    node_id: int
    last_heartbeat_s: float  # monotonic time of the last sign of life
    detached_since_s: float | None = None  # session broke at this time and has not re-attached
    failed_reason: str | None = None  # NodeFailure reported / killed
    in_plan: bool = True  # a death of a node in the plan needs a reconfiguration
    reattach_by_s: float | None = None  # master restarted at (this - restart_grace_s); not yet re-attached
    timeout_s: float | None = None  # the heartbeat timeout this node was given (None: the config's)
    attached: bool = True  # its session has attached since it registered (else: attach_timeout_s)


@dataclass(frozen=True)
class DetectState:
    nodes: tuple[NodeLiveness, ...]  # the nodes not yet declared dead
    pending_since_s: float | None = None  # first in-plan death not yet handled by a reconfiguration
    # How late the master itself has recently been running (its event loop's lag): a heartbeat
    # may be waiting in its own backlog that long, so silence is judged only beyond timeout + lag
    # (an overloaded master detects later instead of declaring live nodes dead).
    master_lag_s: float = 0.0


@dataclass(frozen=True)
class Decision:
    dead: tuple[tuple[int, str], ...] = ()  # (node id, reason) to declare dead now
    pending_since_s: float | None = None  # new value of DetectState.pending_since_s
    reconfigure: bool = False  # the coalescing window is over: handle every pending death at once

    @property
    def quiet(self) -> bool:
        return not self.dead and not self.reconfigure


def node_verdict(now: float, node: NodeLiveness, config: DetectConfig, lag_s: float = 0.0) -> str | None:
    """Why ``node`` is dead at ``now``, or None while it is alive."""
    if node.failed_reason is not None:
        return f"node failure: {node.failed_reason}"
    if node.reattach_by_s is not None:
        if now < node.reattach_by_s:
            return None
        return f"did not re-attach within {config.restart_grace_s:g}s of the master restart"
    if not node.attached:
        # Registered, its session not attached yet (no heartbeat can come before it is).
        if now - node.last_heartbeat_s < max(config.attach_timeout_s, node.timeout_s or config.heartbeat_timeout_s):
            return None
        return f"its session did not attach within {now - node.last_heartbeat_s:.2f}s of registering"
    if node.detached_since_s is not None and now - node.detached_since_s >= config.session_grace_s:
        return f"session broken for {now - node.detached_since_s:.2f}s (grace {config.session_grace_s:g}s)"
    silent = now - node.last_heartbeat_s
    timeout_s = node.timeout_s or config.heartbeat_timeout_s
    if silent >= timeout_s + lag_s:
        late = f", master {lag_s:.2f}s behind" if lag_s > 0 else ""
        return f"no heartbeat for {silent:.2f}s (timeout {timeout_s:g}s{late})"
    return None


def decide(now: float, state: DetectState, config: DetectConfig) -> tuple[Decision, str]:
    """Which nodes die now, and whether the pending deaths' reconfiguration starts now."""
    dead: list[tuple[int, str]] = []
    pending = state.pending_since_s
    for node in state.nodes:
        why = node_verdict(now, node, config, state.master_lag_s)
        if why is None:
            continue
        dead.append((node.node_id, why))
        if node.in_plan and pending is None:
            pending = now
    reconfigure = pending is not None and now - pending >= config.coalesce_window_s
    if reconfigure:
        reason = f"reconfigure: coalescing window of {config.coalesce_window_s:g}s over"
    elif pending is not None:
        reason = f"waiting {config.coalesce_window_s - (now - pending):.3f}s more for coalescing"
    elif dead:
        reason = "spares lost: " + ", ".join(str(n) for n, _ in dead)
    else:
        reason = "all nodes alive"
    return Decision(dead=tuple(dead), pending_since_s=pending, reconfigure=reconfigure), reason
