"""End to end: more failures than the plan absorbs. The real master (C planner), four real agents
(one CPU slot each) and their workers train the tiny GPT with ft=1 and a checkpoint every few
steps; three of the four nodes are killed with ``kill -9`` at once. One node cannot hold a
pipeline (min_nodes 2), so the master pauses the job (GetStatus says why) and stops the survivor's
worker. A fresh agent (a new node) then registers; the survivor and it fit a plan, and the master
restarts the job from the latest checkpoint (a new generation with ``restore_from_checkpoint``).
The job succeeds and its final checkpoint equals an uninterrupted single-process run of the same
job (``rtol=1e-4, atol=1e-5``): the steps after the checkpoint are redone, none is lost or seen
twice. Every process is stopped at the end and none may be left behind.
"""

from __future__ import annotations

import re
import signal

import pytest

from oobleck.protos.v1 import admin_pb2

from .cluster import wait_pid_gone
from .jobs import CHECKPOINT_INTERVAL, assert_final_checkpoint_matches_reference, job_spec, reference

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

NODES = 4
FAULT_AT_STEP = CHECKPOINT_INTERVAL + 2  # a checkpoint exists, and some steps past it are lost
RUNNING = admin_pb2.JOB_STATE_RUNNING
PAUSED = admin_pb2.JOB_STATE_PAUSED
SUCCEEDED = admin_pb2.JOB_STATE_SUCCEEDED


def _trained_steps(log_text: str) -> list[tuple[int, int, float]]:
    """``(generation, step, loss)`` of every step the node's worker committed, in order."""
    pattern = r"slot 0 rank \d+ gen (\d+): step (\d+)/\d+ loss ([0-9.]+)"
    return [(int(g), int(s), float(loss)) for g, s, loss in re.findall(pattern, log_text)]


def test_kill9_of_three_of_four_nodes_pauses_then_restores_from_checkpoint(cluster, profile_path, tmp_path) -> None:
    spec = job_spec(tmp_path / "ckpt", profile_path, ft=1)
    cluster.start(NODES)
    cluster.submit(spec.to_yaml())
    status = cluster.wait_status(lambda s: s.state == RUNNING and s.step >= FAULT_AT_STEP, f"step {FAULT_AT_STEP}")
    assert status.generation == 1 and status.step < spec.steps, status
    ids = cluster.node_ids()
    names = {node_id: name for name, node_id in ids.items()}
    pipelines = [list(p.node_ids) for p in status.plan.pipelines]
    assert sorted(n for p in pipelines for n in p) == sorted(ids.values())
    assert len(pipelines) == 2 and all(len(p) == 2 for p in pipelines), pipelines  # min_nodes: 2

    # kill -9 of three nodes (agents and workers) at once: the one left cannot form a pipeline.
    survivor = names[pipelines[-1][-1]]
    victims = sorted(set(ids) - {survivor})
    survivor_worker = cluster.wait_workers([survivor])[survivor]
    cluster.kill_nodes(victims)
    for name in victims:
        assert cluster.agents[name].proc.returncode == -signal.SIGKILL

    paused = cluster.wait_status(lambda s: s.state == PAUSED, "the job to pause")
    assert "not enough nodes" in paused.reason, paused.reason
    assert paused.step < spec.steps, paused
    paused_generation, paused_step = paused.generation, paused.step
    # The survivor's worker is stopped; its agent stays up as a spare.
    cluster.wait_nodes(
        lambda ns: any(n.name == survivor and n.state == admin_pb2.NODE_STATE_SPARE for n in ns), f"{survivor} spare"
    )
    assert cluster.agents[survivor].proc.poll() is None
    assert wait_pid_gone(survivor_worker, 30), f"{survivor}'s worker was not stopped:\n{cluster.logs()}"
    assert cluster.status().state == PAUSED  # one node cannot hold a plan (min_nodes 2)

    # A fresh node: the survivor and it fit a plan; the job restarts from the latest checkpoint.
    cluster.add_agent("node4")
    resumed = cluster.wait_status(
        lambda s: s.generation > paused_generation and s.state in (RUNNING, SUCCEEDED), "the job to resume"
    )
    assert resumed.plan.restore_from_checkpoint, resumed.plan
    new_ids = cluster.node_ids()
    assert sorted(n for p in resumed.plan.pipelines for n in p.node_ids) == sorted(
        [new_ids[survivor], new_ids["node4"]]
    ), (resumed.plan, new_ids)

    final = cluster.wait_status(lambda s: s.state == SUCCEEDED, "the job to succeed", timeout_s=120)
    assert final.step == spec.steps and final.generation == resumed.generation, final
    assert final.plan.restore_from_checkpoint

    # The restored generation starts right after a checkpoint and redoes the lost steps, each with
    # the reference's loss.
    ref_losses, _ = reference(spec)
    for name in (survivor, "node4"):
        log = cluster.agents[name].log.read_text()
        trained = [(s, loss) for g, s, loss in _trained_steps(log) if g == final.generation]
        steps = [s for s, _ in trained]
        assert steps, f"{name} trained no step of generation {final.generation}:\n{log[-3000:]}"
        first = steps[0]
        assert (first - 1) % CHECKPOINT_INTERVAL == 0 and 1 < first <= paused_step + 1, (first, paused_step)
        assert steps == list(range(first, spec.steps + 1)), steps
        for step, loss in trained:
            assert loss == pytest.approx(ref_losses[step - 1], abs=1e-4), (name, step)

    events = cluster.events()
    kinds = [e.kind for e in events]
    assert kinds.count("job_paused") == 1 and kinds.count("job_resumed") == 1, kinds
    assert kinds.index("job_paused") < kinds.index("job_resumed"), kinds
    pause_event = next(e for e in events if e.kind == "job_paused")
    assert "not enough nodes" in pause_event.message, pause_event.message
    resume_event = next(e for e in events if e.kind == "job_resumed")
    assert resume_event.generation == final.generation > paused_generation, (resume_event, paused_generation)
    assert sorted(names.get(e.node_id, e.node_id) for e in events if e.kind == "node_dead") == victims

    assert_final_checkpoint_matches_reference(spec)
    orphans = cluster.stop()
    assert orphans == {}, orphans
