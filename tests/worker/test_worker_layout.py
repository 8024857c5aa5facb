"""Plan -> per-rank layers (pure function)."""

from __future__ import annotations

import pytest

from oobleck.planner.types import Stage, Template
from oobleck.worker.layout import (
    PipelineSpec,
    PlanError,
    PlanSpec,
    assign_ranks,
    lane_range,
    layer_holders,
    simple_plan,
    transfers,
)


def stage(a: int, b: int, node: int, gpus: int = 1) -> Stage:
    return Stage((a, b), node=node, gpus=gpus, latency_ms=0.0, memory_bytes=0)


def tpl(*stages: Stage) -> Template:
    return Template(num_nodes=max(s.node for s in stages) + 1, stages=stages, iteration_ms=0.0, bottleneck_ms=0.0)


def test_heterogeneous_two_and_three_stage() -> None:
    plan = simple_plan([[3, 2], [1, 2, 2]], [5, 3])
    out = assign_ranks(plan, 5)
    assert [(a.pipeline, a.stage, a.layers) for a in out] == [
        (0, 0, (0, 3)), (0, 1, (3, 5)), (1, 0, (0, 1)), (1, 1, (1, 3)), (1, 2, (3, 5)),
    ]  # fmt: skip
    assert out[3].prev_ranks == (2,) and out[3].next_ranks == (4,)
    assert out[0].is_first and not out[0].is_last and out[4].is_last
    assert [a.microbatch_offset for a in out] == [0, 0, 5, 5, 5]
    assert layer_holders(out, 5) == {0: (0, 2), 1: (0, 3), 2: (0, 3), 3: (1, 4), 4: (1, 4)}


def test_multi_gpu_nodes_use_consecutive_slots() -> None:
    t = tpl(stage(0, 2, 0, gpus=2), stage(2, 3, 1), stage(3, 4, 1))
    plan = PlanSpec(
        pipelines=(PipelineSpec((7, 9), 2),), templates={2: t}, ranks={7: (1, 0), 9: (2, 3)}, gpus_per_node=2
    )
    out = assign_ranks(plan, 4)
    assert out[1].stage_ranks == (1, 0) and out[1].lane == 0 and out[0].lane == 1
    assert out[2].prev_ranks == (1, 0) and out[2].layers == (2, 3)
    assert out[3].layers == (3, 4) and out[3].prev_ranks == (2,)


def test_lane_transfers_cover_each_sample_once() -> None:
    assert [lane_range(5, 2, i) for i in range(2)] == [(0, 2), (2, 5)]
    assert transfers(5, 2, 1, [10, 11, 12]) == [(11, 2, 3), (12, 3, 5)]
    covered = sorted(x for lane in range(3) for _, lo, hi in transfers(7, 3, lane, [0, 1]) for x in range(lo, hi))
    assert covered == list(range(7))
    assert transfers(1, 2, 0, [5]) == []  # an empty lane exchanges nothing


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pipelines": (PipelineSpec((0, 1), 1),), "ranks": {0: (0,), 1: (1,)}}, "no template for 2 nodes"),
        ({"pipelines": (PipelineSpec((0,), 1),), "ranks": {0: (3,)}}, "ranks"),
        ({"pipelines": (PipelineSpec((0,), 1), PipelineSpec((0,), 1)), "ranks": {0: (0,)}}, "more than one pipeline"),
    ],
)
def test_bad_plans_name_the_field(kwargs: dict, message: str) -> None:
    with pytest.raises(PlanError, match=message):
        PlanSpec(templates={1: tpl(stage(0, 4, 0))}, **kwargs)


def test_template_must_cover_model() -> None:
    plan = simple_plan([[2, 2]], [1])
    with pytest.raises(PlanError, match="cover 4 layers, the model has 5"):
        assign_ranks(plan, 5)
    with pytest.raises(PlanError, match="microbatches"):
        PipelineSpec((0,), 0)
