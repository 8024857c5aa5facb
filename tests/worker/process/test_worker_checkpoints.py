"""Checkpoints that stay intact through redone steps, corrupt files and fresh generations: real
``python -m oobleck.worker`` processes against fake node agents (gloo on CPU).

Each test first trains 5 steps on one node with two slots (checkpoints of steps 2, 4 and 5), then
starts another generation on another node under another plan, and ends by checking that every
complete checkpoint matches its manifest, that ``latest`` loads, and that the final state equals
the single-process reference.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from oobleck.worker import checkpoint as ckpt

from .fake_agent import plan_message
from .test_worker_process import (
    ONE_NODE_ONE_STAGE,
    STEPS,
    assert_checkpoint_matches_reference,
    assert_losses_match,
    job_spec,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]

TWO_STAGES_ONE_NODE = {1: [(0, 2, 0, 1), (2, 4, 0, 1)]}


def assert_every_checkpoint_intact(directory: Path) -> list[int]:
    """Every complete checkpoint's files match its manifest, and ``latest`` names one that loads."""
    steps = ckpt.complete_steps(directory)
    for step in steps:
        root = ckpt.step_dir(directory, step)
        manifest, _ = ckpt.read_manifest(root)
        ckpt.verify(root, manifest)
        assert manifest["step"] == step
    manifest, root = ckpt.read_manifest(directory)
    ckpt.load_layers(root, manifest, range(manifest["num_layers"]))
    assert (directory / ckpt.LATEST).read_text() == root.name
    return steps


def train_first_generation(spec, agents, workers, store_port) -> None:
    """Node 7, two slots holding ranks (1, 0) of one 2-stage pipeline, steps 1-5."""
    node = agents(7)
    plan = plan_message(1, [((7,), 8)], TWO_STAGES_ONE_NODE, {7: [1, 0]}, store_port)
    for slot in (0, 1):
        workers.spawn(node, slot)
        node.start_command(slot, 1, plan, spec.to_yaml())
    for slot in (0, 1):
        assert workers.wait(7, slot, timeout_s=80) == 0, workers.all_logs()
    assert node.errors == []
    assert assert_every_checkpoint_intact(Path(spec.checkpoint.dir)) == [5, 4, 2]


def start_second_generation(longer, agents, workers, store_port, *, restore: bool):
    """Node 4, two slots holding ranks (0, 1): the same stages with the writers swapped."""
    node = agents(4)
    plan = plan_message(3, [((4,), 8)], TWO_STAGES_ONE_NODE, {4: [0, 1]}, store_port, resume_step=0)
    plan.restore_from_checkpoint = restore
    for slot in (0, 1):
        workers.spawn(node, slot)
        node.start_command(slot, 3, plan, longer.to_yaml())
    for slot in (0, 1):
        assert workers.wait(4, slot, timeout_s=80) == 0, workers.all_logs()
    assert node.errors == []
    return node


def test_steps_saved_again_after_a_restore_never_mix_with_an_earlier_attempt(
    tmp_path, store_port, agents, workers
) -> None:
    """The over-ft drill's corruption: checkpoints of steps 4 and 5 were being written when the
    job lost its nodes (no manifest yet), their sidecars describing files that the redone steps
    write again under another plan. The restore takes step 2, the redone steps 3-7 checkpoint
    4, 6 and 7 afresh: nothing of the earlier attempt enters a manifest, every checkpoint loads."""
    directory = tmp_path / "ckpt"
    train_first_generation(job_spec(directory, interval=2), agents, workers, store_port)
    for step in (4, 5):  # an interrupted earlier write, as the old in-place layout left it
        root = ckpt.step_dir(directory, step)
        (root / ckpt.MANIFEST).unlink()
        for sidecar in root.glob("rank-*.json"):
            entries = json.loads(sidecar.read_text())
            sidecar.write_text(json.dumps({k: {**v, "sha256": "0" * 64} for k, v in entries.items()}))
    assert ckpt.read_manifest(directory)[0]["step"] == 2  # `latest` names step 5: no longer complete

    longer = job_spec(directory, steps=STEPS + 2, interval=2)
    node = start_second_generation(longer, agents, workers, store_port, restore=True)
    for slot in (0, 1):
        assert "restored the checkpoint of step 2" in workers.log(4, slot)
        assert_losses_match(longer, [r for r in node.steps_of(slot) if r.generation == 3], first_step=3)
    assert assert_every_checkpoint_intact(directory) == [7, 6, 4, 2]
    assert len(list(directory.glob(".stale-step-00000004-*"))) == 1  # the incomplete one, set aside
    assert not list(directory.glob(".partial-*"))
    assert_checkpoint_matches_reference(longer, STEPS + 2)


def test_a_corrupt_latest_checkpoint_is_reported_set_aside_and_an_older_one_restored(
    tmp_path, store_port, agents, workers
) -> None:
    directory = tmp_path / "ckpt"
    train_first_generation(job_spec(directory, interval=2), agents, workers, store_port)
    manifest, root = ckpt.read_manifest(directory)
    assert root.name == "step-00000005"
    victim = root / manifest["layers"]["1"]["file"]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit in the middle of a layer file
    victim.write_bytes(bytes(data))

    longer = job_spec(directory, steps=STEPS + 2, interval=2)
    node = start_second_generation(longer, agents, workers, store_port, restore=True)
    logs = workers.log(4, 0) + workers.log(4, 1)
    assert "step-00000005 cannot be restored" in logs and "checksum mismatch" in logs
    for slot in (0, 1):
        assert "restored the checkpoint of step 4" in workers.log(4, slot)
        assert_losses_match(longer, [r for r in node.steps_of(slot) if r.generation == 3], first_step=5)
    (aside,) = directory.glob(".corrupt-step-00000005-*")
    assert (aside / victim.name).read_bytes() == bytes(data)  # kept for inspection, never deleted
    assert assert_every_checkpoint_intact(directory) == [7, 6, 4, 2]
    assert_checkpoint_matches_reference(longer, STEPS + 2)


def test_a_generation_of_new_processes_restores_even_when_not_told_to(tmp_path, store_port, agents, workers) -> None:
    """A generation whose ranks all start fresh (it replaced a restoring generation before that
    one restored, say) must not train from scratch past the job's checkpoint: it restores."""
    directory = tmp_path / "ckpt"
    train_first_generation(job_spec(directory, interval=2), agents, workers, store_port)
    longer = job_spec(directory, steps=STEPS + 2, interval=2)
    node = agents(4)
    plan = plan_message(3, [((4,), 8)], ONE_NODE_ONE_STAGE, {4: [0]}, store_port, resume_step=0)
    assert not plan.restore_from_checkpoint
    workers.spawn(node, 0)
    node.start_command(0, 3, plan, longer.to_yaml())
    assert workers.wait(4, 0, timeout_s=80) == 0, workers.all_logs()
    assert "restored the checkpoint of step 5" in workers.log(4)
    assert [r.generation for r in node.ready] == [3] and node.ready[0].step == 5
    assert_losses_match(longer, node.steps_of(0), first_step=STEPS + 1)
    assert assert_every_checkpoint_intact(directory) == [7, 6, 5, 4, 2]
    assert_checkpoint_matches_reference(longer, STEPS + 2)
