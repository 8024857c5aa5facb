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


@pytest.mark.skipif(not FAKE_WORKER.exists() or not AGENT.exists(), reason="needs the agent and its test worker")
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

            # Drain: node2 leaves the plan by a reconfiguration, stops its workers and stays a spare.
            await stub.DrainNode(admin_pb2.DrainNodeRequest(node_id=by_name["node2"]), timeout=5)
            for _ in range(1000):
                states = {n.node_id: n.state for n in await nodes()}
                if states[by_name["node2"]] == admin_pb2.NODE_STATE_SPARE and await running(3):
                    break
                await asyncio.sleep(0.02)
            assert states[by_name["node2"]] == admin_pb2.NODE_STATE_SPARE and status.generation == 3
            assert [list(p.node_ids) for p in status.plan.pipelines] == [[by_name["node0"]]]
            # Kill drill on a spare: the agent exits with status 1 and the node is declared dead.
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
