"""End to end, cluster changes around a reconfiguration: a killed node's agent comes back and the
job scales up onto it; a node dies while the survivors are copying layers.

Both use the workers' drill hold file (``OOBLECK_WORKER_HOLD_FILE``) to make the timing
reproducible: "step" holds every worker between two steps (commands still apply), "copy" holds
a reconfiguration after the new process group is joined and before the layer copy. Both end with
the final checkpoint equal to an uninterrupted single-process run (``rtol=1e-4, atol=1e-5``) and
every process stopped.
"""

from __future__ import annotations

import time

import pytest

from oobleck.protos.v1 import admin_pb2

from .jobs import assert_final_checkpoint_matches_reference, job_spec, reference
from .test_e2e_faults import _applied_steps, _received_layers, _spawned_pids, _trained_steps, kill9

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

RUNNING = admin_pb2.JOB_STATE_RUNNING
SUCCEEDED = admin_pb2.JOB_STATE_SUCCEEDED


def _plan_nodes(plan) -> list[int]:
    return sorted(n for p in plan.pipelines for n in p.node_ids)


def _wait_log(cluster, names, text: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not all(text in cluster.agents[n].log.read_text() for n in names):
        if time.monotonic() > deadline:
            raise AssertionError(f"not every node of {names} logged {text!r}\n{cluster.logs()}")
        time.sleep(0.05)


def _check_steps(log_text: str, steps: range, ref_losses) -> list[tuple[int, int, float]]:
    trained = _trained_steps(log_text)
    # Each step committed exactly once: trained here, or applied at a reconfiguration (roll-forward).
    assert sorted([s for _, s, _ in trained] + _applied_steps(log_text)) == list(steps), trained
    for _, step, loss in trained:
        assert loss == pytest.approx(ref_losses[step - 1], abs=1e-4), step
    return trained


def test_killed_node_restarts_as_a_spare_and_the_job_scales_back_up(cluster, profile_path, tmp_path) -> None:
    """Five nodes, ft=1: pipelines of 2 and 3. The last node of the 3-node pipeline is killed
    (-> 2 + 2, generation 2); its agent restarts, registers as a new spare, and the master grows
    the plan back to 2 + 3 at a step boundary (generation 3): the returning node's fresh worker
    receives its layers with their optimizer state from the survivors, which keep their processes."""
    spec = job_spec(tmp_path / "ckpt", profile_path, ft=1)
    hold = tmp_path / "hold"
    cluster.agent_env = {"OOBLECK_WORKER_HOLD_FILE": str(hold)}
    cluster.master_args = ["--scale-up-delay-s", "0.5"]
    cluster.start(5)
    cluster.submit(spec.to_yaml())
    status = cluster.wait_status(lambda s: s.state == RUNNING and s.step >= 4, "step 4")
    ids = cluster.node_ids()
    names = {node_id: name for name, node_id in ids.items()}
    before = cluster.wait_workers(sorted(ids))
    hold.write_text("step")  # the cluster changes between two steps
    three = next(list(p.node_ids) for p in status.plan.pipelines if len(p.node_ids) == 3)
    victim = names[three[-1]]
    survivors = sorted(set(ids) - {victim})
    kill9(cluster, [victim], before)
    gen2 = cluster.wait_status(lambda s: s.generation == 2 and s.state == RUNNING, "generation 2")
    assert _plan_nodes(gen2.plan) == sorted(ids[n] for n in survivors)
    assert sorted(len(p.node_ids) for p in gen2.plan.pipelines) == [2, 2]

    offset = len(cluster.agents[victim].log.read_bytes())
    cluster.add_agent(victim)  # the same node's agent, restarted: a new registration
    gen3 = cluster.wait_status(lambda s: s.generation == 3 and s.state == RUNNING, "generation 3 (scale up)")
    new_id = max(n.node_id for n in cluster.nodes() if n.name == victim)
    assert new_id not in ids.values()
    assert _plan_nodes(gen3.plan) == sorted([*(ids[n] for n in survivors), new_id])
    assert sorted(len(p.node_ids) for p in gen3.plan.pipelines) == [2, 3]
    assert gen3.plan.resume_step >= gen2.plan.resume_step
    hold.unlink()

    final = cluster.wait_status(lambda s: s.state == SUCCEEDED, "the job to succeed", timeout_s=120)
    assert final.generation == 3 and final.step == spec.steps, final
    ref_losses, _ = reference(spec)
    for name in survivors:
        log = cluster.agents[name].log.read_text()
        assert _spawned_pids(log) == [before[name]], f"{name} respawned its worker:\n{log[-3000:]}"
        trained = _check_steps(log, range(1, spec.steps + 1), ref_losses)
        assert {g for g, _, _ in trained} == {1, 3}, trained  # held through generation 2
    returned = cluster.agents[victim].log.read_bytes()[offset:].decode()
    trained = _check_steps(returned, range(gen3.plan.resume_step + 1, spec.steps + 1), ref_losses)
    assert {g for g, _, _ in trained} == {3}
    assert _received_layers(returned, 3) > 0, returned[-3000:]  # its layers came from the survivors

    events = cluster.events()
    kinds = [e.kind for e in events]
    assert kinds.count("reconfiguring") == 2 and kinds.count("reconfigured") == 2, kinds
    scale = [e for e in events if e.kind == "reconfiguring"][1]
    assert scale.generation == 3 and "scaled up from 4 to 5 nodes" in scale.message, scale.message
    recon3 = [e for e in events if e.kind == "reconfigured"][1]
    assert recon3.durations_s["copy"] > 0, dict(recon3.durations_s)
    assert_final_checkpoint_matches_reference(spec)
    orphans = cluster.stop()
    assert orphans == {}, orphans


def test_a_node_dies_while_layers_are_being_copied(cluster, profile_path, tmp_path) -> None:
    """Six nodes, ft=1: pipelines of 3 and 3. One node is killed (generation 2, 2 + 3); while the
    survivors hold before the layer copy, a second one dies. The master does not wait for the ack
    deadline: generation 3 (2 + 2) supersedes generation 2, the survivors leave the half-done
    reconfiguration, copy from the state they carried and train to the end."""
    spec = job_spec(tmp_path / "ckpt", profile_path, ft=1)
    hold = tmp_path / "hold"
    cluster.agent_env = {"OOBLECK_WORKER_HOLD_FILE": str(hold), "OOBLECK_COLLECTIVE_TIMEOUT_S": "120"}
    cluster.master_args = ["--no-scale-up", "--reconfigure-ack-timeout-s", "120"]
    cluster.start(6)
    cluster.submit(spec.to_yaml())
    status = cluster.wait_status(lambda s: s.state == RUNNING and s.step >= 4, "step 4")
    ids = cluster.node_ids()
    names = {node_id: name for name, node_id in ids.items()}
    before = cluster.wait_workers(sorted(ids))
    hold.write_text("copy")
    first = names[status.plan.pipelines[0].node_ids[0]]
    kill9(cluster, [first], before)
    gen2 = cluster.wait_status(lambda s: s.generation == 2, "generation 2")
    in_gen2 = sorted(names[n] for n in _plan_nodes(gen2.plan))
    assert first not in in_gen2 and len(in_gen2) == 5
    _wait_log(cluster, in_gen2, "held before the layer copy of generation 2")
    t0 = time.monotonic()
    second = names[gen2.plan.pipelines[-1].node_ids[-1]]
    kill9(cluster, [second], before)
    gen3 = cluster.wait_status(lambda s: s.generation == 3, "generation 3")
    assert time.monotonic() - t0 < 60  # not the 120 s ack deadline
    survivors = sorted(set(in_gen2) - {second})
    assert _plan_nodes(gen3.plan) == sorted(ids[n] for n in survivors)
    hold.unlink()

    final = cluster.wait_status(lambda s: s.state == SUCCEEDED, "the job to succeed", timeout_s=120)
    assert final.generation == 3 and final.step == spec.steps, final
    ref_losses, _ = reference(spec)
    for name in survivors:
        log = cluster.agents[name].log.read_text()
        assert _spawned_pids(log) == [before[name]], f"{name} respawned its worker:\n{log[-3000:]}"
        trained = _check_steps(log, range(1, spec.steps + 1), ref_losses)
        assert {g for g, _, _ in trained} == {1, 3}, trained
    # The survivors copy from the state they carried out of generation 1 (not what generation 2
    # would have given them: its copy never ran).
    received = {name: _received_layers(cluster.agents[name].log.read_text(), 3) for name in survivors}
    assert sum(received.values()) > 0, received
    events = cluster.events()
    kinds = [e.kind for e in events]
    incomplete = [e for e in events if e.kind == "reconfigure_incomplete"]
    assert len(incomplete) == 1 and incomplete[0].generation == 2, kinds
    assert f"nodes [{ids[second]}] died during it" in incomplete[0].message, incomplete[0].message
    assert kinds.count("reconfigured") == 1
    assert_final_checkpoint_matches_reference(spec)
    orphans = cluster.stop()
    assert orphans == {}, orphans
