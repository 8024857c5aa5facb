"""Bamboo's policy: redundant computation; a lost stage fails over to its predecessor at a slowdown.

A loss it cannot absorb (the node, or its predecessor, already covers two stages) restarts the job;
after each step a local reconfiguration may rebalance the pipelines (see ``sim/README.md``).
"""

from __future__ import annotations

from oobleck.sim.compat import INTENT, Compat
from oobleck.sim.events import Kind
from oobleck.sim.inputs import SystemInputs, Trace
from oobleck.sim.results import Step
from oobleck.sim.simulator import RUNNING, Simulator


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
            self.state[node] = RUNNING
        self.step_ms = step_ms
        self.status = "running"
        self.start_step(self.now)

    def after_step(self, step: Step) -> None:
        spp = self.inp.stages_per_pipeline
        o, w, p = self.overloaded(), self.waiting(), self.n_pipelines
        active = spp * p - o
        reconfigure = (o > 0 and w >= o) or (o > 0 and 2 * o / active > 0.05) or (active + w) // spp > p
        if reconfigure:
            self.counts["reconfigurations"] += 1
            self.start_rendezvous(Kind.LOCAL_RENDEZVOUS, self.inp.reconfiguration_s)
        else:
            self.start_step(self.now)

    def redundant_fraction(self) -> float:
        return 1.0 - self.inp.redundancy_overhead_fraction


__all__ = ["BambooSimulator"]
