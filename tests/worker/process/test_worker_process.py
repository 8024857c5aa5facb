"""Real ``python -m oobleck.worker`` processes against fake node agents (gloo on CPU).

Every test ends by comparing with the single-process reference: the losses the workers report
and the parameters of the final checkpoint they write equal a plain PyTorch loop's.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from oobleck.common.jobspec import CheckpointSpec, DataSpec, JobSpec, ModelSpec, OptimizerSpec
from oobleck.worker import checkpoint as ckpt
from oobleck.worker.reference import reference_run

from .fake_agent import plan_message

STEPS = 5
# 4 model layers: embedding, 2 blocks, head (tied to the embedding).
ONE_NODE_ONE_STAGE = {1: [(0, 4, 0, 1)]}
TWO_NODES_TWO_STAGES = {2: [(0, 2, 0, 1), (2, 4, 1, 1)]}


def job_spec(ckpt_dir: Path, *, steps: int = STEPS, interval: int = 2, **config) -> JobSpec:
    model_config = {"num_layers": 2, "hidden_size": 32, "num_heads": 4, "vocab_size": 64, "tie_embeddings": True}
    model_config.update(config)
    return JobSpec(
        name="worker-main-test",
        model=ModelSpec("gpt", model_config),
        data=DataSpec(seq_len=16, num_samples=256, seed=3),
        optimizer=OptimizerSpec(lr=1e-2, eps=1e-6, grad_clip_norm=0.5, warmup_steps=2, weight_decay=0.01),
        global_batch_size=16,
        microbatch_size=2,  # 8 microbatches per step
        steps=steps,
        seed=5,
        checkpoint=CheckpointSpec(dir=str(ckpt_dir), interval_steps=interval),
    )


def reference(spec: JobSpec, steps: int = STEPS):
    return reference_run(spec.to_yaml(), steps)


def assert_checkpoint_matches_reference(spec: JobSpec, steps: int = STEPS) -> None:
    """The job's latest checkpoint is the one of step ``steps`` and equals the reference."""
    manifest, root = ckpt.read_manifest(Path(spec.checkpoint.dir))
    assert manifest["step"] == steps
    assert root.name == ckpt.step_dir(Path(spec.checkpoint.dir), steps).name
    _, ref_state = reference(spec, steps)
    layers = ckpt.load_layers(root, manifest, range(len(ref_state)))
    for layer, ref_params in ref_state.items():
        params = {k.removeprefix("param."): v for k, v in layers[layer].items() if k.startswith("param.")}
        assert set(params) == set(ref_params)
        for name, value in params.items():
            torch.testing.assert_close(value, ref_params[name], rtol=1e-4, atol=1e-5, msg=f"layer {layer} {name}")


def assert_losses_match(spec: JobSpec, reports, first_step: int = 1) -> None:
    ref_losses, _ = reference(spec, spec.steps)
    got = {r.step: r.loss for r in reports}
    assert sorted(got) == list(range(first_step, spec.steps + 1))
    for step, loss in got.items():
        assert loss == pytest.approx(ref_losses[step - 1], rel=1e-4), f"step {step}"


def test_help_runs_without_an_agent() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "oobleck.worker", "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: python -m oobleck.worker")


def test_without_agent_environment_exits_2() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OOBLECK_")}
    result = subprocess.run(
        [sys.executable, "-m", "oobleck.worker"], capture_output=True, text=True, timeout=60, env=env
    )
    assert result.returncode == 2
    assert "OOBLECK_AGENT_SOCKET" in result.stderr


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_two_slots_train_to_the_end_then_a_restart_restores(tmp_path, store_port, agents, workers) -> None:
    """One node, two slots holding ranks (1, 0): a 2-stage pipeline; checkpoints at 2, 4 and 5.
    Then a Start with ``restore_from_checkpoint`` on another node (one stage) loads step 5 and
    trains on to step 7."""
    spec = job_spec(tmp_path / "ckpt", interval=2)
    node = agents(7)
    plan = plan_message(1, [((7,), 8)], {1: [(0, 2, 0, 1), (2, 4, 0, 1)]}, {7: [1, 0]}, store_port, resume_step=0)
    for slot in (0, 1):
        workers.spawn(node, slot)
        node.start_command(slot, 1, plan, spec.to_yaml())
    for slot in (0, 1):
        assert workers.wait(7, slot, timeout_s=80) == 0, workers.all_logs()
    assert node.errors == []
    assert sorted((r.slot, r.generation) for r in node.ready) == [(0, 1), (1, 1)]
    for slot in (0, 1):
        reports = node.steps_of(slot)
        assert [r.step for r in reports] == list(range(1, STEPS + 1))
        assert all(r.generation == 1 and r.samples == r.step * 16 and r.samples_per_s > 0 for r in reports)
        assert_losses_match(spec, reports)
    for step in (2, 4, 5):
        assert (ckpt.step_dir(Path(spec.checkpoint.dir), step) / ckpt.MANIFEST).exists()
    assert_checkpoint_matches_reference(spec)
    log = workers.log(7, 0)
    assert "node 7 slot 0 rank 1 gen 1: step 3/5 loss" in log
    assert "finished 5 steps" in log

    # The job is restarted (longer) on another node under another plan: it restores step 5.
    longer = job_spec(tmp_path / "ckpt", steps=STEPS + 2, interval=2)
    node = agents(4)
    plan = plan_message(3, [((4,), 8)], ONE_NODE_ONE_STAGE, {4: [0]}, store_port, resume_step=5)
    plan.restore_from_checkpoint = True
    workers.spawn(node, 0)
    node.start_command(0, 3, plan, longer.to_yaml())
    assert workers.wait(4, 0, timeout_s=60) == 0, workers.all_logs()
    assert node.errors == []
    assert_losses_match(longer, node.steps_of(0), first_step=STEPS + 1)
    assert "restored the checkpoint of step 5" in workers.log(4)
    assert_checkpoint_matches_reference(longer, STEPS + 2)


@pytest.mark.slow
@pytest.mark.timeout(110)
def test_sigkilled_peer_then_reconfigure_resumes_like_the_reference(tmp_path, store_port, agents, workers) -> None:
    """Nodes 1, 2, 3: pipelines [1, 2] and [3]. Node 2's worker is SIGKILLed right after it
    commits step 2; the survivors fail their step 3 (no update), receive generation 2 (two 1-stage
    pipelines over nodes 1 and 3: node 1 gets layers 2-3 copied from node 3) and end equal to the
    uninterrupted reference."""
    spec = job_spec(tmp_path / "ckpt", interval=3)
    nodes = {n: agents(n) for n in (1, 2, 3)}
    templates = {**TWO_NODES_TWO_STAGES, **ONE_NODE_ONE_STAGE}
    gen1 = plan_message(1, [((1, 2), 3), ((3,), 5)], templates, {1: [0], 2: [1], 3: [2]}, store_port)
    kill_at = 2
    victim_dead = threading.Event()

    def kill_victim(request) -> None:
        if request.step == kill_at:
            victim = workers.procs[(2, 0)]
            victim.send_signal(signal.SIGKILL)  # before its step report returns: it never starts step 3
            victim.wait()
            victim_dead.set()

    nodes[2].on_step = kill_victim
    for agent in nodes.values():
        workers.spawn(agent, 0)
        agent.start_command(0, 1, gen1, spec.to_yaml())
    assert victim_dead.wait(80), workers.all_logs()
    assert workers.procs[(2, 0)].returncode == -signal.SIGKILL

    # Both survivors fail step 3 before generation 2 is sent (otherwise a survivor may pick the
    # command up between steps, never start step 3, and the failure path goes untested).
    deadline = time.monotonic() + 80
    while not all("abandoned" in workers.log(n) for n in (1, 3)):
        assert time.monotonic() < deadline, workers.all_logs()
        time.sleep(0.02)
    survivors = {1: [0], 3: [1]}
    gen2 = plan_message(2, [((1,), 4), ((3,), 4)], ONE_NODE_ONE_STAGE, survivors, store_port, resume_step=kill_at)
    for n in (1, 3):
        nodes[n].reconfigure(0, 2, gen2)
    for n in (1, 3):
        assert workers.wait(n, 0, timeout_s=80) == 0, workers.all_logs()
        agent = nodes[n]
        assert agent.errors == []
        assert [(r.generation, r.slot) for r in agent.ready] == [(1, 0), (2, 0)]
        assert agent.ready[1].copy_s > 0
        reports = agent.steps_of(0)
        assert [(r.generation, r.step) for r in reports] == [(1, 1), (1, 2), (2, 3), (2, 4), (2, 5)]
        assert_losses_match(spec, reports)
        assert "abandoned" in workers.log(n), workers.log(n)
    assert_checkpoint_matches_reference(spec)


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_stale_command_ignored_then_stop_exits_0(tmp_path, store_port, agents, workers) -> None:
    spec = job_spec(tmp_path / "ckpt", steps=10_000, interval=1_000)
    node = agents(5)
    plan = plan_message(1, [((5,), 8)], ONE_NODE_ONE_STAGE, {5: [0]}, store_port)

    def control(request) -> None:
        if request.step == 2:
            node.reconfigure(0, 1, plan)  # same generation: ignored, training goes on
        elif request.step == 4:
            node.stop_worker(0, 1, reason="test is over")

    node.on_step = control
    workers.spawn(node, 0)
    node.start_command(0, 1, plan, spec.to_yaml())
    assert workers.wait(5, 0, timeout_s=55) == 0, workers.all_logs()
    steps = [r.step for r in node.steps_of(0)]
    assert steps[:4] == [1, 2, 3, 4]
    assert steps[-1] < 10  # stopped between steps, not trained to the end
    assert [r.generation for r in node.ready] == [1]
    assert node.errors == []
    log = workers.log(5)
    assert "ignored reconfigure for generation 1" in log
    assert "stopped by the agent (test is over)" in log


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_fatal_errors_exit_1_and_sigterm_exits_143(tmp_path, store_port, agents, workers) -> None:
    """A bad model config and a plan without this node: a fatal error naming the cause, exit 1.
    A worker sent SIGTERM mid-training closes its engine and exits 143 (not "finished")."""
    bad = job_spec(tmp_path / "ckpt", num_heads=5)
    good = job_spec(tmp_path / "ckpt")
    node_bad, node_absent, node_term = agents(8), agents(9), agents(6)
    plan = plan_message(1, [((8,), 8)], ONE_NODE_ONE_STAGE, {8: [0]}, store_port)
    term_plan = plan_message(1, [((6,), 8)], ONE_NODE_ONE_STAGE, {6: [0]}, store_port)

    def terminate(request) -> None:
        if request.step == 2:
            workers.procs[(6, 0)].send_signal(signal.SIGTERM)

    node_term.on_step = terminate
    workers.spawn(node_bad, 0)
    workers.spawn(node_absent, 0)
    workers.spawn(node_term, 0)
    node_bad.start_command(0, 1, plan, bad.to_yaml())
    node_absent.start_command(0, 1, plan, good.to_yaml())
    node_term.start_command(0, 1, term_plan, job_spec(tmp_path / "ckpt6", steps=10_000, interval=1_000).to_yaml())
    assert workers.wait(6, 0, timeout_s=55) == 128 + signal.SIGTERM, workers.all_logs()
    assert "SIGTERM: closing" in workers.log(6)
    assert node_term.errors == []
    assert workers.wait(8, 0, timeout_s=55) == 1, workers.all_logs()
    assert workers.wait(9, 0, timeout_s=55) == 1, workers.all_logs()
    assert [e.fatal for e in node_bad.errors] == [True]
    assert "model.config.num_heads" in node_bad.errors[0].message
    assert [e.fatal for e in node_absent.errors] == [True]
    assert "node 9 is not in the plan of generation 1" in node_absent.errors[0].message
    assert node_bad.steps == [] and node_absent.steps == []


@pytest.mark.slow
@pytest.mark.timeout(110)
def test_scale_up_reconfigure_with_a_joining_worker(tmp_path, store_port, agents, workers) -> None:
    """Healthy reconfiguration: nodes 1 and 2 train (two 1-stage pipelines); when node 1 reports
    step 2, generation 2 adds node 3 (a fresh worker, Start) in front of node 1 ([3, 1] and [2]).
    The command reaches the workers between steps 2 and 4 (delivery is asynchronous); a worker
    already inside the next step fails it when its peer leaves the old group, and joins too. The
    new worker receives its layers and the committed position from the others."""
    spec = job_spec(tmp_path / "ckpt", interval=3)
    nodes = {n: agents(n) for n in (1, 2, 3)}
    gen1 = plan_message(1, [((1,), 4), ((2,), 4)], ONE_NODE_ONE_STAGE, {1: [0], 2: [1]}, store_port)
    templates = {**TWO_NODES_TWO_STAGES, **ONE_NODE_ONE_STAGE}
    gen2 = plan_message(2, [((3, 1), 5), ((2,), 3)], templates, {3: [0], 1: [1], 2: [2]}, store_port, resume_step=2)
    sent = threading.Event()

    def grow(request) -> None:
        if request.step == 2 and not sent.is_set():
            sent.set()
            nodes[1].reconfigure(0, 2, gen2)
            nodes[2].reconfigure(0, 2, gen2)
            nodes[3].start_command(0, 2, gen2, spec.to_yaml())

    nodes[1].on_step = grow
    for agent in nodes.values():
        workers.spawn(agent, 0)  # node 3's worker waits for its Start
    for n in (1, 2):
        nodes[n].start_command(0, 1, gen1, spec.to_yaml())
    for n in (1, 2, 3):
        assert workers.wait(n, 0, timeout_s=90) == 0, workers.all_logs()
        assert nodes[n].errors == []
    assert [r.generation for r in nodes[1].ready] == [1, 2]
    assert [r.generation for r in nodes[2].ready] == [1, 2]
    assert [r.generation for r in nodes[3].ready] == [2]
    for n in (1, 2):
        assert_losses_match(spec, nodes[n].steps_of(0))
    # Every worker joined generation 2 at the same committed step, and trained on from there.
    joined = {workers.log(n).split(": ready at step ")[-1][0] for n in (1, 2, 3)}
    assert len(joined) == 1
    first = int(joined.pop()) + 1
    assert 3 <= first <= 5
    assert_losses_match(spec, nodes[3].steps_of(0), first_step=first)
    assert all(r.generation == 2 for r in nodes[3].steps_of(0))
    for n in (1, 2):
        assert [r.generation for r in nodes[n].steps_of(0) if r.step >= first] == [2] * (STEPS + 1 - first)
    assert_checkpoint_matches_reference(spec)


@pytest.mark.slow
@pytest.mark.timeout(110)
def test_layers_lost_restores_from_the_checkpoint(tmp_path, store_port, agents, workers) -> None:
    """One pipeline [1, 2] holds each layer once. Node 2 is SIGKILLed once node 1 has passed the
    checkpoint of step 4 (which waits for the one of step 2 to be complete). Generation 2 on node
    1 alone has no copy of layers 2-3: the plan says restore, the worker loads the latest complete
    checkpoint (step 2 or 4), trains on to step 6 and ends equal to the reference."""
    steps = 6
    spec = job_spec(tmp_path / "ckpt", steps=steps, interval=2)
    nodes = {n: agents(n) for n in (1, 2)}
    gen1 = plan_message(1, [((1, 2), 8)], TWO_NODES_TWO_STAGES, {1: [0], 2: [1]}, store_port)
    victim_dead = threading.Event()

    def kill_victim(request) -> None:
        if request.step == 4 and not victim_dead.is_set():
            victim = workers.procs[(2, 0)]
            victim.send_signal(signal.SIGKILL)
            victim.wait()
            victim_dead.set()

    nodes[1].on_step = kill_victim
    for agent in nodes.values():
        workers.spawn(agent, 0)
        agent.start_command(0, 1, gen1, spec.to_yaml())
    assert victim_dead.wait(80), workers.all_logs()
    gen2 = plan_message(2, [((1,), 8)], ONE_NODE_ONE_STAGE, {1: [0]}, store_port, resume_step=4)
    gen2.restore_from_checkpoint = True
    nodes[1].reconfigure(0, 2, gen2)
    assert workers.wait(1, 0, timeout_s=80) == 0, workers.all_logs()
    agent = nodes[1]
    assert agent.errors == []
    assert [r.generation for r in agent.ready] == [1, 2]
    log = workers.log(1)
    assert "restoring every layer from the checkpoint" in log
    restored = int(log.split("restored the checkpoint of step ")[1].split()[0])
    assert restored in (2, 4)
    gen2_reports = [r for r in agent.steps_of(0) if r.generation == 2]
    assert_losses_match(spec, gen2_reports, first_step=restored + 1)
    assert_checkpoint_matches_reference(spec, steps)


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_a_bug_in_a_step_fails_the_worker_at_once_with_its_traceback(tmp_path, store_port, agents, workers) -> None:
    """A ``RuntimeError`` that no communication raised (an injected bug: the learning-rate
    schedule raises after the commit vote of step 2) is not a peer gone: the worker does not
    leave the group to wait for a reconfiguration (the wait is 600 s here), it exits 1 at once
    and tells its agent, with the traceback."""
    spec = job_spec(tmp_path / "ckpt")
    node = agents(11)
    plan = plan_message(1, [((11,), 8)], ONE_NODE_ONE_STAGE, {11: [0]}, store_port)
    env = {"OOBLECK_RECONFIGURE_WAIT_S": "600", "OOBLECK_TEST_BUG_AT_STEP": "1"}
    workers.spawn(node, 0, env=env, argv=[sys.executable, str(Path(__file__).with_name("buggy_worker.py"))])
    node.start_command(0, 1, plan, spec.to_yaml())
    node.wait_for(lambda: len(node.steps) >= 1, 60, "step 1")
    t0 = time.monotonic()
    assert workers.wait(11, 0, timeout_s=30) == 1, workers.all_logs()
    assert time.monotonic() - t0 < 30
    assert [r.step for r in node.steps] == [1]
    [error] = node.errors
    assert error.fatal and error.generation == 1
    assert error.message.startswith("RuntimeError: injected bug at step 2\nTraceback (most recent call last):")
    assert "in lr_at" in error.message and "step.py" in error.message, error.message
    log = workers.log(11)
    assert "abandoned" not in log and "waiting up to" not in log, log
