"""A small real AgentService (grpc.aio, port 0) run on its own thread, for agent tests.

It implements the contract's agent side of the master just enough: Register hands out ids
(same id for a known id with the same nonce), Session requires hello first, records every
agent message as an event, and sends the commands a test queues. Tests wait on events with
deadlines (:meth:`FakeMaster.wait_for`), never on sleeps.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from support.waiting import wait_on

from oobleck.common.auth import TokenAuthInterceptor
from oobleck.common.tls import ServerTls, add_port
from oobleck.protos.v1 import agent_pb2, agent_pb2_grpc, plan_pb2

JOB_SPEC = """\
name: t
model: {name: gpt, config: {num_layers: 4, hidden_size: 16, num_heads: 2}}
data: {kind: synthetic, seq_len: 8, num_samples: 64, seed: 0}
optimizer: {name: adamw, lr: 0.001}
global_batch_size: 8
microbatch_size: 2
ft: 0
steps: 10
"""


@dataclass(frozen=True)
class Event:
    kind: str  # register, hello, heartbeat, worker, step, ack, failure, session_end
    msg: Any
    session: int
    at: float


class _Servicer(agent_pb2_grpc.AgentServiceServicer):
    def __init__(self, master: FakeMaster) -> None:
        self.m = master

    async def Register(self, request, context):
        m = self.m
        m._record("register", request, 0)
        known = m.nonces.get(request.node_id)
        if request.node_id and known == request.nonce:
            node_id = request.node_id
        else:
            m.next_id += 1
            node_id = m.next_id
            m.nonces[node_id] = request.nonce
        return agent_pb2.RegisterResponse(
            node_id=node_id,
            lease_s=2.0,
            heartbeat_interval_s=m.heartbeat_interval_s,
            heartbeat_timeout_s=2.0,
            job_spec_yaml=JOB_SPEC,
            generation=0,
        )

    async def Session(self, request_iterator, context):
        m = self.m
        m.session_count += 1
        session = m.session_count
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("body") != "hello":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "hello: must be the first message")
        m._record("hello", first.hello, session)
        outbox: asyncio.Queue = asyncio.Queue()
        m._current = (session, outbox)

        async def read() -> None:
            async for message in request_iterator:
                body = message.WhichOneof("body")
                m._record(body, getattr(message, body), session)
            await outbox.put(None)

        reader = asyncio.ensure_future(read())
        try:
            while True:
                item = await outbox.get()
                if item is None:
                    return
                if item == "break":
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "fake master broke the session")
                if isinstance(item, agent_pb2.HeartbeatTerms):
                    yield agent_pb2.MasterMessage(terms=item)
                else:
                    yield agent_pb2.MasterMessage(command=item)
        finally:
            reader.cancel()
            m._record("session_end", None, session)


class FakeMaster:
    def __init__(self, token: str, *, heartbeat_interval_s: float = 0.1, tls: ServerTls | None = None) -> None:
        self.token = token
        self.tls = tls
        self.heartbeat_interval_s = heartbeat_interval_s
        self.nonces: dict[int, str] = {}
        self.next_id = 0
        self.session_count = 0
        self.port = 0
        self._current: tuple[int, asyncio.Queue] | None = None
        self._events: list[Event] = []
        self._cond = threading.Condition()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fake-master", daemon=True)
        self._server: grpc.aio.Server | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> int:
        self._thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=30)
        return self.port

    async def _start(self, port: int = 0) -> int:
        interceptor = TokenAuthInterceptor({"/oobleck.v1.AgentService/": self.token})
        self._server = grpc.aio.server(interceptors=[interceptor])
        agent_pb2_grpc.add_AgentServiceServicer_to_server(_Servicer(self), self._server)
        bound = add_port(self._server, f"127.0.0.1:{port}", tls=self.tls, allow_insecure=False)
        await self._server.start()
        return bound

    def forget(self) -> None:
        """Lose every registration (a master restarted without its state file)."""
        self._loop.call_soon_threadsafe(self.nonces.clear)

    def go_down(self) -> None:
        """Stop serving, as a crashed master: sessions break, Register fails with UNAVAILABLE."""
        assert self._server is not None
        asyncio.run_coroutine_threadsafe(self._server.stop(grace=0), self._loop).result(timeout=30)
        self._current = None
        self._record("down", None, 0)

    def come_back(self) -> None:
        """Serve again on the same port with the same registrations (a master restarted from
        its state file)."""
        asyncio.run_coroutine_threadsafe(self._start(self.port), self._loop).result(timeout=30)

    def stop(self) -> None:
        if self._server is not None:
            asyncio.run_coroutine_threadsafe(self._server.stop(grace=0), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)

    # -- events ----------------------------------------------------------------------------

    def _record(self, kind: str, msg: Any, session: int) -> None:
        with self._cond:
            self._events.append(Event(kind, msg, session, time.monotonic()))
            self._cond.notify_all()

    def mark(self) -> int:
        """Position to pass as ``after`` to see only later events."""
        with self._cond:
            return len(self._events)

    def events(self, kind: str | None = None, after: int = 0) -> list[Event]:
        with self._cond:
            return [e for e in self._events[after:] if kind is None or e.kind == kind]

    def wait_for(
        self,
        kind: str,
        predicate: Callable[[Any], bool] | None = None,
        *,
        after: int = 0,
        timeout_s: float = 20.0,
        count: int = 1,
    ) -> list[Event]:
        """Wait until ``count`` events of ``kind`` (matching ``predicate``) arrived after ``after``."""

        def found():
            hits = [e for e in self._events[after:] if e.kind == kind and (predicate is None or predicate(e.msg))]
            return hits if len(hits) >= count else None

        try:
            return wait_on(self._cond, found, timeout_s, f"{count} {kind!r} events")
        except AssertionError as exc:
            with self._cond:
                kinds = [e.kind for e in self._events[after:]][-30:]
            raise AssertionError(f"{exc}; last events: {kinds}") from None

    # -- commands --------------------------------------------------------------------------

    def send(self, command: agent_pb2.Command) -> None:
        assert self._current is not None, "no session"
        outbox = self._current[1]
        self._loop.call_soon_threadsafe(outbox.put_nowait, command)

    def break_session(self) -> None:
        assert self._current is not None, "no session"
        outbox = self._current[1]
        self._loop.call_soon_threadsafe(outbox.put_nowait, "break")


def make_plan(generation: int, node_ids: list[int], slots: int, store_port: int) -> plan_pb2.Plan:
    """One pipeline of ``node_ids`` (one stage of one layer per node, on all its slots)."""
    ranks = [plan_pb2.NodeRanks(node_id=n, ranks=range(i * slots, (i + 1) * slots)) for i, n in enumerate(node_ids)]
    stages = [plan_pb2.Stage(layer_start=i, layer_end=i + 1, node_index=i, gpus=slots) for i in range(len(node_ids))]
    return plan_pb2.Plan(
        generation=generation,
        templates=[plan_pb2.Template(num_nodes=len(node_ids), stages=stages)],
        pipelines=[plan_pb2.Pipeline(node_ids=node_ids, microbatches=4)],
        ranks=ranks,
        rendezvous=plan_pb2.Endpoint(host="127.0.0.1", port=store_port, secret="0f" * 16),
        world_size=len(node_ids) * slots,
    )


def start_command(command_id: int, generation: int, plan: plan_pb2.Plan) -> agent_pb2.Command:
    return agent_pb2.Command(
        command_id=command_id, generation=generation, start=agent_pb2.Start(plan=plan, job_spec_yaml=JOB_SPEC)
    )


def reconfigure_command(command_id: int, generation: int, plan: plan_pb2.Plan) -> agent_pb2.Command:
    return agent_pb2.Command(command_id=command_id, generation=generation, reconfigure=agent_pb2.Reconfigure(plan=plan))
