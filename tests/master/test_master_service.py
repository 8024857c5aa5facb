"""The master served in-process over real gRPC, driven by scripted agents (master_fakes.FakeAgent)."""

import asyncio
import json
import urllib.request

import grpc
import pytest
from master_fakes import (
    ADMIN_TOKEN,
    AGENT_TOKEN,
    NUM_LAYERS,
    FakeAgent,
    admin_stub,
    job_spec_yaml,
    make_fake_planner,
    running_master,
    wait_until,
)
from prometheus_client.parser import text_string_to_metric_families

from oobleck.common.auth import bearer_metadata
from oobleck.protos.v1 import admin_pb2, admin_pb2_grpc, agent_pb2


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


async def start_agents(srv, count, **kw):
    return [await FakeAgent(srv.target, f"node{i}", **kw).start() for i in range(count)]


async def close_all(agents, channel=None):
    for a in agents:
        await a.close()
    if channel is not None:
        await channel.close()


async def submit(stub, srv, **kw):
    return await stub.SubmitJob(admin_pb2.SubmitJobRequest(job_spec_yaml=job_spec_yaml(srv.profile, **kw)), timeout=10)


def state_of(srv):
    return srv.master.job.state if srv.master.job else "NONE"


def test_tokens_are_required_per_service(tmp_path):
    async def body():
        async with running_master(tmp_path) as srv:
            for token in (None, "wrong", AGENT_TOKEN):  # the agent token is not an admin token
                channel, stub = admin_stub(srv.target, token=token)
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.GetStatus(admin_pb2.GetStatusRequest(), timeout=5)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert "bearer token" in err.value.details()
                await channel.close()
            agent = FakeAgent(srv.target, "n", token=ADMIN_TOKEN)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await agent.register()
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            await agent.close()
            assert srv.master.metrics.auth_failures._value.get() == 4
            channel, stub = admin_stub(srv.target)
            status = await stub.GetStatus(admin_pb2.GetStatusRequest(), timeout=5)
            assert status.state == admin_pb2.JOB_STATE_NONE
            await channel.close()

    run(body())


def test_health_needs_no_token(tmp_path):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async def body():
        async with running_master(tmp_path) as srv, grpc.aio.insecure_channel(srv.target) as ch:
            res = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert res.status == health_pb2.HealthCheckResponse.SERVING

    run(body())


def test_submit_starts_plan_nodes_and_later_nodes_are_spares(tmp_path):
    async def body():
        async with running_master(tmp_path, planner=make_fake_planner(nodes_per_pipeline=2)) as srv:
            agents = await start_agents(srv, 5)
            channel, stub = admin_stub(srv.target)
            res = await submit(stub, srv)
            assert res.generation == 1 and res.job_id
            await wait_until(lambda: state_of(srv) == "RUNNING", what="RUNNING")
            assert [a.kinds() for a in agents[:4]] == [["start"]] * 4
            assert agents[4].kinds() == []  # odd one out is a spare
            start = agents[0].commands[0]
            assert start.generation == 1 and start.start.plan.world_size == 4
            assert [list(p.node_ids) for p in start.start.plan.pipelines] == [[1, 2], [3, 4]]
            assert start.start.job_spec_yaml.startswith("name: t")
            late = await FakeAgent(srv.target, "late").start()
            nodes = await stub.ListNodes(admin_pb2.ListNodesRequest(), timeout=5)
            states = {n.name: admin_pb2.NodeState.Name(n.state) for n in nodes.nodes}
            assert states["late"] == "NODE_STATE_SPARE" and states["node4"] == "NODE_STATE_SPARE"
            assert states["node0"] == "NODE_STATE_ALIVE"
            status = await stub.GetStatus(admin_pb2.GetStatusRequest(), timeout=5)
            assert status.state == admin_pb2.JOB_STATE_RUNNING and status.spares == 2 and status.plan.generation == 1
            # A second job while one runs is refused; the same spec again is a retry: the same job.
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await submit(stub, srv, steps=7)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            again = await submit(stub, srv)
            assert (again.job_id, again.generation) == (res.job_id, 1)
            assert [a.kinds() for a in agents[:4]] == [["start"]] * 4
            await close_all([*agents, late], channel)

    run(body())


def test_bad_job_specs_name_the_field_and_the_master_keeps_serving(tmp_path):
    async def body():
        async with running_master(tmp_path) as srv:
            agents = await start_agents(srv, 1)
            channel, stub = admin_stub(srv.target)
            cases = {
                "model: [unclosed": "malformed YAML",
                job_spec_yaml(srv.profile).replace("steps: 100", "steps: -3"): "steps: must be >= 1",
                job_spec_yaml(str(tmp_path / "missing.json")): "missing.json': cannot open",
                job_spec_yaml("/etc/passwd"): "outside the master's profile directory",
                job_spec_yaml("/dev/zero"): "outside the master's profile directory",
                "": "job_spec_yaml: must not be empty",
                job_spec_yaml(srv.profile).replace("name: gpt", "name: gpt9"): "model.name: must be one of",
                job_spec_yaml(srv.profile).replace("config: {", "config: {hidden_size: -4, "): (
                    "model.config.hidden_size"
                ),
                job_spec_yaml(srv.profile)
                .replace("global_batch_size: 8", "global_batch_size: 9")
                .replace(
                    "microbatch_size: 1", "microbatch_size: 2"
                ): "global_batch_size: must be a multiple of microbatch_size",
                job_spec_yaml(srv.profile).replace(f"num_layers: {NUM_LAYERS - 2}", "num_layers: 3"): (
                    f"has {NUM_LAYERS} layers but the model (gpt, 3 blocks) has 5"
                ),
            }
            for spec, fragment in cases.items():
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.SubmitJob(admin_pb2.SubmitJobRequest(job_spec_yaml=spec), timeout=5)
                assert err.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION)
                assert fragment in err.value.details(), err.value.details()
            for rpc, req, code in [
                (stub.DrainNode, admin_pb2.DrainNodeRequest(node_id=99), grpc.StatusCode.NOT_FOUND),
                (stub.KillNode, admin_pb2.KillNodeRequest(node_id=-1), grpc.StatusCode.INVALID_ARGUMENT),
                (stub.CancelJob, admin_pb2.CancelJobRequest(), grpc.StatusCode.FAILED_PRECONDITION),
            ]:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await rpc(req, timeout=5)
                assert err.value.code() == code
                assert "node_id" in err.value.details() or "no job" in err.value.details()
            # Oversize message (a client without a send limit): refused by the server's limit.
            big = grpc.aio.insecure_channel(srv.target, options=[("grpc.max_send_message_length", -1)])
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await admin_pb2_grpc.AdminServiceStub(big).SubmitJob(
                    admin_pb2.SubmitJobRequest(job_spec_yaml="x" * (17 << 20)),
                    metadata=bearer_metadata(ADMIN_TOKEN),
                    timeout=20,
                )
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "larger than max" in err.value.details() or "exceeds" in err.value.details(), err.value.details()
            await big.close()
            bad = FakeAgent(srv.target, "bad", slots=0)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await bad.register()
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "slots" in err.value.details()
            await bad.close()
            status = await stub.GetStatus(admin_pb2.GetStatusRequest(), timeout=5)
            assert status.state == admin_pb2.JOB_STATE_NONE and status.nodes_alive == 1
            await close_all(agents, channel)

    run(body())


def test_session_requires_a_valid_hello(tmp_path):
    async def body():
        async with running_master(tmp_path) as srv:
            agent = FakeAgent(srv.target, "n")
            await agent.register()
            call = agent.stub.Session()
            await call.write(agent_pb2.AgentMessage(heartbeat=agent_pb2.Heartbeat(seq=1)))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call.read()
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "hello" in err.value.details()
            call = agent.stub.Session()
            hello = agent_pb2.SessionHello(node_id=agent.node_id, nonce="other")
            await call.write(agent_pb2.AgentMessage(hello=hello))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call.read()
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "nonce" in err.value.details()
            await agent.close()

    run(body())


def test_one_death_gives_one_reconfiguration_acked_by_survivors(tmp_path):
    async def body():
        async with running_master(tmp_path) as srv:
            agents = await start_agents(srv, 3)
            channel, stub = admin_stub(srv.target)
            watch = stub.WatchEvents(admin_pb2.WatchEventsRequest(since_id=0, follow=True))
            await submit(stub, srv)
            await wait_until(lambda: state_of(srv) == "RUNNING")
            for a in agents:
                await a.send(step=agent_pb2.StepReport(generation=1, step=5, loss=2.5, samples_per_s=100.0))
            await wait_until(lambda: srv.master.job.step == 5)
            await agents[1].drop_session()  # crash
            await wait_until(lambda: state_of(srv) == "RUNNING" and srv.master.generation == 2, what="generation 2")
            survivors = [agents[0], agents[2]]
            for a in survivors:
                recon = [c for c in a.commands if c.WhichOneof("body") == "reconfigure"]
                assert len(recon) == 1 and recon[0].generation == 2
                plan = recon[0].reconfigure.plan
                assert [list(p.node_ids) for p in plan.pipelines] == [[1], [3]]
                assert plan.resume_step == 5 and plan.generation == 2
            await agents[0].send(step=agent_pb2.StepReport(generation=2, step=6, loss=2.4, samples_per_s=90.0))
            kinds, durations = [], {}
            async for ev in watch:
                kinds.append(ev.kind)
                durations.update(ev.durations_s)
                if ev.kind == "resumed":
                    break
            assert kinds.count("node_dead") == 1 and kinds.count("reconfigured") == 1
            assert set(durations) >= {"detect", "plan", "notify", "regroup", "copy", "resume"}
            assert durations["copy"] == pytest.approx(0.02)
            assert srv.master.metrics.reconfigurations._value.get() == 1
            watch.cancel()
            await close_all(agents, channel)

    run(body())


def test_two_simultaneous_deaths_give_one_reconfiguration(tmp_path):
    async def body():
        planner = make_fake_planner()
        async with running_master(tmp_path, planner=planner, coalesce_window_s=0.2) as srv:
            agents = await start_agents(srv, 4)
            channel, stub = admin_stub(srv.target)
            await submit(stub, srv)
            await wait_until(lambda: state_of(srv) == "RUNNING")
            await asyncio.gather(agents[1].drop_session(), agents[2].drop_session())
            await wait_until(lambda: state_of(srv) == "RUNNING" and srv.master.generation > 1)
            assert srv.master.generation == 2
            recon = [c for c in planner.calls if c[0] == "reconfigure"]
            assert len(recon) == 1 and sorted(recon[0][2]) == [2, 3]
            await close_all(agents, channel)

    run(body())


def test_reattach_within_grace_causes_no_reconfiguration(tmp_path):
    async def body():
        async with running_master(tmp_path, session_grace_s=1.0, heartbeat_timeout_s=3.0) as srv:
            agents = await start_agents(srv, 2)
            channel, stub = admin_stub(srv.target)
            await submit(stub, srv)
            await wait_until(lambda: state_of(srv) == "RUNNING")
            a = agents[0]
            await a.drop_session()
            await wait_until(lambda: srv.master.nodes[a.node_id].detached_since_s is not None)
            old_id = a.node_id
            await a.register()
            await a.attach()
            assert a.node_id == old_id
            await wait_until(lambda: srv.master.nodes[a.node_id].session is not None)
            # Wait past the grace period on the master's own clock, then check nothing happened.
            t0 = srv.master.clock()
            await wait_until(lambda: srv.master.clock() - t0 > 1.5, what="past the grace period")
            assert srv.master.generation == 1 and srv.master.nodes[old_id].row.state == "alive"
            assert a.kinds() == ["start"]  # the acked Start is not re-sent
            await close_all(agents, channel)

    run(body())


def test_unacked_commands_are_resent_on_reattach_and_missing_acks_fail_the_node(tmp_path):
    async def body():
        async with running_master(tmp_path, start_ack_timeout_s=1.5, heartbeat_timeout_s=5.0) as srv:
            good = await start_agents(srv, 2)
            slow = await FakeAgent(srv.target, "slow", auto_ack=False).start()
            channel, stub = admin_stub(srv.target)
            await submit(stub, srv)
            await wait_until(lambda: slow.kinds() == ["start"])
            # Re-attach without acking: the Start comes again (same command id), then no ack at all.
            await slow.drop_session()
            await slow.register()
            await slow.attach()
            await wait_until(lambda: len(slow.commands) == 2)
            assert slow.commands[0].command_id == slow.commands[1].command_id
            await wait_until(lambda: srv.master.nodes[slow.node_id].row.state == "dead", what="slow node dead")
            assert "no ack" in srv.master.nodes[slow.node_id].row.reason
            await wait_until(lambda: state_of(srv) == "RUNNING" and srv.master.generation == 2)
            await close_all([*good, slow], channel)

    run(body())


def test_too_few_nodes_pauses_and_a_new_node_resumes_from_checkpoint(tmp_path):
    async def body():
        async with running_master(tmp_path, planner=make_fake_planner(nodes_per_pipeline=2)) as srv:
            agents = await start_agents(srv, 2)
            channel, stub = admin_stub(srv.target)
            await submit(stub, srv)
            await wait_until(lambda: state_of(srv) == "RUNNING")
            for a in agents:  # every node of the plan reports the step: it is committed
                await a.send(step=agent_pb2.StepReport(generation=1, step=7, loss=2.0, samples_per_s=1.0))
            await wait_until(lambda: srv.master.job.step == 7)
            await agents[1].drop_session()
            await wait_until(lambda: state_of(srv) == "PAUSED")
            status = await stub.GetStatus(admin_pb2.GetStatusRequest(), timeout=5)
            assert "need at least 2 nodes" in status.reason
            assert agents[0].kinds() == ["start", "stop"]
            agents[0].ready_step = 5  # the workers restore the checkpoint of step 5
            new = await FakeAgent(srv.target, "new", ready_step=5).start()
            await wait_until(lambda: state_of(srv) == "RUNNING" and srv.master.generation == 2)
            start = next(c for c in new.commands if c.WhichOneof("body") == "start")
            assert start.start.plan.restore_from_checkpoint and start.start.plan.job_id == srv.master.job.job_id
            # The master does not read checkpoints: the restored position comes with the acks
            # (ready means restored), and the step counter follows it back from 7 to 5.
            assert start.start.plan.resume_step == 0 and srv.master.job.step == 5
            assert "restore_pending" not in srv.master.job.plan_json
            for a in (agents[0], new):
                await a.send(step=agent_pb2.StepReport(generation=2, step=6, loss=2.1, samples_per_s=1.0))
            await wait_until(lambda: srv.master.job.step == 6)
            log = [e async for e in stub.WatchEvents(admin_pb2.WatchEventsRequest(since_id=0, follow=False))]
            running = [e.message for e in log if e.kind == "running"]
            assert running[-1] == "all nodes acked generation 2 (restored at step 5)", running
            await close_all([*agents, new], channel)

    run(body())


def test_a_restore_obligation_outlives_the_generation_that_had_it(tmp_path):
    """A restoring generation is replaced before its workers report ready (a node dies during
    the restore): the next generation restores too, whatever replaced what; the obligation ends
    when a generation's acks report the restored position, and later generations do not restore."""

    async def body():
        planner = make_fake_planner(nodes_per_pipeline=2)
        async with running_master(tmp_path, planner=planner, scale_up=False) as srv:
            agents = await start_agents(srv, 2)
            channel, stub = admin_stub(srv.target)
            await submit(stub, srv)
            await wait_until(lambda: state_of(srv) == "RUNNING")
            for a in agents:
                await a.send(step=agent_pb2.StepReport(generation=1, step=9, loss=2.0, samples_per_s=1.0))
            await wait_until(lambda: srv.master.job.step == 9)
            await agents[1].drop_session()
            await wait_until(lambda: state_of(srv) == "PAUSED")
            # Six new nodes, registered together (the plan lock held meanwhile: the restore sees
            # them all); nobody acks yet (restoring takes a while).
            agents[0].auto_ack = False
            async with srv.master._plan_lock:
                new = [await FakeAgent(srv.target, f"new{i}", auto_ack=False).start() for i in range(6)]
            await wait_until(lambda: srv.master.generation == 2 and len(srv.master.pipelines) == 3)
            assert state_of(srv) == "STARTING" and srv.master.job.plan_json["restore_pending"] is True
            in_plan = {n for p in srv.master.pipelines for n in p}
            victim = next(a for a in new if a.node_id in in_plan)
            await victim.drop_session()
            await wait_until(lambda: srv.master.generation == 3, what="generation 3")
            survivors = [a for a in [agents[0], *new] if a is not victim and a.node_id in in_plan]
            await wait_until(lambda: all(a.commands and a.commands[-1].generation == 3 for a in survivors))
            for a in survivors:
                body_ = a.commands[-1].WhichOneof("body")
                assert getattr(a.commands[-1], body_).plan.restore_from_checkpoint, (a.name, body_)
            assert srv.master.job.plan_json["restore_pending"] is True
            for a in [agents[0], *new]:
                if a is not victim:
                    a.ready_step = 5
                    a.auto_ack = True
                    for cmd in a.commands:
                        await a.ack(cmd)
            await wait_until(lambda: state_of(srv) == "RUNNING" and srv.master.generation == 3)
            assert srv.master.job.step == 5 and "restore_pending" not in srv.master.job.plan_json
            # A later failure is an ordinary reconfiguration: layers are copied, nothing restored.
            plan_nodes = {n for p in srv.master.pipelines for n in p}
            other = next(a for a in new if a is not victim and a.node_id in plan_nodes)
            await other.drop_session()
            await wait_until(lambda: srv.master.generation == 4 and state_of(srv) == "RUNNING")
            recon = [a.commands[-1] for a in [agents[0], *new] if a.commands and a.commands[-1].generation == 4]
            assert recon and all(c.WhichOneof("body") == "reconfigure" for c in recon), recon
            assert not any(c.reconfigure.plan.restore_from_checkpoint for c in recon)
            await close_all([*agents, *new], channel)

    run(body())


def test_drain_undrain_kill_cancel(tmp_path):
    async def body():
        async with running_master(tmp_path, scale_up_delay_s=0.2) as srv:
            agents = await start_agents(srv, 3)
            channel, stub = admin_stub(srv.target)
            await submit(stub, srv)
            await wait_until(lambda: state_of(srv) == "RUNNING")
            drained = agents[2].node_id
            await stub.DrainNode(admin_pb2.DrainNodeRequest(node_id=drained), timeout=5)
            await wait_until(lambda: srv.master.nodes[drained].row.state == "drained", what="drained")
            assert agents[2].kinds() == ["start", "drain"]
            assert srv.master.generation == 2 and srv.master.pipelines == ((1,), (2,))
            # The plan grows onto a new node, never onto the drained one (it stays drained)...
            late = await FakeAgent(srv.target, "late").start()
            await wait_until(lambda: srv.master.generation == 3 and state_of(srv) == "RUNNING", what="scale-up")
            assert drained not in {n for p in srv.master.pipelines for n in p}
            listed = await stub.ListNodes(admin_pb2.ListNodesRequest(), timeout=5)
            assert {n.node_id: n.state for n in listed.nodes}[drained] == admin_pb2.NODE_STATE_DRAINED
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.DrainNode(admin_pb2.DrainNodeRequest(node_id=drained), timeout=5)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "is drained" in err.value.details()
            # ... until the operator undrains it.
            await stub.UndrainNode(admin_pb2.UndrainNodeRequest(node_id=drained), timeout=5)
            await wait_until(lambda: drained in {n for p in srv.master.pipelines for n in p}, what="undrained")
            await wait_until(lambda: state_of(srv) == "RUNNING")
            assert srv.master.generation == 4
            await stub.KillNode(admin_pb2.KillNodeRequest(node_id=agents[1].node_id), timeout=5)
            await wait_until(lambda: "kill" in agents[1].kinds())
            await agents[1].drop_session()  # the agent exits on Kill
            await wait_until(lambda: srv.master.generation == 5 and state_of(srv) == "RUNNING")
            await stub.CancelJob(admin_pb2.CancelJobRequest(reason="done testing"), timeout=5)
            assert state_of(srv) == "CANCELLED"
            await wait_until(lambda: agents[0].kinds()[-1] == "stop")
            await close_all([*agents, late], channel)

    run(body())


def test_job_succeeds_at_the_last_step(tmp_path):
    async def body():
        async with running_master(tmp_path) as srv:
            agents = await start_agents(srv, 1)
            channel, stub = admin_stub(srv.target)
            await submit(stub, srv, steps=3)
            await wait_until(lambda: state_of(srv) == "RUNNING")
            await agents[0].send(step=agent_pb2.StepReport(generation=1, step=3, loss=1.0, samples_per_s=1.0))
            await wait_until(lambda: state_of(srv) == "SUCCEEDED")
            await wait_until(lambda: agents[0].kinds() == ["start", "stop"])
            await close_all(agents, channel)

    run(body())


def test_followers_that_ask_get_one_step_event_per_committed_step(tmp_path):
    async def body():
        async with running_master(tmp_path) as srv:
            agents = await start_agents(srv, 1)
            channel, stub = admin_stub(srv.target)
            with_steps = stub.WatchEvents(admin_pb2.WatchEventsRequest(follow=True, include_steps=True))
            without = stub.WatchEvents(admin_pb2.WatchEventsRequest(follow=True))
            await submit(stub, srv, steps=3)
            await wait_until(lambda: state_of(srv) == "RUNNING")
            for step, loss in ((1, 3.0), (1, 3.0), (2, 2.5), (3, 2.0)):  # a repeated report is not a new step
                await agents[0].send(step=agent_pb2.StepReport(generation=1, step=step, loss=loss, samples_per_s=8.0))
            steps, kinds_seen = [], []
            async for ev in with_steps:
                kinds_seen.append(ev.kind)
                if ev.kind == "step":
                    assert ev.id == 0 and ev.generation == 1 and ev.samples_per_s == 8.0
                    steps.append((ev.step, ev.loss))
                if ev.kind == "job_succeeded":
                    break
            assert steps == [(1, 3.0), (2, 2.5), (3, 2.0)]
            plain = []
            async for ev in without:
                plain.append(ev.kind)
                if ev.kind == "job_succeeded":
                    break
            assert "step" not in plain and plain == [k for k in kinds_seen if k != "step"]
            # Progress events are not stored: a replay has none.
            replay = [e.kind async for e in stub.WatchEvents(admin_pb2.WatchEventsRequest(include_steps=True))]
            assert "step" not in replay and "job_succeeded" in replay
            with_steps.cancel()
            without.cancel()
            await close_all(agents, channel)

    run(body())


def test_node_failure_report_is_a_death(tmp_path):
    async def body():
        async with running_master(tmp_path) as srv:
            agents = await start_agents(srv, 2)
            channel, stub = admin_stub(srv.target)
            await submit(stub, srv)
            await wait_until(lambda: state_of(srv) == "RUNNING")
            await agents[1].send(failure=agent_pb2.NodeFailure(reason="worker 0 exited with 1"))
            await wait_until(lambda: srv.master.generation == 2 and state_of(srv) == "RUNNING")
            assert "worker 0 exited" in srv.master.nodes[agents[1].node_id].row.reason
            await wait_until(lambda: agents[1].session_error == grpc.StatusCode.FAILED_PRECONDITION)
            # It re-registers with the same id and nonce: declared dead, so it gets a new id as a spare.
            old = agents[1].node_id
            await agents[1].register()
            assert agents[1].node_id != old
            assert srv.master.nodes[agents[1].node_id].row.state == "spare"
            await close_all(agents, channel)

    run(body())


def test_http_metrics_status_and_healthz(tmp_path):
    async def body():
        async with running_master(tmp_path, http_listen="127.0.0.1:0") as srv:
            agents = await start_agents(srv, 2)
            channel, stub = admin_stub(srv.target)
            await submit(stub, srv)
            await wait_until(lambda: state_of(srv) == "RUNNING")
            base = f"http://127.0.0.1:{srv.http_port}"

            def fetch(path):
                with urllib.request.urlopen(base + path, timeout=5) as r:
                    return r.status, r.read().decode()

            code, text = await asyncio.to_thread(fetch, "/metrics")
            assert code == 200
            samples = {
                (s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(text)
                for s in fam.samples
            }
            assert samples[("oobleck_generation", ())] == 1
            assert samples[("oobleck_nodes_alive", ())] == 2
            assert ("oobleck_reconfigurations_total", ()) in samples
            assert any(k[0] == "oobleck_reconfiguration_phase_seconds_count" for k in samples)
            code, text = await asyncio.to_thread(fetch, "/api/status")
            status = json.loads(text)
            assert status["state"] == "RUNNING" and status["pipelines"] == [[1], [2]]
            assert (await asyncio.to_thread(fetch, "/healthz"))[0] == 200
            await close_all(agents, channel)

    run(body())


def test_a_death_recorded_before_a_crash_is_replanned_after_restart(tmp_path):
    import sqlite3

    async def body():
        async with running_master(tmp_path) as srv:
            agents = await start_agents(srv, 2)
            channel, stub = admin_stub(srv.target)
            await submit(stub, srv)
            await wait_until(lambda: state_of(srv) == "RUNNING")
            await channel.close()
        # As if the master died right after persisting node 2's death, before replanning.
        with sqlite3.connect(tmp_path / "state.db") as conn:
            conn.execute("UPDATE nodes SET state = 'dead', reason = 'crashed' WHERE node_id = 2")
        async with running_master(tmp_path) as srv:
            a = agents[0]
            again = FakeAgent(srv.target, "node0", nonce=a.nonce, node_id=a.node_id)
            again.last_command_id = a.last_command_id
            await again.register()
            await again.attach()
            await wait_until(lambda: state_of(srv) == "RUNNING" and srv.master.generation == 2, what="replanned")
            assert srv.master.pipelines == ((1,),)
            assert again.kinds() == ["reconfigure"]
            await close_all([*agents, again])

    run(body())


def test_max_nodes_counts_live_nodes_only(tmp_path):
    async def body():
        async with running_master(tmp_path, max_nodes=2) as srv:
            agents = await start_agents(srv, 2)
            extra = FakeAgent(srv.target, "extra")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await extra.register()
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_nodes" in err.value.details()
            await agents[0].drop_session()
            await wait_until(lambda: srv.master.nodes[agents[0].node_id].row.state == "dead")
            await extra.register()  # a dead node's place is free again
            assert srv.master.nodes[extra.node_id].row.state == "spare"
            await close_all([*agents, extra])

    run(body())


def test_left_out_node_is_stopped_and_spares_scale_the_plan_back_up(tmp_path):
    """Pipelines of two nodes: losing node 4 leaves [1, 2] and node 3 out of the plan (its agent is
    told, so it stops its workers); a node that joins later makes a pair with node 3 again:
    generation 3 restarts the two spares and reconfigures the running pipeline."""

    async def body():
        planner = make_fake_planner(nodes_per_pipeline=2)
        async with running_master(tmp_path, planner=planner, scale_up_delay_s=0.3) as srv:
            agents = await start_agents(srv, 4)
            channel, stub = admin_stub(srv.target)
            await submit(stub, srv)
            await wait_until(lambda: state_of(srv) == "RUNNING")
            for a in agents:
                await a.send(step=agent_pb2.StepReport(generation=1, step=3, loss=2.5, samples_per_s=100.0))
            await wait_until(lambda: srv.master.job.step == 3)
            await agents[3].drop_session()
            await wait_until(lambda: state_of(srv) == "RUNNING" and srv.master.generation == 2, what="generation 2")
            assert srv.master.pipelines == ((1, 2),)
            assert agents[2].kinds() == ["start", "reconfigure"]  # not in the plan: its agent stops workers
            assert srv.master.nodes[3].row.state == "spare"
            # Node 3 alone brings no gain: it stays a spare, once judged.
            await wait_until(lambda: any(c[0] == "scale_up" for c in planner.calls), what="a scale-up attempt")
            assert srv.master.generation == 2
            late = await FakeAgent(srv.target, "late").start()
            await wait_until(lambda: srv.master.generation == 3 and state_of(srv) == "RUNNING", what="generation 3")
            assert srv.master.pipelines == ((1, 2), (3, late.node_id))
            assert [c for c in planner.calls if c[0] == "scale_up"][-1] == ("scale_up", ((1, 2),), (3, late.node_id))
            for a in agents[:2]:
                assert a.kinds() == ["start", "reconfigure", "reconfigure"]
                assert a.commands[-1].reconfigure.plan.resume_step == 3
            for a in (agents[2], late):
                cmd = a.commands[-1]
                assert cmd.WhichOneof("body") == "start" and cmd.generation == 3
                assert not cmd.start.plan.restore_from_checkpoint
            listed = await stub.ListNodes(admin_pb2.ListNodesRequest(), timeout=5)
            states = {n.name: admin_pb2.NodeState.Name(n.state) for n in listed.nodes}
            assert states["late"] == states["node2"] == "NODE_STATE_ALIVE"
            log = [e async for e in stub.WatchEvents(admin_pb2.WatchEventsRequest(since_id=0, follow=False))]
            skipped = [e for e in log if e.kind == "scale_up_skipped"]
            assert len(skipped) == 1 and "spares [3] stay spares" in skipped[0].message
            assert [e.kind for e in log].count("reconfigured") == 2
            await close_all([*agents[:3], late], channel)

    run(body())


def test_a_death_during_a_reconfiguration_supersedes_it_at_once(tmp_path):
    """Generation 2 waits for acks; one of its nodes dies before acking: the master does not wait
    for the ack deadline (the others are blocked on that node) but moves to generation 3."""

    async def body():
        async with running_master(tmp_path, reconfigure_ack_timeout_s=30.0) as srv:
            agents = await start_agents(srv, 4)
            channel, stub = admin_stub(srv.target)
            await submit(stub, srv)
            await wait_until(lambda: state_of(srv) == "RUNNING")
            for a in agents[1:]:
                a.auto_ack = False
            t0 = asyncio.get_running_loop().time()
            await agents[0].drop_session()
            await wait_until(lambda: srv.master.generation == 2, what="generation 2")
            await wait_until(lambda: any(c.generation == 2 for c in agents[1].commands), what="gen 2 delivered")
            await agents[2].drop_session()  # dies before acking generation 2
            for a in (agents[1], agents[3]):
                a.auto_ack = True
            await wait_until(lambda: srv.master.generation == 3, what="generation 3")
            await wait_until(lambda: state_of(srv) == "RUNNING", what="RUNNING")
            assert asyncio.get_running_loop().time() - t0 < 10  # far from the 30 s ack deadline
            assert srv.master.pipelines == ((2,), (4,))
            for a in (agents[1], agents[3]):
                assert [c.generation for c in a.commands if c.WhichOneof("body") == "reconfigure"] == [2, 3]
            log = [e async for e in stub.WatchEvents(admin_pb2.WatchEventsRequest(since_id=0, follow=False))]
            incomplete = [e for e in log if e.kind == "reconfigure_incomplete"]
            assert len(incomplete) == 1 and "nodes [3] died during it" in incomplete[0].message
            assert srv.master.nodes[2].row.state == "alive" and srv.master.nodes[4].row.state == "alive"
            await close_all([agents[1], agents[3]], channel)

    run(body())


async def event_log(stub):
    return [e async for e in stub.WatchEvents(admin_pb2.WatchEventsRequest(since_id=0, follow=False))]


def test_spec_without_profile_answers_at_once_profiling_and_starts_when_measured(tmp_path):
    """Issue 12 item 15: submit does not wait for the measurement (the job is PROFILING); a
    retried submit returns the same job and measures nothing twice; the profile is cached."""

    async def body():
        async with running_master(tmp_path) as srv:
            agents = await start_agents(srv, 2)
            agents[0].auto_ack = False  # holds the Profile command until the test acks it
            agents[0].profile_reply = json.dumps({"model": "measured"})
            channel, stub = admin_stub(srv.target)
            spec = job_spec_yaml(None)
            res = await stub.SubmitJob(admin_pb2.SubmitJobRequest(job_spec_yaml=spec), timeout=2)
            status = await stub.GetStatus(admin_pb2.GetStatusRequest(), timeout=5)
            assert status.state == admin_pb2.JOB_STATE_PROFILING and status.job_id == res.job_id
            assert "measuring the profile" in status.reason and not status.plan.pipelines
            await wait_until(lambda: agents[0].kinds() == ["profile"], what="profile command")
            again = await stub.SubmitJob(admin_pb2.SubmitJobRequest(job_spec_yaml=spec), timeout=2)
            assert again.job_id == res.job_id  # a client's retry: the same job, nothing measured twice
            with pytest.raises(grpc.aio.AioRpcError) as err:  # another spec is still refused
                await stub.SubmitJob(admin_pb2.SubmitJobRequest(job_spec_yaml=job_spec_yaml(None, steps=7)), timeout=2)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "PROFILING" in err.value.details()
            agents[0].auto_ack = True
            await agents[0].ack(agents[0].commands[0])
            await wait_until(lambda: agents[0].kinds() == ["profile", "start"] and agents[1].kinds() == ["start"])
            await wait_until(lambda: state_of(srv) == "RUNNING")
            assert srv.master.job.job_id == res.job_id and srv.master.generation == 1
            assert srv.master.ctx.profile.model == "measured"
            cached = list((tmp_path / "profiles").glob("profile-*.json"))
            assert len(cached) == 1 and json.loads(cached[0].read_text()) == {"model": "measured"}
            await stub.CancelJob(admin_pb2.CancelJobRequest(reason="again"), timeout=5)
            await wait_until(lambda: state_of(srv) == "CANCELLED")
            res2 = await stub.SubmitJob(admin_pb2.SubmitJobRequest(job_spec_yaml=spec), timeout=5)
            assert res2.job_id != res.job_id and state_of(srv) == "STARTING"  # planned at once from the cache
            assert agents[0].kinds().count("profile") == 1
            kinds = [e.kind for e in await event_log(stub)]
            assert kinds.count("profiling") == 1 and kinds.count("job_planned") == 1
            assert kinds.count("job_submitted") == 2
            await close_all(agents, channel)

    run(body())


def test_a_late_profile_is_cached_and_a_resubmit_uses_it(tmp_path):
    """The measurement outlives the job that asked for it (timed out, or cancelled): its result
    is cached when it arrives, and a resubmitted job starts from it without measuring again."""

    async def body():
        async with running_master(tmp_path, profile_timeout_s=0.5) as srv:
            agents = await start_agents(srv, 1, auto_ack=False)
            agents[0].profile_reply = json.dumps({"model": "late"})
            channel, stub = admin_stub(srv.target)
            spec = job_spec_yaml(None)
            await stub.SubmitJob(admin_pb2.SubmitJobRequest(job_spec_yaml=spec), timeout=2)
            await wait_until(lambda: state_of(srv) == "FAILED", what="timed out")
            assert "did not finish profiling within 0.5s" in srv.master.job.reason
            assert not list((tmp_path / "profiles").glob("profile-*.json"))
            await agents[0].ack(agents[0].commands[0])  # the measurement finishes after all
            await wait_until(lambda: list((tmp_path / "profiles").glob("profile-*.json")), what="cached")
            agents[0].auto_ack = True
            await stub.SubmitJob(admin_pb2.SubmitJobRequest(job_spec_yaml=spec), timeout=2)
            await wait_until(lambda: state_of(srv) == "RUNNING")
            assert agents[0].kinds() == ["profile", "start"] and srv.master.ctx.profile.model == "late"
            await close_all(agents, channel)

    run(body())


def test_a_job_profiling_when_the_measuring_node_dies_is_measured_on_another(tmp_path):
    async def body():
        async with running_master(tmp_path) as srv:
            agents = await start_agents(srv, 2)
            agents[0].auto_ack = False
            for a in agents:
                a.profile_reply = json.dumps({"model": a.name})
            channel, stub = admin_stub(srv.target)
            await stub.SubmitJob(admin_pb2.SubmitJobRequest(job_spec_yaml=job_spec_yaml(None)), timeout=2)
            await wait_until(lambda: agents[0].kinds() == ["profile"])
            await agents[0].drop_session()
            await wait_until(lambda: state_of(srv) == "RUNNING", what="running on the other node")
            assert agents[1].kinds() == ["profile", "start"] and srv.master.ctx.profile.model == agents[1].name
            await close_all(agents[1:], channel)

    run(body())


def test_a_master_restarted_while_profiling_carries_on(tmp_path):
    async def body():
        async with running_master(tmp_path) as srv:
            agents = await start_agents(srv, 1, auto_ack=False)
            agents[0].profile_reply = json.dumps({"model": "measured"})
            channel, stub = admin_stub(srv.target)
            res = await stub.SubmitJob(admin_pb2.SubmitJobRequest(job_spec_yaml=job_spec_yaml(None)), timeout=2)
            await wait_until(lambda: agents[0].kinds() == ["profile"])
            await close_all(agents, channel)
        async with running_master(tmp_path) as srv:
            assert state_of(srv) == "PROFILING" and srv.master.job.job_id == res.job_id
            agent = await FakeAgent(srv.target, agents[0].name, node_id=agents[0].node_id).start()
            agent.profile_reply = json.dumps({"model": "measured"})
            await wait_until(lambda: state_of(srv) == "RUNNING", what="started after the restart")
            assert agent.kinds() == ["profile", "start"]  # the unacked Profile command came again
            assert srv.master.job.job_id == res.job_id
            await close_all([agent], None)

    run(body())


@pytest.mark.parametrize(
    ("reply", "needle"),
    [
        (None, "profiling on node 1 failed: profile: no profiler"),
        ("{not json", "node 1 returned a profile that is not oobleck-profile/1"),
        ('["a list"]', "node 1 returned a profile that is not oobleck-profile/1"),
    ],
    ids=["nack", "malformed", "invalid"],
)
def test_failed_profiling_fails_the_job_and_the_master_keeps_serving(tmp_path, reply, needle):
    async def body():
        async with running_master(tmp_path) as srv:
            agents = await start_agents(srv, 1)
            agents[0].profile_reply = reply
            channel, stub = admin_stub(srv.target)
            await stub.SubmitJob(admin_pb2.SubmitJobRequest(job_spec_yaml=job_spec_yaml(None)), timeout=2)
            await wait_until(lambda: state_of(srv) == "FAILED", what="failed")
            status = await stub.GetStatus(admin_pb2.GetStatusRequest(), timeout=5)
            assert status.state == admin_pb2.JOB_STATE_FAILED and needle in status.reason, status.reason
            assert not srv.master.pending and not list((tmp_path / "profiles").glob("profile-*.json"))
            kinds = [e.kind for e in await event_log(stub)]
            assert kinds[-1] == "job_failed" and "job_planned" not in kinds
            await close_all(agents, channel)

    run(body())


def test_degraded_is_recorded_when_fewer_than_ft_plus_one_pipelines_or_idle_nodes(tmp_path):
    async def body():
        planner = make_fake_planner(nodes_per_pipeline=2)
        async with running_master(tmp_path, planner=planner, scale_up_delay_s=0.3) as srv:
            agents = await start_agents(srv, 4)
            channel, stub = admin_stub(srv.target)
            await submit(stub, srv)  # ft 1: two pipelines of two
            await wait_until(lambda: state_of(srv) == "RUNNING")
            assert srv.master.metrics.degraded._value.get() == 0
            await agents[3].drop_session()
            await wait_until(lambda: srv.master.metrics.degraded._value.get() == 1, what="degraded")
            log = [e async for e in stub.WatchEvents(admin_pb2.WatchEventsRequest(since_id=0, follow=False))]
            (degraded,) = [e for e in log if e.kind == "degraded"]
            assert "1 pipeline, fewer than ft+1 = 2" in degraded.message, degraded.message
            assert f"nodes [{agents[2].node_id}] idle" in degraded.message, degraded.message
            late = await FakeAgent(srv.target, "late").start()  # the idle node gets a partner
            await wait_until(lambda: srv.master.metrics.degraded._value.get() == 0, what="not degraded")
            log = [e async for e in stub.WatchEvents(admin_pb2.WatchEventsRequest(since_id=0, follow=False))]
            kinds = [e.kind for e in log]
            # One degraded event per change of reason (the late node may be idle for a moment too).
            cleared = kinds.index("degraded_cleared")
            assert kinds.count("degraded_cleared") == 1 and "degraded" not in kinds[cleared:]
            reasons = [e.message for e in log if e.kind == "degraded"]
            assert len(set(reasons)) == len(reasons) <= 2, reasons
            assert len(srv.master.pipelines) == 2
            await close_all([*agents[:3], late], channel)

    run(body())


def test_a_large_cluster_gets_longer_heartbeat_terms(tmp_path):
    """Beyond heartbeat_budget_per_s the interval (and timeout) stretch, for the registering node
    and, once they grew by a quarter, for every live node (its session gets the new terms)."""

    async def body():
        async with running_master(tmp_path, heartbeat_budget_per_s=20.0) as srv:  # 0.1 s: 2 nodes fit
            agents = [FakeAgent(srv.target, f"n{i}") for i in range(4)]
            terms = []
            for a in agents:
                res = await a.register()
                await a.attach()
                terms.append((round(res.heartbeat_interval_s, 3), round(res.heartbeat_timeout_s, 3)))
            assert terms == [(0.1, 1.0), (0.1, 1.0), (0.15, 1.5), (0.2, 2.0)], terms
            await wait_until(lambda: all(a.terms and a.terms[-1] == (0.2, 2.0) for a in agents[:3]), what="terms")
            assert [round(t[0], 3) for t in agents[0].terms] == [0.15, 0.2]
            assert all(srv.master.nodes[a.node_id].timeout_s == 2.0 for a in agents)
            t0 = asyncio.get_running_loop().time()
            agents[0].heartbeating = False
            await wait_until(lambda: srv.master.nodes[agents[0].node_id].row.state == "dead", what="n0 dead")
            assert asyncio.get_running_loop().time() - t0 >= 1.9  # its timeout is now 2 s, not 1 s
            assert "timeout 2s" in srv.master.nodes[agents[0].node_id].row.reason
            await close_all(agents)

    run(body())
