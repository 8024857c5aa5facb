"""The one edge between the planner's dataclasses and the ``oobleck.v1.Plan`` message.

Everything here is synchronous and may be slow (the planner): the master calls it through
``asyncio.to_thread``. ``planner`` is the ``oobleck.planner`` module, imported lazily (tests may
pass a stand-in with the same functions).
"""

from __future__ import annotations

import importlib
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from oobleck.protos.v1 import plan_pb2

#: Random bytes of a generation's rendezvous secret (``Endpoint.secret``, hex): workers derive
#: the generation's store keys from it and tag the values with it (the store itself has none).
RENDEZVOUS_SECRET_BYTES = 16


def default_planner() -> Any:
    """``oobleck.planner``, imported on first use (the C extension is not needed to start)."""
    return importlib.import_module("oobleck.planner")


def cluster_class(planner: Any) -> Any:
    cls = getattr(planner, "Cluster", None)
    if cls is None:
        from oobleck.planner.types import Cluster as cls
    return cls


@dataclass(frozen=True)
class NodeInfo:
    """What planning needs to know about a registered node."""

    node_id: int
    address: str
    slots: int
    gpu_memory_bytes: int
    store_port: int


@dataclass(frozen=True)
class ClusterParams:
    cpu_memory_bytes_per_slot: int
    intra_node_bytes_per_s: float
    inter_node_bytes_per_s: float
    optimizer_state_factor: float
    reserved_bytes: int


@dataclass
class PlanContext:
    """Inputs kept for later reconfigurations (templates are recomputed after a restart)."""

    profile: Any
    cluster: Any
    templates: Any
    microbatches: int
    ft: int
    min_nodes: int | None

    def to_json(self) -> dict[str, Any]:
        return {
            "profile": self.profile.to_dict(),
            "cluster": self.cluster.to_dict(),
            "microbatches": self.microbatches,
            "ft": self.ft,
            "min_nodes": self.min_nodes,
        }


@dataclass(frozen=True)
class PlannedLayout:
    """A plan as the master keeps it: pipelines of node ids plus the proto sent to agents."""

    pipelines: tuple[tuple[int, ...], ...]
    microbatches: tuple[int, ...]
    spares: tuple[int, ...]
    plan: plan_pb2.Plan
    copy_ms: float = 0.0
    reason: str = ""

    @property
    def nodes(self) -> tuple[int, ...]:
        return tuple(n for p in self.pipelines for n in p)


def plannable_nodes(nodes: Sequence[NodeInfo]) -> tuple[list[NodeInfo], list[NodeInfo]]:
    """Nodes with the first node's slot count (the planner assumes identical nodes), and the rest."""
    if not nodes:
        return [], []
    slots = nodes[0].slots
    return [n for n in nodes if n.slots == slots], [n for n in nodes if n.slots != slots]


def build_cluster(planner: Any, nodes: Sequence[NodeInfo], params: ClusterParams) -> Any:
    first = nodes[0]
    memory = first.gpu_memory_bytes if first.gpu_memory_bytes > 0 else params.cpu_memory_bytes_per_slot
    return cluster_class(planner)(
        nodes=len(nodes),
        gpus_per_node=first.slots,
        gpu_memory_bytes=memory,
        intra_node_bytes_per_s=params.intra_node_bytes_per_s,
        inter_node_bytes_per_s=params.inter_node_bytes_per_s,
        optimizer_state_factor=params.optimizer_state_factor,
        reserved_bytes=params.reserved_bytes,
    )


def assign_ranks(pipelines: Sequence[Sequence[int]], slots: Mapping[int, int]) -> dict[int, tuple[int, ...]]:
    """Global ranks: pipelines in order, nodes in stage order, one rank per slot."""
    ranks: dict[int, tuple[int, ...]] = {}
    nxt = 0
    for pipe in pipelines:
        for node in pipe:
            ranks[node] = tuple(range(nxt, nxt + slots[node]))
            nxt += slots[node]
    return ranks


def _templates_proto(templates: Any) -> list[plan_pb2.Template]:
    out = []
    for t in templates.templates:
        stages = [
            plan_pb2.Stage(layer_start=s.layers[0], layer_end=s.layers[1], node_index=s.node, gpus=s.gpus)
            for s in t.stages
        ]
        out.append(plan_pb2.Template(num_nodes=t.num_nodes, stages=stages, iteration_ms=t.iteration_ms))
    return out


def to_plan_proto(
    *,
    generation: int,
    templates: Any,
    pipelines: Sequence[Any],
    ranks: Mapping[int, Sequence[int]],
    nodes: Mapping[int, NodeInfo],
    resume_step: int,
    restore_from_checkpoint: bool,
    secret: str | None = None,
) -> plan_pb2.Plan:
    """Planner dataclasses (PipelinePlan, TemplateSet) -> ``oobleck.v1.Plan`` (the planner's layer
    copies stay with the master: workers decide theirs from what every rank carries).

    Every plan gets a fresh rendezvous ``secret`` (unless one is given): a plan is one
    generation, and a generation's store keys must not be derivable from an earlier one's.
    """
    first = nodes[pipelines[0].nodes[0]]
    if secret is None:
        secret = secrets.token_hex(RENDEZVOUS_SECRET_BYTES)
    return plan_pb2.Plan(
        generation=generation,
        templates=_templates_proto(templates),
        pipelines=[plan_pb2.Pipeline(node_ids=list(p.nodes), microbatches=p.microbatches) for p in pipelines],
        ranks=[plan_pb2.NodeRanks(node_id=n, ranks=list(r)) for n, r in sorted(ranks.items())],
        rendezvous=plan_pb2.Endpoint(host=first.address, port=first.store_port, secret=secret),
        resume_step=resume_step,
        world_size=sum(len(r) for r in ranks.values()),
        restore_from_checkpoint=restore_from_checkpoint,
    )


def make_context(
    planner: Any, profile: Any, nodes: Sequence[NodeInfo], params: ClusterParams, *, ft: int, microbatches: int,
    min_nodes: int | None,
) -> PlanContext:  # fmt: skip
    """Cluster + templates for ``nodes`` (blocking: the planner runs here)."""
    cluster = build_cluster(planner, nodes, params)
    templates = planner.plan_templates(profile, cluster, ft=ft, microbatches=microbatches, min_nodes=min_nodes)
    return PlanContext(profile, cluster, templates, microbatches, ft, min_nodes)


def context_from_json(planner: Any, data: Mapping[str, Any]) -> PlanContext:
    """Rebuild a :class:`PlanContext` after a restart (templates recomputed; deterministic)."""
    profile = planner.parse_profile(data["profile"])
    cluster = cluster_class(planner).from_dict(dict(data["cluster"]))
    templates = planner.plan_templates(
        profile, cluster, ft=data["ft"], microbatches=data["microbatches"], min_nodes=data["min_nodes"]
    )
    return PlanContext(profile, cluster, templates, data["microbatches"], data["ft"], data["min_nodes"])


def first_layout(
    planner: Any,
    ctx: PlanContext,
    nodes: Sequence[NodeInfo],
    *,
    generation: int,
    resume_step: int = 0,
    restore_from_checkpoint: bool = False,
) -> PlannedLayout:
    """Instantiate pipelines over ``nodes`` (ids in registration order). Blocking."""
    by_id = {n.node_id: n for n in nodes}
    inst = planner.instantiate(
        ctx.templates, ctx.profile, ctx.cluster, [n.node_id for n in nodes], microbatches=ctx.microbatches
    )
    if not inst.pipelines:
        raise planner.InfeasibleError("the planner placed no pipeline on the registered nodes")
    pipelines = [tuple(p.nodes) for p in inst.pipelines]
    ranks = assign_ranks(pipelines, {n: by_id[n].slots for n in by_id})
    plan = to_plan_proto(
        generation=generation,
        templates=ctx.templates,
        pipelines=inst.pipelines,
        ranks={n: ranks[n] for p in pipelines for n in p},
        nodes=by_id,
        resume_step=resume_step,
        restore_from_checkpoint=restore_from_checkpoint,
    )
    return PlannedLayout(
        pipelines=tuple(pipelines),
        microbatches=tuple(p.microbatches for p in inst.pipelines),
        spares=tuple(inst.spares),
        plan=plan,
        reason="restored from checkpoint" if restore_from_checkpoint else "initial instantiation",
    )


def next_layout(
    planner: Any,
    ctx: PlanContext,
    pipelines: Sequence[Sequence[int]],
    lost: Sequence[int],
    nodes: Mapping[int, NodeInfo],
    *,
    generation: int,
    resume_step: int,
) -> PlannedLayout:
    """Re-instantiate after losing ``lost`` (raises the planner's InfeasibleError). Blocking."""
    rec = planner.reconfigure(
        [list(p) for p in pipelines],
        list(lost),
        templates=ctx.templates,
        profile=ctx.profile,
        cluster=ctx.cluster,
        microbatches=ctx.microbatches,
    )
    used = {n for p in rec.pipelines for n in p.nodes}
    spares = tuple(n for p in pipelines for n in p if n not in used and n not in set(lost))
    return _from_reconfiguration(rec, ctx, nodes, spares, generation=generation, resume_step=resume_step)


def grow_layout(
    planner: Any,
    ctx: PlanContext,
    pipelines: Sequence[Sequence[int]],
    added: Sequence[int],
    nodes: Mapping[int, NodeInfo],
    *,
    generation: int,
    resume_step: int,
) -> PlannedLayout:
    """Scale up onto the spares ``added`` (raises InfeasibleError when they bring no gain). Blocking."""
    rec = planner.scale_up(
        [list(p) for p in pipelines],
        list(added),
        templates=ctx.templates,
        profile=ctx.profile,
        cluster=ctx.cluster,
        microbatches=ctx.microbatches,
    )
    return _from_reconfiguration(rec, ctx, nodes, tuple(rec.spares), generation=generation, resume_step=resume_step)


def _from_reconfiguration(
    rec: Any, ctx: PlanContext, nodes: Mapping[int, NodeInfo], spares: tuple[int, ...], *, generation: int,
    resume_step: int,
) -> PlannedLayout:  # fmt: skip
    """A planner ``Reconfiguration`` (after failures, or a scale-up) as the master keeps it."""
    new_pipes = [tuple(p.nodes) for p in rec.pipelines]
    used = {n for p in new_pipes for n in p}
    ranks = dict(rec.ranks) if rec.ranks else assign_ranks(new_pipes, {n: nodes[n].slots for n in used})
    plan = to_plan_proto(
        generation=generation,
        templates=ctx.templates,
        pipelines=rec.pipelines,
        ranks={n: r for n, r in ranks.items() if n in used},
        nodes=nodes,
        resume_step=resume_step,
        restore_from_checkpoint=bool(rec.restore_layers),
    )
    return PlannedLayout(
        pipelines=tuple(new_pipes),
        microbatches=tuple(p.microbatches for p in rec.pipelines),
        spares=spares,
        plan=plan,
        copy_ms=float(rec.copy_ms),
        reason=rec.reason,
    )
