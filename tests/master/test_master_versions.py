"""Versions exchanged at registration, and the skew rule (upgrade the master first)."""

import asyncio

import grpc
import pytest
from master_fakes import AGENT_TOKEN, running_master

from oobleck.common.tls import aio_channel
from oobleck.common.version import OLDEST_AGENT_PROTOCOL, PROTOCOL_VERSION, agent_protocol_problem, version
from oobleck.protos.v1 import agent_pb2, agent_pb2_grpc


def test_the_skew_rule():
    assert agent_protocol_problem(PROTOCOL_VERSION) is None
    assert agent_protocol_problem(OLDEST_AGENT_PROTOCOL) is None
    assert agent_protocol_problem(0) is None  # an agent from before versions were exchanged: protocol 1
    newer = agent_protocol_problem(PROTOCOL_VERSION + 1, "9.9")
    assert f"agent 9.9 speaks protocol {PROTOCOL_VERSION + 1}" in newer and "upgrade the master first" in newer


def test_registration_exchanges_versions_and_a_newer_agent_is_refused_until_the_master_is_upgraded(tmp_path):
    async def body():
        async with running_master(tmp_path) as srv:
            channel = aio_channel(srv.target, token=AGENT_TOKEN)
            stub = agent_pb2_grpc.AgentServiceStub(channel)

            def request(name, protocol):
                return agent_pb2.RegisterRequest(
                    node_name=name, address="127.0.0.1", slots=1, software_version="x", nonce=name, store_port=1,
                    protocol_version=protocol,
                )  # fmt: skip

            res = await stub.Register(request("current", PROTOCOL_VERSION), timeout=5)
            assert res.protocol_version == PROTOCOL_VERSION and res.software_version == version()
            assert (await stub.Register(request("old", 0), timeout=5)).node_id > res.node_id
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Register(request("newer", PROTOCOL_VERSION + 1), timeout=5)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "protocol_version: agent x speaks protocol" in err.value.details()
            assert "upgrade the master first" in err.value.details()
            assert sorted(n.row.name for n in srv.master.nodes.values()) == ["current", "old"]
            await channel.close()

    asyncio.run(asyncio.wait_for(body(), 60))
