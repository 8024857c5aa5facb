"""Pure parts of the master: the failure detector, the config, the SQLite store, plan conversion."""

import os

import pytest

from oobleck.common.validate import ConfigError
from oobleck.master import planning
from oobleck.master.config import ENV_TOKEN_FILE, MasterConfig, add_config_flags, config_from_sources
from oobleck.master.detect import DetectConfig, DetectState, NodeLiveness, decide
from oobleck.master.store import CommandRow, EventRow, JobRow, NodeRow, Store

CFG = DetectConfig(heartbeat_timeout_s=2.0, session_grace_s=1.0, coalesce_window_s=0.2)


def nodes(*items):
    return tuple(items)


def test_alive_nodes_give_a_quiet_decision():
    state = DetectState(nodes(NodeLiveness(1, 100.0), NodeLiveness(2, 99.0)))
    decision, reason = decide(100.5, state, CFG)
    assert decision.quiet and decision.pending_since_s is None
    assert reason == "all nodes alive"


def test_heartbeat_timeout_is_exact_at_the_boundary():
    state = DetectState(nodes(NodeLiveness(1, 100.0)))
    assert decide(101.999, state, CFG)[0].dead == ()
    decision, _ = decide(102.0, state, CFG)
    assert [n for n, _ in decision.dead] == [1]
    assert "no heartbeat for 2.00s" in decision.dead[0][1]
    assert decision.pending_since_s == 102.0 and not decision.reconfigure


def test_broken_session_dies_after_grace_not_before():
    state = DetectState(nodes(NodeLiveness(1, 100.0, detached_since_s=100.2)))
    assert decide(101.1, state, CFG)[0].dead == ()
    decision, _ = decide(101.2, state, CFG)
    assert decision.dead and "session broken" in decision.dead[0][1]


def test_reattached_session_is_alive():
    # Re-attached within grace: detached_since is cleared and heartbeats resumed.
    state = DetectState(nodes(NodeLiveness(1, 101.5, detached_since_s=None)))
    assert decide(102.5, state, CFG)[0].quiet


def test_a_registered_node_gets_the_attach_timeout_for_its_session_then_the_heartbeat_timeout():
    # Registered at t=100; a master busy accepting thousands of sessions may take seconds to
    # attach this one: no heartbeat can arrive before, so the attach timeout (10 s) applies.
    cfg = DetectConfig(heartbeat_timeout_s=2.0, session_grace_s=1.0, coalesce_window_s=0.2, attach_timeout_s=10.0)
    queued = NodeLiveness(1, 100.0, attached=False)
    assert decide(109.9, DetectState(nodes(queued)), cfg)[0].quiet
    decision, _ = decide(110.0, DetectState(nodes(queued)), cfg)
    assert decision.dead == ((1, "its session did not attach within 10.00s of registering"),)
    # Once attached, silence is judged by the heartbeat timeout again.
    attached = NodeLiveness(1, 100.0, attached=True)
    assert [n for n, _ in decide(102.0, DetectState(nodes(attached)), cfg)[0].dead] == [1]
    # A failure reported before the session attached counts at once.
    failed = NodeLiveness(2, 100.0, failed_reason="boom", attached=False)
    assert decide(100.5, DetectState(nodes(failed)), cfg)[0].dead == ((2, "node failure: boom"),)


def test_after_a_master_restart_nodes_get_the_restart_grace_not_the_heartbeat_timeout():
    # State loaded at t=100 with restart_grace_s=10: silent far beyond the 2 s timeout, still alive.
    cfg = DetectConfig(heartbeat_timeout_s=2.0, session_grace_s=1.0, coalesce_window_s=0.2, restart_grace_s=10.0)
    waiting = NodeLiveness(1, 100.0, reattach_by_s=110.0)
    assert decide(109.9, DetectState(nodes(waiting)), cfg)[0].quiet
    decision, _ = decide(110.0, DetectState(nodes(waiting)), cfg)
    assert decision.dead == ((1, "did not re-attach within 10s of the master restart"),)
    # A reported failure still counts at once while waiting.
    failed = NodeLiveness(2, 100.0, failed_reason="boom", reattach_by_s=110.0)
    assert decide(100.5, DetectState(nodes(failed)), cfg)[0].dead == ((2, "node failure: boom"),)


def test_reported_failure_is_dead_at_once():
    state = DetectState(nodes(NodeLiveness(3, 100.0, failed_reason="worker exited")))
    decision, _ = decide(100.0, state, CFG)
    assert decision.dead == ((3, "node failure: worker exited"),)


def test_coalescing_window_gives_one_reconfiguration_for_two_deaths():
    # Node 1 dies at t=102.0; node 2 at t=102.1 (inside the 0.2 s window).
    state = DetectState(nodes(NodeLiveness(1, 100.0), NodeLiveness(2, 100.1)))
    d1, _ = decide(102.0, state, CFG)
    assert [n for n, _ in d1.dead] == [1] and not d1.reconfigure
    state = DetectState(nodes(NodeLiveness(2, 100.1)), pending_since_s=d1.pending_since_s)
    d2, _ = decide(102.1, state, CFG)
    assert [n for n, _ in d2.dead] == [2] and not d2.reconfigure
    d3, reason = decide(102.2, DetectState((), pending_since_s=d2.pending_since_s), CFG)
    assert d3.reconfigure and d3.dead == ()
    assert "coalescing window" in reason


def test_spare_death_needs_no_reconfiguration():
    state = DetectState(nodes(NodeLiveness(5, 100.0, in_plan=False)))
    decision, reason = decide(103.0, state, CFG)
    assert decision.dead and decision.pending_since_s is None and not decision.reconfigure
    assert "spares lost" in reason


def test_each_node_is_judged_by_the_heartbeat_timeout_it_was_given():
    config = DetectConfig(heartbeat_timeout_s=2.0)
    nodes = (NodeLiveness(1, 100.0), NodeLiveness(2, 100.0, timeout_s=5.0))
    decision, _ = decide(103.0, DetectState(nodes), config)
    assert [n for n, _ in decision.dead] == [1]
    decision, _ = decide(105.0, DetectState(nodes), config)
    assert [n for n, _ in decision.dead] == [1, 2] and "timeout 5s" in decision.dead[1][1]


def test_a_master_running_late_extends_the_silence_it_tolerates():
    """Heartbeats may wait in the master's own backlog: silence counts beyond timeout + lag."""
    config = DetectConfig(heartbeat_timeout_s=2.0)
    nodes = (NodeLiveness(1, 100.0),)
    assert decide(102.5, DetectState(nodes, master_lag_s=0.8), config)[0].quiet
    decision, _ = decide(102.85, DetectState(nodes, master_lag_s=0.8), config)
    assert decision.dead == ((1, "no heartbeat for 2.85s (timeout 2s, master 0.80s behind)"),)


def test_detect_config_validates():
    with pytest.raises(ValueError, match="heartbeat_timeout_s"):
        DetectConfig(heartbeat_timeout_s=0)


def _cfg(tmp_path, **kw):
    return MasterConfig(token_file=str(tmp_path / "t"), admin_token_file=str(tmp_path / "a"), **kw)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("heartbeat_timeout_s", 0.4, "heartbeat_timeout_s: must be greater than heartbeat_interval_s"),
        ("coalesce_window_s", -1.0, "coalesce_window_s: must be >= 0"),
        ("listen", "nohostport", "listen: address 'nohostport'"),
        ("tls_cert_file", "c.pem", "tls_key_file: tls_cert_file and tls_key_file"),
        ("max_message_bytes", 10, "max_message_bytes: must be >= 4096"),
    ],
)
def test_config_errors_name_the_field(tmp_path, field, value, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(tmp_path, **{field: value})


def test_config_precedence_yaml_env_flags(tmp_path):
    import argparse

    (tmp_path / "m.yaml").write_text("heartbeat_timeout_s: 3\ntoken_file: /yaml/t\nadmin_token_file: /a\n")
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    args = parser.parse_args(["--config", str(tmp_path / "m.yaml"), "--session-grace-s", "0.7", "--allow-insecure"])
    cfg = config_from_sources(args, environ={ENV_TOKEN_FILE: "/env/t"})
    assert cfg.heartbeat_timeout_s == 3.0 and isinstance(cfg.heartbeat_timeout_s, float)
    assert cfg.session_grace_s == 0.7 and cfg.allow_insecure is True
    assert cfg.token_file == "/env/t"
    args = parser.parse_args(["--config", str(tmp_path / "m.yaml"), "--token-file", "/flag/t"])
    assert config_from_sources(args, environ={ENV_TOKEN_FILE: "/env/t"}).token_file == "/flag/t"


def test_config_file_rejects_unknown_field(tmp_path):
    import argparse

    (tmp_path / "m.yaml").write_text("token_file: t\nadmin_token_file: a\nheartbeat_timout_s: 1\n")
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    with pytest.raises(ConfigError, match="heartbeat_timout_s: unknown field"):
        config_from_sources(parser.parse_args(["--config", str(tmp_path / "m.yaml")]), environ={})


def test_store_round_trip_and_exactly_once_acks(tmp_path):
    path = tmp_path / "s.db"
    store = Store(path)
    node = store.register_node(NodeRow(0, "n1", "127.0.0.1", 2, 0, "v", "nonce", 1234, "spare"))
    assert node.node_id == 1
    job = JobRow("j1", "spec", "RUNNING", "", 3, b"plan", {"pipelines": [[1]]}, 7, 10)
    cmds = [CommandRow(5, 1, 3, "start", b"x"), CommandRow(6, 1, 3, "stop", b"y")]
    events = store.commit_plan(job, [node], cmds, [EventRow(0, 1.0, "k", 1, 3, 7, "m", {"plan": 0.5})])
    assert events[0].id == 1
    assert store.ack_command(5, True, "") is True
    assert store.ack_command(5, True, "") is False  # nothing applied twice
    store.close()
    store = Store(path)
    snap = store.load()
    assert snap.job.generation == 3 and snap.job.plan == b"plan" and snap.job.plan_json == {"pipelines": [[1]]}
    assert [c.command_id for c in snap.pending_commands] == [6]
    assert snap.next_command_id == 7 and snap.next_node_id == 2
    assert snap.nodes[0].nonce == "nonce"
    assert store.events_since(0)[0].durations_s == {"plan": 0.5}
    store.close()


def test_a_version_1_state_file_gains_node_identities_and_dead_nodes_are_deleted(tmp_path):
    import sqlite3

    path = tmp_path / "s.db"
    store = Store(path)
    store.register_node(NodeRow(0, "n1", "127.0.0.1", 1, 0, "v", "nonce", 1, "spare"))
    store.close()
    conn = sqlite3.connect(path)  # what an older master wrote: no identity column, version 1
    conn.executescript(
        "ALTER TABLE nodes DROP COLUMN identity; UPDATE meta SET value = '1' WHERE key = 'schema_version';"
    )
    conn.close()
    store = Store(path)
    (node,) = store.load().nodes
    assert node.identity == "" and node.name == "n1"
    node.identity, node.state = "CN:x", "dead"
    store.declare_dead([node], [EventRow(0, 1.0, "node_dead", node.node_id, 0, 0, "gone")])
    assert store.load().nodes[0].identity == "CN:x"
    store.delete_nodes([node.node_id])
    assert store.load().nodes == [] and [e.kind for e in store.events_since(0)] == ["node_dead"]
    store.close()


def test_a_state_file_from_a_newer_master_is_refused_naming_both_versions(tmp_path):
    import sqlite3

    from oobleck.master.store import SCHEMA_VERSION, StoreError

    path = tmp_path / "s.db"
    Store(path).close()
    conn = sqlite3.connect(path)
    conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match=f"newer master \\(schema version {SCHEMA_VERSION + 1}\\); this master reads"):
        Store(path)
    with pytest.raises(StoreError, match="newer master"):  # not "in use": the refusal released its lock
        Store(path)


def test_plan_proto_conversion_uses_first_node_as_rendezvous():
    from oobleck.planner import types as pt

    nodes = {i: planning.NodeInfo(i, f"10.0.0.{i}", 2, 0, 4000 + i) for i in (3, 4, 5)}
    pipes = [pt.PipelinePlan(2, (4, 3), 3, 1.0), pt.PipelinePlan(1, (5,), 1, 1.0)]
    ranks = planning.assign_ranks([p.nodes for p in pipes], {n: 2 for n in nodes})
    assert ranks == {4: (0, 1), 3: (2, 3), 5: (4, 5)}
    tset = pt.TemplateSet(pt.NodeSpec(1, 2, 1, (1, 2)), ())
    plan = planning.to_plan_proto(
        generation=9, templates=tset, pipelines=pipes, ranks=ranks,
        nodes=nodes, resume_step=12, restore_from_checkpoint=False,
    )  # fmt: skip
    assert plan.generation == 9 and plan.world_size == 6 and plan.resume_step == 12
    assert (plan.rendezvous.host, plan.rendezvous.port) == ("10.0.0.4", 4004)
    assert list(plan.pipelines[0].node_ids) == [4, 3] and plan.pipelines[0].microbatches == 3
    assert not plan.HasField("rendezvous") or plan.rendezvous.secret  # a fresh secret per plan


def test_token_helpers(tmp_path):
    from oobleck.common.auth import TokenFileError, read_token_file, token_from_metadata, tokens_equal

    def private(name: str, text: str):
        path = tmp_path / name
        path.write_text(text)
        path.chmod(0o600)
        return path

    assert read_token_file(private("t", "  secret-of-16-chars \n")) == "secret-of-16-chars"
    with pytest.raises(TokenFileError, match="empty"):
        read_token_file(private("e", "\n"))
    with pytest.raises(TokenFileError, match="one token"):
        read_token_file(private("two", "a-long-first-token another-one"))
    with pytest.raises(TokenFileError, match="cannot read"):
        read_token_file(tmp_path / "missing")
    with pytest.raises(TokenFileError, match="fewer than 16"):
        read_token_file(private("short", "x"))
    loose = private("loose", "secret-of-16-chars")
    loose.chmod(0o644)
    with pytest.raises(TokenFileError, match=r"readable by others \(mode 644\); chmod 600"):
        read_token_file(loose)
    with pytest.raises(TokenFileError, match="not a regular file"):
        read_token_file("/dev/zero")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(TokenFileError, match="not a regular file"):
        read_token_file(fifo)  # opened non-blocking: no writer does not hang it
    assert tokens_equal("abc", "abc") and not tokens_equal("abd", "abc") and not tokens_equal(None, "abc")
    assert not tokens_equal("ab", "abc")
    assert token_from_metadata([("x", "y"), ("authorization", "Bearer tok")]) == "tok"
    assert token_from_metadata([("authorization", "Basic tok")]) is None
    assert token_from_metadata(None) is None


@pytest.mark.parametrize(
    ("address", "allowed"),
    [("127.0.0.1:0", True), ("localhost:5", True), ("[::1]:7", True), ("127.3.2.1:1", True),
     ("0.0.0.0:0", False), ("10.1.2.3:80", False), ("example.org:1", False), ("[::]:0", False)],
)  # fmt: skip
def test_plaintext_only_on_loopback(address, allowed):
    from oobleck.common.tls import InsecureTransportError, check_plaintext_allowed

    if allowed:
        check_plaintext_allowed(address, False)
    else:
        with pytest.raises(InsecureTransportError, match="plaintext is allowed only on loopback"):
            check_plaintext_allowed(address, False)
        check_plaintext_allowed(address, True)  # explicit allow_insecure


def test_split_host_port_errors():
    from oobleck.common.tls import split_host_port

    assert split_host_port("[::1]:80") == ("::1", 80)
    for bad, fragment in [
        ("host", "HOST:PORT"),
        (":80", "empty host"),
        ("h:x", "not an integer"),
        ("h:70000", "0..65535"),
    ]:
        with pytest.raises(ValueError, match=fragment):
            split_host_port(bad)
