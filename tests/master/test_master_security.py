"""TLS/mTLS, reflection by a generic client, the real planner, and bad input against a live master."""

import asyncio
import json
import os
import random
import socket
import ssl
import urllib.request

import grpc
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from master_certs import have_openssl, make_certs
from master_fakes import (
    ADMIN_TOKEN,
    AGENT_TOKEN,
    FakeAgent,
    MasterProcess,
    admin_stub,
    job_spec_yaml,
    running_master,
    wait_until,
)

from oobleck.common.auth import bearer_metadata
from oobleck.common.tls import ClientTls, sync_channel
from oobleck.protos.v1 import admin_pb2, admin_pb2_grpc, agent_pb2, agent_pb2_grpc


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    if not have_openssl():
        pytest.skip("the openssl command is needed to make test certificates")
    return make_certs(tmp_path_factory.mktemp("certs"))


def test_tls_and_mtls(tmp_path, certs):
    async def body():
        tls_server = {"tls_cert_file": certs.server_cert_file, "tls_key_file": certs.server_key_file}
        async with running_master(tmp_path / "tls", **tls_server) as srv:
            good = ClientTls(ca_file=certs.ca_file)
            agent = await FakeAgent(srv.target, "n", tls=good).start()
            channel, stub = admin_stub(srv.target, tls=good)
            status = await stub.GetStatus(admin_pb2.GetStatusRequest(), timeout=5)
            assert status.nodes_alive == 1
            await channel.close()
            channel, stub = admin_stub(srv.target, tls=ClientTls(ca_file=certs.other_ca_file))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.GetStatus(admin_pb2.GetStatusRequest(), timeout=3)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # server certificate not trusted
            await channel.close()
            async with grpc.aio.insecure_channel(srv.target) as plain:  # plaintext to a TLS port
                with pytest.raises(grpc.aio.AioRpcError):
                    await admin_pb2_grpc.AdminServiceStub(plain).GetStatus(admin_pb2.GetStatusRequest(), timeout=3)
            # HTTP is TLS too, with the same certificate.
            context = ssl.create_default_context(cafile=certs.ca_file)
            url = f"https://localhost:{srv.http_port}/healthz"
            body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5, context=context).read())
            assert body == b"ok\n"
            await agent.close()
        mtls = {**tls_server, "tls_client_ca_file": certs.ca_file}
        async with running_master(tmp_path / "mtls", **mtls) as srv:
            channel, stub = admin_stub(srv.target, tls=ClientTls(ca_file=certs.ca_file))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.GetStatus(admin_pb2.GetStatusRequest(), timeout=3)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # no client certificate
            await channel.close()
            client = ClientTls(certs.ca_file, certs.client_cert_file, certs.client_key_file)
            channel, stub = admin_stub(srv.target, tls=client)
            assert (await stub.GetStatus(admin_pb2.GetStatusRequest(), timeout=5)).state == admin_pb2.JOB_STATE_NONE
            await channel.close()
            # mTLS does not replace the token.
            channel, stub = admin_stub(srv.target, tls=client, token="wrong")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.GetStatus(admin_pb2.GetStatusRequest(), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            await channel.close()

    run(body())


def test_under_mtls_a_node_id_is_bound_to_its_client_certificate(tmp_path, certs):
    """Issue 12 item 2: another certificate can neither re-claim a node's id (even once its
    session is gone) nor open its session; the same certificate can (a restarted agent)."""

    async def body():
        mtls = {
            "tls_cert_file": certs.server_cert_file,
            "tls_key_file": certs.server_key_file,
            "tls_client_ca_file": certs.ca_file,
        }
        mine = ClientTls(certs.ca_file, certs.client_cert_file, certs.client_key_file)
        other = ClientTls(certs.ca_file, certs.client2_cert_file, certs.client2_key_file)
        async with running_master(tmp_path, **mtls) as srv:
            agent = await FakeAgent(srv.target, "n0", tls=mine).start()
            node_id = agent.node_id
            assert srv.master.nodes[node_id].row.identity == "CN:oobleck-test-client"
            intruder = FakeAgent(srv.target, "evil", tls=other, node_id=node_id, nonce=agent.nonce)
            with pytest.raises(grpc.aio.AioRpcError) as err:  # the live node's id, even with its nonce
                await intruder.register()
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "bound to another client certificate" in err.value.details()
            intruder.node_id = node_id
            await intruder.attach()  # a session for the node under the other certificate
            await wait_until(lambda: intruder.session_error is not None, what="session refused")
            assert intruder.session_error == grpc.StatusCode.PERMISSION_DENIED
            await agent.drop_session()  # the session is gone: still not claimable by another certificate
            await wait_until(lambda: srv.master.nodes[node_id].row.state == "dead", what="old session dead")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await intruder.register()
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert srv.master.nodes[node_id].row.name == "n0"
            await intruder.close()
            restarted = FakeAgent(srv.target, "n0", tls=mine, node_id=node_id)
            await restarted.start()  # the same certificate re-registers (a new id: the old one died)
            assert srv.master.nodes[restarted.node_id].row.identity == "CN:oobleck-test-client"
            other_node = await FakeAgent(srv.target, "n1", tls=other).start()  # its own node is fine
            assert srv.master.nodes[other_node.node_id].row.identity == "CN:oobleck-test-client-2"
            for a in (agent, restarted, other_node):
                await a.close()
        async with running_master(tmp_path, **mtls) as srv:  # the binding is durable
            assert srv.master.nodes[node_id].row.identity == "CN:oobleck-test-client"

    run(body())


def _reflect_and_call(target: str) -> tuple[list[str], object]:
    from google.protobuf import message_factory
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(target) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = sorted(db.get_services())
        pool = DescriptorPool(db)
        method = pool.FindServiceByName("oobleck.v1.AdminService").methods_by_name["GetStatus"]
        req_cls = message_factory.GetMessageClass(method.input_type)
        resp_cls = message_factory.GetMessageClass(method.output_type)
        call = channel.unary_unary(
            "/oobleck.v1.AdminService/GetStatus",
            request_serializer=req_cls.SerializeToString,
            response_deserializer=resp_cls.FromString,
        )
        resp = call(req_cls(), metadata=bearer_metadata(ADMIN_TOKEN), timeout=5)
        return services, resp


def test_generic_reflection_client_lists_services_and_calls_get_status(tmp_path):
    async def body():
        async with running_master(tmp_path) as srv:
            agent = await FakeAgent(srv.target, "n").start()
            services, resp = await asyncio.to_thread(_reflect_and_call, srv.target)
            assert {"oobleck.v1.AdminService", "oobleck.v1.AgentService", "grpc.health.v1.Health"} <= set(services)
            state = resp.DESCRIPTOR.fields_by_name["state"].enum_type.values_by_number[resp.state].name
            assert state == "JOB_STATE_NONE" and resp.nodes_alive == 1
            await agent.close()

    run(body())


def _real_profile(path, layers=8, param_bytes=1 << 20):
    from oobleck.planner import PROFILE_FORMAT

    data = {
        "format": PROFILE_FORMAT,
        "model": "gpt",
        "microbatch_size": 1,
        "layers": [
            {"name": f"l{i}", "forward_ms": 1.0, "backward_ms": 2.0, "param_bytes": param_bytes,
             "activation_bytes": 1 << 16, "output_bytes": 1 << 12}
            for i in range(layers)
        ],
    }  # fmt: skip
    path.write_text(json.dumps(data))
    return str(path)


def test_real_planner_start_and_reconfigure(tmp_path):
    import oobleck.planner as planner

    async def body():
        async with running_master(tmp_path, planner=planner) as srv:
            agents = [await FakeAgent(srv.target, f"n{i}").start() for i in range(4)]
            channel, stub = admin_stub(srv.target)
            # A model that cannot fit (1 TiB of parameters per layer on 8 GiB CPU slots) is refused
            # at submit, with the planner's account of the memory it lacks; nothing starts.
            huge = job_spec_yaml(_real_profile(tmp_path / "huge.json", param_bytes=1 << 40))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.SubmitJob(admin_pb2.SubmitJobRequest(job_spec_yaml=huge), timeout=30)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "cannot plan the job on 4 nodes" in err.value.details() and "bytes" in err.value.details()
            assert srv.master.job is None and all(not a.commands for a in agents)
            spec = job_spec_yaml(_real_profile(tmp_path / "real.json"))
            res = await stub.SubmitJob(admin_pb2.SubmitJobRequest(job_spec_yaml=spec), timeout=30)
            assert res.generation == 1
            await wait_until(lambda: srv.master.job.state == "RUNNING", timeout_s=30)
            plan = agents[0].commands[0].start.plan
            assert plan.templates and plan.pipelines and plan.world_size == sum(len(r.ranks) for r in plan.ranks)
            in_plan = [n for p in plan.pipelines for n in p.node_ids]
            assert sum(p.microbatches for p in plan.pipelines) == 8
            victim = next(a for a in agents if a.node_id == in_plan[-1])
            await victim.drop_session()
            await wait_until(lambda: srv.master.generation == 2 and srv.master.job.state in ("RUNNING", "PAUSED"),
                             timeout_s=30)  # fmt: skip
            # 3 survivors still hold every layer (ft=1): the job runs on without the victim.
            assert srv.master.job.state == "RUNNING"
            new = srv.master.status().plan
            assert victim.node_id not in [n for p in new.pipelines for n in p.node_ids]
            assert sum(p.microbatches for p in new.pipelines) == 8
            for a in agents:
                await a.close()
            await channel.close()

    run(body())


# -- bad input against a live master (a real process) ----------------------------------------------------
@pytest.fixture(scope="module")
def live(tmp_path_factory):
    proc = MasterProcess(tmp_path_factory.mktemp("live"))
    try:
        proc.start()
        yield proc
    finally:
        proc.stop()


OK_CODES = {
    None,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
FUZZ = settings(
    max_examples=int(os.environ.get("OOBLECK_FUZZ_EXAMPLES", "40")),
    deadline=None,
    derandomize=not os.environ.get("OOBLECK_FUZZ_EXAMPLES"),
    phases=(Phase.explicit, Phase.reuse, Phase.generate),
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
i64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
i32 = st.integers(min_value=-(2**31), max_value=2**31 - 1)


def _code(fn, *args):
    try:
        fn(*args, timeout=10)
        return None, ""
    except grpc.RpcError as exc:
        return exc.code(), exc.details()


def _still_serving(live):
    with sync_channel(live.target, token=ADMIN_TOKEN) as ch:
        status = admin_pb2_grpc.AdminServiceStub(ch).GetStatus(admin_pb2.GetStatusRequest(), timeout=10)
    assert status.state != admin_pb2.JOB_STATE_UNSPECIFIED


@FUZZ
@given(
    name=st.text(max_size=300), address=st.text(max_size=300), slots=i32, mem=i64, version=st.text(max_size=200),
    nonce=st.text(max_size=200), port=i32, node_id=i64,
)  # fmt: skip
def test_fuzz_register(live, name, address, slots, mem, version, nonce, port, node_id):
    with sync_channel(live.target, token=AGENT_TOKEN) as ch:
        req = agent_pb2.RegisterRequest(
            node_name=name, address=address, slots=slots, gpu_memory_bytes=mem, software_version=version,
            nonce=nonce, store_port=port, node_id=node_id,
        )  # fmt: skip
        code, details = _code(agent_pb2_grpc.AgentServiceStub(ch).Register, req)
    assert code in OK_CODES, (code, details)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        assert details.split(":")[0] in agent_pb2.RegisterRequest.DESCRIPTOR.fields_by_name


yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)
spec_keys = st.sampled_from(["model", "steps", "ft", "global_batch_size", "microbatch_size", "profile", "optimizer"])


@FUZZ
@given(
    raw=st.one_of(
        st.text(max_size=500),
        st.dictionaries(spec_keys, yaml_values, max_size=6).map(lambda d: json.dumps(d, default=str)),
    ),
    node_id=i64,
    since=i64,
    reason=st.text(max_size=2000),
)
def test_fuzz_admin(live, raw, node_id, since, reason):
    with sync_channel(live.target, token=ADMIN_TOKEN) as ch:
        stub = admin_pb2_grpc.AdminServiceStub(ch)
        code, details = _code(stub.SubmitJob, admin_pb2.SubmitJobRequest(job_spec_yaml=raw))
        assert code in OK_CODES - {None}, (code, details)  # never a valid job
        assert details and ":" in details
        for fn, req in [
            (stub.DrainNode, admin_pb2.DrainNodeRequest(node_id=node_id)),
            (stub.KillNode, admin_pb2.KillNodeRequest(node_id=-abs(node_id) or -1)),
            (stub.CancelJob, admin_pb2.CancelJobRequest(reason=reason)),
        ]:
            code, details = _code(fn, req)
            assert code in OK_CODES, (code, details)
        try:
            list(stub.WatchEvents(admin_pb2.WatchEventsRequest(since_id=since), timeout=10))
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT and "since_id" in exc.details()
    _still_serving(live)


def test_random_bytes_to_both_ports_do_not_stop_the_master(live):
    rng = random.Random(1234)
    for port in (live.info["grpc_port"], live.info["http_port"]):
        for size in (1, 64, 4096, 70000):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                try:
                    s.sendall(bytes(rng.getrandbits(8) for _ in range(size)))
                    s.settimeout(2)
                    s.recv(1024)
                except OSError:
                    pass  # the server may reset the connection: that is fine
    _still_serving(live)
    with urllib.request.urlopen(f"http://127.0.0.1:{live.info['http_port']}/healthz", timeout=5) as r:
        assert r.status == 200
    assert os.kill(live.proc.pid, 0) is None


f64 = st.floats(allow_nan=True, allow_infinity=True)
agent_messages = st.one_of(
    st.builds(lambda s: agent_pb2.AgentMessage(heartbeat=agent_pb2.Heartbeat(seq=s)), i64),
    st.builds(
        lambda g, s, loss, sps, n: agent_pb2.AgentMessage(
            step=agent_pb2.StepReport(generation=g, step=s, loss=loss, samples_per_s=sps, samples=n)
        ),
        i64, i64, f64, f64, i64,
    ),
    st.builds(
        lambda c, g, ok, err, r, cp: agent_pb2.AgentMessage(
            ack=agent_pb2.CommandAck(command_id=c, generation=g, ok=ok, error=err,
                                     phases=agent_pb2.PhaseTimes(regroup_s=r, copy_s=cp))
        ),
        i64, i64, st.booleans(), st.text(max_size=100), f64, f64,
    ),
    st.builds(
        lambda slot, pid, state, code, d: agent_pb2.AgentMessage(
            worker=agent_pb2.WorkerReport(slot=slot, pid=pid, state=state, exit_code=code, detail=d)
        ),
        i32, i32, st.integers(0, 4), i32, st.text(max_size=100),
    ),
    st.just(agent_pb2.AgentMessage()),
    st.builds(lambda n: agent_pb2.AgentMessage(hello=agent_pb2.SessionHello(node_id=n)), i64),
)  # fmt: skip


@FUZZ
@given(messages=st.lists(agent_messages, min_size=1, max_size=5))
def test_fuzz_session_messages(live, messages):
    nonce = "fuzz-" + os.urandom(6).hex()
    with sync_channel(live.target, token=AGENT_TOKEN) as ch:
        stub = agent_pb2_grpc.AgentServiceStub(ch)
        reg = stub.Register(
            agent_pb2.RegisterRequest(node_name="fuzz", address="127.0.0.1", slots=1, nonce=nonce), timeout=10
        )
        hello = agent_pb2.AgentMessage(hello=agent_pb2.SessionHello(node_id=reg.node_id, nonce=nonce))
        try:
            list(stub.Session(iter([hello, *messages]), timeout=10))
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, (exc.code(), exc.details())
            assert exc.details().split(":")[0] in ("hello", "body") or "." in exc.details().split(":")[0]
    _still_serving(live)
