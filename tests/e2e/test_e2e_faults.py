"""End to end: the real master (C planner), six (or five) real agents (one CPU slot each) and
their real workers (gloo) train a tiny GPT; nodes fail in the middle of training.

Each test checks that the master moves to generation 2 (one reconfiguration) with a plan over
exactly the surviving nodes, that their workers copied layers between them, that the surviving
workers are the same processes before and after the reconfiguration (nothing respawned), that
every surviving worker committed each step exactly once with the loss of the reference, that the
job succeeds, and that its final checkpoint equals an uninterrupted single-process run of the same job
(``rtol=1e-4, atol=1e-5``: no sample was lost or seen twice). Every process is stopped at the
end and none may be left behind.
"""

from __future__ import annotations

import os
import re
import signal

import pytest

from oobleck.protos.v1 import admin_pb2

from .cluster import wait_pid_gone
from .jobs import assert_final_checkpoint_matches_reference, job_spec, reference

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

NODES = 6
FAULT_AT_STEP = 4  # the fault is injected once the master has seen this step
RUNNING = admin_pb2.JOB_STATE_RUNNING
SUCCEEDED = admin_pb2.JOB_STATE_SUCCEEDED


def _spawned_pids(log_text: str) -> list[int]:
    return [int(p) for p in re.findall(r"slot 0: worker pid (\d+) spawned", log_text)]


def _applied_steps(log_text: str) -> list[int]:
    """Steps the node's worker did not train but applied at a reconfiguration: its commit vote
    failed as the peers committed (a peer died right then), its gradients were kept (roll-forward)."""
    return [int(s) for s in re.findall(r"applied step (\d+), which peers committed", log_text)]


def _received_layers(log_text: str, generation: int) -> int:
    """Layers the node's worker received from its peers when it joined ``generation`` (the
    workers decide the copies from what every rank carries: docs/worker.md)."""
    pattern = rf"slot 0 rank \d+ gen {generation}: ready at step \d+ \(.*; received (\d+) layers"
    return sum(int(n) for n in re.findall(pattern, log_text))


def _trained_steps(log_text: str) -> list[tuple[int, int, float]]:
    """``(generation, step, loss)`` of every step the node's worker committed, in order."""
    pattern = r"slot 0 rank \d+ gen (\d+): step (\d+)/\d+ loss ([0-9.]+)"
    return [(int(g), int(s), float(loss)) for g, s, loss in re.findall(pattern, log_text)]


def run_with_fault(cluster, spec, choose_victims, inject, nodes: int = NODES) -> dict:
    """Start the cluster (``nodes`` agents) and the job, inject a fault into the nodes
    ``choose_victims(pipelines)`` picks (node ids of the first generation's pipelines) with
    ``inject(cluster, victim_names, worker_pids)``, then check everything the module docstring
    promises."""
    cluster.start(nodes)
    cluster.submit(spec.to_yaml())
    cluster.wait_status(lambda s: s.state == RUNNING and s.generation == 1 and s.step >= 1, "training")
    ids = cluster.node_ids()
    names = {node_id: name for name, node_id in ids.items()}
    before = cluster.wait_workers(sorted(ids))

    status = cluster.wait_status(lambda s: s.step >= FAULT_AT_STEP, f"step {FAULT_AT_STEP}")
    assert status.generation == 1 and status.step < spec.steps, status
    pipelines = [list(p.node_ids) for p in status.plan.pipelines]
    assert sorted(n for p in pipelines for n in p) == sorted(ids.values())
    assert len(pipelines) >= 2 and all(len(p) >= 2 for p in pipelines), pipelines  # min_nodes: 2
    victims = sorted(names[n] for n in choose_victims(pipelines))
    survivors = sorted(set(ids) - set(victims))
    inject(cluster, victims, before)

    # Generation 2: exactly the survivors (layers are copied: borrowing / merging happened).
    status = cluster.wait_status(lambda s: s.generation >= 2, "generation 2")
    assert status.generation == 2, status
    assert sorted(n for p in status.plan.pipelines for n in p.node_ids) == sorted(ids[n] for n in survivors)
    assert status.plan.resume_step < spec.steps
    assert all(len(p.node_ids) >= 2 for p in status.plan.pipelines), status.plan
    # Training goes on under generation 2 with the same worker processes.
    cluster.wait_status(
        lambda s: s.state == SUCCEEDED or (s.generation == 2 and s.step > status.plan.resume_step),
        "a step of generation 2",
    )
    during = {name: cluster.worker_pids(name) for name in survivors}
    final = cluster.wait_status(lambda s: s.state == SUCCEEDED, "the job to succeed", timeout_s=120)
    assert final.generation == 2 and final.step == spec.steps, final
    assert sorted(n for p in final.plan.pipelines for n in p.node_ids) == sorted(ids[n] for n in survivors)
    ref_losses, _ = reference(spec)
    for name in survivors:
        assert during[name] in ({before[name]}, set()), (name, before[name], during[name])  # set(): done already
        log = cluster.agents[name].log.read_text()
        assert _spawned_pids(log) == [before[name]], f"{name} respawned its worker:\n{log[-3000:]}"
        # Every rank logs the last step before the final checkpoint's barrier; the master stops
        # the workers once one of them reports the step after that barrier.
        assert f"gen 2: step {spec.steps}/{spec.steps} loss" in log, log[-3000:]
        # Each step committed exactly once, with the reference's loss (the failed step is redone).
        trained = _trained_steps(log)
        steps = sorted([step for _, step, _ in trained] + _applied_steps(log))
        assert steps == list(range(1, spec.steps + 1)), (trained, _applied_steps(log))
        assert {g for g, _, _ in trained} == {1, 2}
        for _, step, loss in trained:
            assert loss == pytest.approx(ref_losses[step - 1], abs=1e-4), (name, step)
    assert any(during.values()), "the job ended before any worker could be seen under generation 2"
    received = {name: _received_layers(cluster.agents[name].log.read_text(), 2) for name in survivors}
    assert sum(received.values()) > 0, received

    events = cluster.events()
    kinds = [e.kind for e in events]
    assert kinds.count("reconfiguring") == 1 and kinds.count("reconfigured") == 1, kinds
    assert sorted(names.get(e.node_id, e.node_id) for e in events if e.kind == "node_dead") == victims
    reconfiguring = next(e for e in events if e.kind == "reconfiguring")
    assert reconfiguring.generation == 2 and reconfiguring.step < spec.steps
    reconfigured = next(e for e in events if e.kind == "reconfigured")
    assert reconfigured.durations_s["copy"] > 0, dict(reconfigured.durations_s)
    assert any(e.kind == "resumed" and e.generation == 2 for e in events), kinds

    assert_final_checkpoint_matches_reference(spec)
    orphans = cluster.stop()
    assert orphans == {}, orphans
    return {"victims": victims, "survivors": survivors, "events": events, "ids": ids}


def kill9(cluster, victims, worker_pids) -> None:
    cluster.kill_nodes(victims)
    for name in victims:
        assert cluster.agents[name].proc.returncode == -signal.SIGKILL
        assert wait_pid_gone(worker_pids[name], 10)


def test_kill9_of_one_node_mid_training(cluster, profile_path, tmp_path) -> None:
    """ft=1: the first node of the first pipeline loses its agent and worker to SIGKILL; the
    rest of its pipeline is merged with another one (3 + 2 nodes), layers are copied."""
    spec = job_spec(tmp_path / "ckpt", profile_path, ft=1)
    run_with_fault(cluster, spec, lambda pipes: [pipes[0][0]], kill9)


def test_kill9_of_two_nodes_at_once(cluster, profile_path, tmp_path) -> None:
    """ft=2: the second node of two pipelines dies at the same moment (one reconfiguration); the
    two halves left form one pipeline and receive the missing layers from the third."""
    spec = job_spec(tmp_path / "ckpt", profile_path, ft=2)
    result = run_with_fault(cluster, spec, lambda pipes: [pipes[0][1], pipes[1][1]], kill9)
    assert len(result["survivors"]) == 4


def test_hung_worker_is_detected_and_replaced(cluster, profile_path, tmp_path) -> None:
    """A worker frozen with SIGSTOP: its agent's liveness probe sees the stopped process, reports
    the node failed and stops the worker; the master reconfigures without that node. The agent
    itself stays up (and joins again as a spare)."""
    spec = job_spec(tmp_path / "ckpt", profile_path, ft=1)
    cluster.master_args = ["--no-scale-up"]  # the frozen node's agent comes back: keep one reconfiguration

    def freeze(cluster, victims, worker_pids) -> None:
        for name in victims:
            os.kill(worker_pids[name], signal.SIGSTOP)
        for name in victims:
            assert wait_pid_gone(worker_pids[name], 30), f"{name}'s frozen worker was not stopped"

    result = run_with_fault(cluster, spec, lambda pipes: [pipes[0][0]], freeze)
    (victim,) = result["victims"]
    dead = [e for e in result["events"] if e.kind == "node_dead"]
    assert "process is stopped" in dead[0].message, dead[0].message
    # The frozen node's agent survived the fault and registered again (a new node id, a spare).
    registered = [e for e in result["events"] if e.kind == "node_registered" and e.message.startswith(f"{victim} ")]
    assert len(registered) == 2 and registered[1].node_id != result["ids"][victim], registered
    assert cluster.agents[victim].proc.returncode == 0  # it lived until the cluster's SIGTERM


def _in_pipeline_of(size: int, stage: int):
    """Victim chooser: the node at ``stage`` of the first pipeline of ``size`` nodes."""

    def choose(pipelines: list[list[int]]) -> list[int]:
        assert sorted(len(p) for p in pipelines) == [2, 3], pipelines  # 5 nodes, min_nodes 2
        return [next(p for p in pipelines if len(p) == size)[stage]]

    return choose


def test_kill9_of_the_last_stage_of_a_three_node_pipeline(cluster, profile_path, tmp_path) -> None:
    """Five nodes, ft=1: pipelines of 2 and 3 nodes. The last node of the 3-node pipeline dies;
    its first stage is not its neighbour (it waits on the middle stage, which is alive), yet every
    survivor must leave the step and reconfigure to 2 + 2 nodes (a regression: the middle stage
    used to go on to the gradient sync after its transfer failed, the first stage stayed blocked
    on it, and no survivor ever saw the reconfiguration)."""
    spec = job_spec(tmp_path / "ckpt", profile_path, ft=1)
    result = run_with_fault(cluster, spec, _in_pipeline_of(3, -1), kill9, nodes=5)
    assert len(result["survivors"]) == 4


def test_kill9_of_a_node_of_the_two_node_pipeline(cluster, profile_path, tmp_path) -> None:
    """Five nodes, ft=1: the first node of the 2-node pipeline dies; its survivor and a node of the
    3-node pipeline form a new pipeline (2 + 2 nodes)."""
    spec = job_spec(tmp_path / "ckpt", profile_path, ft=1)
    result = run_with_fault(cluster, spec, _in_pipeline_of(2, 0), kill9, nodes=5)
    assert len(result["survivors"]) == 4
