"""The shared plan rules (oobleck.common.planrules) as the agent applies them to a plan message."""

from __future__ import annotations

import pytest

from oobleck.common.planrules import (
    PlanRuleError,
    PlanShape,
    check_endpoint,
    check_layers,
    check_plan,
    node_ranks,
    plan_shape,
)
from oobleck.protos.v1 import plan_pb2

from .fake_master import make_plan

SECRET = "0f" * 16


def message() -> plan_pb2.Plan:
    """Two pipelines (nodes 8, 5 and node 3) of two-GPU nodes; templates for 1 and 2 nodes."""
    msg = plan_pb2.Plan(generation=3, world_size=6)
    two = msg.templates.add(num_nodes=2)
    two.stages.add(layer_start=0, layer_end=2, node_index=0, gpus=2)
    two.stages.add(layer_start=2, layer_end=3, node_index=1, gpus=1)
    two.stages.add(layer_start=3, layer_end=4, node_index=1, gpus=1)
    one = msg.templates.add(num_nodes=1)
    one.stages.add(layer_start=0, layer_end=4, node_index=0, gpus=2)
    msg.pipelines.add(node_ids=[8, 5], microbatches=6)
    msg.pipelines.add(node_ids=[3], microbatches=2)
    msg.ranks.add(node_id=8, ranks=[0, 1])
    msg.ranks.add(node_id=5, ranks=[2, 3])
    msg.ranks.add(node_id=3, ranks=[5, 4])
    msg.rendezvous.host = "10.0.0.8"
    msg.rendezvous.port = 29400
    msg.rendezvous.secret = SECRET
    return msg


def test_a_good_plan_passes_and_names_the_node_ranks() -> None:
    shape = plan_shape(message())
    check_plan(shape, generation=3, num_layers=4)
    check_plan(plan_shape(make_plan(2, [1, 2], 2, 29400)), generation=2)  # what the agent tests send
    assert node_ranks(shape, 3) == (5, 4) and node_ranks(shape, 99) is None
    assert SECRET not in repr(shape)


def _break(edit):
    msg = message()
    edit(msg)
    return plan_shape(msg)


@pytest.mark.parametrize(
    ("edit", "field", "words"),
    [
        (lambda m: setattr(m, "generation", 2), "generation", "differs from the command's generation 3"),
        (lambda m: setattr(m, "world_size", 0), "world_size", "must be >= 1"),
        (lambda m: setattr(m, "world_size", 7), "world_size", "hold 6 ranks"),
        (lambda m: m.ranks[2].ranks.append(9), "ranks", "rank 9 of node 3 outside 0..5"),
        (lambda m: m.ranks.add(node_id=8, ranks=[0, 1]), "ranks", "node 8 listed twice"),
        (lambda m: m.ranks[2].ranks.append(4), "ranks", "the same number of ranks"),
        (lambda m: m.ranks[2].ranks.__setitem__(0, 4), "ranks", "must be 0..5 once each"),
        (lambda m: m.ClearField("ranks"), "ranks", "must not be empty"),
        (lambda m: m.ranks.pop(), "ranks", "node 3 has no ranks"),
        (lambda m: m.ClearField("pipelines"), "pipelines", "must not be empty"),
        (lambda m: setattr(m.pipelines[1], "microbatches", 0), "pipelines[1].microbatches", ">= 1"),
        (lambda m: m.templates.pop(0), "pipelines[0]", "no template for 2 nodes"),
        (lambda m: m.pipelines.add(node_ids=[8], microbatches=1), "pipelines[2].node_ids", "more than one pipeline"),
        (lambda m: m.templates.pop(), "pipelines[1]", "no template for 1 nodes"),
        (lambda m: m.templates.append(m.templates[1]), "templates[2]", "a second template for 1 nodes"),
        (lambda m: setattr(m.templates[0].stages[2], "gpus", 2), "templates[0]", "node 1 uses 3 GPUs"),
        (lambda m: setattr(m.templates[0].stages[2], "node_index", 2), "templates[0].stages[2].node_index", "0..1"),
        (lambda m: setattr(m.templates[0].stages[1], "layer_start", 1), "templates[0].stages[1].layers", "at 2"),
        (lambda m: setattr(m.templates[1].stages[0], "layer_end", 5), "templates[1]", "cover 5 layers"),
        (lambda m: setattr(m.rendezvous, "host", ""), "rendezvous", "needs a host"),
        (lambda m: setattr(m.rendezvous, "port", 70000), "rendezvous", "1..65535"),
        (lambda m: setattr(m.rendezvous, "secret", "short"), "rendezvous.secret", "at least 32 characters, got 5"),
    ],
)
def test_every_rule_names_its_field(edit, field, words) -> None:
    with pytest.raises(PlanRuleError) as info:
        check_plan(_break(edit), generation=3)
    assert info.value.field == field and words in info.value.problem, str(info.value)
    assert str(info.value).startswith(f"{field}: ")


def test_the_model_layers_and_the_endpoint_alone() -> None:
    shape = plan_shape(message())
    assert check_layers(shape.templates) == 4
    with pytest.raises(PlanRuleError, match=r"templates\[0\]: stages cover 4 layers, the model has 6"):
        check_plan(shape, num_layers=6)
    check_endpoint("h", 1, "")  # no secret: plain keys (a test or an older master)
    with pytest.raises(PlanRuleError, match=r"rendezvous\.secret") as info:
        check_endpoint("h", 1, "s3cret-but-short")
    assert "s3cret" not in str(info.value)  # never quoted
    assert check_layers(PlanShape().templates) is None
