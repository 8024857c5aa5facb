"""Load benchmark for the master (not a test): many simulated agents heartbeating to one master.

    .venv/bin/python scripts/bench/master_load.py [--agents 1000] [--procs 4] [--silent 10]

Starts ``oobleck-master`` (loopback, port 0, temporary state), then ``--procs`` client processes
that each register and hold ``agents/procs`` sessions over grpc.aio, sending a heartbeat at the
interval the master gives (``--heartbeat-interval-s``, stretched by the master beyond its
``heartbeat_budget_per_s``, 5,000 heartbeats/s: at 10,000 agents the last ones get 2 s, with a
5 s timeout). After a warm-up, ``--silent`` agents stop heartbeating at once (their
streams stay open, so only the heartbeat timeout can catch them). Reports:
- heartbeat_p99_ms: p99 time for a heartbeat write to be accepted by the transport (client side);
- detect_p99_s: p99 of (node_dead event time - that agent's last heartbeat), target <= timeout + 0.5;
- false_dead: nodes declared dead that were never silenced (must be 0);
- master_rss_mb: the master's resident memory at the end of the heartbeat phase;
- heartbeat_timeout_s: the longest heartbeat timeout the master gave an agent;
- idle_cpu_pct: after the heartbeat phase, every agent stops and more nodes register without ever
  attaching until ``--churn-nodes`` (20,000) nodes have died; once the master has purged them all
  (``--dead-node-retention-s``), its CPU over 10 s with no live session (target < 5 %).
The last line printed is one JSON object with these figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from oobleck.common import procs

ROOT = Path(__file__).resolve().parents[2]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q * (len(values) - 1))))
    return values[k]


# -- client process ---------------------------------------------------------------------------------
async def client_main(target: str, token: str, count: int, first: int, interval_s: float, channels: int) -> None:
    import grpc

    from oobleck.common.tls import aio_channel
    from oobleck.protos.v1 import agent_pb2, agent_pb2_grpc

    chans = [aio_channel(target, token=token) for _ in range(channels)]
    stubs = [agent_pb2_grpc.AgentServiceStub(c) for c in chans]
    latencies: list[float] = []
    silent: set[int] = set()
    last_hb: dict[int, float] = {}
    max_gap: dict[int, float] = {}  # node -> longest time between two of its heartbeat writes
    node_ids: list[int] = []
    timeouts: list[float] = []
    readers: list[asyncio.Task] = []
    measuring = False

    async def agent(i: int, ready: asyncio.Event) -> None:
        stub = stubs[i % channels]
        nonce = secrets.token_hex(8)
        res = await stub.Register(
            agent_pb2.RegisterRequest(
                node_name=f"sim{first + i}", address="127.0.0.1", slots=1, software_version="bench", nonce=nonce,
                store_port=1,
            ),
            timeout=60,
        )  # fmt: skip
        node = res.node_id
        node_ids.append(node)
        k = len(timeouts)
        timeouts.append(res.heartbeat_timeout_s)
        terms = [res.heartbeat_interval_s or interval_s]  # the master stretches it as the cluster grows
        call = stub.Session()
        await call.write(agent_pb2.AgentMessage(hello=agent_pb2.SessionHello(node_id=node, nonce=nonce)))
        ready.set()

        async def read_terms() -> None:  # like an agent: the master may send longer terms later
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
                while True:
                    msg = await call.read()
                    if msg is grpc.aio.EOF:
                        return
                    if msg.WhichOneof("body") == "terms":
                        terms[0] = msg.terms.interval_s
                        timeouts[k] = max(timeouts[k], msg.terms.timeout_s)

        readers.append(asyncio.create_task(read_terms()))
        loop = asyncio.get_running_loop()
        await asyncio.sleep(terms[0] * (i % 50) / 50)  # spread the heartbeats
        seq = 0
        nxt = loop.time()
        try:
            while True:
                if node not in silent:
                    seq += 1
                    t0 = time.perf_counter()
                    if node in last_hb:
                        max_gap[node] = max(max_gap.get(node, 0.0), time.time() - last_hb[node])
                    await call.write(agent_pb2.AgentMessage(heartbeat=agent_pb2.Heartbeat(seq=seq)))
                    if measuring:
                        latencies.append((time.perf_counter() - t0) * 1000)
                    last_hb[node] = time.time()
                nxt = max(nxt + terms[0], loop.time())  # late (a busy client): no burst to catch up
                await asyncio.sleep(nxt - loop.time())
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
            print(json.dumps({"event": "session_error", "node": node, "error": str(exc)[:200]}), flush=True)

    tasks = []
    readies = []
    for i in range(count):
        ev = asyncio.Event()
        readies.append(ev)
        tasks.append(asyncio.create_task(agent(i, ev)))
        if i % 50 == 49:
            await asyncio.gather(*(e.wait() for e in readies))
    await asyncio.gather(*(e.wait() for e in readies))
    print(json.dumps({"event": "ready", "nodes": len(node_ids), "timeout_s": max(timeouts)}), flush=True)

    reader = asyncio.StreamReader()
    await asyncio.get_running_loop().connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = (await reader.readline()).decode().strip()
        if not line or line == "stop":
            break
        cmd, _, arg = line.partition(" ")
        if cmd == "measure":
            measuring = True
        elif cmd == "silence":
            ids = sorted(node_ids)  # spread over the registration order (early and late terms)
            victims = ids[:: max(1, len(ids) // int(arg))][: int(arg)]
            silent.update(victims)
            print(json.dumps({"event": "silenced", "nodes": victims}), flush=True)
        elif cmd == "last":
            print(json.dumps({"event": "last", "last_hb": {str(n): last_hb.get(n, 0.0) for n in silent}}), flush=True)
    print(
        json.dumps(
            {"event": "stats", "count": len(latencies), "timeout_s": max(timeouts), "p50": percentile(latencies, 0.5),
             "p99": percentile(latencies, 0.99), "latencies_sample": latencies[-20000:],
             "max_gap": {str(n): round(g, 3) for n, g in max_gap.items()}}
        ),
        flush=True,
    )  # fmt: skip
    for t in tasks + readers:
        t.cancel()
    for c in chans:
        await c.close()


async def churn_main(target: str, token: str, count: int, first: int, channels: int) -> None:
    """Register ``count`` nodes that never open a session (they die at the heartbeat timeout)."""
    from oobleck.common.tls import aio_channel
    from oobleck.protos.v1 import agent_pb2, agent_pb2_grpc

    chans = [aio_channel(target, token=token) for _ in range(channels)]
    stubs = [agent_pb2_grpc.AgentServiceStub(c) for c in chans]

    async def one(i: int) -> None:
        await stubs[i % channels].Register(
            agent_pb2.RegisterRequest(
                node_name=f"churn{first + i}", address="127.0.0.1", slots=1, software_version="bench",
                nonce=secrets.token_hex(8), store_port=1,
            ),
            timeout=120,
        )  # fmt: skip

    for start in range(0, count, 200):
        await asyncio.gather(*(one(i) for i in range(start, min(count, start + 200))))
    print(json.dumps({"event": "churned", "nodes": count}), flush=True)
    for c in chans:
        await c.close()


async def node_total(stub) -> int:
    from oobleck.protos.v1 import admin_pb2

    return (await stub.ListNodes(admin_pb2.ListNodesRequest(page_size=1), timeout=30)).total


# -- driver -------------------------------------------------------------------------------------------
class Client:
    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True, bufsize=1
        )
        self.lines: asyncio.Queue = asyncio.Queue()

    async def pump(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            line = await loop.run_in_executor(None, self.proc.stdout.readline)
            if not line:
                await self.lines.put(None)
                return
            try:
                await self.lines.put(json.loads(line))
            except json.JSONDecodeError:
                continue

    async def expect(self, event: str, timeout_s: float) -> dict:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            remaining = deadline - asyncio.get_running_loop().time()
            msg = await asyncio.wait_for(self.lines.get(), max(0.01, remaining))
            if msg is None:
                raise RuntimeError(f"client exited before {event}")
            if msg.get("event") == event:
                return msg

    def send(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


async def driver(args) -> dict:
    import grpc

    from oobleck.common.files import write_secret
    from oobleck.common.tls import aio_channel
    from oobleck.protos.v1 import admin_pb2, admin_pb2_grpc

    tmp = Path(tempfile.mkdtemp(prefix="oobleck-bench-"))
    write_secret(tmp / "agent.token", secrets.token_hex(16))
    write_secret(tmp / "admin.token", secrets.token_hex(16))
    ready = tmp / "ready.json"
    master_argv = [
        str(Path(sys.executable).parent / "oobleck-master"), "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0",
        "--state-file", str(tmp / "state.db"), "--token-file", str(tmp / "agent.token"),
        "--admin-token-file", str(tmp / "admin.token"), "--ready-file", str(ready),
        "--heartbeat-interval-s", str(args.heartbeat_interval_s),
        "--heartbeat-timeout-s", str(args.heartbeat_timeout_s),
        "--max-nodes", str(max(args.agents, args.churn_nodes) + 100), "--log-level", "WARNING",
        "--register-burst", str(args.churn_nodes + args.agents), "--register-rate-per-s", "1000000",
        "--dead-node-retention-s", str(args.dead_node_retention_s),
        "--heartbeat-budget-per-s", str(args.heartbeat_budget_per_s),
    ]  # fmt: skip
    master = subprocess.Popen(master_argv, start_new_session=True)
    clients: list[Client] = []
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            if master.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("master did not start")
            await asyncio.sleep(0.05)
        info = json.loads(ready.read_text())
        target = f"127.0.0.1:{info['grpc_port']}"
        agent_token = (tmp / "agent.token").read_text().strip()
        per = [args.agents // args.procs + (1 if i < args.agents % args.procs else 0) for i in range(args.procs)]
        first = 0
        for count in per:
            clients.append(
                Client([sys.executable, __file__, "--client", target, agent_token, str(count),
                        str(first), str(args.heartbeat_interval_s), str(args.channels)])
            )  # fmt: skip
            first += count
        pumps = [asyncio.create_task(c.pump()) for c in clients]
        t_reg, t_reg_unix = time.monotonic(), time.time()
        timeout_s = 0.0
        for c in clients:
            timeout_s = max(timeout_s, (await c.expect("ready", 900))["timeout_s"])
        print(f"{args.agents} agents registered in {time.monotonic() - t_reg:.1f}s", flush=True)

        admin = aio_channel(target, token=(tmp / "admin.token").read_text().strip())
        stub = admin_pb2_grpc.AdminServiceStub(admin)
        deaths: list = []

        async def watch() -> None:
            try:
                async for ev in stub.WatchEvents(admin_pb2.WatchEventsRequest(since_id=0, follow=True)):
                    if ev.kind == "node_dead":
                        deaths.append(ev)
            except grpc.aio.AioRpcError:
                pass

        watcher = asyncio.create_task(watch())
        await asyncio.sleep(args.warmup_s)
        for c in clients:
            c.send("measure")
        rtts = []
        t_end = time.monotonic() + args.measure_s
        while time.monotonic() < t_end:
            t0 = time.perf_counter()
            await stub.GetStatus(admin_pb2.GetStatusRequest(), timeout=10)
            rtts.append((time.perf_counter() - t0) * 1000)
            await asyncio.sleep(0.1)
        clients[0].send(f"silence {args.silent}")
        silenced = set((await clients[0].expect("silenced", 30))["nodes"])
        t_silence = time.monotonic()
        while len([d for d in deaths if d.node_id in silenced]) < len(silenced):
            if time.monotonic() - t_silence > timeout_s + 30:
                break
            await asyncio.sleep(0.05)
        clients[0].send("last")
        last = {int(k): v for k, v in (await clients[0].expect("last", 30))["last_hb"].items()}
        await asyncio.sleep(args.after_s)  # keep going: nobody else may die
        rss = (procs.rss_bytes(master.pid) or 0) / (1 << 20)
        stats = []
        for c in clients:
            c.send("stop")
        for c in clients:
            stats.append(await c.expect("stats", 60))
        watcher.cancel()
        for p in pumps:
            p.cancel()
        for c in clients:
            c.stop()
        idle_cpu_pct, purge_s = await churn_and_idle(args, target, tmp, stub, master.pid)
        await admin.close()
        timeout_s = max([timeout_s] + [s["timeout_s"] for s in stats])
        detect = [d.unix_time_s - last[d.node_id] for d in deaths if d.node_id in silenced and d.node_id in last]
        lat = [x for s in stats for x in s["latencies_sample"]]
        result = {
            "agents": args.agents,
            "heartbeat_p99_ms": round(percentile(lat, 0.99), 3),
            "detect_p99_s": round(percentile(detect, 0.99), 3),
            "false_dead": len([d for d in deaths if d.node_id not in silenced]),
            "master_rss_mb": round(rss, 1),
            "heartbeat_timeout_s": timeout_s,  # the longest any agent was given
            "idle_cpu_pct": round(idle_cpu_pct, 2),
        }
        gaps = {int(k): v for s in stats for k, v in s["max_gap"].items()}
        false = [d for d in deaths if d.node_id not in silenced]
        for d in false[:5]:
            print(
                f"false death: node {d.node_id} at +{d.unix_time_s - t_reg_unix:.1f}s: {d.message} "
                f"(its longest heartbeat gap {gaps.get(d.node_id, float('nan')):.2f}s)",
                flush=True,
            )
        print(
            f"detected {len(detect)}/{len(silenced)} silent agents; "
            f"detect max {max(detect, default=float('nan')):.3f}s; "
            f"heartbeats measured {sum(s['count'] for s in stats)}; GetStatus p99 under load "
            f"{percentile(rtts, 0.99):.1f} ms; {args.churn_nodes} dead nodes purged {purge_s:.1f}s after the "
            f"last died (retention {args.dead_node_retention_s:g}s)",
            flush=True,
        )
        return result
    finally:
        for c in clients:
            c.stop()
        if master.poll() is None:
            master.send_signal(signal.SIGTERM)
            try:
                master.wait(15)
            except subprocess.TimeoutExpired:
                master.kill()
                master.wait(15)
        shutil.rmtree(tmp, ignore_errors=True)


async def churn_and_idle(args, target: str, tmp: Path, stub, master_pid: int) -> tuple[float, float]:
    """Every agent has stopped; register nodes that never attach until ``churn_nodes`` have died,
    wait for the master to purge them all, then measure its CPU over ``idle_s``."""
    extra = max(0, args.churn_nodes - args.agents)
    if extra:
        token = (tmp / "agent.token").read_text().strip()
        churn = Client([sys.executable, __file__, "--churn", target, token, str(extra),
                        str(args.agents), str(args.channels)])  # fmt: skip
        pump = asyncio.create_task(churn.pump())
        try:
            await churn.expect("churned", 600)
        finally:
            churn.stop()
            pump.cancel()
    t_dead = time.monotonic()
    deadline = t_dead + args.heartbeat_timeout_s + args.dead_node_retention_s + 300
    while await node_total(stub) > 0:
        if time.monotonic() > deadline:
            raise RuntimeError(f"dead nodes not purged: {await node_total(stub)} left")
        await asyncio.sleep(0.5)
    purge_s = time.monotonic() - t_dead
    await asyncio.sleep(1.0)  # let the purge's own work finish before measuring
    c0, t0 = procs.cpu_seconds(master_pid), time.monotonic()
    await asyncio.sleep(args.idle_s)
    return 100.0 * (procs.cpu_seconds(master_pid) - c0) / (time.monotonic() - t0), purge_s


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--churn":
        target, token, count, first, channels = sys.argv[2:7]
        asyncio.run(churn_main(target, token, int(count), int(first), int(channels)))
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        target, token, count, first, interval, channels = sys.argv[2:8]
        asyncio.run(client_main(target, token, int(count), int(first), float(interval), int(channels)))
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--agents", type=int, default=1000)
    p.add_argument("--procs", type=int, default=4)
    p.add_argument("--channels", type=int, default=8, help="gRPC channels per client process")
    p.add_argument("--silent", type=int, default=10)
    p.add_argument("--heartbeat-interval-s", type=float, default=0.5)
    p.add_argument("--heartbeat-timeout-s", type=float, default=2.0)
    p.add_argument("--warmup-s", type=float, default=5.0)
    p.add_argument("--measure-s", type=float, default=10.0)
    p.add_argument("--after-s", type=float, default=5.0)
    p.add_argument("--heartbeat-budget-per-s", type=float, default=5000.0, help="the master's heartbeat budget")
    p.add_argument("--churn-nodes", type=int, default=20_000, help="nodes that have died before idle_cpu_pct")
    p.add_argument("--dead-node-retention-s", type=float, default=5.0)
    p.add_argument("--idle-s", type=float, default=10.0)
    args = p.parse_args()
    result = asyncio.run(driver(args))
    print(json.dumps(result))
    return 0 if result["false_dead"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
