"""``oobleck-launch``: local clusters end to end (with the agent tests' stand-in worker), bad
input, fault injection and Ctrl-C. Every run's processes are reaped by the ``launcher`` fixture."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from oobleck.cli import launch
from oobleck.cli.local_cluster import LocalCluster, LocalClusterConfig
from oobleck.common.files import write_secret

from .conftest import FAKE_WORKER_COMMAND, PROFILE, pids_under, spec_text, wait_pid_gone


def write_spec(tmp_path, name="job.yaml", **kw) -> str:
    path = tmp_path / name
    path.write_text(spec_text(**kw))
    return str(path)


def write_profile(tmp_path) -> str:
    (tmp_path / "profile.json").write_text(json.dumps(PROFILE))
    return "profile.json"  # relative: resolved against the spec's folder


# -- bad input: exit 2, one line naming the field, nothing started ---------------------------------
def test_bad_job_spec_exits_2_naming_the_field_and_starts_nothing(tmp_path, capsys):
    bad = spec_text(steps=10).replace("lr: 0.001", "lr: -1")
    (tmp_path / "bad.yaml").write_text(bad)
    work = tmp_path / "work"
    rc = launch.main(["--local", "2", "--config", str(tmp_path / "bad.yaml"), "--work-dir", str(work)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "optimizer.lr" in err and len(err.strip().splitlines()) == 1, err
    assert not work.exists()  # no work dir: no master, no agents


def test_bad_model_config_is_a_usage_error_too(tmp_path, capsys):
    spec = spec_text(steps=10).replace("num_heads: 4", "num_heads: 5")  # 32 is not a multiple of 5
    (tmp_path / "bad.yaml").write_text(spec)
    rc = launch.main(["--local", "1", "--config", str(tmp_path / "bad.yaml"), "--work-dir", str(tmp_path / "w")])
    assert rc == 2
    assert "model.config.num_heads" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--local", "2"], "--config"),
        (["--local", "2", "--master", "127.0.0.1:1", "--config", "x.yaml"], "--local and --master"),
        (["--local", "0", "--config", "x.yaml"], "--local"),
        (["--local", "2", "--config", "x.yaml", "--kill-node", "3"], "--kill-node"),
        (["--master", "127.0.0.1:1", "--config", "x.yaml"], "--token-file"),
        (["--local", "1", "--config", "/nonexistent/job.yaml"], "cannot read"),
    ],
)
def test_usage_errors_exit_2(argv, needle, capsys, monkeypatch):
    monkeypatch.delenv(launch.ENV_ADMIN_TOKEN_FILE, raising=False)
    assert launch.main(argv) == 2
    assert needle in capsys.readouterr().err


# -- local runs -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_local_run_completes_with_a_json_summary(tmp_path, launcher):
    # No profile in the spec: the master has it measured on the first node (cached by the master).
    spec = write_spec(tmp_path, steps=40)
    run = launcher("--local", "2", "--config", spec, "--worker-command", FAKE_WORKER_COMMAND)
    rc = run.finish(90)
    assert rc == 0, run.output()
    summary = run.summary()
    assert summary["state"] == "SUCCEEDED" and summary["steps"] == 40 and summary["total_steps"] == 40
    assert summary["generations"] == 1 and summary["reconfigurations"] == []
    assert summary["final_loss"] == pytest.approx(1 / 40)
    assert any("] step " in line and "/40 loss " in line for line in run.lines)
    submitted = (run.work_dir / "job.yaml").read_text()
    assert "profile:" not in submitted and list((run.work_dir / "profiles").glob("profile-*.json"))
    assert any("profiling" in line for line in run.lines)
    assert pids_under(run.work_dir) == set()
    assert oct((run.work_dir / "admin.token").stat().st_mode & 0o777) == "0o600"


@pytest.mark.slow
def test_kill_node_at_step_gives_a_reconfiguration_and_the_job_finishes(tmp_path, launcher):
    spec = write_spec(tmp_path, steps=120, profile=write_profile(tmp_path))
    run = launcher(
        "--local", "3", "--config", spec, "--worker-command", FAKE_WORKER_COMMAND,
        "--kill-node-at-step", "20", "--json",
    )  # fmt: skip
    rc = run.finish(90)
    assert rc == 0, run.output()
    records = [json.loads(line) for line in run.lines if line.startswith("{")]
    summary = records[-1]
    assert summary["type"] == "summary" and summary["state"] == "SUCCEEDED" and summary["steps"] == 120
    fault = summary["fault"]
    assert fault["step"] >= 20 and len(fault["pids"]) >= 2  # the agent and its worker
    assert summary["generations"] == 2
    [recon] = summary["reconfigurations"]
    assert recon["lost_nodes"] == [fault["node_id"]] and recon["generation"] == 2
    assert {"detect", "plan", "notify", "regroup", "copy", "resume"} <= set(recon["phases_s"])
    assert any(r.get("type") == "event" and r["kind"] == "node_dead" for r in records)
    assert any(r.get("type") == "step" and r["generation"] == 2 for r in records)
    for pid in fault["pids"]:
        assert wait_pid_gone(pid, 0)


@pytest.mark.slow
def test_sigint_stops_master_agents_and_workers(tmp_path, launcher):
    spec = write_spec(tmp_path, steps=1_000_000, profile=write_profile(tmp_path))
    run = launcher("--local", "2", "--config", spec, "--worker-command", FAKE_WORKER_COMMAND)
    run.wait_for_line(" step ", 60)
    pids = pids_under(run.work_dir)
    assert len(pids) >= 5, pids  # master, 2 agents, 2 workers
    run.proc.send_signal(signal.SIGINT)
    rc = run.finish(60)
    assert rc == 130, run.output()
    assert run.summary()["state"] == "INTERRUPTED"
    gone = {pid for pid in pids if wait_pid_gone(pid, 0)}
    assert gone == pids
    assert pids_under(run.work_dir) == set()


@pytest.mark.slow
def test_tiny_real_job_end_to_end(tmp_path, launcher):
    """The real worker (``python -m oobleck.worker``) trains a tiny GPT on 2 local nodes."""
    spec = write_spec(tmp_path, steps=8)
    run = launcher("--local", "2", "--config", spec, env={"OOBLECK_WORKER_DEVICE": "cpu"})
    rc = run.finish(110)
    assert rc == 0, run.output()
    summary = run.summary()
    assert summary["state"] == "SUCCEEDED" and summary["steps"] == 8
    assert summary["final_loss"] > 0


@pytest.mark.slow
def test_submit_to_a_running_master_with_the_kill_node_drill(tmp_path):
    cluster = LocalCluster(  # a running master whose operator keeps profiles in tmp_path
        LocalClusterConfig(
            nodes=2, work_dir=tmp_path / "cluster", worker_command=FAKE_WORKER_COMMAND, profile_dir=str(tmp_path)
        )
    )
    spec = write_spec(tmp_path, steps=80, profile=write_profile(tmp_path))
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    base = [sys.executable, "-m", "oobleck.cli.launch", "--config", spec]
    try:
        cluster.start_master()
        target = cluster.wait_master()
        cluster.start_agents()
        assert len(cluster.wait_agents()) == 2
        write_secret(tmp_path / "wrong.token", "not-the-admin-token-but-long-enough")
        wrong = subprocess.run(
            [*base, "--master", target, "--token-file", str(tmp_path / "wrong.token")],
            capture_output=True, text=True, env=env, timeout=60,
        )  # fmt: skip
        assert wrong.returncode == 2 and "UNAUTHENTICATED" in wrong.stderr, wrong.stderr
        res = subprocess.run(
            [*base, "--master", target, "--token-file", str(cluster.admin_token_file), "--kill-node-at-step", "10"],
            capture_output=True, text=True, env=env, timeout=90,
        )  # fmt: skip
        assert res.returncode == 0, res.stdout + res.stderr
        summary = json.loads(res.stdout.strip().splitlines()[-1])
        assert summary["state"] == "SUCCEEDED" and summary["fault"]["pids"] == []  # KillNode RPC, no local pids
        assert [r["lost_nodes"] for r in summary["reconfigurations"]] == [[summary["fault"]["node_id"]]]
        assert cluster.master.alive()  # the launcher leaves a master it did not start running
    finally:
        cluster.stop()
    assert pids_under(tmp_path / "cluster") == set()
