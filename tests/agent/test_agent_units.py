"""Fast unit tests: agent config, the liveness decision, /proc parsing, the worker link's edges."""

from __future__ import annotations

import sys

import pytest

from oobleck.agent import main as agent_main
from oobleck.agent.config import AgentConfig, config_from_sources
from oobleck.agent.supervision import LivenessConfig, Verdict, WorkerProbe, decide_worker, read_proc_state
from oobleck.common.validate import ConfigError
from oobleck.protos.v1 import plan_pb2, worker_pb2
from oobleck.worker.agent_link import (
    RECONFIGURE,
    START,
    STOP,
    AgentLink,
    AgentLinkError,
    command_from_proto,
)

BASE = {"master": "127.0.0.1:5000", "token_file": "/t"}
LIVE = LivenessConfig(liveness_timeout_s=2.0, startup_timeout_s=30.0)


# -- config ----------------------------------------------------------------------------------


def test_config_defaults_and_derived_fields():
    cfg = AgentConfig(**BASE)
    assert cfg.slots == 1 and cfg.address == "127.0.0.1" and cfg.node_name
    assert cfg.worker_argv == (sys.executable, "-m", "oobleck.worker")
    assert not cfg.tls
    cfg = AgentConfig(**BASE, worker_command="python3 w.py --flag 'a b'")
    assert cfg.worker_argv == ("python3", "w.py", "--flag", "a b")


@pytest.mark.parametrize(
    ("overrides", "field", "fragment"),
    [
        ({"slots": 0}, "slots", "must be >= 1, got 0"),
        ({"master": "10.0.0.1:5000"}, "master", "only on loopback"),
        ({"master": "nohostport"}, "master", "HOST:PORT"),
        ({"master": "127.0.0.1:0"}, "master", "got 0"),
        ({"liveness_timeout_s": -1.0}, "liveness_timeout_s", "must be >= 0.05"),
        ({"tls_cert_file": "c.pem"}, "tls_cert_file", "go together"),
        ({"probe_interval_s": 3.0, "liveness_timeout_s": 2.0}, "probe_interval_s", "<= liveness_timeout_s"),
        ({"node_name": "a b"}, "node_name", "without spaces"),
        ({"worker_command": "python 'unterminated"}, "worker_command", "cannot split"),
    ],
)
def test_config_errors_name_the_field(overrides, field, fragment):
    with pytest.raises(ConfigError) as info:
        AgentConfig(**{**BASE, **overrides})
    assert info.value.field == field
    assert fragment in str(info.value)


def test_non_loopback_master_needs_tls_or_allow_insecure():
    assert AgentConfig(**{**BASE, "master": "10.0.0.1:5000", "allow_insecure": True}).allow_insecure
    assert AgentConfig(**{**BASE, "master": "10.0.0.1:5000", "tls_ca_file": "ca.pem"}).tls


def test_yaml_file_and_flag_overrides(tmp_path):
    path = tmp_path / "agent.yaml"
    path.write_text("master: 127.0.0.1:7000\ntoken_file: /tok\nslots: 4\nliveness_timeout_s: 3\n")
    cfg = config_from_sources(str(path), {"slots": 2, "node_name": None})
    assert (cfg.master, cfg.slots, cfg.liveness_timeout_s) == ("127.0.0.1:7000", 2, 3.0)
    path.write_text("master: 127.0.0.1:7000\ntoken_file: /tok\nslot: 4\n")
    with pytest.raises(ConfigError, match="slot: unknown field"):
        config_from_sources(str(path), {})
    with pytest.raises(ConfigError, match="master: required"):
        config_from_sources(None, {"token_file": "/tok"})
    with pytest.raises(ConfigError, match="slots: expected an integer"):
        config_from_sources(None, {**BASE, "slots": "many"})


def test_cli_rejects_a_bad_config_with_status_2(tmp_path, capsys):
    token = tmp_path / "t"
    token.write_text("x")
    argv = ["--master", "127.0.0.1:1", "--token-file", str(token), "--slots", "0"]
    assert agent_main.main(argv) == 2
    assert "slots: must be >= 1" in capsys.readouterr().err
    assert agent_main.main(["--master", "127.0.0.1:1", "--token-file", str(tmp_path / "missing")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_gpu_memory_from_nvidia_smi():
    from oobleck.agent.probes import parse_gpu_memory_mib

    assert parse_gpu_memory_mib("81559\n81559\n40960\n") == 40960 * 2**20
    assert parse_gpu_memory_mib("") == 0
    assert parse_gpu_memory_mib("[N/A]\n") == 0


# -- liveness decision -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("probe", "verdict", "fragment"),
    [
        (WorkerProbe(0.0, 99.0, None, "S"), Verdict.ALIVE, "heartbeating"),
        # Blocked in a collective (sleeping, no steps) but heartbeating: alive.
        (WorkerProbe(0.0, 98.5, None, "S"), Verdict.ALIVE, "heartbeating"),
        (WorkerProbe(0.0, 97.9, None, "R"), Verdict.HUNG, "heartbeat silent for 2.1s"),
        (WorkerProbe(0.0, 99.9, None, "T"), Verdict.HUNG, "stopped"),
        (WorkerProbe(0.0, 99.9, None, "t"), Verdict.HUNG, "stopped"),
        (WorkerProbe(80.0, None, None, "R"), Verdict.ALIVE, "starting"),
        (WorkerProbe(60.0, None, None, "R"), Verdict.HUNG, "no heartbeat"),
        # Start-up (importing torch on a loaded machine starves the heartbeat thread): silence
        # within startup_timeout_s of the spawn is not a hang until the worker reported ready...
        (WorkerProbe(80.0, 85.0, None, "R"), Verdict.ALIVE, "starting"),
        # ... once ready, the heartbeat rule applies at once ...
        (WorkerProbe(80.0, 90.0, None, "R", ready=True), Verdict.HUNG, "heartbeat silent for 10.0s"),
        # ... and past the allowance it applies even when the worker never got ready.
        (WorkerProbe(60.0, 65.0, None, "R"), Verdict.HUNG, "heartbeat silent for 35.0s"),
        (WorkerProbe(60.0, 99.5, None, "S"), Verdict.ALIVE, "heartbeating"),
        (WorkerProbe(80.0, None, None, "T"), Verdict.HUNG, "stopped"),
        (WorkerProbe(0.0, 99.0, 3, None), Verdict.EXITED, "status 3"),
        (WorkerProbe(0.0, 99.0, -9, None), Verdict.EXITED, "signal 9"),
        (WorkerProbe(0.0, 10.0, 0, None), Verdict.FINISHED, "status 0"),
    ],
)
def test_decide_worker(probe, verdict, fragment):
    got, reason = decide_worker(100.0, probe, LIVE)
    assert got is verdict
    assert fragment in reason


def test_read_proc_state_handles_odd_command_names(tmp_path):
    (tmp_path / "42").mkdir()
    (tmp_path / "42" / "stat").write_text("42 (we ird) name)) T 1 42 42 0 -1\n")
    assert read_proc_state(42, tmp_path) == "T"
    assert read_proc_state(43, tmp_path) is None
    import os

    assert read_proc_state(os.getpid()) in ("R", "S")


# -- worker link -----------------------------------------------------------------------------


def test_commands_convert_from_protos():
    plan = plan_pb2.Plan(generation=3, world_size=2)
    start = command_from_proto(
        worker_pb2.WorkerCommand(
            generation=3, start=worker_pb2.WorkerStart(plan=plan, job_spec_yaml="name: x", node_id=7)
        )
    )
    assert (start.kind, start.generation, start.plan.world_size, start.job_spec_yaml, start.node_id) == (
        START,
        3,
        2,
        "name: x",
        7,
    )
    reconf = command_from_proto(worker_pb2.WorkerCommand(generation=4, reconfigure=worker_pb2.WorkerReconfigure()))
    assert (reconf.kind, reconf.generation) == (RECONFIGURE, 4)
    stop = command_from_proto(worker_pb2.WorkerCommand(generation=4, stop=worker_pb2.WorkerStop(reason="bye")))
    assert (stop.kind, stop.reason, stop.plan) == (STOP, "bye", None)
    with pytest.raises(AgentLinkError, match="unknown body"):
        command_from_proto(worker_pb2.WorkerCommand(generation=1))


def test_link_from_env():
    env = {
        "OOBLECK_AGENT_SOCKET": "/run/a.sock",
        "OOBLECK_SLOT": "2",
        "OOBLECK_NODE_ID": "5",
        "OOBLECK_WORK_DIR": "/w",
        "OOBLECK_WORKER_HEARTBEAT_INTERVAL_S": "0.2",
        "OOBLECK_AGENT_PID": "123",
    }
    link = AgentLink.from_env(env)
    got = (link.socket_path, link.slot, link.node_id, link.work_dir, link.agent_pid)
    assert got == ("/run/a.sock", 2, 5, "/w", 123)
    assert link.heartbeat_interval_s == 0.2
    with pytest.raises(AgentLinkError, match="OOBLECK_AGENT_SOCKET is not set"):
        AgentLink.from_env({})
    with pytest.raises(AgentLinkError, match="bad agent environment"):
        AgentLink.from_env({"OOBLECK_AGENT_SOCKET": "/s", "OOBLECK_SLOT": "x"})


def test_attach_without_an_agent_fails_cleanly(tmp_path):
    link = AgentLink(str(tmp_path / "none.sock"), 0, rpc_timeout_s=1.0, on_agent_lost=None)
    with pytest.raises(AgentLinkError, match="Heartbeat to the agent failed: UNAVAILABLE"):
        link.attach()
    link.close()


def test_die_with_parent_only_for_a_direct_child():
    import os
    import subprocess

    from oobleck.worker.agent_link import die_with_parent

    assert die_with_parent(os.getppid() + 1) is False  # behind a wrapper: left to end of stream
    code = "import os; from oobleck.worker.agent_link import die_with_parent; print(die_with_parent(os.getppid()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "True", out.stderr
