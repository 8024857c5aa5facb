"""The rules a generation's plan obeys, in one place for the agent and the workers.

The rules work on plain values (:class:`PlanShape` and its parts); :func:`plan_shape` reads
them from an ``oobleck.v1.Plan`` message by field name, without importing protobuf, and only
the modules at the wire's edge call it with a message. Every error is a :class:`PlanRuleError`
naming the field (``ranks``, ``templates[1].stages[0].layers``...); callers prefix where the
plan came from (the agent: ``start.plan.``).

The rules (:func:`check_plan` applies them all):

- ``generation``: 0 or the generation of the command carrying the plan (when it is given);
- ``world_size`` >= 1, every listed rank inside ``0..world_size-1``, and ``world_size`` equal
  to the ranks held by the pipelines' nodes;
- ``ranks``: not empty, no node listed twice, every node with the same number (>= 1) of ranks
  (the node's GPUs, one rank per slot); the ranks of the pipelines' nodes are ``0..n-1`` once
  each;
- ``pipelines``: not empty, each with nodes and ``microbatches`` >= 1, a template for its
  size, every node in one pipeline at most and listed in ``ranks``;
- ``templates``: one per size (``num_nodes`` >= 1); each stage on a node index of its template,
  with >= 1 GPU; every template node uses exactly the node's GPUs; the stages' layers are
  contiguous from 0, and every template covers the same layers (``num_layers`` when given);
- ``rendezvous``: a host, a port in 1..65535, and a secret that is empty (plain keys) or at
  least :data:`MIN_SECRET_CHARS` characters (never quoted in an error).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

#: Shortest rendezvous secret accepted (the master sends 32 hex characters: 128 bits).
MIN_SECRET_CHARS = 32


class PlanRuleError(ValueError):
    """A plan breaks a rule; ``field`` names where (``str()`` is ``"<field>: <problem>"``)."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


@dataclass(frozen=True)
class StageShape:
    layer_start: int
    layer_end: int
    node_index: int  # an index within the template, not a node id
    gpus: int


@dataclass(frozen=True)
class TemplateShape:
    num_nodes: int
    stages: tuple[StageShape, ...]


@dataclass(frozen=True)
class PipelineShape:
    node_ids: tuple[int, ...]  # in stage order
    microbatches: int


@dataclass(frozen=True)
class PlanShape:
    """A plan's fields the rules read, as plain values."""

    generation: int = 0
    templates: tuple[TemplateShape, ...] = ()
    pipelines: tuple[PipelineShape, ...] = ()
    ranks: tuple[tuple[int, tuple[int, ...]], ...] = ()  # (node id, its ranks in slot order), as listed
    world_size: int = 0
    host: str = ""
    port: int = 0
    secret: str = field(default="", repr=False)  # never in a repr, a log line or an error


def plan_shape(msg: Any) -> PlanShape:
    """The plain values of an ``oobleck.v1.Plan`` message (read by field name)."""
    endpoint = msg.rendezvous
    return PlanShape(
        generation=msg.generation,
        templates=tuple(
            TemplateShape(
                t.num_nodes, tuple(StageShape(s.layer_start, s.layer_end, s.node_index, s.gpus) for s in t.stages)
            )
            for t in msg.templates
        ),
        pipelines=tuple(PipelineShape(tuple(p.node_ids), p.microbatches) for p in msg.pipelines),
        ranks=tuple((r.node_id, tuple(r.ranks)) for r in msg.ranks),
        world_size=msg.world_size,
        host=endpoint.host,
        port=endpoint.port,
        secret=endpoint.secret,
    )


def check_plan(plan: PlanShape, *, generation: int | None = None, num_layers: int | None = None) -> None:
    """Every rule above; ``generation``: the carrying command's, ``num_layers``: the model's."""
    if generation is not None and plan.generation not in (0, generation):
        raise PlanRuleError("generation", f"{plan.generation} differs from the command's generation {generation}")
    if plan.world_size < 1:
        raise PlanRuleError("world_size", f"must be >= 1, got {plan.world_size}")
    for node_id, ranks in plan.ranks:
        for rank in ranks:
            if not 0 <= rank < plan.world_size:
                raise PlanRuleError("ranks", f"rank {rank} of node {node_id} outside 0..{plan.world_size - 1}")
    _, held = check_layout(plan.pipelines, plan.templates, plan.ranks)
    if held != plan.world_size:
        raise PlanRuleError("world_size", f"{plan.world_size}, but the pipelines' nodes hold {held} ranks")
    check_layers(plan.templates, num_layers)
    check_endpoint(plan.host, plan.port, plan.secret)


def node_ranks(plan: PlanShape, node_id: int) -> tuple[int, ...] | None:
    """The ranks of ``node_id`` in ``plan``, None when the node is not in it."""
    for listed, ranks in plan.ranks:
        if listed == node_id:
            return ranks
    return None


def check_layout(
    pipelines: Sequence[PipelineShape],
    templates: Sequence[TemplateShape],
    ranks: Iterable[tuple[int, Sequence[int]]],
    *,
    gpus_per_node: int | None = None,
) -> tuple[int, int]:
    """The rules on ``ranks``, ``pipelines`` and ``templates``' GPUs; returns ``(gpus_per_node,
    world_size)``. ``gpus_per_node``: what every node must have (default: what they all have)."""
    by_node: dict[int, tuple[int, ...]] = {}
    for node_id, listed in ranks:
        if node_id in by_node:
            raise PlanRuleError("ranks", f"node {node_id} listed twice")
        by_node[node_id] = tuple(listed)
    if not by_node:
        raise PlanRuleError("ranks", "must not be empty")
    if gpus_per_node is None:
        counts = sorted({len(r) for r in by_node.values()})
        if len(counts) != 1:
            raise PlanRuleError("ranks", f"every node must have the same number of ranks, got {counts}")
        gpus_per_node = counts[0]
    if gpus_per_node < 1:
        raise PlanRuleError("ranks", f"every node needs at least one rank, got {gpus_per_node}")
    for node_id, listed in by_node.items():
        if len(listed) != gpus_per_node:
            raise PlanRuleError("ranks", f"node {node_id}: expected {gpus_per_node} ranks, got {len(listed)}")
    sizes = check_templates(templates, gpus_per_node)
    if not pipelines:
        raise PlanRuleError("pipelines", "must not be empty")
    seen: set[int] = set()
    for p, pipe in enumerate(pipelines):
        where = f"pipelines[{p}]"
        if not pipe.node_ids:
            raise PlanRuleError(f"{where}.node_ids", "must not be empty")
        mb = pipe.microbatches
        if isinstance(mb, bool) or not isinstance(mb, int) or mb < 1:
            raise PlanRuleError(f"{where}.microbatches", f"must be an integer >= 1, got {mb!r}")
        if len(pipe.node_ids) not in sizes:
            raise PlanRuleError(where, f"no template for {len(pipe.node_ids)} nodes")
        for node in pipe.node_ids:
            if node in seen:
                raise PlanRuleError(f"{where}.node_ids", f"node {node} is in more than one pipeline")
            seen.add(node)
            if node not in by_node:
                raise PlanRuleError("ranks", f"node {node} has no ranks")
    held = sorted(rank for node in seen for rank in by_node[node])
    if held != list(range(len(held))):
        raise PlanRuleError("ranks", f"the ranks of the pipelines' nodes must be 0..{len(held) - 1} once each")
    return gpus_per_node, len(held)


def check_templates(templates: Sequence[TemplateShape], gpus_per_node: int) -> set[int]:
    """One template per size, stages on their template's nodes, every node using
    ``gpus_per_node`` GPUs; returns the sizes."""
    sizes: set[int] = set()
    for i, tpl in enumerate(templates):
        where = f"templates[{i}]"
        if tpl.num_nodes < 1:
            raise PlanRuleError(f"{where}.num_nodes", f"must be >= 1, got {tpl.num_nodes}")
        if tpl.num_nodes in sizes:
            raise PlanRuleError(where, f"a second template for {tpl.num_nodes} nodes")
        sizes.add(tpl.num_nodes)
        used = [0] * tpl.num_nodes
        for s, stage in enumerate(tpl.stages):
            if not 0 <= stage.node_index < tpl.num_nodes:
                raise PlanRuleError(
                    f"{where}.stages[{s}].node_index", f"{stage.node_index} outside 0..{tpl.num_nodes - 1}"
                )
            if stage.gpus < 1:
                raise PlanRuleError(f"{where}.stages[{s}].gpus", f"must be >= 1, got {stage.gpus}")
            used[stage.node_index] += stage.gpus
        for node, gpus in enumerate(used):
            if gpus != gpus_per_node:
                raise PlanRuleError(where, f"node {node} uses {gpus} GPUs, expected gpus_per_node={gpus_per_node}")
    return sizes


def check_layers(templates: Sequence[TemplateShape], num_layers: int | None = None) -> int | None:
    """Each template's stages cover layers ``0..n-1`` in order, the same ``n`` for every
    template (``num_layers`` when given); returns ``n`` (None without templates)."""
    covered = num_layers
    for i, tpl in enumerate(templates):
        end = 0
        for s, stage in enumerate(tpl.stages):
            a, b = stage.layer_start, stage.layer_end
            if a != end or b <= a:
                raise PlanRuleError(f"templates[{i}].stages[{s}].layers", f"expected to start at {end}, got {[a, b]}")
            end = b
        if covered is not None and end != covered:
            other = "the model has" if num_layers is not None else "templates[0] covers"
            raise PlanRuleError(f"templates[{i}]", f"stages cover {end} layers, {other} {covered}")
        covered = end
    return covered


def check_endpoint(host: str, port: int, secret: str) -> None:
    """The rendezvous endpoint: a host, a port in 1..65535, a secret empty or long enough."""
    if not host or not 0 < port < 65536:
        raise PlanRuleError("rendezvous", f"needs a host and a port in 1..65535, got {host!r}:{port}")
    if secret and len(secret) < MIN_SECRET_CHARS:
        raise PlanRuleError("rendezvous.secret", f"must be at least {MIN_SECRET_CHARS} characters, got {len(secret)}")
