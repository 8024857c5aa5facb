"""Test doubles for the master's tests: a small deterministic planner and a scripted agent that
speaks the real protocol over real gRPC (so master tests do not depend on the agent daemon)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import grpc
from support.waiting import wait_until  # noqa: F401  (the suites import it from here)

from oobleck.common.files import write_secret
from oobleck.common.tls import ClientTls, aio_channel
from oobleck.planner import errors as planner_errors
from oobleck.planner import types as pt
from oobleck.protos.v1 import admin_pb2_grpc, agent_pb2, agent_pb2_grpc

AGENT_TOKEN = "agent-token-" + "a" * 20
ADMIN_TOKEN = "admin-token-" + "b" * 20
NUM_LAYERS = 8


# -- planner stand-in ----------------------------------------------------------------------------
@dataclass(frozen=True)
class FakeProfile:
    model: str = "fake"
    num_layers: int = NUM_LAYERS

    def to_dict(self):
        return {"model": self.model, "num_layers": self.num_layers}


def _template(n: int) -> pt.Template:
    per = NUM_LAYERS // n
    stages = tuple(
        pt.Stage(layers=(i * per, NUM_LAYERS if i == n - 1 else (i + 1) * per), node=i, gpus=1, latency_ms=1.0,
                 memory_bytes=1)
        for i in range(n)
    )  # fmt: skip
    return pt.Template(num_nodes=n, stages=stages, iteration_ms=10.0 * n, bottleneck_ms=1.0)


def make_fake_planner(nodes_per_pipeline: int = 1, calls: list | None = None) -> SimpleNamespace:
    """Pipelines of ``nodes_per_pipeline`` nodes in node order; leftovers are spares."""
    k = nodes_per_pipeline
    calls = calls if calls is not None else []

    def plan_templates(profile, cluster, *, ft, microbatches, min_nodes=None):
        calls.append(("plan_templates", cluster.nodes))
        spec = pt.NodeSpec(min_nodes=k, max_nodes=max(k, cluster.nodes), ft=ft, guaranteed_range=(k, cluster.nodes))
        return pt.TemplateSet(node_spec=spec, templates=(_template(k),))

    def _group(nodes, microbatches):
        nodes = list(nodes)
        count = len(nodes) // k
        if count == 0:
            raise planner_errors.InfeasibleError(f"need at least {k} nodes, have {len(nodes)}")
        pipes = tuple(
            pt.PipelinePlan(template_nodes=k, nodes=tuple(nodes[i * k : (i + 1) * k]), microbatches=0, estimated_ms=1.0)
            for i in range(count)
        )
        share = [microbatches // count + (1 if i < microbatches % count else 0) for i in range(count)]
        pipes = tuple(pt.PipelinePlan(p.template_nodes, p.nodes, share[i], p.estimated_ms) for i, p in enumerate(pipes))
        return pipes, tuple(nodes[count * k :])

    def instantiate(templates, profile, cluster, nodes, *, microbatches):
        calls.append(("instantiate", tuple(nodes)))
        pipes, spares = _group(nodes, microbatches)
        return pt.Instantiation(pipelines=pipes, iteration_ms=1.0, sync_ms=0.0, spares=spares)

    def reconfigure(pipelines, lost, *, templates, profile, cluster, microbatches):
        calls.append(("reconfigure", tuple(tuple(p) for p in pipelines), tuple(lost)))
        survivors = [n for p in pipelines for n in p if n not in set(lost)]
        pipes, _spares = _group(survivors, microbatches)
        copies = tuple(pt.LayerCopy(layer=0, src=pipes[0].nodes[0], dst=p.nodes[0], bytes=100) for p in pipes[1:])
        return pt.Reconfiguration(pipelines=pipes, copies=copies, copy_ms=1.0, reason=f"lost {sorted(lost)}")

    def scale_up(pipelines, added, *, templates, profile, cluster, microbatches):
        calls.append(("scale_up", tuple(tuple(p) for p in pipelines), tuple(added)))
        current = [n for p in pipelines for n in p]
        pipes, spares = _group(current + sorted(added), microbatches)
        if sum(len(p.nodes) for p in pipes) <= len(current):
            raise planner_errors.InfeasibleError(f"no gain from {sorted(added)}")
        copies = tuple(
            pt.LayerCopy(layer=0, src=current[0], dst=n, bytes=100) for p in pipes for n in p.nodes if n in added
        )
        return pt.Reconfiguration(pipelines=pipes, copies=copies, copy_ms=1.0, reason="scaled up", spares=spares)

    def load_profile(path):
        data = json.loads(Path(path).read_text())
        return FakeProfile(model=data.get("model", "fake"))

    def parse_profile(data):
        if not isinstance(data, dict) or "model" not in data:
            raise planner_errors.InvalidInputError(f"profile: expected an object with a model, got {data!r}")
        return FakeProfile(model=data["model"])

    return SimpleNamespace(
        Cluster=pt.Cluster,
        plan_templates=plan_templates,
        instantiate=instantiate,
        reconfigure=reconfigure,
        scale_up=scale_up,
        load_profile=load_profile,
        parse_profile=parse_profile,
        InfeasibleError=planner_errors.InfeasibleError,
        PlannerError=planner_errors.PlannerError,
        calls=calls,
    )


def job_spec_yaml(profile_path: str | None, *, steps: int = 100, name: str = "t") -> str:
    lines = [
        f"name: {name}",
        f"model: {{name: gpt, config: {{num_layers: {NUM_LAYERS - 2}}}}}",  # + embeddings and head
        "global_batch_size: 8",
        "microbatch_size: 1",
        f"steps: {steps}",
        "ft: 1",
    ]
    if profile_path:
        lines.append(f"profile: {profile_path}")
    return "\n".join(lines) + "\n"


def write_setup(tmp: Path) -> dict[str, str]:
    """Token files and a profile file; returns their paths."""
    tmp.mkdir(parents=True, exist_ok=True)
    write_secret(tmp / "agent.token", AGENT_TOKEN)
    write_secret(tmp / "admin.token", ADMIN_TOKEN)
    (tmp / "profile.json").write_text(json.dumps({"model": "fake"}))
    return {
        "token_file": str(tmp / "agent.token"),
        "admin_token_file": str(tmp / "admin.token"),
        "profile": str(tmp / "profile.json"),
    }


def admin_stub(target: str, *, token: str = ADMIN_TOKEN, tls: ClientTls | None = None):
    channel = aio_channel(target, token=token, tls=tls)
    return channel, admin_pb2_grpc.AdminServiceStub(channel)


# -- scripted agent ------------------------------------------------------------------------------------
@dataclass
class FakeAgent:
    """Registers, opens a Session, heartbeats and (optionally) acks commands automatically."""

    target: str
    name: str
    slots: int = 1
    token: str = AGENT_TOKEN
    tls: ClientTls | None = None
    auto_ack: bool = True
    heartbeat_s: float = 0.1
    nonce: str = field(default_factory=lambda: secrets.token_hex(8))
    node_id: int = 0
    last_command_id: int = 0
    last_generation: int = 0
    commands: list = field(default_factory=list)
    terms: list = field(default_factory=list)  # heartbeat terms the master sent on the session
    session_error: grpc.StatusCode | None = None
    profile_reply: str | None = None  # a Profile command's ack carries this; None: nack it
    ready_step: int | None = None  # start / reconfigure acks carry this position (None: no step)

    def __post_init__(self) -> None:
        self._channel = aio_channel(self.target, token=self.token, tls=self.tls)
        self.stub = agent_pb2_grpc.AgentServiceStub(self._channel)
        self._call = None
        self._tasks: list[asyncio.Task] = []
        self.new_command = asyncio.Event()
        self.heartbeating = True

    async def register(self) -> agent_pb2.RegisterResponse:
        res = await self.stub.Register(
            agent_pb2.RegisterRequest(
                node_name=self.name,
                address="127.0.0.1",
                slots=self.slots,
                software_version="test",
                nonce=self.nonce,
                store_port=29500,
                node_id=self.node_id,
            ),
            timeout=10,
        )
        self.node_id = res.node_id
        return res

    async def attach(self) -> None:
        self.session_error = None
        self._call = self.stub.Session()
        hello = agent_pb2.SessionHello(
            node_id=self.node_id,
            nonce=self.nonce,
            last_generation=self.last_generation,
            last_command_id=self.last_command_id,
        )
        await self._call.write(agent_pb2.AgentMessage(hello=hello))
        self._tasks = [asyncio.create_task(self._reader(self._call)), asyncio.create_task(self._heartbeats(self._call))]

    async def start(self) -> FakeAgent:
        await self.register()
        await self.attach()
        return self

    async def _reader(self, call) -> None:
        try:
            while True:
                msg = await call.read()
                if msg is grpc.aio.EOF:
                    return
                if msg.WhichOneof("body") == "terms":
                    self.terms.append((msg.terms.interval_s, msg.terms.timeout_s))
                    continue
                cmd = msg.command
                self.commands.append(cmd)
                self.new_command.set()
                if self.auto_ack:
                    await self.ack(cmd)
        except grpc.aio.AioRpcError as exc:
            self.session_error = exc.code()
            self.session_details = exc.details()
        except asyncio.CancelledError:
            pass

    async def ack(self, cmd, ok: bool = True, regroup_s: float = 0.01, copy_s: float = 0.02) -> None:
        if cmd.command_id <= self.last_command_id:
            return
        self.last_command_id = cmd.command_id
        self.last_generation = max(self.last_generation, cmd.generation)
        ack = agent_pb2.CommandAck(
            command_id=cmd.command_id,
            generation=cmd.generation,
            ok=ok,
            phases=agent_pb2.PhaseTimes(regroup_s=regroup_s, copy_s=copy_s),
        )
        if cmd.WhichOneof("body") in ("start", "reconfigure") and self.ready_step is not None:
            ack.step = self.ready_step
        if cmd.WhichOneof("body") == "profile":
            if self.profile_reply is None:
                ack.ok, ack.error = False, "profile: no profiler on this fake node"
            else:
                ack.profile_json = self.profile_reply
        await self._call.write(agent_pb2.AgentMessage(ack=ack))

    async def send(self, **body) -> None:
        await self._call.write(agent_pb2.AgentMessage(**body))

    async def _heartbeats(self, call) -> None:
        seq = 0
        with contextlib.suppress(
            asyncio.CancelledError, grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError
        ):
            while True:
                if self.heartbeating:
                    seq += 1
                    await call.write(agent_pb2.AgentMessage(heartbeat=agent_pb2.Heartbeat(seq=seq)))
                await asyncio.sleep(self.heartbeat_s)

    def kinds(self) -> list[str]:
        return [c.WhichOneof("body") for c in self.commands]

    async def drop_session(self) -> None:
        """Break the stream (as a crashed agent's would)."""
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(BaseException):
                await t
        if self._call is not None:
            self._call.cancel()
        self._tasks = []

    async def close(self) -> None:
        await self.drop_session()
        await self._channel.close()


@contextlib.asynccontextmanager
async def running_master(tmp: Path, planner=None, **overrides):
    """A MasterServer serving in this event loop on port 0 (stopped on exit, even on failure)."""
    from oobleck.master.config import MasterConfig
    from oobleck.master.service import MasterServer

    paths = write_setup(tmp)
    values = {
        "token_file": paths["token_file"],
        "admin_token_file": paths["admin_token_file"],
        "state_file": str(tmp / "state.db"),
        "heartbeat_interval_s": 0.1,
        "heartbeat_timeout_s": 1.0,
        "session_grace_s": 0.3,
        "detect_tick_s": 0.02,
        "shutdown_grace_s": 1.0,
    }
    values.update(overrides)
    srv = MasterServer(MasterConfig(**values), planner=planner if planner is not None else make_fake_planner())
    await srv.start()
    srv.target = f"127.0.0.1:{srv.grpc_port}"
    srv.profile = paths["profile"]
    task = asyncio.create_task(srv.run())
    try:
        yield srv
    finally:
        srv.request_stop()
        await asyncio.wait_for(task, 30)


# -- the master as a real subprocess -------------------------------------------------------------------
HERE = Path(__file__).parent


class MasterProcess:
    """``oobleck-master`` (with the test planner injected) in its own process group."""

    def __init__(self, tmp: Path, *extra: str, name: str = "master") -> None:
        import sys

        self.tmp = tmp
        self.paths = write_setup(tmp)
        self.ready_file = tmp / f"{name}.ready.json"
        self.log_file = tmp / f"{name}.log"
        self.state_file = tmp / "state.db"
        self.argv = [
            sys.executable, str(HERE / "fake_planner_master.py"),
            "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0",
            "--state-file", str(self.state_file),
            "--token-file", self.paths["token_file"], "--admin-token-file", self.paths["admin_token_file"],
            "--heartbeat-interval-s", "0.1", "--heartbeat-timeout-s", "1.0", "--session-grace-s", "0.3",
            "--ready-file", str(self.ready_file), "--shutdown-grace-s", "2", *extra,
        ]  # fmt: skip
        self.proc = None
        self.info: dict = {}

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.info['grpc_port']}"

    def start(self, timeout_s: float = 60.0) -> MasterProcess:
        import subprocess
        import time

        self.ready_file.unlink(missing_ok=True)
        log = open(self.log_file, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout_s
        while not self.ready_file.exists():
            if self.proc.poll() is not None:
                raise AssertionError(f"master exited with {self.proc.returncode}:\n{self.log_file.read_text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"master not ready after {timeout_s}s:\n{self.log_file.read_text()}")
            time.sleep(0.02)
        self.info = json.loads(self.ready_file.read_text())
        assert self.info["pid"] == self.proc.pid
        return self

    def metric(self, name: str) -> float:
        """One sample of the master's ``/metrics`` (``name`` with its labels, as exposed)."""
        import urllib.request

        url = f"http://127.0.0.1:{self.info['http_port']}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            for line in response.read().decode().splitlines():
                if line.split()[0] == name:
                    return float(line.split()[-1])
        raise AssertionError(f"{name} not in /metrics")

    def signal(self, sig) -> None:
        import os

        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)

    def wait(self, timeout_s: float = 20.0) -> int:
        return self.proc.wait(timeout=timeout_s)

    def stop(self) -> None:
        """SIGTERM, a deadline, then SIGKILL; safe to call twice."""
        import signal
        import subprocess

        if self.proc is None or self.proc.poll() is not None:
            return
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
