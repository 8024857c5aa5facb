"""The master as a real process: ready file, SIGTERM, kill -9 and restart, oobleckctl."""

import asyncio
import json
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from master_fakes import FakeAgent, MasterProcess, admin_stub, job_spec_yaml, wait_until

from oobleck.common.files import write_secret
from oobleck.protos.v1 import admin_pb2

pytestmark = pytest.mark.slow
CTL = [str(Path(sys.executable).parent / "oobleckctl")]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 90))


@pytest.fixture
def master(tmp_path):
    proc = MasterProcess(tmp_path)
    try:
        yield proc
    finally:
        proc.stop()


def http_status(master) -> dict:
    url = f"http://127.0.0.1:{master.info['http_port']}/api/status"
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def acked(db: Path) -> dict[int, bool]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return {cid: bool(a) for cid, a in conn.execute("SELECT command_id, acked FROM commands")}


def test_sigterm_stops_cleanly_and_ends_sessions(master):
    async def body():
        await asyncio.to_thread(master.start)
        agent = await FakeAgent(master.target, "n0").start()
        await wait_until(lambda: http_status(master)["nodes"][0]["attached"], what="session attached")
        master.signal(signal.SIGTERM)
        await wait_until(lambda: agent.session_error is not None, timeout_s=20, what="session end")
        assert agent.session_error == grpc.StatusCode.UNAVAILABLE, agent.session_details
        rc = await asyncio.to_thread(master.wait, 20)
        assert rc == 0
        await agent.close()

    run(body())
    assert "master stopping" in master.log_file.read_text()


def test_plaintext_on_a_public_address_is_refused(tmp_path):
    proc = MasterProcess(tmp_path)
    argv = [*proc.argv]
    argv[argv.index("127.0.0.1:0")] = "0.0.0.0:0"
    res = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert "plaintext is allowed only on loopback" in res.stderr


def test_an_unusable_state_file_is_one_line_naming_it(tmp_path):
    """A state directory that cannot be created, and a state file that is not a database: exit 2
    with one line naming the path (no traceback), and a new state file is private (0600)."""
    proc = MasterProcess(tmp_path)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the state directory should be")
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not an SQLite database, just some bytes" * 100)
    for path, why in [(blocker / "state.db", "File exists"), (garbage, "not a database")]:
        argv = [*proc.argv]
        argv[argv.index("--state-file") + 1] = str(path)
        res = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert res.returncode == 2, res.stderr
        assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr, res.stderr
        assert f"state file {path}: opening failed" in res.stderr and why in res.stderr, res.stderr
    proc.start()
    try:
        assert proc.state_file.stat().st_mode & 0o777 == 0o600
    finally:
        proc.stop()


def test_a_busy_port_or_unusable_tls_files_are_one_line_and_exit_2(tmp_path):
    import socket

    proc = MasterProcess(tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = f"127.0.0.1:{busy.getsockname()[1]}"
        garbage = tmp_path / "not-a-cert.pem"
        garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
        for extra, message in [
            ({"--listen": taken}, f"listen address {taken}: cannot bind"),
            ({"--http-listen": taken}, taken),
            ({"--tls-cert-file": str(garbage), "--tls-key-file": str(garbage)}, f"tls_cert_file {garbage}"),
        ]:
            argv = [*proc.argv]
            for flag, value in extra.items():
                if flag in argv:
                    argv[argv.index(flag) + 1] = value
                else:
                    argv += [flag, value]
            res = subprocess.run(argv, capture_output=True, text=True, timeout=60)
            assert res.returncode == 2, res.stderr
            ours = [line for line in res.stderr.splitlines() if line.startswith("oobleck-master:")]
            assert len(ours) == 1 and message in ours[0] and "Traceback" not in res.stderr, res.stderr


def test_a_second_master_on_the_same_state_file_exits_2_naming_the_holder(master):
    master.start()
    res = subprocess.run(master.argv, capture_output=True, text=True, timeout=60)  # same state file
    assert res.returncode == 2, res.stderr
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr, res.stderr
    assert f"state file {master.state_file}" in res.stderr, res.stderr
    assert f"in use by another master (pid {master.proc.pid}" in res.stderr, res.stderr
    # The lock goes with the holder, however it dies.
    master.signal(signal.SIGKILL)
    master.wait()
    master.start()
    assert master.proc.poll() is None


def test_kill9_and_restart_keeps_generation_plan_and_commands(master):
    async def body():
        await asyncio.to_thread(master.start)
        a = await FakeAgent(master.target, "a").start()
        b = await FakeAgent(master.target, "b").start()
        c = await FakeAgent(master.target, "c", auto_ack=False).start()
        channel, stub = admin_stub(master.target)
        spec = job_spec_yaml(master.paths["profile"])
        await stub.SubmitJob(admin_pb2.SubmitJobRequest(job_spec_yaml=spec), timeout=10)
        await wait_until(lambda: a.last_command_id and b.last_command_id and c.commands)
        ids = {x.name: x.commands[0].command_id for x in (a, b, c)}
        await wait_until(lambda: acked(master.state_file) == {ids["a"]: True, ids["b"]: True, ids["c"]: False})
        before = await stub.GetStatus(admin_pb2.GetStatusRequest(), timeout=5)
        assert before.generation == 1 and before.state == admin_pb2.JOB_STATE_STARTING
        await channel.close()

        master.signal(signal.SIGKILL)
        await asyncio.to_thread(master.wait, 20)
        for x in (a, b, c):
            await x.close()
        await asyncio.to_thread(master.start)

        # Agents re-attach to the new port with their node ids, nonces and last acked commands.
        again = []
        for x in (a, b, c):
            y = FakeAgent(master.target, x.name, nonce=x.nonce, node_id=x.node_id, auto_ack=True)
            y.last_command_id = x.last_command_id
            await y.register()
            assert y.node_id == x.node_id
            await y.attach()
            again.append(y)
        a2, b2, c2 = again
        channel, stub = admin_stub(master.target)
        await wait_until(lambda: c2.commands, what="unacked Start re-sent to c")
        assert c2.commands[0].command_id == ids["c"] and c2.kinds() == ["start"]
        # Waiting for c's ack resumed after the restart: the job runs, still generation 1.
        for _ in range(200):
            after = await stub.GetStatus(admin_pb2.GetStatusRequest(), timeout=5)
            if after.state == admin_pb2.JOB_STATE_RUNNING:
                break
            await asyncio.sleep(0.02)
        assert after.state == admin_pb2.JOB_STATE_RUNNING
        assert after.generation == 1 and after.plan == before.plan and after.job_id == before.job_id
        assert a2.commands == [] and b2.commands == []  # nothing applied twice
        assert all(acked(master.state_file).values())

        # The restarted master still detects failures and reconfigures once.
        await b2.drop_session()
        await wait_until(lambda: [k for k in a2.kinds() if k == "reconfigure"], timeout_s=15)
        assert a2.commands[0].generation == 2 and c2.kinds() == ["start", "reconfigure"]
        events = [e async for e in stub.WatchEvents(admin_pb2.WatchEventsRequest(since_id=0), timeout=5)]
        kinds = [e.kind for e in events]
        assert kinds.count("job_submitted") == 1 and "node_dead" in kinds
        assert [e.id for e in events] == sorted({e.id for e in events})
        await channel.close()
        for y in again:
            await y.close()

    run(body())


def ctl(master, *args, token=None):
    token = token or master.paths["admin_token_file"]
    return subprocess.run(
        [*CTL, *args, "--master", master.target, "--token-file", token],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_oobleckctl_admin_commands(master, tmp_path):
    async def body():
        await asyncio.to_thread(master.start)
        agents = [await FakeAgent(master.target, f"n{i}").start() for i in range(2)]
        job = tmp_path / "job.yaml"
        job.write_text(job_spec_yaml(master.paths["profile"]))
        res = await asyncio.to_thread(ctl, master, "submit", str(job), "--json")
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)["generation"] == "1"  # int64 is a JSON string
        res = await asyncio.to_thread(ctl, master, "nodes", "--json")
        nodes = json.loads(res.stdout)
        assert [n["name"] for n in nodes] == ["n0", "n1"] and nodes[0]["state"] == "NODE_STATE_ALIVE"
        res = await asyncio.to_thread(ctl, master, "status")
        assert res.returncode == 0 and "generation:  1" in res.stdout
        res = await asyncio.to_thread(ctl, master, "events")
        assert "job_submitted" in res.stdout
        res = await asyncio.to_thread(ctl, master, "drain-node", "77")
        assert res.returncode == 2
        assert res.stderr.strip() == "oobleckctl: NOT_FOUND: node_id: no node 77 (see `oobleckctl nodes`)"
        bad = tmp_path / "bad.token"
        write_secret(bad, "a-wrong-admin-token-of-some-length")
        res = await asyncio.to_thread(ctl, master, "status", token=str(bad))
        assert res.returncode == 2 and res.stderr.startswith("oobleckctl: UNAUTHENTICATED")
        assert len(res.stderr.strip().splitlines()) == 1
        res = await asyncio.to_thread(ctl, master, "cancel", "--reason", "test")
        assert res.returncode == 0 and "cancelled" in res.stdout
        for a in agents:
            await a.close()

    run(body())


def test_kill9_during_a_reconfiguration_resumes_it_after_restart(master):
    async def body():
        await asyncio.to_thread(master.start)
        a, b, c = [await FakeAgent(master.target, n).start() for n in "abc"]
        channel, stub = admin_stub(master.target)
        spec = job_spec_yaml(master.paths["profile"])
        await stub.SubmitJob(admin_pb2.SubmitJobRequest(job_spec_yaml=spec), timeout=10)
        await wait_until(lambda: all(x.last_command_id for x in (a, b, c)))
        b.auto_ack = False
        await c.drop_session()
        await wait_until(lambda: "reconfigure" in b.kinds() and a.last_generation == 2, timeout_s=15)
        recon_id = b.commands[-1].command_id
        await wait_until(lambda: acked(master.state_file).get(a.commands[-1].command_id) is True)
        await channel.close()
        master.signal(signal.SIGKILL)
        await asyncio.to_thread(master.wait, 20)
        for x in (a, b, c):
            await x.close()
        await asyncio.to_thread(master.start)
        again = []
        for x in (a, b):
            y = FakeAgent(master.target, x.name, nonce=x.nonce, node_id=x.node_id)
            y.last_command_id = x.last_command_id
            await y.register()
            await y.attach()
            again.append(y)
        a2, b2 = again
        await wait_until(lambda: b2.commands, what="the unacked Reconfigure re-sent")
        assert b2.kinds() == ["reconfigure"] and b2.commands[0].command_id == recon_id
        assert b2.commands[0].generation == 2
        channel, stub = admin_stub(master.target)
        for _ in range(500):
            status = await stub.GetStatus(admin_pb2.GetStatusRequest(), timeout=5)
            if status.state == admin_pb2.JOB_STATE_RUNNING:
                break
            await asyncio.sleep(0.02)
        assert status.state == admin_pb2.JOB_STATE_RUNNING and status.generation == 2
        assert a2.commands == []
        assert sorted(n for p in status.plan.pipelines for n in p.node_ids) == sorted([a.node_id, b.node_id])
        await channel.close()
        for y in again:
            await y.close()

    run(body())


def test_token_files_must_be_private_long_and_distinct(tmp_path):
    proc = MasterProcess(tmp_path)
    admin = Path(proc.paths["admin_token_file"])
    cases = []
    loose = tmp_path / "loose.token"
    write_secret(loose, "a-long-enough-token-but-world-readable")
    loose.chmod(0o644)
    cases.append((["--token-file", str(loose)], "readable by others (mode 644); chmod 600"))
    short = tmp_path / "short.token"
    write_secret(short, "tiny")
    cases.append((["--token-file", str(short)], "fewer than 16"))
    cases.append((["--token-file", str(admin)], "hold the same token"))
    cases.append((["--token-file", "/dev/zero"], "not a regular file"))
    for extra, message in cases:
        argv = [*proc.argv]
        argv[argv.index(extra[0]) + 1] = extra[1]
        res = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert res.returncode == 2, res.stderr
        ours = [line for line in res.stderr.splitlines() if line.startswith("oobleck-master:")]
        assert len(ours) == 1 and message in ours[0] and "Traceback" not in res.stderr, res.stderr


def test_tokens_rotate_on_sighup_with_a_grace_period(tmp_path):
    master = MasterProcess(tmp_path, "--token-rotation-grace-s", "5")
    old = Path(master.paths["admin_token_file"])
    old_copy = tmp_path / "old-admin.token"
    write_secret(old_copy, old.read_text().strip())
    try:
        master.start()

        def status_with(token_file: Path):
            return ctl(master, "status", token=str(token_file))

        assert status_with(old_copy).returncode == 0
        write_secret(old, "a-brand-new-admin-token-0123456789")  # the operator rotates it...
        master.signal(signal.SIGHUP)  # ... and tells the master
        deadline = 30.0
        t0 = time.monotonic()
        while "tokens reloaded" not in master.log_file.read_text():
            assert time.monotonic() - t0 < deadline, master.log_file.read_text()[-2000:]
            time.sleep(0.05)
        assert status_with(old).returncode == 0  # the new token works at once
        first = status_with(old_copy)  # the old one, within the grace period
        assert first.returncode == 0, first.stderr
        while status_with(old_copy).returncode == 0:  # until the grace period ends
            assert time.monotonic() - t0 < deadline
        res = status_with(old_copy)
        assert res.returncode == 2 and "UNAUTHENTICATED" in res.stderr
        assert status_with(old).returncode == 0
        assert "new admin token (the old one is accepted for 5s)" in master.log_file.read_text()
    finally:
        master.stop()


def test_http_follows_the_plaintext_rule_and_status_needs_the_admin_token_off_loopback(tmp_path):
    proc = MasterProcess(tmp_path)
    argv = [*proc.argv]
    argv[argv.index("--http-listen") + 1] = "0.0.0.0:0"
    res = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "http_listen '0.0.0.0:0': plaintext is allowed only on loopback" in res.stderr

    master = MasterProcess(tmp_path, "--allow-insecure")
    master.argv[master.argv.index("--http-listen") + 1] = "0.0.0.0:0"
    try:
        master.start()
        base = f"http://127.0.0.1:{master.info['http_port']}"

        def get(path: str, token: str | None = None) -> tuple[int, bytes]:
            request = urllib.request.Request(base + path)
            if token is not None:
                request.add_header("Authorization", f"Bearer {token}")
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    return response.status, response.read()
            except urllib.error.HTTPError as exc:
                return exc.code, exc.read()

        admin = Path(master.paths["admin_token_file"]).read_text().strip()
        agent = Path(master.paths["token_file"]).read_text().strip()
        code, body = get("/api/status")
        assert code == 401 and b"admin token is required" in body
        assert get("/api/status", agent)[0] == 401
        code, body = get("/api/status", admin)
        assert code == 200 and json.loads(body)["state"] == "NONE"
        assert get("/healthz")[0] == 200 and get("/metrics")[0] == 200
    finally:
        master.stop()
