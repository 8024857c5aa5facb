"""The checkpoint format without torch: staging per attempt, one-rename publication, immutable
published checkpoints, a ``latest`` that only moves forward, verification and fallback."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from oobleck.common import checkpoint as ck

NUM_LAYERS = 3


def write_attempt(directory: Path, step: int, attempt: str, writers: dict[int, list[int]], tag: bytes) -> Path:
    """What ranks do: each writes its layer files (content ``tag``) and its sidecar."""
    staging = ck.staging_dir(directory, step, attempt)
    staging.mkdir(parents=True, exist_ok=True)
    for rank, layers in writers.items():
        files = {}
        for index in layers:
            path = staging / ck.layer_file(index)
            path.write_bytes(tag + b"-%d" % index)
            files[str(index)] = {"file": path.name, "sha256": ck.sha256_file(path), "bytes": path.stat().st_size}
        ck.write_sidecar(staging, rank, files)
    return staging


def publish(directory: Path, step: int, attempt: str, tag: bytes, writers=None) -> Path:
    writers = writers or {0: [0, 1], 1: [2]}
    staging = write_attempt(directory, step, attempt, writers, tag)
    files = ck.collect_sidecars(staging, set(writers), timeout_s=5)
    return ck.publish(directory, staging, step=step, files=files, manifest_extra={"num_layers": NUM_LAYERS})


def assert_intact(root: Path) -> dict:
    manifest = ck.load_manifest(root)
    ck.verify(root, manifest)
    return manifest


def test_publish_is_one_rename_and_moves_latest(tmp_path: Path) -> None:
    root = publish(tmp_path, 5, "job-g1", b"a")
    assert root == ck.step_dir(tmp_path, 5)
    assert_intact(root)
    assert (tmp_path / ck.LATEST).read_text() == "step-00000005"
    assert sorted(p.name for p in root.iterdir()) == [
        "layer-00000.pt", "layer-00001.pt", "layer-00002.pt", ck.MANIFEST, "rank-00000.json", "rank-00001.json",
    ]  # fmt: skip
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging or temp files left


def test_a_published_checkpoint_is_never_rewritten(tmp_path: Path) -> None:
    """A step redone after a restore, or a new generation re-saving it: the first stays as it was."""
    root = publish(tmp_path, 5, "job-g1", b"first")
    before = {p.name: p.read_bytes() for p in root.iterdir()}
    again = publish(tmp_path, 5, "job-g2", b"second", writers={0: [0], 1: [1, 2]})
    assert again == root
    assert {p.name: p.read_bytes() for p in root.iterdir()} == before
    assert_intact(root)
    assert not list(tmp_path.glob(".partial-*"))


def test_leftovers_of_an_earlier_attempt_never_enter_a_manifest(tmp_path: Path) -> None:
    """An earlier attempt at step 5 (a generation superseded while saving) left its files and a
    sidecar describing them; a later attempt under another plan publishes only its own files."""
    old = write_attempt(tmp_path, 5, "job-g1", {1: [0, 1]}, b"old")
    (old / ck.layer_file(0)).write_bytes(b"overwritten later")  # its sidecar no longer matches
    root = publish(tmp_path, 5, "job-g2", b"new", writers={0: [0, 1, 2]})
    manifest = assert_intact(root)
    assert sorted(json.loads((root / "rank-00000.json").read_text())) == ["0", "1", "2"]
    assert not (root / "rank-00001.json").exists()
    assert set(manifest["layers"]) == {"0", "1", "2"}
    assert not old.exists()  # stale attempts up to the published step are removed


def test_an_incomplete_step_directory_of_the_old_layout_is_set_aside(tmp_path: Path) -> None:
    legacy = ck.step_dir(tmp_path, 5)
    legacy.mkdir()
    (legacy / ck.layer_file(0)).write_bytes(b"half written")
    (legacy / "rank-00001.json").write_text(json.dumps({"0": {"file": ck.layer_file(0), "sha256": "0" * 64}}))
    root = publish(tmp_path, 5, "job-g2", b"new")
    assert_intact(root)
    (aside,) = tmp_path.glob(".stale-step-00000005-*")
    assert (aside / ck.layer_file(0)).read_bytes() == b"half written"  # moved, never deleted


def test_latest_only_moves_forward(tmp_path: Path) -> None:
    publish(tmp_path, 10, "job-g3", b"x")
    publish(tmp_path, 5, "job-g4", b"y")  # redone after a restore from an older checkpoint
    assert (tmp_path / ck.LATEST).read_text() == "step-00000010"
    assert ck.complete_steps(tmp_path) == [10, 5]


def test_missing_sidecar_times_out_and_size_mismatch_is_caught(tmp_path: Path) -> None:
    staging = write_attempt(tmp_path, 3, "job-g1", {0: [0]}, b"a")
    with pytest.raises(ck.CheckpointError, match=r"ranks \[1\] did not write"):
        ck.collect_sidecars(staging, {0, 1}, timeout_s=0.05)
    (staging / ck.layer_file(0)).write_bytes(b"truncated?")
    with pytest.raises(ck.CheckpointError, match="bytes on disk"):
        ck.collect_sidecars(staging, {0}, timeout_s=1)
    with pytest.raises(ck.CheckpointError, match=r"no rank wrote layers \[1, 2\]"):
        ck.publish(tmp_path, staging, step=3, files={"0": {}}, manifest_extra={"num_layers": NUM_LAYERS})


def test_a_corrupt_latest_falls_back_to_the_newest_intact_and_is_set_aside(tmp_path: Path, caplog) -> None:
    publish(tmp_path, 5, "job-g1", b"five")
    bad = publish(tmp_path, 10, "job-g1", b"ten")
    (bad / ck.layer_file(1)).write_bytes(b"bit rot")
    with pytest.raises(ck.CheckpointCorrupt, match=r"layer-00001\.pt: checksum mismatch"):
        ck.verify(bad, ck.load_manifest(bad))
    with caplog.at_level(logging.WARNING, logger="oobleck.common.checkpoint"):
        manifest, root = ck.newest_intact(tmp_path)
    assert root == ck.step_dir(tmp_path, 5) and manifest["step"] == 5
    assert "step-00000010 is not intact" in caplog.text and "checksum mismatch" in caplog.text
    assert (tmp_path / ck.LATEST).read_text() == "step-00000010"  # reading changes nothing
    aside = ck.quarantine(tmp_path, bad)
    assert aside is not None and aside.name.startswith(".corrupt-step-00000010-") and aside.exists()
    assert (tmp_path / ck.LATEST).read_text() == "step-00000005"
    assert ck.read_manifest(tmp_path)[1] == ck.step_dir(tmp_path, 5)
    assert ck.quarantine(tmp_path, bad) is None  # already set aside (by another rank)


def test_read_manifest_when_latest_names_nothing_complete(tmp_path: Path) -> None:
    with pytest.raises(ck.CheckpointError, match="no complete checkpoint"):
        ck.read_manifest(tmp_path)
    publish(tmp_path, 4, "job-g1", b"a")
    (tmp_path / ck.LATEST).write_text("step-00000099")
    manifest, root = ck.read_manifest(tmp_path)
    assert manifest["step"] == 4 and root.name == "step-00000004"
    assert ck.newest_intact(tmp_path, job_id="another-job")[0]["step"] == 4  # no job id in it: any job's
    (root / ck.MANIFEST).write_text("{not json")
    with pytest.raises(ck.CheckpointCorrupt, match="unreadable"):
        ck.load_manifest(root)


def test_newest_intact_filters_by_job(tmp_path: Path) -> None:
    staging = write_attempt(tmp_path, 2, "a-g1", {0: [0, 1, 2]}, b"a")
    files = ck.collect_sidecars(staging, {0}, 1)
    ck.publish(tmp_path, staging, step=2, files=files, manifest_extra={"num_layers": NUM_LAYERS, "job_id": "a"})
    staging = write_attempt(tmp_path, 3, "b-g1", {0: [0, 1, 2]}, b"b")
    files = ck.collect_sidecars(staging, {0}, 1)
    ck.publish(tmp_path, staging, step=3, files=files, manifest_extra={"num_layers": NUM_LAYERS, "job_id": "b"})
    assert ck.newest_intact(tmp_path, job_id="a")[0]["step"] == 2
    assert ck.newest_intact(tmp_path)[0]["step"] == 3


def test_a_reused_directory_keeps_the_other_jobs_checkpoints_aside(tmp_path: Path) -> None:
    """A new job writing where another job's checkpoints are: its own step is published (the other
    job's one of the same step is renamed aside, not overwritten or deleted), ``latest`` names the
    new job's newest, and each job's restore finds only its own."""

    def publish_for(job: str, step: int, tag: bytes) -> Path:
        staging = write_attempt(tmp_path, step, f"{job}-g1", {0: [0, 1, 2]}, tag)
        files = ck.collect_sidecars(staging, {0}, 1)
        extra = {"num_layers": NUM_LAYERS, "job_id": job}
        return ck.publish(tmp_path, staging, step=step, files=files, manifest_extra=extra)

    publish_for("old", 5, b"old5")
    publish_for("old", 10, b"old10")
    root = publish_for("new", 5, b"new5")
    assert ck.load_manifest(root)["job_id"] == "new" and (root / ck.layer_file(0)).read_bytes() == b"new5-0"
    (aside,) = tmp_path.glob(".stale-step-00000005-*")
    assert ck.load_manifest(aside)["job_id"] == "old" and (aside / ck.layer_file(0)).read_bytes() == b"old5-0"
    assert (tmp_path / ck.LATEST).read_text() == "step-00000005"  # not the other job's step 10
    assert ck.newest_intact(tmp_path, job_id="new")[0]["step"] == 5
    assert ck.newest_intact(tmp_path, job_id="old")[0]["step"] == 10
    again = publish_for("new", 5, b"again")  # the same job again: the first stays
    assert (again / ck.layer_file(0)).read_bytes() == b"new5-0"
