"""What a run reports: the steps it ran, and its :class:`Result` with the time :class:`Breakdown`.

:func:`breakdown` splits the averaging window between useful work, lost work, checkpoints,
reconfiguration and stopped time, each instant counted once.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class Step:
    """One training step started; its segment (for research rollbacks) starts at ``seg_start_ms``."""

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


def breakdown(
    steps: Iterable[Step],
    ckpt_intervals: Iterable[tuple[int, int]],
    rdzv_intervals: Iterable[tuple[int, int]],
    w0: int,
    w1: int,
    redundant_fraction: float,
) -> Breakdown:
    """The window ``[w0, w1)`` in ms split by category; ``redundant_fraction`` of the useful time is
    reported as redundant (Bamboo; 0 for the others)."""
    # Each instant goes to the first active category in this order (research: steps run during a
    # rendezvous, and the step wins).
    cats = ("useful", "lost", "checkpoint", "reconfiguration")
    points: list[tuple[int, int, int]] = []

    def add(start: int, end: int, cat: int) -> None:
        start, end = max(start, w0), min(end, w1)
        if end > start:
            points.append((start, 1, cat))
            points.append((end, -1, cat))

    for s in steps:
        if s.outcome != "running":
            add(s.start_ms, s.end_ms, 0 if s.outcome == "useful" else 1)
    for a, b in ckpt_intervals:
        add(a, b, 2)
    for a, b in rdzv_intervals:
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
    return Breakdown(
        window_s=max(0, w1 - w0) / 1000,
        useful_s=useful_s,
        lost_s=totals["lost"] / 1000,
        reconfiguration_s=totals["reconfiguration"] / 1000,
        checkpoint_s=totals["checkpoint"] / 1000,
        stopped_s=totals["stopped"] / 1000,
        redundant_s=useful_s * redundant_fraction,
    )


__all__ = ["Breakdown", "Result", "Step", "breakdown"]
