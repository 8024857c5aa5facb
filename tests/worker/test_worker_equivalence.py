"""Any plan trains exactly like the single-process reference (gloo on CPU, real processes)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist
from worker_testutil import STEPS, assert_matches_reference, assert_params_match, reference, tiny_spec

from oobleck.common.jobspec import OptimizerSpec
from oobleck.planner.types import Stage, Template
from oobleck.worker.engine import TrainingEngine
from oobleck.worker.failures import RendezvousAbandoned
from oobleck.worker.layout import PipelineSpec, PlanSpec, simple_plan
from oobleck.worker.local import RankFailed, reconfigure_ranks, run_ranks, train_ranks
from oobleck.worker.rendezvous import DistInit

PLANS = {
    "one-4-stage": ([[1, 1, 1, 1]], [8]),
    "2+2": ([[2, 2], [2, 2]], [3, 5]),
    "2+3-heterogeneous": ([[3, 1], [1, 2, 1]], [5, 3]),
}


@pytest.mark.slow
@pytest.mark.parametrize("model", ["gpt", "hf-gpt2"])
@pytest.mark.parametrize("plan_name", list(PLANS))
def test_plan_equals_single_process(model: str, plan_name: str) -> None:
    spec = tiny_spec(model)
    plan = simple_plan(*PLANS[plan_name])
    results = run_ranks(plan.world_size, train_ranks, (spec, plan, STEPS))
    assert_matches_reference(spec, results)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["hf-bert", "hf-llama"])
def test_other_hf_models_heterogeneous(model: str) -> None:
    spec = tiny_spec(model, config={"tie_embeddings": model == "hf-bert"})
    plan = simple_plan(*PLANS["2+3-heterogeneous"])
    results = run_ranks(plan.world_size, train_ranks, (spec, plan, STEPS))
    assert_matches_reference(spec, results)


@pytest.mark.slow
def test_gpipe_untied_sgd_matches() -> None:
    spec = tiny_spec(
        "gpt",
        config={"tie_embeddings": False},
        schedule="gpipe",
        optimizer=OptimizerSpec(name="sgd", lr=0.1, momentum=0.9),
    )
    plan = simple_plan([[2, 2], [1, 2, 1]], [4, 4])
    results = run_ranks(plan.world_size, train_ranks, (spec, plan, STEPS))
    assert_matches_reference(spec, results)


@pytest.mark.slow
def test_multi_gpu_stage_lanes_match() -> None:
    """Two GPUs per node: a 2-lane stage feeding two 1-lane stages; microbatches of 3 split 1+2."""
    spec = tiny_spec("gpt", microbatch_size=3, global_batch_size=12)
    tpl = Template(
        num_nodes=2,
        stages=(
            Stage((0, 2), node=0, gpus=2, latency_ms=0.0, memory_bytes=0),
            Stage((2, 3), node=1, gpus=1, latency_ms=0.0, memory_bytes=0),
            Stage((3, 4), node=1, gpus=1, latency_ms=0.0, memory_bytes=0),
        ),
        iteration_ms=0.0,
        bottleneck_ms=0.0,
    )
    plan = PlanSpec(
        pipelines=(PipelineSpec((10, 11), 4),),
        templates={2: tpl},
        ranks={10: (0, 1), 11: (2, 3)},
        gpus_per_node=2,
    )
    results = run_ranks(plan.world_size, train_ranks, (spec, plan, STEPS))
    assert_matches_reference(spec, results)


@pytest.mark.slow
def test_failed_step_is_not_committed_anywhere() -> None:
    """Rank 3 fails after the backward of step 1: every rank reports the failure, nobody applies
    the update, the step is retried and the run still equals the reference."""
    spec = tiny_spec("gpt")
    plan = simple_plan(*PLANS["2+3-heterogeneous"])
    results = run_ranks(plan.world_size, train_ranks, (spec, plan, STEPS, {"fail_at": (3, 1)}))
    assert [r["failed_steps"] for r in results] == [[1]] * plan.world_size
    assert_matches_reference(spec, results)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["gpt", "hf-gpt2"])
def test_reconfigurations_keep_training_exact(model: str) -> None:
    """Generation 0: processes 0-3 as 2 + 2 (process 4 idle). Generation 1: process 4 joins
    fresh, 2 + 3. Generation 2: process 0 fails, the rest run one 4-stage pipeline. Layers and
    optimizer state move between processes; the whole run equals the reference."""
    spec = tiny_spec(model, steps=4)
    gens = [
        (simple_plan([[2, 2], [2, 2]], [3, 5]), 1, {0: 0, 1: 1, 2: 2, 3: 3}),
        (simple_plan([[3, 1], [1, 2, 1]], [5, 3]), 2, {0: 0, 1: 1, 2: 2, 3: 3, 4: 4}),
        (simple_plan([[1, 1, 1, 1]], [8]), 1, {1: 0, 2: 1, 3: 2, 4: 3}),
    ]
    results = run_ranks(5, reconfigure_ranks, (spec, gens))
    ref_losses, _ = reference(spec, 4)
    for process, res in enumerate(results):
        ran = [0, 1, 2] if process == 0 else [1, 2, 3] if process == 4 else [0, 1, 2, 3]
        assert sorted(res["losses"]) == ran
        assert [res["losses"][s] for s in ran] == pytest.approx([ref_losses[s] for s in ran], rel=1e-5)
    assert [len(r["phases"]) for r in results] == [1, 2, 2, 2, 1]  # reconfigurations per process
    assert results[0]["params"] == {}  # the failed process holds nothing at the end
    assert_params_match(spec, results[1:], steps=4)


@pytest.mark.slow
def test_layers_with_no_surviving_copy_are_reported() -> None:
    spec = tiny_spec("gpt")
    gens = [
        (simple_plan([[2, 2], [2, 2]], [3, 5]), 1, {0: 0, 1: 1, 2: 2, 3: 3}),
        (simple_plan([[2, 2]], [8]), 1, {1: 0, 3: 1}),  # processes 0 and 2 held layers 0-1
    ]
    with pytest.raises(RankFailed, match=r"no surviving copy of layers \[0, 1\]: restore from checkpoint"):
        run_ranks(4, reconfigure_ranks, (spec, gens))


def test_single_rank_through_tcp_store() -> None:
    """One rank holding the whole model, joining through a TCPStore client (as under an agent)."""
    store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, wait_for_workers=False)
    spec = tiny_spec("gpt")
    engine = TrainingEngine(spec, simple_plan([[4]], [8]), 0, DistInit(host="127.0.0.1", port=store.port))
    try:
        results = [engine.train_step() for _ in range(STEPS)]
        assert [r.step for r in results] == [1, 2, 3] and all(r.samples == 16 for r in results)
        assert all(r.grad_norm > 0 for r in results)
        losses = [r.loss for r in results]
        params = {
            i: {k[6:]: v for k, v in st.items() if k.startswith("param.")} for i, st in engine.export_layers().items()
        }
        exported = engine.export_layers([1])[1]
        assert {k.split(".")[-1] for k in exported if k.startswith("opt.")} == {"step", "exp_avg", "exp_avg_sq"}
    finally:
        engine.close()
        engine.close()  # safe twice
    assert not dist.is_initialized()
    assert_matches_reference(spec, [{"losses": losses, "params": params}])


@pytest.mark.slow
def test_bf16_autocast_trains_close_to_fp32() -> None:
    spec = tiny_spec("gpt", precision="bf16")
    plan = simple_plan([[2, 2], [1, 2, 1]], [4, 4])
    results = run_ranks(plan.world_size, train_ranks, (spec, plan, STEPS))
    fp32_losses, fp32_state = reference(tiny_spec("gpt"))
    for r in results:
        assert r["losses"] == pytest.approx(fp32_losses, rel=2e-2)
        assert r["losses"] != pytest.approx(fp32_losses, rel=1e-7)  # autocast did change the maths
        for layer, params in r["params"].items():
            for name, value in params.items():
                assert value.dtype == torch.float32  # master weights stay fp32
                torch.testing.assert_close(value, fp32_state[layer][name], rtol=0.0, atol=0.05)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("uncommitted", "kept_step"),
    [({2, 3}, True), ({0, 1}, False)],
    ids=["one-pipeline-committed-step-kept", "committed-ranks-lack-layers-step-redone"],
)
def test_split_commit_is_reconciled_at_the_next_reconfiguration(uncommitted: set[int], kept_step: bool) -> None:
    """A peer died while the commit vote of step 2 completed on some ranks only. Generation 1
    (process 3 gone): when a whole pipeline committed step 2 (processes 0, 1), the others drop
    their stale layers and copy the committed ones; when only process 2 (half a pipeline)
    committed it, its layers are dropped and step 2 is redone. Either way the run equals the
    reference."""
    spec = tiny_spec("gpt", steps=4)
    gens = [
        (simple_plan([[2, 2], [2, 2]], [3, 5]), 2, {0: 0, 1: 1, 2: 2, 3: 3}, uncommitted),
        (simple_plan([[2, 2], [4]], [4, 4]), 2 if kept_step else 3, {0: 0, 1: 1, 2: 2}),
    ]
    results = run_ranks(4, reconfigure_ranks, (spec, gens))
    ref_losses, _ = reference(spec, 4)
    for process in (0, 1, 2):
        losses = results[process]["losses"]
        # A rank that did not commit step 2 (index 1) and then copied it from others never ran it.
        ran = [0, 2, 3] if kept_step and process in uncommitted else [0, 1, 2, 3]
        assert sorted(losses) == ran, (process, losses)
        assert [losses[s] for s in ran] == pytest.approx([ref_losses[s] for s in ran], rel=1e-5)
    assert_params_match(spec, results[:3], steps=4)


@pytest.mark.slow
def test_fp64_runs_stay_equal_to_the_reference_over_many_steps() -> None:
    """``precision: fp64`` (verification runs): 2 + 3 stages for 40 steps at a learning rate where
    fp32 summation order alone drifts visibly; in fp64 the parameters agree to 1e-9."""
    spec = tiny_spec("gpt", precision="fp64", steps=40)
    plan = simple_plan(*PLANS["2+3-heterogeneous"])
    results = run_ranks(plan.world_size, train_ranks, (spec, plan, 40))
    ref_losses, ref_state = reference(spec, 40)
    for r in results:
        assert r["losses"] == pytest.approx(ref_losses, rel=1e-10)
        for layer, params in r["params"].items():
            for name, value in params.items():
                assert value.dtype == torch.float64
                torch.testing.assert_close(value, ref_state[layer][name], rtol=1e-9, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize(
    "voted", [{2: "voted", 3: "voted"}, {0: "voted", 1: "voted"}, {2: "voted"}, {0: "lost", 2: "voted"}]
)
def test_split_vote_is_rolled_forward_by_ranks_that_kept_their_gradients(voted: dict[int, str]) -> None:
    """The commit vote of step 2 fails on some ranks after every gradient all-reduce (a peer died
    as it completed): those ranks keep their gradients, and at the next reconfiguration they apply
    the step with the global norm the committed ranks report. Nothing is redone, whichever ranks
    (even half a pipeline) committed; the run equals the reference. With a rank that kept nothing
    of the step (``lost``) the positions are split too: the rolled-forward rank's layers count as
    carried at step 2 (it is the copy source for the rank that lost the step)."""
    spec = tiny_spec("gpt", steps=4)
    gens = [
        (simple_plan([[2, 2], [2, 2]], [3, 5]), 2, {0: 0, 1: 1, 2: 2, 3: 3}, voted),
        (simple_plan([[2, 2], [4]], [4, 4]), 2, {0: 0, 1: 1, 2: 2}),
    ]
    results = run_ranks(4, reconfigure_ranks, (spec, gens))
    ref_losses, _ = reference(spec, 4)
    for process in (0, 1, 2):
        losses = results[process]["losses"]
        ran = [0, 2, 3] if process in voted else [0, 1, 2, 3]
        assert sorted(losses) == ran, (process, losses)
        assert [losses[s] for s in ran] == pytest.approx([ref_losses[s] for s in ran], rel=1e-5)
    assert_params_match(spec, results[:3], steps=4)


def test_rendezvous_gives_up_when_the_generation_is_superseded() -> None:
    """Rank 0 of a 2-rank generation whose rank 1 never arrives (it died first): while nothing
    else is waiting it keeps waiting; once a newer command is (``interrupt`` says so) it gives
    up at once instead of at the rendezvous timeout, and a later generation can be joined."""
    import time

    store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, wait_for_workers=False)
    spec = tiny_spec("gpt")
    asked: list[float] = []
    t0 = time.monotonic()

    def interrupt() -> str | None:
        asked.append(time.monotonic() - t0)
        return "a newer command is waiting" if len(asked) > 5 else None

    init = DistInit(host="127.0.0.1", port=store.port, timeout_s=60)
    with pytest.raises(RendezvousAbandoned, match="1 of 2 ranks arrived: a newer command is waiting"):
        TrainingEngine(spec, simple_plan([[4], [4]], [4, 4]), 0, init, interrupt=interrupt)
    assert len(asked) == 6 and asked[-1] - asked[0] >= 0.2 and time.monotonic() - t0 < 10  # polled, then gave up
    assert not dist.is_initialized()
    plan = dataclasses.replace(simple_plan([[4]], [8]), generation=2)
    engine = TrainingEngine(spec, plan, 0, init, interrupt=lambda: None)  # the next generation: alone
    try:
        assert engine.train_step().step == 1
    finally:
        engine.close()


def test_unreachable_rendezvous_store_is_given_up_when_superseded() -> None:
    """The agent hosting the generation's store died with its node: connecting is retried in
    short attempts and given up once a newer command is waiting."""
    import socket
    import time

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    asked: list[int] = []

    def interrupt() -> str | None:
        asked.append(1)
        return "a newer command is waiting" if len(asked) >= 2 else None

    t0 = time.monotonic()
    with pytest.raises(RendezvousAbandoned, match=f"store 127.0.0.1:{port} unreachable"):
        TrainingEngine(
            tiny_spec("gpt"),
            simple_plan([[4]], [8]),
            0,
            DistInit(host="127.0.0.1", port=port, timeout_s=60),
            interrupt=interrupt,
        )
    assert len(asked) == 2 and time.monotonic() - t0 < 20
