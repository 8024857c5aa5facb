"""Plan messages -> PlanSpec."""

from __future__ import annotations

import pytest

from oobleck.protos.v1 import plan_pb2
from oobleck.worker.layout import PlanError, assign_ranks
from oobleck.worker.planmsg import dist_init_from_proto, plan_from_proto


def message() -> plan_pb2.Plan:
    msg = plan_pb2.Plan(generation=3, world_size=4)
    t = msg.templates.add(num_nodes=2, iteration_ms=5.0)
    t.stages.add(layer_start=0, layer_end=2, node_index=0, gpus=2)
    t.stages.add(layer_start=2, layer_end=3, node_index=1, gpus=1)
    t.stages.add(layer_start=3, layer_end=4, node_index=1, gpus=1)
    msg.pipelines.add(node_ids=[8, 5], microbatches=6)
    msg.ranks.add(node_id=8, ranks=[0, 1])
    msg.ranks.add(node_id=5, ranks=[2, 3])
    msg.rendezvous.host = "10.0.0.8"
    msg.rendezvous.port = 29400
    return msg


def test_plan_from_proto() -> None:
    plan = plan_from_proto(message())
    assert plan.generation == 3 and plan.gpus_per_node == 2 and plan.world_size == 4
    out = assign_ranks(plan, 4)
    assert [(a.stage, a.layers, a.lane) for a in out] == [
        (0, (0, 2), 0),
        (0, (0, 2), 1),
        (1, (2, 3), 0),
        (2, (3, 4), 0),
    ]
    init = dist_init_from_proto(message(), timeout_s=9.0)
    assert (init.host, init.port, init.backend, init.timeout_s) == ("10.0.0.8", 29400, "gloo", 9.0)


def test_inconsistent_messages_name_the_field() -> None:
    msg = message()
    msg.world_size = 5
    with pytest.raises(PlanError, match="world_size"):
        plan_from_proto(msg)
    msg = message()
    msg.ranks[1].ranks.append(4)
    with pytest.raises(PlanError, match="ranks"):
        plan_from_proto(msg)
    msg = message()
    msg.rendezvous.port = 0
    with pytest.raises(PlanError, match="rendezvous"):
        dist_init_from_proto(msg)
