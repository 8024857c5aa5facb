"""Checkpoints: plan-independent round trip, atomic manifest, checksums."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from worker_testutil import assert_matches_reference, tiny_spec

from oobleck.worker import checkpoint as ckpt
from oobleck.worker.layout import simple_plan
from oobleck.worker.local import run_ranks, train_ranks


@pytest.mark.slow
@pytest.mark.parametrize("model", ["gpt", "hf-gpt2"])
def test_save_under_one_plan_resume_under_another(tmp_path: Path, model: str) -> None:
    spec = tiny_spec(model)
    first = simple_plan([[2, 2], [2, 2]], [3, 5])
    run_ranks(first.world_size, train_ranks, (spec, first, 2, {"save": str(tmp_path), "export": False}))
    root = tmp_path / "step-00000002"
    manifest = json.loads((root / ckpt.MANIFEST).read_text())
    assert manifest["step"] == 2 and manifest["position"] == {"epoch": 0, "step": 2, "samples": 32}
    assert sorted(int(k) for k in manifest["layers"]) == [0, 1, 2, 3]
    assert (tmp_path / "latest").read_text() == "step-00000002"
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temporary files left

    second = simple_plan([[1, 2, 1]], [8])
    results = run_ranks(second.world_size, train_ranks, (spec, second, 1, {"load": str(tmp_path)}))
    assert all(r["position"]["step"] == 3 for r in results)
    # Parameters after 2 + 1 steps across two plans equal 3 uninterrupted single-process steps.
    assert_matches_reference(spec, results, steps=3, first_step=2)


@pytest.mark.slow
def test_background_checkpoint_is_a_consistent_snapshot(tmp_path: Path) -> None:
    """Saved in the background after step 1 while training goes on to step 3; resuming from it
    under another plan still reproduces the reference exactly."""
    spec = tiny_spec("gpt")
    first = simple_plan([[1, 2, 1]], [8])
    run_ranks(first.world_size, train_ranks, (spec, first, 3, {"save_async": (str(tmp_path), 1), "export": False}))
    assert (tmp_path / "latest").read_text() == "step-00000001"
    second = simple_plan([[3, 1], [1, 2, 1]], [5, 3])
    results = run_ranks(second.world_size, train_ranks, (spec, second, 2, {"load": str(tmp_path)}))
    assert_matches_reference(spec, results, steps=3, first_step=1)


def test_checksum_and_missing_manifest(tmp_path: Path) -> None:
    root = tmp_path / "step-00000001"
    root.mkdir()
    with pytest.raises(ckpt.CheckpointError, match="no complete checkpoint"):
        ckpt.read_manifest(root)

    path = root / ckpt.layer_file(0)
    torch.save({"param.w": torch.ones(2)}, path)
    manifest = {"format": ckpt.FORMAT, "layers": {"0": {"file": path.name, "sha256": ckpt.sha256_file(path)}}}
    (root / ckpt.MANIFEST).write_text(json.dumps(manifest))
    loaded, where = ckpt.read_manifest(root)
    assert where == root
    assert torch.equal(ckpt.load_layers(root, loaded, [0])[0]["param.w"], torch.ones(2))
    torch.save({"param.w": torch.zeros(2)}, path)
    with pytest.raises(ckpt.CheckpointCorrupt, match="checksum mismatch"):
        ckpt.load_layers(root, loaded, [0])
    with pytest.raises(ckpt.CheckpointError, match="layer 1 missing"):
        ckpt.load_layers(root, loaded, [1])
