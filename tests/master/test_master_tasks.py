"""Every long-running task of the master has an owner that acts on its failure, and the plan in
force is one record (the master served in-process over real gRPC, scripted agents)."""

import asyncio

from master_fakes import FakeAgent, admin_stub, job_spec_yaml, make_fake_planner, running_master, wait_until

from oobleck.protos.v1 import admin_pb2, agent_pb2


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


async def started(srv, count, **kw):
    agents = [await FakeAgent(srv.target, f"node{i}", **kw).start() for i in range(count)]
    channel, stub = admin_stub(srv.target)
    await stub.SubmitJob(admin_pb2.SubmitJobRequest(job_spec_yaml=job_spec_yaml(srv.profile)), timeout=10)
    await wait_until(lambda: srv.master.job is not None and srv.master.job.state == "RUNNING")
    return agents, channel, stub


async def events(stub):
    return [e async for e in stub.WatchEvents(admin_pb2.WatchEventsRequest(since_id=0, follow=False))]


def failing(planner, times):
    """The planner's reconfigure raises an unexpected error ``times`` times, then works."""
    real, calls = planner.reconfigure, []

    def reconfigure(*args, **kw):
        calls.append(1)
        if len(calls) <= times:
            raise RuntimeError(f"injected bug #{len(calls)}")
        return real(*args, **kw)

    planner.reconfigure = reconfigure
    return calls


def test_an_unexpected_error_in_a_reconfiguration_is_recorded_and_retried(tmp_path):
    async def body():
        planner = make_fake_planner()
        async with running_master(tmp_path, planner=planner) as srv:
            agents, channel, stub = await started(srv, 3)
            calls = failing(planner, 1)
            await agents[1].drop_session()
            await wait_until(
                lambda: srv.master.job.state == "RUNNING" and srv.master.generation == 2, what="retried generation 2"
            )
            assert len(calls) == 2 and srv.master.pipelines == ((1,), (3,))
            failed = [e.message for e in await events(stub) if e.kind == "job_task_failed"]
            assert failed == ["reconfiguration failed: RuntimeError: injected bug #1 (attempt 1 of 3): retried"]
            for a in agents[:1]:
                await a.close()
            await agents[2].close()
            await channel.close()

    run(body())


def test_a_reconfiguration_that_keeps_failing_fails_the_job_visibly(tmp_path):
    async def body():
        planner = make_fake_planner()
        async with running_master(tmp_path, planner=planner) as srv:
            agents, channel, stub = await started(srv, 3)
            failing(planner, 100)
            await agents[1].drop_session()
            await wait_until(lambda: any(e.kind == "job_failed" for e in srv.master.events.recent), what="job_failed")
            status = await stub.GetStatus(admin_pb2.GetStatusRequest(), timeout=5)
            assert status.state == admin_pb2.JOB_STATE_FAILED
            assert "reconfiguration failed: RuntimeError: injected bug #3" in status.reason
            kinds = [e.kind for e in await events(stub)]
            assert kinds.count("job_task_failed") == 3 and kinds[-1] == "job_failed"
            for a in (agents[0], agents[2]):  # the survivors' workers are stopped
                await wait_until(lambda a=a: "stop" in a.kinds(), what="stop sent")
                await a.close()
            await channel.close()

    run(body())


def test_a_paused_job_shows_no_plan_anywhere(tmp_path):
    """GetStatus and /api/status read the same record: while paused, neither shows a plan."""

    async def body():
        async with running_master(tmp_path, planner=make_fake_planner(nodes_per_pipeline=2)) as srv:
            agents, channel, stub = await started(srv, 2)
            status = await stub.GetStatus(admin_pb2.GetStatusRequest(), timeout=5)
            assert [list(p.node_ids) for p in status.plan.pipelines] == [[1, 2]]
            assert srv.master.status_dict()["pipelines"] == [[1, 2]]
            for a in agents:
                await a.send(step=agent_pb2.StepReport(generation=1, step=3, loss=2.0, samples_per_s=1.0))
            await agents[1].drop_session()
            await wait_until(lambda: srv.master.job.state == "PAUSED")
            status = await stub.GetStatus(admin_pb2.GetStatusRequest(), timeout=5)
            assert not status.HasField("plan") and srv.master.status_dict()["pipelines"] == []
            assert srv.master.job.plan == b"" and srv.master.pipelines == ()
            await agents[0].close()
            await channel.close()

    run(body())


def test_an_unexpected_error_in_a_scale_up_is_recorded_and_the_job_runs_on(tmp_path):
    async def body():
        planner = make_fake_planner()
        async with running_master(tmp_path, planner=planner, scale_up_delay_s=0.1) as srv:
            agents, channel, stub = await started(srv, 2)

            def scale_up(*args, **kw):
                raise RuntimeError("injected scale-up bug")

            planner.scale_up = scale_up
            spare = await FakeAgent(srv.target, "spare").start()
            await wait_until(
                lambda: any(e.kind == "scale_up_failed" for e in srv.master.events.recent), what="scale_up_failed"
            )
            failed = [e.message for e in await events(stub) if e.kind == "scale_up_failed"]
            assert failed == [f"spares [{spare.node_id}] stay spares: RuntimeError: injected scale-up bug"]
            assert srv.master.job.state == "RUNNING" and srv.master.generation == 1
            assert srv.master.nodes[spare.node_id].row.state == "spare"
            for a in [*agents, spare]:
                await a.close()
            await channel.close()

    run(body())
