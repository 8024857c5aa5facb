"""The master with real ``oobleck-agent`` processes (and the agent tests' stand-in worker)."""

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from master_fakes import MasterProcess, admin_stub, job_spec_yaml

from oobleck.protos.v1 import admin_pb2

pytestmark = pytest.mark.slow
FAKE_WORKER = Path(__file__).parents[1] / "agent" / "fake_worker.py"
AGENT = Path(sys.executable).parent / "oobleck-agent"


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


class Agents:
    def __init__(self, tmp: Path, master: MasterProcess) -> None:
        self.tmp, self.master, self.procs = tmp, master, []

    def start(self, name: str) -> subprocess.Popen:
        work = self.tmp / name
        argv = [
            str(AGENT), "--master", self.master.target, "--token-file", self.master.paths["token_file"],
            "--node-name", name, "--slots", "1", "--work-dir", str(work),
            "--worker-command", f"{sys.executable} {FAKE_WORKER}", "--ready-file", str(self.tmp / f"{name}.ready"),
        ]  # fmt: skip
        with (self.tmp / f"{name}.log").open("wb") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=15)


def test_kill9_of_an_agent_gives_one_reconfiguration(tmp_path):
    master = MasterProcess(tmp_path)
    agents = Agents(tmp_path, master)
    try:
        master.start()

        async def body():
            channel, stub = admin_stub(master.target)
            procs = [agents.start(f"node{i}") for i in range(3)]

            async def nodes():
                return (await stub.ListNodes(admin_pb2.ListNodesRequest(), timeout=5)).nodes

            for _ in range(1000):
                if len(await nodes()) == 3:
                    break
                await asyncio.sleep(0.02)
            spec = job_spec_yaml(master.paths["profile"], steps=1_000_000)
            await stub.SubmitJob(admin_pb2.SubmitJobRequest(job_spec_yaml=spec), timeout=10)
            status = admin_pb2.GetStatusResponse()

            async def running(generation):
                nonlocal status
                status = await stub.GetStatus(admin_pb2.GetStatusRequest(), timeout=5)
                return status.state == admin_pb2.JOB_STATE_RUNNING and status.generation == generation

            for _ in range(3000):
                if await running(1) and status.step > 0:
                    break
                await asyncio.sleep(0.02)
            assert status.state == admin_pb2.JOB_STATE_RUNNING and status.step > 0, status
            by_name = {n.name: n.node_id for n in await nodes()}
            watch = stub.WatchEvents(admin_pb2.WatchEventsRequest(since_id=0, follow=True))
            killed_at = time.time()
            os.killpg(procs[1].pid, signal.SIGKILL)  # the agent and its worker
            dead_at = None
            async for ev in watch:
                if ev.kind == "node_dead":
                    assert ev.node_id == by_name["node1"]
                    dead_at = ev.unix_time_s
                if ev.kind == "reconfigured":
                    assert ev.generation == 2 and {"regroup", "copy"} <= set(ev.durations_s)
                    break
            watch.cancel()
            assert dead_at is not None and dead_at - killed_at <= 1.0 + 0.5  # heartbeat_timeout_s + 0.5
            for _ in range(1000):
                if await running(2):
                    break
                await asyncio.sleep(0.02)
            assert status.generation == 2 and status.nodes_dead == 1
            assert sorted(n for p in status.plan.pipelines for n in p.node_ids) == sorted(
                [by_name["node0"], by_name["node2"]]
            )
            events = [e async for e in stub.WatchEvents(admin_pb2.WatchEventsRequest(since_id=0), timeout=5)]
            assert [e.kind for e in events].count("reconfiguring") == 1

            # Drain: node2 leaves the plan by a reconfiguration, stops its workers and stays drained.
            await stub.DrainNode(admin_pb2.DrainNodeRequest(node_id=by_name["node2"]), timeout=5)
            for _ in range(1000):
                states = {n.node_id: n.state for n in await nodes()}
                if states[by_name["node2"]] == admin_pb2.NODE_STATE_DRAINED and await running(3):
                    break
                await asyncio.sleep(0.02)
            assert states[by_name["node2"]] == admin_pb2.NODE_STATE_DRAINED and status.generation == 3
            assert [list(p.node_ids) for p in status.plan.pipelines] == [[by_name["node0"]]]
            # Kill drill on a drained node: the agent exits with status 1 and the node is declared dead.
            await stub.KillNode(admin_pb2.KillNodeRequest(node_id=by_name["node2"]), timeout=5)
            assert await asyncio.to_thread(procs[2].wait, 20) == 1
            for _ in range(1000):
                if {n.node_id: n.state for n in await nodes()}[by_name["node2"]] == admin_pb2.NODE_STATE_DEAD:
                    break
                await asyncio.sleep(0.02)
            assert {n.node_id: n.state for n in await nodes()}[by_name["node2"]] == admin_pb2.NODE_STATE_DEAD
            assert (await stub.GetStatus(admin_pb2.GetStatusRequest(), timeout=5)).generation == 3
            await channel.close()

        run(body())
    finally:
        agents.stop()
        master.stop()


async def _wait_status(stub, predicate, what: str, timeout_s: float = 60.0):
    """Poll GetStatus until ``predicate(status)`` holds (a deadline, not a sleep-as-sync)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        status = await stub.GetStatus(admin_pb2.GetStatusRequest(), timeout=5)
        if predicate(status):
            return status
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}; last status: {status}")
        await asyncio.sleep(0.02)


async def _wait_nodes(stub, predicate, what: str, timeout_s: float = 60.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        nodes = (await stub.ListNodes(admin_pb2.ListNodesRequest(), timeout=5)).nodes
        if predicate(nodes):
            return nodes
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}; last nodes: {nodes}")
        await asyncio.sleep(0.02)


async def _start_job(stub, master, agents, count: int):
    procs = [agents.start(f"node{i}") for i in range(count)]
    nodes = await _wait_nodes(stub, lambda ns: len(ns) == count, f"{count} registered agents")
    spec = job_spec_yaml(master.paths["profile"], steps=1_000_000)
    await stub.SubmitJob(admin_pb2.SubmitJobRequest(job_spec_yaml=spec), timeout=10)
    await _wait_status(
        stub,
        lambda s: s.state == admin_pb2.JOB_STATE_RUNNING and s.generation == 1 and s.step > 0,
        "the job to run",
    )
    return procs, {n.name: n.node_id for n in nodes}


def test_two_agents_killed_at_once_give_one_reconfiguration(tmp_path):
    master = MasterProcess(tmp_path)
    agents = Agents(tmp_path, master)
    try:
        master.start()

        async def body():
            channel, stub = admin_stub(master.target)
            procs, by_name = await _start_job(stub, master, agents, 5)
            for i in (1, 3):  # same moment: both process groups, back to back
                os.killpg(procs[i].pid, signal.SIGKILL)
            status = await _wait_status(
                stub,
                lambda s: s.state == admin_pb2.JOB_STATE_RUNNING and s.generation >= 2 and s.nodes_dead == 2,
                "the reconfigured job",
            )
            assert status.generation == 2
            survivors = sorted(by_name[f"node{i}"] for i in (0, 2, 4))
            assert sorted(n for p in status.plan.pipelines for n in p.node_ids) == survivors
            events = [e async for e in stub.WatchEvents(admin_pb2.WatchEventsRequest(since_id=0), timeout=5)]
            kinds = [e.kind for e in events]
            assert kinds.count("reconfiguring") == 1
            assert sorted(e.node_id for e in events if e.kind == "node_dead") == sorted(
                by_name[f"node{i}"] for i in (1, 3)
            )
            # every survivor applied generation 2 exactly once
            for i in (0, 2, 4):
                log = (tmp_path / f"node{i}" / "slot-0.log").read_text().split("\n")
                assert log.count("reconfigure 2") == 1, log
            await channel.close()

        run(body())
    finally:
        agents.stop()
        master.stop()


def test_master_kill9_and_restart_with_real_agents(tmp_path):
    master = MasterProcess(tmp_path)
    agents = Agents(tmp_path, master)
    try:
        master.start()

        async def first_life():
            channel, stub = admin_stub(master.target)
            _, by_name = await _start_job(stub, master, agents, 3)
            status = await stub.GetStatus(admin_pb2.GetStatusRequest(), timeout=5)
            await channel.close()
            return by_name, status

        by_name, before = run(first_life())
        port = master.info["grpc_port"]
        master.signal(signal.SIGKILL)
        master.wait()
        # Same state file; the same port (it was chosen by the kernel in the first life), so the
        # agents' configured master address still works.
        master.argv[master.argv.index("--listen") + 1] = f"127.0.0.1:{port}"
        master.start()

        async def second_life():
            channel, stub = admin_stub(master.target)
            nodes = await _wait_nodes(
                stub,
                lambda ns: len(ns) == 3 and all(n.state == admin_pb2.NODE_STATE_ALIVE for n in ns),
                "all agents re-attached",
            )
            assert {n.name: n.node_id for n in nodes} == by_name
            status = await _wait_status(stub, lambda s: s.step > before.step + 5, "training to go on")
            assert status.generation == before.generation == 1
            assert status.plan == before.plan
            events = [e async for e in stub.WatchEvents(admin_pb2.WatchEventsRequest(since_id=0), timeout=5)]
            assert "reconfiguring" not in [e.kind for e in events]
            await channel.close()

        run(second_life())
        for i in range(3):  # no command was delivered twice: one start, nothing else
            log = (tmp_path / f"node{i}" / "slot-0.log").read_text().split()
            assert log == ["start", "1"], log
    finally:
        agents.stop()
        master.stop()
