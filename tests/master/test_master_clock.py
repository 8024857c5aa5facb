"""The master's decisions driven by a fake clock, without sockets: registration, attach,
detection, a reconfiguration's commands and its acks, called as the servicers call them. Time
only moves when the test moves it; the waits are for the state file's writes (on their thread)."""

import asyncio

from master_fakes import job_spec_yaml, make_fake_planner, write_setup
from support.waiting import wait_until

from oobleck.master.config import MasterConfig
from oobleck.master.core import Master
from oobleck.master.records import RegisterInfo


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def info(name: str) -> RegisterInfo:
    return RegisterInfo(name, "127.0.0.1", 1, 0, "test", f"nonce-{name}", 1, 0)


def drain(handle) -> list:
    out = []
    while not handle.queue.empty():
        out.append(handle.queue.get_nowait())
    return out


def commands(messages) -> list:
    return [m.command for m in messages if hasattr(m, "WhichOneof") and m.WhichOneof("body") == "command"]


def test_a_silent_node_is_declared_dead_at_its_timeout_and_the_survivors_get_the_next_plan(tmp_path):
    async def body():
        paths = write_setup(tmp_path)
        clock = Clock()
        config = MasterConfig(
            token_file=paths["token_file"], admin_token_file=paths["admin_token_file"],
            state_file=str(tmp_path / "state.db"), heartbeat_interval_s=0.5, heartbeat_timeout_s=2.0,
            coalesce_window_s=0.2, profile_dir=str(tmp_path),
        )  # fmt: skip
        master = Master(config, planner=make_fake_planner(), clock=clock)
        await master.open()
        try:
            nodes = [master.nodes[(await master.on_register(info(f"n{i}"))).node_id] for i in range(3)]
            handles = [master.attach(n, 0) for n in nodes]
            await master.submit_job(job_spec_yaml(paths["profile"]))
            for node, handle in zip(nodes, handles, strict=True):
                (start,) = commands(drain(handle))
                await master.on_ack(node, start.command_id, 1, True, "", {}, step=0)
            await wait_until(lambda: master.job.state == "RUNNING", what="RUNNING")  # SQLite writes on its thread
            assert master.pipelines == ((1,), (2,), (3,))

            # Nodes 1 and 3 heartbeat; node 2 falls silent. 1.9 s later it is still alive.
            clock.now += 1.9
            for n in (nodes[0], nodes[2]):
                master.on_heartbeat(n)
            await master.detect_once()
            assert nodes[1].row.state == "alive"
            clock.now += 0.2  # 2.1 s of silence: dead; the reconfiguration waits for the window
            await master.detect_once()
            assert nodes[1].row.state == "dead" and master.generation == 1
            clock.now += 0.2
            for n in (nodes[0], nodes[2]):
                master.on_heartbeat(n)
            await master.detect_once()  # the window is over: generation 2 for the survivors
            await wait_until(lambda: any(p.row.generation == 2 for p in master.pending.values()), what="generation 2")
            got = {n.row.node_id: commands(drain(h)) for n, h in zip(nodes, handles, strict=True)}
            assert [c.WhichOneof("body") for c in got[1]] == ["reconfigure"] and got[2] == []
            plan = got[1][0].reconfigure.plan
            assert [list(p.node_ids) for p in plan.pipelines] == [[1], [3]] and plan.generation == 2
            for node in (nodes[0], nodes[2]):
                (cmd,) = got[node.row.node_id]
                await master.on_ack(node, cmd.command_id, 2, True, "", {"regroup": 0.1, "copy": 0.0}, step=0)
            await wait_until(lambda: master.events.recent[-1].kind == "reconfigured", what="reconfigured")
            kinds = [e.kind for e in master.events.recent]
            assert kinds.count("node_dead") == 1 and kinds[-1] == "reconfigured"
            dead = next(e for e in master.events.recent if e.kind == "node_dead")
            assert dead.node_id == 2 and dead.message.startswith("no heartbeat for 2.10s (timeout 2s")
        finally:
            await master.close()

    asyncio.run(asyncio.wait_for(body(), 30))
