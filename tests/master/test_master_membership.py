"""Issue 12 item 7, against a real master process: a registration flood from one peer is cut off
by the per-peer limit, dead nodes leave memory and the state file after their retention (events
keep their history), and ListNodes answers a page at a time."""

import asyncio
import secrets
import sqlite3
import urllib.request

import grpc
import pytest
from master_fakes import FakeAgent, MasterProcess, admin_stub, wait_until

from oobleck.protos.v1 import admin_pb2, agent_pb2, agent_pb2_grpc

pytestmark = pytest.mark.slow
BURST = 12


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 90))


def healthz_ms(master) -> float:
    import time

    t0 = time.perf_counter()
    with urllib.request.urlopen(f"http://127.0.0.1:{master.info['http_port']}/healthz", timeout=5) as response:
        assert response.status == 200
    return (time.perf_counter() - t0) * 1000


def stored_node_ids(master) -> set[int]:
    conn = sqlite3.connect(f"file:{master.state_file}?mode=ro", uri=True, timeout=5)
    try:
        return {r[0] for r in conn.execute("SELECT node_id FROM nodes")}
    finally:
        conn.close()


@pytest.fixture
def master(tmp_path):
    proc = MasterProcess(
        tmp_path,
        "--no-scale-up",
        "--register-burst", str(BURST),
        "--register-rate-per-s", "2",
        "--dead-node-retention-s", "1",
    )  # fmt: skip
    try:
        yield proc.start()
    finally:
        proc.stop()


def test_a_registration_flood_is_cut_off_and_dead_nodes_are_purged(master):
    async def body():
        channel, admin = admin_stub(master.target)
        from master_fakes import AGENT_TOKEN

        from oobleck.common.tls import aio_channel

        agent_channel = aio_channel(master.target, token=AGENT_TOKEN)
        stub = agent_pb2_grpc.AgentServiceStub(agent_channel)
        registered, refused = [], []
        for i in range(3 * BURST):  # registrations that never open a session
            request = agent_pb2.RegisterRequest(
                node_name=f"flood{i}", address="127.0.0.1", slots=1, nonce=secrets.token_hex(8), store_port=1
            )
            try:
                registered.append((await stub.Register(request, timeout=5)).node_id)
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
                refused.append(exc.details())
        assert BURST <= len(registered) <= BURST + 2, len(registered)  # the burst (and what refilled meanwhile)
        assert "too many registrations from 127.0.0.1" in refused[0] and "retry in" in refused[0], refused[0]
        assert master.metric("oobleck_registrations_refused_total") == len(refused)
        assert healthz_ms(master) < 200

        # Registered but never attached: declared dead, listed for the retention, then purged.
        await wait_until(
            lambda: master.metric('oobleck_nodes{state="dead"}') == len(registered), 15, "flood nodes dead"
        )
        await wait_until(lambda: master.metric("oobleck_nodes_purged_total") == len(registered), 15, "purged")
        listed = await admin.ListNodes(admin_pb2.ListNodesRequest(), timeout=5)
        assert listed.total == 0 and not listed.nodes
        assert not stored_node_ids(master) & set(registered)  # gone from the state file too
        log = [e async for e in admin.WatchEvents(admin_pb2.WatchEventsRequest(since_id=0, follow=False))]
        assert {e.node_id for e in log if e.kind == "node_dead"} == set(registered)  # history kept

        # The limit refills: a real agent registers and works, its id never reused.
        agent = FakeAgent(master.target, "real")
        for _ in range(100):
            try:
                await agent.start()
                break
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                await asyncio.sleep(0.1)  # waiting for the bucket to refill (2 per second)
        assert agent.node_id > max(registered)
        await wait_until(lambda: master.metric('oobleck_nodes{state="spare"}') == 1, 10, "real agent live")
        await agent.close()
        await agent_channel.close()
        await channel.close()

    run(body())


def test_list_nodes_answers_a_page_at_a_time(master):
    async def body():
        channel, admin = admin_stub(master.target)
        agents = [await FakeAgent(master.target, f"n{i}").start() for i in range(7)]
        ids = [a.node_id for a in agents]
        pages, after = [], 0
        while True:
            res = await admin.ListNodes(admin_pb2.ListNodesRequest(page_size=3, after_node_id=after), timeout=5)
            pages.append([n.node_id for n in res.nodes])
            assert res.total == 7
            after = res.next_after_node_id
            if not after:
                break
        assert pages == [ids[:3], ids[3:6], ids[6:]]
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await admin.ListNodes(admin_pb2.ListNodesRequest(page_size=100_000), timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "page_size" in err.value.details()
        for a in agents:
            await a.close()
        await channel.close()

    run(body())
