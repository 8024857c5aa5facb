"""End to end: training progress survives what an operator's bad day brings (real master, agents
and CPU workers; every test ends with the final checkpoint equal to the single-process reference
and every checkpoint intact).

- the master down for 30 s while the job finishes: the agents re-attach within seconds of its
  return, no node is declared dead, and the job completes from the agents' last reports;
- the master killed while a reconfiguration waits for its acks: after the restart the
  reconfiguration's phase events (reconfigured, resumed) are recorded as if nothing happened;
- more nodes lost than ``ft`` and their agents restarted at once: the job restores its
  checkpoint, returning nodes are added only once it has, and no generation ever trains from
  step 0 again;
- SIGTERM to an agent (a pre-emption notice): its node is drained at a step boundary and leaves,
  no step lost;
- workers whose start-up starves their heartbeat (importing torch on a loaded machine) are not
  declared hung.
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import pytest

from oobleck.common import checkpoint as ck
from oobleck.protos.v1 import admin_pb2

from .jobs import (
    CHECKPOINT_INTERVAL,
    assert_checkpoints_intact,
    assert_final_checkpoint_matches_reference,
    job_spec,
    reference,
    trained_steps,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

RUNNING = admin_pb2.JOB_STATE_RUNNING
PAUSED = admin_pb2.JOB_STATE_PAUSED
SUCCEEDED = admin_pb2.JOB_STATE_SUCCEEDED
OUTAGE_S = 30.0
HERE = Path(__file__).parent


def kinds(events) -> list[str]:
    return [e.kind for e in events]


def test_a_job_that_finishes_during_a_30s_master_outage_completes_when_it_returns(
    cluster, profile_path, tmp_path
) -> None:
    spec = job_spec(tmp_path / "ckpt", profile_path, ft=1)
    cluster.start(4)
    cluster.submit(spec.to_yaml())
    cluster.wait_status(lambda s: s.state == RUNNING and s.step >= 8, "step 8")
    names = list(cluster.agents)
    cluster.kill_master()
    down_at = time.monotonic()
    # Training does not need the master: the workers finish and write the final checkpoint.
    cluster.wait(
        lambda: (
            ck.complete_steps(spec.checkpoint.dir)[:1] == [spec.steps]
            and not any(cluster.worker_pids(n) for n in names)
        ),
        "the job to finish without the master",
        timeout_s=120,
    )
    assert time.monotonic() - down_at < OUTAGE_S, "the job took longer than the outage: the test proves nothing"
    time.sleep(max(0.0, down_at + OUTAGE_S - time.monotonic()))  # the outage itself, not a synchronisation
    cluster.start_master()
    back_at = time.monotonic()
    cluster.wait(
        lambda: all(n["attached"] for n in cluster.http_json("/api/status")["nodes"]), "every agent re-attached", 10
    )
    reattach_s = time.monotonic() - back_at
    final = cluster.wait_status(lambda s: s.state == SUCCEEDED, "the job to complete", timeout_s=20)
    assert final.step == spec.steps and final.generation == 1, final
    assert reattach_s <= 4.0, f"agents re-attached {reattach_s:.1f}s after the master came back"
    events = cluster.events()
    assert "node_dead" not in kinds(events), [(e.kind, e.message) for e in events]
    assert kinds(events)[-1] == "job_succeeded"
    assert sorted(n.state for n in cluster.nodes()) == [admin_pb2.NODE_STATE_SPARE] * 4
    assert_checkpoints_intact(spec)
    assert_final_checkpoint_matches_reference(spec)


def test_a_master_restart_during_a_reconfiguration_keeps_its_phase_events(cluster, profile_path, tmp_path) -> None:
    hold = tmp_path / "hold"
    cluster.agent_env = {"OOBLECK_WORKER_HOLD_FILE": str(hold)}
    spec = job_spec(tmp_path / "ckpt", profile_path, ft=1)
    cluster.start(4)
    cluster.submit(spec.to_yaml())
    status = cluster.wait_status(lambda s: s.state == RUNNING and s.step >= 5, "step 5")
    victim = next(
        name for name, node_id in cluster.node_ids().items() if node_id == status.plan.pipelines[0].node_ids[0]
    )
    hold.write_text("copy")  # survivors join generation 2, then wait before the layer copy: no acks
    cluster.kill_nodes([victim])
    cluster.wait_status(lambda s: s.generation == 2 and s.state == admin_pb2.JOB_STATE_RECONFIGURING, "generation 2")
    cluster.kill_master()
    cluster.start_master()
    hold.unlink()
    final = cluster.wait_status(lambda s: s.state == SUCCEEDED, "the job to succeed")
    assert final.generation == 2, final
    events = [e for e in cluster.events() if e.generation == 2]
    assert kinds(events)[:1] == ["reconfiguring"], kinds(events)
    (reconfigured,) = [e for e in events if e.kind == "reconfigured"]
    assert {"detect", "plan", "regroup", "copy"} <= set(reconfigured.durations_s), reconfigured
    assert reconfigured.durations_s["copy"] > 0
    (resumed,) = [e for e in events if e.kind == "resumed"]
    assert events.index(reconfigured) < events.index(resumed)
    assert_checkpoints_intact(spec)
    assert_final_checkpoint_matches_reference(spec)


def test_returning_nodes_restore_the_checkpoint_and_nothing_trains_from_scratch(
    cluster, profile_path, tmp_path
) -> None:
    """The issue's drill: more nodes lost than ft, their agents restarted together. The first
    returning node makes a plan feasible and the restore starts; the others join only once its
    workers have restored (a scale-up never replaces a generation that has not restored)."""
    spec = job_spec(tmp_path / "ckpt", profile_path, ft=1)
    cluster.start(4)
    cluster.submit(spec.to_yaml())
    fault_at = 2 * CHECKPOINT_INTERVAL + 2
    status = cluster.wait_status(lambda s: s.state == RUNNING and s.step >= fault_at, f"step {fault_at}")
    cluster.wait(lambda: 2 * CHECKPOINT_INTERVAL in ck.complete_steps(spec.checkpoint.dir), "the step-10 checkpoint")
    taken = ck.complete_steps(spec.checkpoint.dir)[0]
    survivor = next(n for n, i in cluster.node_ids().items() if i == status.plan.pipelines[-1].node_ids[-1])
    victims = sorted(set(cluster.agents) - {survivor})
    cluster.kill_nodes(victims)
    paused = cluster.wait_status(lambda s: s.state == PAUSED, "the job to pause")
    for name in victims:  # all back at once, each registering as a new node
        cluster.spawn_agent(name)
    final = cluster.wait_status(lambda s: s.state == SUCCEEDED, "the job to succeed", timeout_s=150)
    assert final.step == spec.steps

    events = cluster.events()
    after = [e for e in events if e.generation > paused.generation]
    resumed = next(e for e in after if e.kind == "job_resumed")
    running = next(e for e in after if e.kind == "running")
    assert running.generation == resumed.generation
    restored = int(running.message.split("restored at step ")[1].rstrip(")"))
    assert restored >= taken, (restored, taken)
    # Nothing replaced the restoring generation before its workers had restored.
    if "reconfiguring" in kinds(after):  # returning nodes added by a scale-up
        assert kinds(after).index("running") < kinds(after).index("reconfiguring"), kinds(after)
    ref_losses, _ = reference(spec)
    for name in cluster.agents:
        steps = [(g, s, loss) for g, s, loss in trained_steps(cluster.agents[name].log.read_text()) if g > 1]
        assert steps and min(s for _, s, _ in steps) > restored, (name, steps[:3])
        for _, step, loss in steps:
            assert loss == pytest.approx(ref_losses[step - 1], abs=1e-4), (name, step)
    assert_checkpoints_intact(spec)
    assert_final_checkpoint_matches_reference(spec)


def test_sigterm_to_an_agent_drains_its_node_and_no_step_is_lost(cluster, profile_path, tmp_path) -> None:
    spec = job_spec(tmp_path / "ckpt", profile_path, ft=1)
    cluster.start(4)
    cluster.submit(spec.to_yaml())
    status = cluster.wait_status(lambda s: s.state == RUNNING and s.step >= 6, "step 6")
    ids = cluster.node_ids()
    victim = next(name for name, node_id in ids.items() if node_id == status.plan.pipelines[0].node_ids[-1])
    cluster.agents[victim].proc.send_signal(signal.SIGTERM)  # a spot pre-emption notice
    assert cluster.agents[victim].proc.wait(timeout=60) == 0, cluster.tail(cluster.agents[victim])
    assert "drained: leaving" in cluster.agents[victim].log.read_text()
    final = cluster.wait_status(lambda s: s.state == SUCCEEDED, "the job to succeed")
    assert final.step == spec.steps and ids[victim] not in {n for p in final.plan.pipelines for n in p.node_ids}
    events = cluster.events()
    leaving = [e for e in events if e.kind == "node_leaving"]
    assert [e.node_id for e in leaving] == [ids[victim]], leaving
    recon = next(e for e in events if e.kind == "reconfiguring")
    assert f"draining [{ids[victim]}]" in recon.message, recon.message
    assert not [e for e in events if e.kind == "node_dead" and e.node_id == ids[victim]], events
    assert "reconfigure_incomplete" not in kinds(events)
    # Every step is committed exactly once on every node of the final plan (a survivor the new
    # plan leaves out as a spare stops, without redoing anything): nothing lost or redone.
    final_nodes = {n for p in final.plan.pipelines for n in p.node_ids}
    for name in set(ids) - {victim}:
        steps = [s for _, s, _ in trained_steps(cluster.agents[name].log.read_text())]
        if ids[name] in final_nodes:
            assert steps == list(range(1, spec.steps + 1)), (name, steps)
        else:
            assert steps == list(range(1, len(steps) + 1)), (name, steps)
    assert_checkpoints_intact(spec)
    assert_final_checkpoint_matches_reference(spec)


def test_workers_that_start_slowly_under_load_are_not_declared_hung(cluster, profile_path, tmp_path) -> None:
    """Four nodes start at once; each worker holds the GIL for seconds right after attaching
    (its heartbeat thread starves, as when importing torch on a loaded machine), far past the
    3 s liveness timeout. The start-up allowance covers the whole start-up: no node dies."""
    worker = f"{sys.executable} {HERE / 'slow_start_worker.py'}"
    cluster.agent_args = ["--worker-command", worker, "--liveness-timeout-s", "3"]
    spec = job_spec(tmp_path / "ckpt", profile_path, ft=1)
    cluster.start(4)
    cluster.submit(spec.to_yaml())
    final = cluster.wait_status(lambda s: s.state == SUCCEEDED, "the job to succeed", timeout_s=150)
    assert final.generation == 1, final
    events = cluster.events()
    assert "node_dead" not in kinds(events), [(e.kind, e.message) for e in events]
    assert_final_checkpoint_matches_reference(spec)
