"""Oobleck's policy: pipeline templates, so a failure costs the step in flight and one reconfiguration.

No checkpoints; training resumes at the step time of the new node count (see ``sim/README.md``).
"""

from __future__ import annotations

from oobleck.sim.events import Kind
from oobleck.sim.results import Step
from oobleck.sim.simulator import RUNNING, Simulator


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
            self.state[n] = RUNNING
        if step_ms is None:
            if self.legacy:  # research: an effectively infinite step; the system counts as running
                self.status = "running"
                return
            self.stop(f"out of memory on {self.lookup_nodes} nodes")
            return
        self.step_ms = step_ms
        self.status = "running"
        self.start_step(self.now)

    def after_step(self, step: Step) -> None:
        self.start_step(self.now)


__all__ = ["OobleckSimulator"]
