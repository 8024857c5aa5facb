"""What a node holding the agent token can no longer do to the job, against a real master process
(scripted agents over real gRPC): forge progress or the job's end, or smuggle control characters
into logs, events and ``oobleckctl`` output. The master keeps serving correct answers afterwards."""

import asyncio
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import pytest
from master_fakes import FakeAgent, MasterProcess, admin_stub, job_spec_yaml, wait_until
from support.waiting import poll_until_async

from oobleck.protos.v1 import admin_pb2, agent_pb2

pytestmark = pytest.mark.slow
CTL = [str(Path(sys.executable).parent / "oobleckctl")]
STEPS = 20


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 90))


@pytest.fixture
def master(tmp_path):
    proc = MasterProcess(tmp_path, "--no-scale-up")
    try:
        yield proc.start()
    finally:
        proc.stop()


def report(step: int, loss: float = 2.0, generation: int = 1) -> agent_pb2.StepReport:
    return agent_pb2.StepReport(generation=generation, step=step, loss=loss, samples_per_s=10.0)


async def status(stub) -> admin_pb2.GetStatusResponse:
    return await stub.GetStatus(admin_pb2.GetStatusRequest(), timeout=5)


def test_forged_step_reports_neither_advance_nor_end_the_job(master, tmp_path):
    async def body():
        channel, stub = admin_stub(master.target)
        plan_nodes = [await FakeAgent(master.target, f"n{i}").start() for i in range(2)]
        await stub.SubmitJob(
            admin_pb2.SubmitJobRequest(job_spec_yaml=job_spec_yaml(master.paths["profile"], steps=STEPS)), timeout=10
        )
        await wait_until(lambda: all(a.kinds() == ["start"] for a in plan_nodes))
        spare = await FakeAgent(master.target, "spare").start()
        for a in plan_nodes:
            await a.send(step=report(3))
        await wait_until_async(lambda s: s.step == 3, stub)

        # A spare (not in the plan), with a huge step and a too-good loss, a hundred times.
        for _ in range(100):
            await spare.send(step=report(10**12, loss=1e-4))
        # A plan node, beyond the job's steps; then the final step, alone.
        await plan_nodes[0].send(step=report(10**12, loss=1e-4))
        await plan_nodes[0].send(step=report(STEPS, loss=1e-4))
        await wait_until(lambda: master.metric('oobleck_step_reports_ignored_total{reason="not_in_plan"}') == 100)
        s = await status(stub)
        assert s.state == admin_pb2.JOB_STATE_RUNNING and s.step == 3 and s.loss != pytest.approx(1e-4), s
        assert master.metric('oobleck_step_reports_ignored_total{reason="beyond_steps"}') == 1
        assert master.metric("oobleck_step") == 3
        log = master.log_file.read_text()
        assert log.count(f"node {spare.node_id}: step report ignored") == 1, "one line per node, not a flood"

        # The job ends when every node of the plan reports the final step.
        await plan_nodes[1].send(step=report(STEPS, loss=1.5))
        await wait_until_async(lambda s: s.state == admin_pb2.JOB_STATE_SUCCEEDED, stub)
        assert (await status(stub)).step == STEPS
        for a in [*plan_nodes, spare]:
            await a.close()
        await channel.close()

    run(body())


async def wait_until_async(predicate, stub, timeout_s: float = 10.0):
    return await poll_until_async(lambda: status(stub), predicate, "a status", timeout_s)


def test_control_characters_from_a_node_reach_no_log_event_or_terminal_raw(master, tmp_path):
    forged = "boom\x1b[2J\x1b[31m\n2026-12-03 12:00:00,000 INFO oobleck.master.core: event job_succeeded FORGED"

    async def body():
        channel, stub = admin_stub(master.target)
        nodes = [await FakeAgent(master.target, f"n{i}", auto_ack=False).start() for i in range(2)]
        await stub.SubmitJob(
            admin_pb2.SubmitJobRequest(job_spec_yaml=job_spec_yaml(master.paths["profile"], steps=STEPS)), timeout=10
        )
        await wait_until(lambda: all(a.kinds() == ["start"] for a in nodes))
        # A multi-line error in an ack (a worker's traceback) is a valid message, escaped: the
        # start failed (the node is then failed, not refused as a bad request).
        cmd = nodes[0].commands[0]
        bad = agent_pb2.CommandAck(command_id=cmd.command_id, generation=1, ok=False, error=forged)
        await nodes[0].send(ack=bad)
        await nodes[1].send(worker=agent_pb2.WorkerReport(slot=0, pid=1, state=3, exit_code=1, detail=forged))
        await nodes[1].send(failure=agent_pb2.NodeFailure(reason=forged))
        await wait_until_async(lambda s: s.nodes_dead == 2, stub)
        await wait_until(lambda: nodes[0].session_error is not None)
        assert nodes[0].session_error == grpc.StatusCode.FAILED_PRECONDITION, nodes[0].session_details
        for a in nodes:
            await a.close()
        await channel.close()

    run(body())
    log = master.log_file.read_text()
    assert "\x1b" not in log and "\nFORGED" not in log
    assert not any(line.startswith("2026-12-03 12:00:00,000") for line in log.splitlines())
    assert "boom\\x1b[2J\\x1b[31m\\n2026-12-03" in log
    res = subprocess.run(
        [*CTL, "events", "--master", master.target, "--token-file", master.paths["admin_token_file"]],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "\x1b" not in res.stdout and "boom\\x1b[2J" in res.stdout
    assert all(not line.startswith("2026-12-03 12:00:00,000") for line in res.stdout.splitlines())


def test_a_live_node_is_never_evicted_by_a_registration_with_its_id(master):
    async def body():
        channel, stub = admin_stub(master.target)
        nodes = [await FakeAgent(master.target, f"n{i}").start() for i in range(2)]
        await stub.SubmitJob(
            admin_pb2.SubmitJobRequest(job_spec_yaml=job_spec_yaml(master.paths["profile"], steps=STEPS)), timeout=10
        )
        await wait_until_async(lambda s: s.state == admin_pb2.JOB_STATE_RUNNING, stub)
        victim = nodes[0]
        impostor = FakeAgent(master.target, "impostor", node_id=victim.node_id)  # its id, a fresh nonce
        for _ in range(3):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await impostor.register()
            assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS, err.value.details()
            assert "is alive under another registration" in err.value.details()
        s = await status(stub)
        assert s.generation == 1 and s.nodes_dead == 0 and s.state == admin_pb2.JOB_STATE_RUNNING, s
        assert victim.session_error is None
        events = [e async for e in stub.WatchEvents(admin_pb2.WatchEventsRequest(since_id=0, follow=False))]
        assert "node_dead" not in [e.kind for e in events]

        # Once the old session is gone (a crashed agent), the restarted one registers (a new node).
        await victim.drop_session()
        await wait_until_async(lambda s: s.nodes_dead == 1, stub)
        await impostor.register()
        assert impostor.node_id != victim.node_id
        for a in [*nodes, impostor]:
            await a.close()
        await channel.close()

    run(body())


def test_hostile_job_specs_are_refused_at_once_and_leave_no_phantom_job(master):
    laughs = "\n".join(
        [f"l0: &l0 [{', '.join(['lol'] * 9)}]"]
        + [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9)]
        + ["model: {name: gpt}", "global_batch_size: 8", "microbatch_size: 1", "steps: 5"]
    )
    valid = job_spec_yaml(master.paths["profile"], steps=STEPS)

    async def body():
        channel, stub = admin_stub(master.target)
        nodes = [await FakeAgent(master.target, f"n{i}").start() for i in range(2)]
        for text, message in [
            (laughs, "aliases (*name) are not allowed"),
            ("model: " + "[" * 200 + "]" * 200, "nested more than 32 levels deep"),
            (valid.replace(f"steps: {STEPS}", "steps: 100000000000000000000"), "steps: must be <="),
        ]:
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.SubmitJob(admin_pb2.SubmitJobRequest(job_spec_yaml=text), timeout=10)
            assert loop.time() - t0 < 1.0
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in err.value.details()
            t0 = loop.time()
            url = f"http://127.0.0.1:{master.info['http_port']}/healthz"
            await asyncio.to_thread(lambda u=url: urllib.request.urlopen(u, timeout=5).read())
            assert loop.time() - t0 < 0.2
        assert (await status(stub)).state == admin_pb2.JOB_STATE_NONE  # no phantom job
        await stub.SubmitJob(admin_pb2.SubmitJobRequest(job_spec_yaml=valid), timeout=10)
        await wait_until_async(lambda s: s.state == admin_pb2.JOB_STATE_RUNNING, stub)
        for a in nodes:
            await a.close()
        await channel.close()

    run(body())


def test_a_garbage_body_without_a_token_is_unauthenticated_and_logged_with_the_peer(master):
    async def body():
        async with grpc.aio.insecure_channel(master.target) as channel:
            for method in ("/oobleck.v1.AdminService/SubmitJob", "/oobleck.v1.AgentService/Register"):
                call = channel.unary_unary(method)  # raw bytes, no serializer
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call(b"\xff\xfe\x00 not a protobuf message at all \x08\x96", timeout=5)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, err.value.details()
        channel, stub = admin_stub(master.target)
        assert (await status(stub)).state == admin_pb2.JOB_STATE_NONE  # still serving
        await channel.close()

    run(body())
    log = master.log_file.read_text()
    assert "rejected /oobleck.v1.AdminService/SubmitJob from ipv4:127.0.0.1:" in log, log[-2000:]
    assert "rejected /oobleck.v1.AgentService/Register from ipv4:127.0.0.1:" in log


def test_profile_paths_are_confined_bounded_and_never_echoed(master, tmp_path):
    """The master reads ``profile:`` only from its profile directory (here the state file's),
    regular files only, non-blocking, at most 16 MiB, and never quotes what it read."""
    os.mkfifo(tmp_path / "fifo.json", 0o600)  # would block a plain open() forever
    (tmp_path / "huge.json").write_bytes(b" " * (17 << 20))
    (tmp_path / "secret.json").write_text("SECRET-VALUE-42 is not JSON")
    (tmp_path / "escape.json").symlink_to("/etc/passwd")
    cases = {
        "/etc/shadow": "is outside the master's profile directory",
        "/dev/zero": "is outside the master's profile directory",
        "escape.json": "is outside the master's profile directory",
        "../../etc/passwd": "is outside the master's profile directory",
        "fifo.json": "not a regular file",
        "huge.json": "more than 16777216",
        "secret.json": "not an oobleck-profile/1 JSON document (invalid JSON at line 1)",
    }

    async def body():
        channel, stub = admin_stub(master.target)
        nodes = [await FakeAgent(master.target, f"n{i}").start() for i in range(2)]
        loop = asyncio.get_running_loop()
        for name, message in cases.items():
            t0 = loop.time()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.SubmitJob(admin_pb2.SubmitJobRequest(job_spec_yaml=job_spec_yaml(name)), timeout=10)
            assert loop.time() - t0 < 2.0, name
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, err.value.details())
            assert message in err.value.details() and "SECRET-VALUE" not in err.value.details(), err.value.details()
        await stub.SubmitJob(  # the master still serves: a good profile is accepted
            admin_pb2.SubmitJobRequest(job_spec_yaml=job_spec_yaml(master.paths["profile"], steps=STEPS)), timeout=10
        )
        await wait_until_async(lambda s: s.state == admin_pb2.JOB_STATE_RUNNING, stub)
        for a in nodes:
            await a.close()
        await channel.close()

    run(body())
