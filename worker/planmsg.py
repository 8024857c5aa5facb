"""Conversion of the ``oobleck.v1.Plan`` message a worker receives into worker dataclasses.

Protobuf types stop here: the worker loop works on :class:`GenerationPlan` (a
:class:`~oobleck.worker.layout.PlanSpec`, the rendezvous :class:`Endpoint`, where to resume and
whether to restore), the engine on :class:`~oobleck.worker.layout.PlanSpec` and
:class:`~oobleck.worker.rendezvous.DistInit` (imported lazily: this module does not import
torch). The plan's ``copies`` field is not read: workers decide the layer copies themselves
(docs/worker.md, "Layer copies on reconfiguration").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from oobleck.common.planrules import PlanRuleError, check_endpoint, check_plan, plan_shape
from oobleck.planner.types import Stage, Template
from oobleck.worker.layout import PipelineSpec, PlanError, PlanSpec


def plan_from_proto(msg: Any) -> PlanSpec:
    """``msg``: an ``oobleck.protos.v1.plan_pb2.Plan``, checked by the rules the agent checks too
    (:mod:`oobleck.common.planrules`). GPUs per node = ranks per node."""
    try:
        check_plan(plan_shape(msg))
    except PlanRuleError as exc:
        raise PlanError(str(exc)) from None
    templates = {}
    for t in msg.templates:
        stages = tuple(
            Stage((s.layer_start, s.layer_end), node=s.node_index, gpus=s.gpus, latency_ms=0.0, memory_bytes=0)
            for s in t.stages
        )
        templates[t.num_nodes] = Template(
            num_nodes=t.num_nodes, stages=stages, iteration_ms=t.iteration_ms, bottleneck_ms=0.0
        )
    ranks = {r.node_id: tuple(r.ranks) for r in msg.ranks}
    plan = PlanSpec(
        pipelines=tuple(PipelineSpec(tuple(p.node_ids), p.microbatches) for p in msg.pipelines),
        templates=templates,
        ranks=ranks,
        gpus_per_node=len(next(iter(ranks.values()))),
        generation=msg.generation,
        job_id=msg.job_id,
    )
    return plan


@dataclass(frozen=True)
class Endpoint:
    """Where a generation's ranks meet: the TCPStore an agent hosts, and the plan's secret."""

    host: str
    port: int
    secret: str = field(default="", repr=False)  # never in a repr, a log line or an error

    def dist_init(self, backend: str = "gloo", timeout_s: float = 300.0):
        """The :class:`~oobleck.worker.rendezvous.DistInit` that joins this endpoint."""
        from oobleck.worker.rendezvous import DistInit

        return DistInit(backend=backend, host=self.host, port=self.port, timeout_s=timeout_s, secret=self.secret)


@dataclass(frozen=True)
class GenerationPlan:
    """A generation's plan as the worker loop needs it."""

    plan: PlanSpec
    rendezvous: Endpoint
    resume_step: int = 0  # the step the master expects training to resume from
    restore_from_checkpoint: bool = False  # some layer has no surviving copy: restore every layer

    @property
    def generation(self) -> int:
        return self.plan.generation


def endpoint_from_proto(msg: Any) -> Endpoint:
    """The plan's rendezvous endpoint and its secret (never quoted in an error)."""
    endpoint = msg.rendezvous
    try:
        check_endpoint(endpoint.host, endpoint.port, endpoint.secret)
    except PlanRuleError as exc:
        raise PlanError(str(exc)) from None
    return Endpoint(host=endpoint.host, port=endpoint.port, secret=endpoint.secret)


def generation_plan_from_proto(msg: Any) -> GenerationPlan:
    """``msg``: an ``oobleck.protos.v1.plan_pb2.Plan``."""
    return GenerationPlan(
        plan=plan_from_proto(msg),
        rendezvous=endpoint_from_proto(msg),
        resume_step=msg.resume_step,
        restore_from_checkpoint=bool(msg.restore_from_checkpoint),
    )


def dist_init_from_proto(msg: Any, backend: str = "gloo", timeout_s: float = 300.0):
    """The :class:`~oobleck.worker.rendezvous.DistInit` for the plan's rendezvous endpoint (a
    TCPStore hosted by an agent) and its secret (never quoted in an error)."""
    return endpoint_from_proto(msg).dist_init(backend, timeout_s)
