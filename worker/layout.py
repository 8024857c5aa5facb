"""From a plan to what each rank holds: a pure function, no torch.distributed, no modules.

A plan is a list of pipelines (node ids in stage order, microbatches), the template of each
pipeline size, GPUs per node and the rank map (node id -> global ranks in slot order). A node's
stages (in template order) take consecutive slots: a stage with ``g`` GPUs takes the next ``g``
ranks of its node. The ``g`` ranks of one stage are *lanes*: each processes a contiguous share
of every microbatch (data parallel inside the stage, an allowed simplification of the planner's
sharded stage), and a lane exchanges activations with every lane of the neighbouring stage whose
share overlaps its own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from oobleck.common import planrules
from oobleck.planner.types import Stage, Template


class PlanError(ValueError):
    """The plan description is inconsistent (names the offending field)."""


@dataclass(frozen=True)
class PipelineSpec:
    nodes: tuple[int, ...]  # node ids in stage order
    microbatches: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "nodes", tuple(self.nodes))
        if not self.nodes:
            raise PlanError("pipelines[].nodes: must not be empty")
        if isinstance(self.microbatches, bool) or not isinstance(self.microbatches, int) or self.microbatches < 1:
            raise PlanError(f"pipelines[].microbatches: must be an integer >= 1, got {self.microbatches!r}")


@dataclass(frozen=True)
class PlanSpec:
    """The plan of one generation, as a worker needs it."""

    pipelines: tuple[PipelineSpec, ...]
    templates: Mapping[int, Template]  # template size (nodes) -> template
    ranks: Mapping[int, tuple[int, ...]]  # node id -> global ranks, one per slot
    gpus_per_node: int = 1
    generation: int = 0
    job_id: str = ""  # recorded in checkpoints; a restore loads only the job's own
    world_size: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "pipelines", tuple(self.pipelines))
        object.__setattr__(self, "ranks", {int(k): tuple(v) for k, v in self.ranks.items()})
        object.__setattr__(self, "templates", dict(self.templates))
        for size, tpl in self.templates.items():
            if tpl.num_nodes != size:
                raise PlanError(f"templates[{size}]: template is for {tpl.num_nodes} nodes")
        try:  # the rules the agent checks too (oobleck.common.planrules)
            _, world_size = planrules.check_layout(
                [planrules.PipelineShape(tuple(p.nodes), p.microbatches) for p in self.pipelines],
                _template_shapes(self.templates.values()),
                sorted(self.ranks.items()),
                gpus_per_node=self.gpus_per_node,
            )
        except planrules.PlanRuleError as exc:
            raise PlanError(str(exc)) from None
        object.__setattr__(self, "world_size", world_size)

    @property
    def num_microbatches(self) -> int:
        return sum(p.microbatches for p in self.pipelines)


@dataclass(frozen=True)
class RankAssignment:
    """What one rank does under a plan."""

    rank: int
    pipeline: int
    stage: int
    num_stages: int
    layers: tuple[int, int]  # [start, end)
    lane: int  # index among the stage's ranks
    stage_ranks: tuple[int, ...]  # all lanes of this stage, lane order
    prev_ranks: tuple[int, ...]  # lanes of the previous stage (empty on the first stage)
    next_ranks: tuple[int, ...]  # lanes of the next stage (empty on the last stage)
    microbatches: int  # this pipeline's microbatches per step
    microbatch_offset: int  # microbatches of pipelines before this one

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.num_stages - 1

    @property
    def layer_indices(self) -> range:
        return range(*self.layers)


def lane_range(size: int, lanes: int, lane: int) -> tuple[int, int]:
    """Samples ``[start, end)`` of a microbatch of ``size`` handled by ``lane`` of ``lanes``."""
    return (lane * size // lanes, (lane + 1) * size // lanes)


def transfers(size: int, my_lanes: int, my_lane: int, peer_ranks: Sequence[int]) -> list[tuple[int, int, int]]:
    """``(peer rank, start, end)`` pieces (microbatch sample offsets) this lane exchanges with
    the lanes of a neighbouring stage, in sample order."""
    a, b = lane_range(size, my_lanes, my_lane)
    out = []
    for j, peer in enumerate(peer_ranks):
        c, d = lane_range(size, len(peer_ranks), j)
        lo, hi = max(a, c), min(b, d)
        if lo < hi:
            out.append((peer, lo, hi))
    return out


def _template_shapes(templates) -> list[planrules.TemplateShape]:
    return [
        planrules.TemplateShape(
            t.num_nodes, tuple(planrules.StageShape(s.layers[0], s.layers[1], s.node, s.gpus) for s in t.stages)
        )
        for t in templates
    ]


def assign_ranks(plan: PlanSpec, num_layers: int) -> tuple[RankAssignment, ...]:
    """Every rank's assignment, indexed by rank."""
    try:
        planrules.check_layers(_template_shapes(plan.templates.values()), num_layers)
    except planrules.PlanRuleError as exc:
        raise PlanError(str(exc)) from None
    out: dict[int, RankAssignment] = {}
    offset = 0
    for p, pipe in enumerate(plan.pipelines):
        tpl = plan.templates[len(pipe.nodes)]
        slot_used = {i: 0 for i in range(tpl.num_nodes)}
        stage_ranks: list[tuple[int, ...]] = []
        for stage in tpl.stages:
            node_id = pipe.nodes[stage.node]
            first = slot_used[stage.node]
            stage_ranks.append(tuple(plan.ranks[node_id][first : first + stage.gpus]))
            slot_used[stage.node] = first + stage.gpus
        n = len(tpl.stages)
        for s, stage in enumerate(tpl.stages):
            for lane, rank in enumerate(stage_ranks[s]):
                out[rank] = RankAssignment(
                    rank=rank,
                    pipeline=p,
                    stage=s,
                    num_stages=n,
                    layers=(stage.layers[0], stage.layers[1]),
                    lane=lane,
                    stage_ranks=stage_ranks[s],
                    prev_ranks=stage_ranks[s - 1] if s > 0 else (),
                    next_ranks=stage_ranks[s + 1] if s + 1 < n else (),
                    microbatches=pipe.microbatches,
                    microbatch_offset=offset,
                )
        offset += pipe.microbatches
    return tuple(out[r] for r in range(plan.world_size))


def layer_holders(assignments: Sequence[RankAssignment], num_layers: int) -> dict[int, tuple[int, ...]]:
    """Layer index -> sorted ranks holding it."""
    holders: dict[int, list[int]] = {i: [] for i in range(num_layers)}
    for a in assignments:
        for i in a.layer_indices:
            holders[i].append(a.rank)
    return {i: tuple(sorted(r)) for i, r in holders.items()}


def simple_plan(pipelines: Sequence[Sequence[int]], microbatches: Sequence[int], gpus: int = 1) -> PlanSpec:
    """A plan with one node per stage: ``pipelines[p]`` lists each stage's layer count.

    Pipelines with the same number of stages must have the same split (one template per size).
    For tests, benchmarks and single-node runs.
    """
    if len(pipelines) != len(microbatches):
        raise PlanError("microbatches: need one count per pipeline")
    templates: dict[int, Template] = {}
    specs = []
    ranks: dict[int, tuple[int, ...]] = {}
    node = 0
    for counts in pipelines:
        stages = []
        start = 0
        for i, c in enumerate(counts):
            stages.append(Stage(layers=(start, start + c), node=i, gpus=gpus, latency_ms=0.0, memory_bytes=0))
            start += c
        tpl = Template(num_nodes=len(counts), stages=tuple(stages), iteration_ms=0.0, bottleneck_ms=0.0)
        if len(counts) in templates and templates[len(counts)] != tpl:
            raise PlanError(f"pipelines: two different splits for {len(counts)} stages")
        templates[len(counts)] = tpl
        nodes = tuple(range(node, node + len(counts)))
        node += len(counts)
        specs.append(nodes)
    r = 0
    for nodes in specs:
        for n in nodes:
            ranks[n] = tuple(range(r, r + gpus))
            r += gpus
    return PlanSpec(
        pipelines=tuple(PipelineSpec(nodes, m) for nodes, m in zip(specs, microbatches, strict=True)),
        templates=templates,
        ranks=ranks,
        gpus_per_node=gpus,
    )
