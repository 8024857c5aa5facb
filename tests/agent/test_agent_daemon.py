"""A real ``oobleck-agent`` against the in-test fake master, with fake workers.

Every test waits on events (messages at the fake master, process exits) with deadlines.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from oobleck.common.files import write_secret
from oobleck.common.tls import ServerTls
from oobleck.protos.v1 import agent_pb2

from .conftest import TOKEN, wait_pid_gone
from .fake_master import FakeMaster, make_plan, reconfigure_command, start_command

RUNNING = agent_pb2.WORKER_STATE_RUNNING
EXITED = agent_pb2.WORKER_STATE_EXITED
HUNG = agent_pb2.WORKER_STATE_HUNG

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]


def registered(master, agent) -> dict:
    """Wait for the agent's session; return its ready file (written before the hello)."""
    master.wait_for("hello")
    info = json.loads(agent.ready_file.read_text())
    assert info["pid"] == agent.proc.pid
    return info


def start_workers(master, info, *, slots=2, command_id=1, generation=1) -> dict[int, int]:
    """Send Start; wait for its ack and for every worker to attach. Returns {slot: pid}."""
    mark = master.mark()
    plan = make_plan(generation, [info["node_id"]], slots, info["store_port"])
    master.send(start_command(command_id, generation, plan))
    ack = master.wait_for("ack", lambda a: a.command_id == command_id, after=mark)[0].msg
    assert ack.ok, ack.error
    assert ack.generation == generation
    running = master.wait_for("worker", lambda w: w.state == RUNNING, after=mark, count=slots)
    return {e.msg.slot: e.msg.pid for e in running}


def assert_all_gone(pids, timeout_s=15.0):
    alive = [pid for pid in pids if not wait_pid_gone(pid, timeout_s)]
    assert not alive, f"workers still running: {alive}"


def iter_until(timeout_s, condition):
    """Poll ``condition`` (for facts with no event to wait on, like a log line) until the deadline."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met before the deadline"
        yield
        time.sleep(0.02)


def command_log(agent, slot) -> list[str]:
    return (agent.work_dir / f"slot-{slot}.log").read_text().split("\n")[:-1]


def test_register_start_reconfigure_and_bad_commands(master, start_agent):
    agent = start_agent()
    info = registered(master, agent)
    reg = master.events("register")[0].msg
    assert (reg.node_name, reg.slots, reg.store_port, reg.node_id) == ("node0", 2, info["store_port"], 0)
    assert info["node_id"] == 1 and reg.nonce and reg.address == "127.0.0.1"
    master.wait_for("heartbeat", count=3)

    pids = start_workers(master, info)
    assert sorted(pids) == [0, 1]
    steps = master.wait_for("step", count=10)
    # Only the lowest slot's reports are forwarded: every (generation, step) appears once.
    seen = [(e.msg.generation, e.msg.step) for e in steps]
    assert len(set(seen)) == len(seen) and all(g == 1 for g, _ in seen)

    node = info["node_id"]
    mark = master.mark()
    master.send(reconfigure_command(2, 2, make_plan(2, [node], 2, info["store_port"])))
    ack = master.wait_for("ack", lambda a: a.command_id == 2, after=mark)[0].msg
    assert (ack.ok, ack.generation) == (True, 2)
    assert ack.phases.regroup_s == pytest.approx(0.02) and ack.phases.copy_s == pytest.approx(0.02)
    master.wait_for("step", lambda s: s.generation == 2, after=mark)

    # The same command again (as after a master restart): its ack is repeated, nothing re-applied.
    mark = master.mark()
    master.send(reconfigure_command(2, 2, make_plan(2, [node], 2, info["store_port"])))
    again = master.wait_for("ack", lambda a: a.command_id == 2, after=mark)[0].msg
    assert again == ack
    # An older generation under a new command id is refused.
    master.send(reconfigure_command(3, 1, make_plan(1, [node], 2, info["store_port"])))
    old = master.wait_for("ack", lambda a: a.command_id == 3, after=mark)[0].msg
    assert not old.ok and "older" in old.error
    master.send(reconfigure_command(4, 3, make_plan(3, [node], 2, info["store_port"])))
    assert master.wait_for("ack", lambda a: a.command_id == 4, after=mark)[0].msg.ok
    for slot in (0, 1):
        assert command_log(agent, slot) == ["start 1", "reconfigure 2", "reconfigure 3"]
    assert len(master.events("ack", after=mark)) == 3

    # Malformed commands are nacked naming the field; the agent carries on.
    mark = master.mark()
    master.send(agent_pb2.Command(command_id=5, generation=4, reconfigure=agent_pb2.Reconfigure()))
    master.send(agent_pb2.Command(command_id=6, generation=4))
    bad_ranks = make_plan(4, [node], 3, info["store_port"])
    master.send(reconfigure_command(7, 4, bad_ranks))
    acks = {e.msg.command_id: e.msg for e in master.wait_for("ack", after=mark, count=3)}
    assert "reconfigure.plan: missing" in acks[5].error
    assert acks[6].error.startswith("body:")
    assert "reconfigure.plan.ranks" in acks[7].error and "3 ranks but 2 slots" in acks[7].error
    assert not any(a.ok for a in acks.values())

    # Stop: workers gone, ack, and the node keeps heartbeating.
    mark = master.mark()
    master.send(agent_pb2.Command(command_id=8, generation=3, stop=agent_pb2.Stop(reason="test")))
    assert master.wait_for("ack", lambda a: a.command_id == 8, after=mark)[0].msg.ok
    assert_all_gone(pids.values(), timeout_s=1)  # acked only after they were reaped
    exited = master.wait_for("worker", lambda w: w.state == EXITED, after=mark, count=2)
    assert {e.msg.pid for e in exited} == set(pids.values())
    assert [e.msg.exit_code for e in exited] == [0, 0]  # they acted on the stop, no SIGTERM needed
    master.wait_for("heartbeat", after=master.mark(), count=2)
    assert not master.events("failure")

    agent.proc.send_signal(signal.SIGTERM)
    assert agent.wait() == 0


def test_worker_crash_is_a_node_failure(master, start_agent):
    agent = start_agent(env={"FAKE_WORKER_CRASH_AT_STEP": "5", "FAKE_WORKER_FAULT_SLOT": "1"})
    info = registered(master, agent)
    pids = start_workers(master, info)
    failure = master.wait_for("failure")[0].msg
    assert f"slot 1 (pid {pids[1]})" in failure.reason and "status 3" in failure.reason
    report = master.wait_for("worker", lambda w: w.slot == 1 and w.state == EXITED)[0].msg
    assert report.exit_code == 3
    assert_all_gone(pids.values())
    # Still a live node (a spare candidate), but it has no workers to reconfigure.
    mark = master.mark()
    master.send(reconfigure_command(2, 2, make_plan(2, [info["node_id"]], 2, info["store_port"])))
    nack = master.wait_for("ack", lambda a: a.command_id == 2, after=mark)[0].msg
    assert not nack.ok and "0 of 2 workers running" in nack.error
    master.wait_for("heartbeat", after=mark, count=2)
    assert len(master.events("failure")) == 1


def test_fatal_worker_error_is_a_node_failure(master, start_agent):
    agent = start_agent(env={"FAKE_WORKER_ERROR_AT_STEP": "3", "FAKE_WORKER_FAULT_SLOT": "1"})
    pids = start_workers(master, registered(master, agent))
    failure = master.wait_for("failure")[0].msg
    assert "slot 1" in failure.reason and "worker error: boom" in failure.reason
    assert_all_gone(pids.values())


def test_stopped_worker_is_hung(master, start_agent):
    agent = start_agent()
    info = registered(master, agent)
    pids = start_workers(master, info)
    os.kill(pids[0], signal.SIGSTOP)
    failure = master.wait_for("failure")[0].msg
    assert "slot 0" in failure.reason and "stopped" in failure.reason
    assert master.wait_for("worker", lambda w: w.state == HUNG)[0].msg.pid == pids[0]
    assert_all_gone(pids.values())


def test_silent_heartbeat_is_hung(master, start_agent):
    agent = start_agent(env={"FAKE_WORKER_HANG_AT_STEP": "3"})
    info = registered(master, agent)
    pids = start_workers(master, info)
    failure = master.wait_for("failure")[0].msg
    assert "slot 0" in failure.reason and "heartbeat silent" in failure.reason
    assert_all_gone(pids.values())


def test_heartbeat_terms_from_the_master_change_the_interval(master, start_agent):
    """A master whose cluster grew sends longer heartbeat terms on the session: the agent
    heartbeats at the new interval from then on."""
    agent = start_agent()
    registered(master, agent)
    master.wait_for("heartbeat", count=5)  # every 0.1 s (the fake master's interval)
    mark = master.mark()
    master.send(agent_pb2.HeartbeatTerms(interval_s=0.6, timeout_s=3.0))
    beats = master.wait_for("heartbeat", count=5, after=mark, timeout_s=30)
    gaps = [b.at - a.at for a, b in itertools.pairwise(beats[1:])]  # the first came after the old sleep
    assert gaps and min(gaps) > 0.4, gaps


def test_blocked_but_heartbeating_worker_is_not_hung(master, start_agent):
    # Blocked twice as long as the liveness timeout (1.5 s), heartbeat thread still running.
    agent = start_agent(env={"FAKE_WORKER_BLOCK_AT_STEP": "3", "FAKE_WORKER_BLOCK_S": "3"})
    info = registered(master, agent)
    start_workers(master, info)
    master.wait_for("step", lambda s: s.step >= 6, timeout_s=30)
    assert not master.events("failure")
    assert not master.events("worker", after=0) or all(e.msg.state != HUNG for e in master.events("worker"))


def test_sigterm_is_a_leave_notice_and_the_agent_exits_once_drained(master, start_agent):
    """A pre-emption notice: the agent asks the master to drain its node and keeps its workers
    training until the master's Drain stops them (a step boundary), then acks it and exits 0."""
    agent = start_agent()
    info = registered(master, agent)
    pids = start_workers(master, info)
    mark = master.mark()
    agent.proc.send_signal(signal.SIGTERM)
    leaving = master.wait_for("leaving", after=mark)[0].msg
    assert "SIGTERM" in leaving.reason and leaving.deadline_s == 30
    assert agent.proc.poll() is None and all(not wait_pid_gone(pid, 0) for pid in pids.values())
    # While leaving, the node takes no new work.
    master.send(start_command(2, 2, make_plan(2, [info["node_id"]], 2, info["store_port"])))
    refused = master.wait_for("ack", lambda a: a.command_id == 2, after=mark)[0].msg
    assert not refused.ok and "leaving" in refused.error
    master.send(agent_pb2.Command(command_id=3, generation=2, drain=agent_pb2.Drain(reason="node leaving")))
    assert master.wait_for("ack", lambda a: a.command_id == 3, after=mark)[0].msg.ok
    assert agent.wait() == 0
    assert_all_gone(pids.values(), timeout_s=1)
    assert "drained: leaving" in agent.log()


def test_a_second_sigterm_or_no_leave_timeout_stops_at_once(master, start_agent):
    agent = start_agent()
    pids = start_workers(master, registered(master, agent))
    mark = master.mark()
    agent.proc.send_signal(signal.SIGTERM)
    master.wait_for("leaving", after=mark)
    agent.proc.send_signal(signal.SIGTERM)
    assert agent.wait() == 0
    assert_all_gone(pids.values(), timeout_s=1)
    assert "shutting down" in agent.log()

    mark = master.mark()
    agent = start_agent("--leave-timeout-s", "0")
    master.wait_for("hello", after=mark)
    pids = start_workers(master, json.loads(agent.ready_file.read_text()))
    agent.proc.send_signal(signal.SIGTERM)
    assert agent.wait() == 0
    assert_all_gone(pids.values(), timeout_s=1)
    assert not master.events("leaving", after=mark)


def test_killed_agent_takes_its_workers_along(master, start_agent):
    agent = start_agent()
    pids = start_workers(master, registered(master, agent))
    agent.proc.send_signal(signal.SIGKILL)
    agent.wait()
    assert_all_gone(pids.values())


def test_broken_session_reregisters_with_same_node_and_nonce(master, start_agent):
    agent = start_agent()
    info = registered(master, agent)
    pids = start_workers(master, info)
    first = master.events("register")[0].msg
    mark = master.mark()
    master.break_session()
    again = master.wait_for("register", after=mark)[0].msg
    assert (again.node_id, again.nonce) == (info["node_id"], first.nonce)
    hello = master.wait_for("hello", after=mark)[0]
    assert hello.msg.node_id == info["node_id"] and hello.msg.last_command_id == 1 and hello.msg.last_generation == 1
    # The workers kept running: steps flow on the new session, nobody exited.
    master.wait_for("step", lambda s: s.step > 0, after=master.mark(), count=3)
    assert master.events("step", after=mark)[-1].session == hello.session
    assert not master.events("worker", after=mark) and not master.events("failure")
    assert all(not wait_pid_gone(pid, 0) for pid in pids.values())

    # A plan without this node: its workers stop and it stays on as a spare; Drain acks too.
    mark = master.mark()
    master.send(reconfigure_command(2, 2, make_plan(2, [info["node_id"] + 1], 2, info["store_port"])))
    assert master.wait_for("ack", lambda a: a.command_id == 2, after=mark)[0].msg.ok
    assert_all_gone(pids.values(), timeout_s=1)
    master.send(agent_pb2.Command(command_id=3, generation=2, drain=agent_pb2.Drain(reason="maintenance")))
    assert master.wait_for("ack", lambda a: a.command_id == 3, after=mark)[0].msg.ok
    master.wait_for("heartbeat", after=master.mark(), count=2)
    assert not master.events("failure")


def test_master_restart_keeps_the_node(master, start_agent):
    agent = start_agent()
    info = registered(master, agent)
    pids = start_workers(master, info)
    nonce = master.events("register")[0].msg.nonce
    master.go_down()
    mark = master.mark()
    # Wait until the agent has seen the master gone (its Register fails), then restart it.
    for _ in iter_until(20, lambda: "failed (UNAVAILABLE)" in agent.log()):
        pass
    master.come_back()
    again = master.wait_for("register", after=mark)[0].msg
    assert (again.node_id, again.nonce) == (info["node_id"], nonce)
    master.wait_for("hello", lambda h: h.node_id == info["node_id"] and h.last_command_id == 1, after=mark)
    master.wait_for("step", after=master.mark(), count=3)
    assert not master.events("failure") and all(not wait_pid_gone(pid, 0) for pid in pids.values())


def test_master_that_lost_its_state_gets_a_fresh_node(master, start_agent):
    agent = start_agent()
    info = registered(master, agent)
    pids = start_workers(master, info)
    mark = master.mark()
    master.forget()
    master.break_session()
    again = master.wait_for("register", after=mark)[0].msg
    assert again.node_id == info["node_id"]
    hello = master.wait_for("hello", after=mark)[0].msg
    assert hello.node_id == 2 and hello.last_command_id == 0 and hello.last_generation == 0
    assert json.loads(agent.ready_file.read_text())["node_id"] == 2
    assert_all_gone(pids.values())  # it is a spare now: the old node's workers are gone
    fresh = start_workers(master, {**info, "node_id": 2})
    assert set(fresh.values()).isdisjoint(pids.values())


def test_new_node_id_attaches_while_the_old_workers_still_stop(master, start_agent):
    """The master hands out a new node id (it declared the node dead, or lost its state) while
    the old workers take their time to stop: the new node opens its session and heartbeats at
    once (a node silent for heartbeat_timeout_s would be declared dead again), the old workers
    are stopped in the background, and nothing queued for the old node reaches the new one."""
    agent = start_agent(env={"FAKE_WORKER_SLOW_STOP_S": "2"})
    info = registered(master, agent)
    pids = start_workers(master, info)
    mark = master.mark()
    master.forget()
    master.break_session()
    master.wait_for("hello", lambda h: h.node_id == 2, after=mark)
    assert all(not wait_pid_gone(pid, 0) for pid in pids.values()), "the session waited for the old workers"
    master.wait_for("heartbeat", after=master.mark(), count=3)
    assert_all_gone(pids.values())
    assert not master.events("failure", after=mark) and not master.events("ack", after=mark)


def test_kill_drill_exits_without_ack(master, start_agent):
    agent = start_agent()
    pids = start_workers(master, registered(master, agent))
    mark = master.mark()
    master.send(agent_pb2.Command(command_id=2, generation=1, kill=agent_pb2.Kill(reason="drill")))
    assert agent.wait() == 1
    assert_all_gone(pids.values(), timeout_s=1)
    master.wait_for("session_end", after=mark)
    assert not [e for e in master.events("ack", after=mark) if e.msg.command_id == 2]


def test_wrong_token_is_fatal(master, start_agent, tmp_path):
    wrong = tmp_path / "wrong.token"
    write_secret(wrong, "a-wrong-agent-token-of-some-length")
    agent = start_agent(token=wrong)
    assert agent.wait() == 1
    assert "UNAUTHENTICATED" in agent.log()
    assert not master.events("register")


def test_parent_death_signal_kills_a_worker_that_never_attached(master, start_agent):
    # This worker ignores the channel, so only PR_SET_PDEATHSIG can take it down with the agent.
    sleeper = f"{sys.executable} -c 'import time; time.sleep(120)'"
    agent = start_agent("--worker-command", sleeper, slots=1)
    info = registered(master, agent)
    mark = master.mark()
    master.send(start_command(1, 1, make_plan(1, [info["node_id"]], 1, info["store_port"])))
    pid = master.wait_for("worker", after=mark)[0].msg.pid  # spawned; never ready, so never acked
    assert not wait_pid_gone(pid, 0)
    agent.proc.send_signal(signal.SIGKILL)
    agent.wait()
    assert_all_gone([pid])


def _load_test_certs(tmp_path):
    """The master tests' certificate maker (openssl); skipped where it is unavailable."""
    path = Path(__file__).resolve().parents[1] / "master" / "master_certs.py"
    spec = importlib.util.spec_from_file_location("agent_test_master_certs", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    if not module.have_openssl():
        pytest.skip("openssl is not installed")
    return module.make_certs(tmp_path / "certs")


def test_mutual_tls_to_the_master(start_agent, tmp_path):
    certs = _load_test_certs(tmp_path)
    tls = ServerTls(certs.server_cert_file, certs.server_key_file, client_ca_file=certs.ca_file)
    secure = FakeMaster(TOKEN, tls=tls)
    secure.start()
    try:
        agent = start_agent(
            "--tls-ca-file", certs.ca_file,
            "--tls-cert-file", certs.client_cert_file,
            "--tls-key-file", certs.client_key_file,
            master_host="localhost",
            fake_master=secure,
        )  # fmt: skip
        registered(secure, agent)
        secure.wait_for("heartbeat", count=2)
        assert secure.events("register")[0].msg.node_name == "node0"
        agent.proc.send_signal(signal.SIGTERM)
        assert agent.wait() == 0
    finally:
        secure.stop()


PROFILE_SPEC = """\
name: p
model: {name: gpt, config: {num_layers: 2, hidden_size: 16, num_heads: 2, vocab_size: 32}}
data: {seq_len: 8, num_samples: 64}
global_batch_size: 4
microbatch_size: 2
steps: 1
"""


def test_profile_command_runs_the_profiler_and_acks_with_the_profile(master, start_agent):
    """The master's Profile command: the agent runs the real profiler in a child process and
    acks with the oobleck-profile/1 document; a bad spec or a failing profiler is a nack with
    the reason, and the agent goes on serving."""
    from oobleck.planner import parse_profile

    agent = start_agent(env={"OOBLECK_WORKER_DEVICE": "cpu"})
    registered(master, agent)
    mark = master.mark()
    master.send(agent_pb2.Command(command_id=1, generation=0, profile=agent_pb2.Profile(job_spec_yaml=PROFILE_SPEC)))
    ack = master.wait_for("ack", lambda a: a.command_id == 1, after=mark, timeout_s=60)[0].msg
    assert ack.ok, ack.error
    profile = parse_profile(json.loads(ack.profile_json))
    assert profile.num_layers == 4  # embeddings, 2 blocks, head
    assert all(layer.param_bytes > 0 and layer.forward_ms > 0 for layer in profile.layers)

    mark = master.mark()
    bad = PROFILE_SPEC.replace("name: gpt", "name: nope")
    master.send(agent_pb2.Command(command_id=2, generation=0, profile=agent_pb2.Profile(job_spec_yaml=bad)))
    ack = master.wait_for("ack", lambda a: a.command_id == 2, after=mark)[0].msg
    assert not ack.ok and ack.error.startswith("profile.job_spec_yaml: model.name"), ack.error

    mark = master.mark()  # a spec the parser accepts but the model config rejects: the child fails
    odd = PROFILE_SPEC.replace("num_heads: 2", "num_heads: 3")
    master.send(agent_pb2.Command(command_id=3, generation=0, profile=agent_pb2.Profile(job_spec_yaml=odd)))
    ack = master.wait_for("ack", lambda a: a.command_id == 3, after=mark, timeout_s=60)[0].msg
    assert not ack.ok and "the profiler exited with 2" in ack.error and "num_heads" in ack.error, ack.error
    master.wait_for("heartbeat", after=master.mark(), count=2)
    assert not master.events("failure")


def test_sighup_rereads_the_token_file(master, start_agent, token_file):
    """The operator rotates the agent token: SIGHUP makes the agent use the file's new token for
    its next calls (here the fake master knows only the old one, so re-registering fails)."""
    agent = start_agent()
    registered(master, agent)
    write_secret(token_file, "a-rotated-agent-token-0123456789")
    agent.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while "token file re-read: a new token" not in agent.log():
        assert time.monotonic() < deadline and agent.proc.poll() is None, agent.log()
        time.sleep(0.05)
    master.break_session()
    assert agent.wait() == 1  # the new token is refused by this master: fatal, as a wrong token is
    assert "master refused registration: UNAUTHENTICATED" in agent.log()


def test_the_rendezvous_store_listens_on_the_node_address_only(master, start_agent):
    """A loopback master makes the node's address 127.0.0.1: the store is bound there (another
    address of this host refuses), on the port asked for (to open in a firewall)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    agent = start_agent("--store-port", str(port))
    info = registered(master, agent)
    assert info["store_port"] == port and master.events("register")[0].msg.store_port == port
    socket.create_connection(("127.0.0.1", port), timeout=5).close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.2", port), timeout=5).close()
    assert f"rendezvous store listening on 127.0.0.1, port {port}" in agent.log()
