"""End to end: the master's state file system fills up mid-run (a real tmpfs, filled for real).

The master runs in a private mount namespace whose state directory is an 8 MiB tmpfs (gone with
the process, whatever happens to the test). The test fills it while a job trains: the master keeps
serving (health, status, metrics), raises the alert, refuses state changes with a message naming
the state file, keeps a node's death in memory without sending an unpersisted plan, and once space
returns writes everything at once, reconfigures, and the job ends equal to the reference with
every event of the outage in the state file.
"""

from __future__ import annotations

import errno
import shutil
import sqlite3
import urllib.request
from pathlib import Path

import grpc
import pytest

from oobleck.protos.v1 import admin_pb2

from .jobs import assert_checkpoints_intact, assert_final_checkpoint_matches_reference, job_spec

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(180),
    pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare (util-linux) for a private tmpfs"),
]

RUNNING = admin_pb2.JOB_STATE_RUNNING
SUCCEEDED = admin_pb2.JOB_STATE_SUCCEEDED


def fill(directory: Path) -> Path:
    """Write a file into ``directory`` until its file system is full."""
    filler = directory / "filler"
    chunk = b"\0" * 65536
    with filler.open("wb") as f:
        try:
            while True:
                f.write(chunk)
                f.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    return filler


def metric(cluster, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{cluster.http_port}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_a_full_state_disk_never_stops_the_master_and_loses_nothing(cluster, profile_path, tmp_path) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    cluster.master_prefix = [
        "unshare", "--mount", "--propagation", "private", "--",
        "sh", "-c", 'mount -t tmpfs -o size=8m oobleck-state "$0" && exec "$@"', str(state_dir),
    ]  # fmt: skip
    cluster.state_file = state_dir / "master.db"
    cluster.master_args = ["--state-retry-s", "0.2"]
    hold = tmp_path / "hold"  # training waits between steps while the disk is full (a short job)
    cluster.agent_env = {"OOBLECK_WORKER_HOLD_FILE": str(hold)}
    spec = job_spec(tmp_path / "ckpt", profile_path, ft=1)
    cluster.start(4)
    cluster.submit(spec.to_yaml())
    status = cluster.wait_status(lambda s: s.state == RUNNING and s.step >= 3, "step 3")
    # The master's view of its state directory (the test's own is the empty mount point).
    inside = Path(f"/proc/{cluster.master.pid}/root") / state_dir.relative_to("/")
    assert (inside / "master.db").exists() and not (state_dir / "master.db").exists()

    filler = fill(inside)
    # The next progress write fails; then training waits between steps while the disk is full.
    cluster.wait(lambda: cluster.http_json("/api/status")["state_store"].startswith("failing"), "the failed write")
    hold.write_text("step")
    assert "database or disk is full" in cluster.http_json("/api/status")["state_store"]
    with urllib.request.urlopen(f"http://127.0.0.1:{cluster.http_port}/healthz", timeout=5) as response:
        assert response.status == 200
    assert metric(cluster, "oobleck_state_store_ok") == 0
    assert cluster.status().step >= status.step  # still serving what it knows
    with pytest.raises(grpc.RpcError) as err:
        cluster.admin.DrainNode(admin_pb2.DrainNodeRequest(node_id=status.plan.pipelines[0].node_ids[0]), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert str(cluster.state_file) in err.value.details() and "refuses state changes" in err.value.details()

    # A node dies during the outage: known at once, but no plan is sent that could not be persisted.
    ids = cluster.node_ids()
    victim = next(n for n, i in ids.items() if i == status.plan.pipelines[0].node_ids[0])
    cluster.kill_nodes([victim])
    cluster.wait(lambda: any(e.kind == "node_dead" for e in cluster.events()), "the node's death")
    failures = metric(cluster, "oobleck_state_write_failures_total")
    cluster.wait(lambda: metric(cluster, "oobleck_state_write_failures_total") >= failures + 3, "more retries")
    assert cluster.status().generation == 1

    filler.unlink()  # space returns
    cluster.wait_status(lambda s: s.generation == 2 and s.state == RUNNING, "generation 2")
    hold.unlink()
    final = cluster.wait_status(lambda s: s.state == SUCCEEDED, "the job to succeed", timeout_s=120)
    assert final.generation == 2 and final.step == spec.steps, final
    kinds = [e.kind for e in cluster.events()]
    for before, after in [
        ("state_write_failed", "node_dead"),
        ("node_dead", "state_store_recovered"),
        ("state_store_recovered", "reconfiguring"),
        ("reconfigured", "job_succeeded"),
    ]:
        assert kinds.index(before) < kinds.index(after), kinds
    assert metric(cluster, "oobleck_state_store_ok") == 1

    # The outage's facts are in the state file itself, next to what was committed before it.
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("master.db", "master.db-wal"):  # a snapshot of the live file and its write-ahead log
        if (inside / name).exists():
            shutil.copyfile(inside / name, copy / name)
    with sqlite3.connect(copy / "master.db") as db:
        stored = [row[0] for row in db.execute("SELECT kind FROM events ORDER BY id")]
        (state, step) = db.execute("SELECT state, step FROM job").fetchone()
        dead = db.execute("SELECT state FROM nodes WHERE node_id = ?", (ids[victim],)).fetchone()[0]
    assert stored == kinds, (stored, kinds)
    assert (state, step, dead) == ("SUCCEEDED", spec.steps, "dead")
    assert_checkpoints_intact(spec)
    assert_final_checkpoint_matches_reference(spec)
