"""Which step reports count, and the training step they commit (pure; the master records facts).

Every node of a generation's plan trains every step, so the step the job has committed is the
lowest step all of them reported: no single node -- a confused one, or a hostile one holding a
leaked agent token -- can move the job forward or end it. A report counts only when it comes
from a node of the current generation's plan, for this generation, for a step after the one the
generation started from and not beyond the job's last step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

STALE = "stale_generation"
NOT_IN_PLAN = "not_in_plan"
BEYOND_STEPS = "beyond_steps"
NOT_AFTER_START = "not_after_start"
REASONS = (STALE, NOT_IN_PLAN, BEYOND_STEPS, NOT_AFTER_START)


@dataclass
class GenerationProgress:
    """Step reports of one generation. ``start`` is the step it started from; None while it is
    unknown (a restoring generation: the workers' acks tell the restored step)."""

    generation: int
    nodes: frozenset[int]
    start: int | None
    total_steps: int
    reported: dict[int, tuple[int, float, float]] = field(default_factory=dict)  # node -> (step, loss, samples/s)

    def judge(self, node_id: int, generation: int, step: int) -> tuple[str | None, str]:
        """``(None, "")`` when the report counts, else ``(reason code, explanation)``."""
        if generation != self.generation:
            return STALE, f"generation {generation}, the current one is {self.generation}"
        if node_id not in self.nodes:
            return NOT_IN_PLAN, f"node {node_id} is not in the plan of generation {self.generation}"
        if step > self.total_steps:
            return BEYOND_STEPS, f"step {step} is beyond the job's {self.total_steps} steps"
        if self.start is not None and step <= self.start:
            return NOT_AFTER_START, f"step {step} is not after step {self.start}, where generation {generation} started"
        return None, ""

    def record(self, node_id: int, step: int, loss: float, samples_per_s: float) -> None:
        if step >= self.reported.get(node_id, (0, 0.0, 0.0))[0]:
            self.reported[node_id] = (step, loss, samples_per_s)

    def committed(self) -> tuple[int, float, float] | None:
        """``(step, loss, samples/s)``: the step every plan node has reached (the start for those
        not heard from yet) and what the slowest node reported with it; None while the start is
        unknown. A value reported by one node alone never shows."""
        if self.start is None or not self.nodes:
            return None
        slowest = min(self.nodes, key=lambda n: (self.reported.get(n, (self.start,))[0], n))
        step, loss, rate = self.reported.get(slowest, (self.start, 0.0, 0.0))
        if step <= self.start:
            return self.start, 0.0, 0.0
        return step, loss, rate
