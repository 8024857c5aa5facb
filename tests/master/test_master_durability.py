"""A master whose state file stops taking writes (disk full, read-only, I/O errors) keeps serving:
facts stay in memory and are written when the file is writable again; state changes are refused
with a clear error (and undone when their commit fails); nothing already committed is lost.

The master runs in-process over real gRPC with scripted agents; the failure is injected at the
store's edge (every write raises what SQLite raises on a full disk). ``tests/e2e`` fills a real
file system under a real master.
"""

import sqlite3

import grpc
import pytest
from master_fakes import FakeAgent, admin_stub, make_fake_planner, running_master, wait_until
from test_master_service import close_all, run, start_agents, state_of, submit

from oobleck.master.store import StoreError
from oobleck.protos.v1 import admin_pb2, agent_pb2

READS = {"events_since", "load", "commands_for"}


class FullDisk:
    """Makes the master's store fail the way SQLite does on a full disk, for chosen methods."""

    def __init__(self, master) -> None:
        self.master = master
        self.failing: set[str] | None = None  # None: healthy; empty set: every write fails
        self.refused: list[str] = []
        self._call = master.store.call
        master.store.call = self.call

    async def call(self, method, *args):
        if self.failing is not None and method not in READS and (not self.failing or method in self.failing):
            self.refused.append(method)
            full = sqlite3.OperationalError("database or disk is full")
            raise StoreError(self.master.config.state_file, method, full)
        return await self._call(method, *args)


async def events(stub) -> list:
    return [e async for e in stub.WatchEvents(admin_pb2.WatchEventsRequest(since_id=0, follow=False))]


async def running_job(srv):
    """Four scripted agents, a job of two 2-node pipelines, RUNNING: (agents, channel, stub)."""
    agents = await start_agents(srv, 4)
    channel, stub = admin_stub(srv.target)
    await submit(stub, srv)
    await wait_until(lambda: state_of(srv) == "RUNNING")
    return agents, channel, stub


def test_a_full_disk_never_stops_the_master_and_nothing_is_lost(tmp_path):
    async def body():
        planner = make_fake_planner(nodes_per_pipeline=2)
        async with running_master(tmp_path, planner=planner, state_retry_s=0.1, scale_up=False) as srv:
            agents, channel, stub = await running_job(srv)
            disk = FullDisk(srv.master)
            disk.failing = set()
            for a in agents:
                await a.send(step=agent_pb2.StepReport(generation=1, step=4, loss=2.5, samples_per_s=10.0))
            await wait_until(lambda: srv.master.store_failure is not None, what="the failed progress write")
            assert "database or disk is full" in srv.master.store_failure
            assert srv.master.metrics.state_store_ok._value.get() == 0
            assert srv.master.metrics.state_write_failures._value.get() >= 1

            # It keeps serving reads, and refuses changes with a message naming the file.
            status = await stub.GetStatus(admin_pb2.GetStatusRequest(), timeout=5)
            assert status.step == 4 and admin_pb2.JobState.Name(status.state) == "JOB_STATE_RUNNING"
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.DrainNode(admin_pb2.DrainNodeRequest(node_id=agents[0].node_id), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert str(tmp_path / "state.db") in err.value.details() and "refuses state changes" in err.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await FakeAgent(srv.target, "newcomer").start()  # a new node needs a durable id
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "state_write_failed" in [e.kind for e in await events(stub)]

            # A node dies: recorded in memory, but no plan can be persisted, so none is sent.
            await agents[3].drop_session()
            await wait_until(lambda: srv.master.nodes[agents[3].node_id].row.state == "dead", what="node 4 dead")
            tried = disk.refused.count("resync")  # a few more retries: nothing may be sent meanwhile
            await wait_until(lambda: disk.refused.count("resync") >= tried + 3, what="three more retries")
            assert srv.master.generation == 1 and all(a.kinds() == ["start"] for a in agents[:3])

            # Space returns: one resync writes everything; the reconfiguration goes ahead.
            disk.failing = None
            await wait_until(lambda: srv.master.generation == 2 and state_of(srv) == "RUNNING", what="generation 2")
            assert srv.master.store_failure is None and srv.master.metrics.state_store_ok._value.get() == 1
            kinds = [e.kind for e in await events(stub)]
            assert kinds.index("state_write_failed") < kinds.index("node_dead") < kinds.index("state_store_recovered")
            assert kinds.index("state_store_recovered") < kinds.index("reconfiguring")
            before = [(e.id, e.kind, e.message) for e in await events(stub)]
            await close_all(agents, channel)

        # Everything recorded during the outage is in the state file, with the same ids.
        async with running_master(tmp_path, planner=planner) as srv:
            channel, stub = admin_stub(srv.target)
            after = [(e.id, e.kind, e.message) for e in await events(stub)]
            assert after[: len(before)] == before
            assert srv.master.generation == 2 and srv.master.job.step == 4
            assert srv.master.nodes[agents[3].node_id].row.state == "dead"
            await channel.close()

    run(body())


def test_a_commit_that_fails_is_undone_and_retried(tmp_path):
    """The disk fills exactly as the next generation is committed: nothing is sent, memory is as
    before (generation, plan, node states), and the same reconfiguration happens once it can."""

    async def body():
        planner = make_fake_planner(nodes_per_pipeline=2)
        async with running_master(tmp_path, planner=planner, state_retry_s=0.1, scale_up=False) as srv:
            agents, channel, _stub = await running_job(srv)
            plan_before, pipelines_before = srv.master.job.plan, srv.master.pipelines
            disk = FullDisk(srv.master)
            disk.failing = {"commit_plan"}
            await agents[3].drop_session()
            await wait_until(lambda: "commit_plan" in disk.refused, what="the failed commit")
            assert srv.master.generation == 1 and srv.master.job.state == "RUNNING"
            assert srv.master.job.plan == plan_before and srv.master.pipelines == pipelines_before
            assert {srv.master.nodes[a.node_id].row.state for a in agents[:3]} == {"alive"}
            assert all(a.kinds() == ["start"] for a in agents[:3])
            disk.failing = None
            await wait_until(lambda: srv.master.generation == 2 and state_of(srv) == "RUNNING", what="generation 2")
            assert [a.kinds() for a in agents[:3]].count(["start", "reconfigure"]) >= 2
            await close_all(agents, channel)

    run(body())
