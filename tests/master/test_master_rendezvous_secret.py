"""Every plan carries a fresh rendezvous secret (workers key the generation's store with it)."""

from __future__ import annotations

import string

from oobleck.master import planning


def _plan(**kwargs):
    from oobleck.planner import types as pt

    nodes = {i: planning.NodeInfo(i, f"10.0.0.{i}", 1, 0, 4000 + i) for i in (1, 2)}
    pipes = [pt.PipelinePlan(1, (1,), 2, 1.0), pt.PipelinePlan(1, (2,), 2, 1.0)]
    return planning.to_plan_proto(
        generation=3, templates=pt.TemplateSet(pt.NodeSpec(1, 1, 1, (1, 1)), ()), pipelines=pipes,
        ranks={1: (0,), 2: (1,)}, nodes=nodes, resume_step=0, restore_from_checkpoint=False, **kwargs,
    )  # fmt: skip


def test_each_plan_gets_its_own_128_bit_secret():
    secrets = {_plan().rendezvous.secret for _ in range(20)}
    assert len(secrets) == 20
    assert all(
        len(s) == 2 * planning.RENDEZVOUS_SECRET_BYTES == 32 and set(s) <= set(string.hexdigits) for s in secrets
    )
    assert _plan(secret="f" * 32).rendezvous.secret == "f" * 32
