"""When to grow a running plan onto spare nodes (scale up), as a pure function.

A node that (re)joins registers as a spare. Once the job is running steadily (no reconfiguration
in flight, no death waiting for one) and the newest usable spare has been registered for
``delay_s`` (so that nodes coming back together are added in one reconfiguration), the master
asks the planner for a larger plan. When the planner finds no gain (the best mix for the larger
node count uses no more nodes), the same set of spares is not tried again under the same
generation: a new spare or a new generation makes it worth another look.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ScaleUpConfig:
    enabled: bool = True
    delay_s: float = 2.0

    def __post_init__(self) -> None:
        if not self.delay_s >= 0:
            raise ValueError(f"delay_s: must be >= 0, got {self.delay_s!r}")


@dataclass(frozen=True)
class ScaleUpState:
    job_running: bool  # the job is RUNNING: not starting, reconfiguring, paused or over
    busy: bool  # a reconfiguration is in flight, or failures wait for one
    spares: tuple[tuple[int, float], ...]  # (node id, registered at) of live spares the plan could use
    tried: frozenset[int] | None = None  # the spare set found of no use under the current generation


def decide_scale_up(now: float, state: ScaleUpState, config: ScaleUpConfig) -> tuple[tuple[int, ...], str]:
    """The spares to add now (empty: not now), and why."""
    if not config.enabled:
        return (), "scale up disabled"
    if not state.spares:
        return (), "no spares"
    if not state.job_running:
        return (), "the job is not running steadily"
    if state.busy:
        return (), "a reconfiguration is in flight or pending"
    ids = tuple(sorted(n for n, _ in state.spares))
    if state.tried is not None and frozenset(ids) == state.tried:
        return (), f"spares {list(ids)} bring no gain to the current plan"
    newest = max(t for _, t in state.spares)
    if now - newest < config.delay_s:
        return (), f"waiting {config.delay_s - (now - newest):.3f}s more for other nodes to join"
    return ids, f"scale up onto spares {list(ids)}"
