"""The gRPC edge: servicers (validation, proto <-> dataclass) and the server that hosts them.

:class:`MasterServer` assembles the master: SQLite state, gRPC (agent + admin services, health,
reflection, bearer-token interceptor, TLS), HTTP (metrics, status) and the detector task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from oobleck.common.auth import RotatingToken, TokenAuthInterceptor, TokenFileError
from oobleck.common.files import write_json
from oobleck.common.jobspec import MAX_SPEC_BYTES
from oobleck.common.tls import ServerTls, add_port, server_options
from oobleck.common.version import PROTOCOL_VERSION, version
from oobleck.master.config import MasterConfig
from oobleck.master.core import Master
from oobleck.master.membership import RateLimiter, peer_host
from oobleck.master.records import MasterError, RegisterInfo
from oobleck.master.wire import (
    MAX_TEXT_CHARS,
    Invalid,
    abort_with,
    check_distinct_tokens,
    finite_field,
    free_text,
    int_field,
    json_field,
    peer_identity,
    status_details,
    text_field,
)
from oobleck.protos.v1 import admin_pb2, admin_pb2_grpc, agent_pb2, agent_pb2_grpc

log = logging.getLogger(__name__)

AGENT_SERVICE = agent_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name
ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name
HELLO_TIMEOUT_S = 10.0
DEFAULT_NODES_PAGE = 1000  # ListNodes without page_size
MAX_NODES_PAGE = 5000
MAX_PROFILE_CHARS = 4 << 20  # an oobleck-profile/1 document in a Profile ack


class AgentServicer(agent_pb2_grpc.AgentServiceServicer):
    def __init__(self, master: Master) -> None:
        self.master = master
        cfg = master.config
        self.register_limit = RateLimiter(cfg.register_rate_per_s, cfg.register_burst)

    def _check_rate(self, context) -> None:
        """Registrations per peer address are rate-limited (a flood from one host cannot fill the
        node table); refused with RESOURCE_EXHAUSTED and the time to wait."""
        peer = peer_host(context.peer() or "")
        allowed, wait_s = self.register_limit.allow(peer, self.master.clock())
        if not allowed:
            self.master.metrics.registrations_refused.inc()
            raise MasterError(
                "RESOURCE_EXHAUSTED",
                f"too many registrations from {peer} (register_rate_per_s {self.master.config.register_rate_per_s:g}, "
                f"register_burst {self.master.config.register_burst}); retry in {wait_s:.1f}s",
            )

    async def Register(self, request: agent_pb2.RegisterRequest, context) -> agent_pb2.RegisterResponse:
        try:
            self._check_rate(context)
            info = RegisterInfo(
                node_name=text_field(request.node_name, "node_name"),
                address=text_field(request.address, "address"),
                slots=int_field(request.slots, "slots", 1, 1024),
                gpu_memory_bytes=int_field(request.gpu_memory_bytes, "gpu_memory_bytes", 0, 1 << 50),
                software_version=text_field(request.software_version, "software_version", allow_empty=True),
                protocol_version=int_field(request.protocol_version, "protocol_version", 0, 1 << 20),
                nonce=text_field(request.nonce, "nonce", max_chars=128),
                store_port=int_field(request.store_port, "store_port", 0, 65535),
                node_id=int_field(request.node_id, "node_id", 0, 1 << 62),
                identity=peer_identity(context),
            )
            if any(ch.isspace() for ch in info.address):
                raise Invalid("address", "must not contain whitespace")
            res = await self.master.on_register(info)
        except Exception as exc:  # Invalid, MasterError; anything else is logged as INTERNAL
            await abort_with(context, exc)
        return agent_pb2.RegisterResponse(
            node_id=res.node_id,
            lease_s=res.lease_s,
            heartbeat_interval_s=res.heartbeat_interval_s,
            heartbeat_timeout_s=res.heartbeat_timeout_s,
            job_spec_yaml=res.job_spec_yaml,
            generation=res.generation,
            protocol_version=PROTOCOL_VERSION,
            software_version=version(),
        )

    async def Session(self, request_iterator, context):
        master = self.master
        try:
            first = await asyncio.wait_for(context.read(), HELLO_TIMEOUT_S)
        except TimeoutError:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"hello: not received within {HELLO_TIMEOUT_S:g}s")
        if first is grpc.aio.EOF:
            return
        try:
            if first.WhichOneof("body") != "hello":
                raise Invalid("hello", f"the first message must be hello, got {first.WhichOneof('body')}")
            hello = first.hello
            int_field(hello.node_id, "hello.node_id", 1, 1 << 62)
            text_field(hello.nonce, "hello.nonce", max_chars=128)
            int_field(hello.last_generation, "hello.last_generation", 0, 1 << 62)
            int_field(hello.last_command_id, "hello.last_command_id", 0, 1 << 62)
            node = master.session_node(hello.node_id, hello.nonce, peer_identity(context))
        except Exception as exc:  # Invalid, MasterError; anything else is logged as INTERNAL
            await abort_with(context, exc)
        handle = master.attach(node, hello.last_command_id)
        reader = asyncio.get_running_loop().create_task(self._read(node, handle, context))
        try:
            while True:
                item = await handle.queue.get()
                if isinstance(item, agent_pb2.MasterMessage):
                    await context.write(item)
                    continue
                if item.code is not None:
                    await context.abort(getattr(grpc.StatusCode, item.code), status_details(item.message))
                return
        finally:
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader
            master.detach(node, handle)

    async def _read(self, node, handle, context) -> None:
        master = self.master
        try:
            while True:
                msg = await context.read()
                if msg is grpc.aio.EOF:
                    break
                kind = msg.WhichOneof("body")
                if kind == "heartbeat":
                    master.on_heartbeat(node)
                elif kind == "step":
                    s = msg.step
                    master.on_step(
                        node,
                        int_field(s.generation, "step.generation", 0, 1 << 62),
                        int_field(s.step, "step.step", 0, 1 << 62),
                        finite_field(s.loss, "step.loss"),
                        finite_field(s.samples_per_s, "step.samples_per_s", 0.0),
                    )
                elif kind == "ack":
                    a = msg.ack
                    phases = {
                        "regroup": finite_field(a.phases.regroup_s, "ack.phases.regroup_s", 0.0),
                        "copy": finite_field(a.phases.copy_s, "ack.phases.copy_s", 0.0),
                    }
                    await master.on_ack(
                        node,
                        int_field(a.command_id, "ack.command_id", 1, 1 << 62),
                        a.generation,
                        a.ok,
                        free_text(a.error, MAX_TEXT_CHARS * 4),
                        phases,
                        json_field(a.profile_json, "ack.profile_json", MAX_PROFILE_CHARS),
                        int_field(a.step, "ack.step", 0, 1 << 62) if a.HasField("step") else None,
                    )
                elif kind == "failure":
                    master.on_failure(node, free_text(msg.failure.reason))
                elif kind == "leaving":
                    await master.on_leaving(
                        node,
                        free_text(msg.leaving.reason),
                        finite_field(msg.leaving.deadline_s, "leaving.deadline_s", 0.0),
                    )
                elif kind == "worker":
                    w = msg.worker
                    master.on_worker_report(
                        node, w.slot, agent_pb2.WorkerState.Name(w.state) if w.state in (0, 1, 2, 3, 4) else "?",
                        w.exit_code, free_text(w.detail),
                    )  # fmt: skip
                elif kind == "hello":
                    raise Invalid("hello", "sent twice in one session")
                else:
                    raise Invalid("body", "empty agent message")
            handle.close()
        except Invalid as exc:
            log.warning("node %d sent a bad message: %s", node.row.node_id, exc)
            handle.close("INVALID_ARGUMENT", str(exc))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the stream broke (peer gone); the session ends
            log.info("node %d session read ended: %s", node.row.node_id, type(exc).__name__)
            handle.close()


def _event_proto(ev) -> admin_pb2.Event:
    return admin_pb2.Event(
        id=ev.id,
        unix_time_s=ev.unix_time_s,
        kind=ev.kind,
        node_id=ev.node_id,
        generation=ev.generation,
        step=ev.step,
        message=ev.message,
        durations_s=ev.durations_s,
        loss=ev.loss,
        samples_per_s=ev.samples_per_s,
    )


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, master: Master) -> None:
        self.master = master

    async def SubmitJob(self, request, context):
        try:
            if not request.job_spec_yaml.strip():
                raise Invalid("job_spec_yaml", "must not be empty")
            if len(request.job_spec_yaml.encode()) > MAX_SPEC_BYTES:
                raise Invalid("job_spec_yaml", f"larger than {MAX_SPEC_BYTES} bytes")
            job_id, generation = await self.master.submit_job(request.job_spec_yaml)
        except Exception as exc:  # Invalid, MasterError; anything else is logged as INTERNAL
            await abort_with(context, exc)
        return admin_pb2.SubmitJobResponse(job_id=job_id, generation=generation)

    async def GetStatus(self, request, context):
        s = self.master.status()
        return admin_pb2.GetStatusResponse(
            job_id=s.job_id,
            state=admin_pb2.JobState.Value("JOB_STATE_" + s.state),
            reason=s.reason,
            generation=s.generation,
            step=s.step,
            total_steps=s.total_steps,
            loss=s.loss if math.isfinite(s.loss) else 0.0,
            samples_per_s=s.samples_per_s,
            nodes_alive=s.nodes_alive,
            nodes_dead=s.nodes_dead,
            spares=s.spares,
            plan=s.plan,
        )

    async def ListNodes(self, request, context):
        try:
            size = int_field(request.page_size, "page_size", 0, MAX_NODES_PAGE) or DEFAULT_NODES_PAGE
            after = int_field(request.after_node_id, "after_node_id", 0, 1 << 62)
        except Invalid as exc:
            await abort_with(context, exc)
        nodes, next_after = self.master.list_nodes(after, size)
        return admin_pb2.ListNodesResponse(
            next_after_node_id=next_after,
            total=len(self.master.nodes),
            nodes=[
                admin_pb2.NodeInfo(
                    node_id=n.node_id,
                    name=n.name,
                    address=n.address,
                    slots=n.slots,
                    state=admin_pb2.NodeState.Value("NODE_STATE_" + n.state.upper()),
                    last_seen_s_ago=n.last_seen_s_ago,
                    reason=n.reason,
                )
                for n in nodes
            ],
        )

    async def WatchEvents(self, request, context):
        try:
            since = int_field(request.since_id, "since_id", 0, 1 << 62)
        except Invalid as exc:
            await abort_with(context, exc)
        q = self.master.watch(include_steps=request.include_steps) if request.follow else None
        try:
            last = since
            for ev in await self.master.events_since(since):
                last = ev.id
                yield _event_proto(ev)
            while q is not None:
                ev = await q.get()
                if ev is None:
                    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "watcher too slow; reconnect with since_id")
                if ev.id == 0:  # a progress event: never stored, so never replayed
                    yield _event_proto(ev)
                elif ev.id > last:
                    last = ev.id
                    yield _event_proto(ev)
        finally:
            if q is not None:
                self.master.unwatch(q)

    async def DrainNode(self, request, context):
        try:
            await self.master.drain_node(int_field(request.node_id, "node_id", 1, 1 << 62))
        except Exception as exc:  # Invalid, MasterError; anything else is logged as INTERNAL
            await abort_with(context, exc)
        return admin_pb2.DrainNodeResponse()

    async def UndrainNode(self, request, context):
        try:
            await self.master.undrain_node(int_field(request.node_id, "node_id", 1, 1 << 62))
        except Exception as exc:  # Invalid, MasterError; anything else is logged as INTERNAL
            await abort_with(context, exc)
        return admin_pb2.UndrainNodeResponse()

    async def KillNode(self, request, context):
        try:
            await self.master.kill_node(int_field(request.node_id, "node_id", 1, 1 << 62))
        except Exception as exc:  # Invalid, MasterError; anything else is logged as INTERNAL
            await abort_with(context, exc)
        return admin_pb2.KillNodeResponse()

    async def CancelJob(self, request, context):
        try:
            await self.master.cancel_job(
                text_field(request.reason, "reason", max_chars=MAX_TEXT_CHARS, allow_empty=True)
            )
        except Exception as exc:  # Invalid, MasterError; anything else is logged as INTERNAL
            await abort_with(context, exc)
        return admin_pb2.CancelJobResponse()


class _StopRequested(Exception):
    pass


class MasterServer:
    """The whole daemon. ``await start()`` binds (port 0 allowed); ``run()`` serves until stop."""

    def __init__(self, config: MasterConfig, *, planner: Any = None) -> None:
        self.config = config
        self.master = Master(config, planner=planner)
        self.grpc_port = 0
        self.http_port = 0
        self._server: grpc.aio.Server | None = None
        self._health: Any = None
        self._http_runner: Any = None
        self._stop = asyncio.Event()
        self._started = False
        self._agent_token: RotatingToken | None = None
        self._admin_token: RotatingToken | None = None
        self._reloads: set[asyncio.Task] = set()

    async def start(self) -> None:
        cfg = self.config
        grace = cfg.token_rotation_grace_s
        self._agent_token = await asyncio.to_thread(RotatingToken, cfg.token_file, grace)
        self._admin_token = await asyncio.to_thread(RotatingToken, cfg.admin_token_file, grace)
        check_distinct_tokens(self._agent_token.current, self._admin_token.current)
        await self.master.open()
        interceptor = TokenAuthInterceptor(
            {f"/{AGENT_SERVICE}/": self._agent_token, f"/{ADMIN_SERVICE}/": self._admin_token},
            on_reject=lambda method, why: self.master.metrics.auth_failures.inc(),
        )
        server = grpc.aio.server(interceptors=[interceptor], options=server_options(cfg.max_message_bytes))
        self._server = server  # stopped by stop(), also when start() fails half-way
        agent_pb2_grpc.add_AgentServiceServicer_to_server(AgentServicer(self.master), server)
        admin_pb2_grpc.add_AdminServiceServicer_to_server(AdminServicer(self.master), server)
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (AGENT_SERVICE, ADMIN_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME),
            server,
        )  # fmt: skip
        tls = ServerTls(cfg.tls_cert_file, cfg.tls_key_file, cfg.tls_client_ca_file) if cfg.tls_enabled else None
        self.grpc_port = add_port(server, cfg.listen, tls=tls, allow_insecure=cfg.allow_insecure)
        await server.start()
        for name in ("", AGENT_SERVICE, ADMIN_SERVICE):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if cfg.http_listen:
            from oobleck.master.http import start_http

            self._http_runner, self.http_port = await start_http(self, cfg.http_listen)
        self._started = True
        if cfg.ready_file:
            ready = {"pid": os.getpid(), "grpc_port": self.grpc_port, "http_port": self.http_port}
            await asyncio.to_thread(write_json, Path(cfg.ready_file), ready)
        log.info("master serving: gRPC port %d, HTTP port %d", self.grpc_port, self.http_port)

    def request_stop(self) -> None:
        self._stop.set()

    def admin_token_accepts(self, given: str | None) -> bool:
        return self._admin_token is not None and self._admin_token.accepts(given)

    def request_token_reload(self) -> None:
        """SIGHUP: re-read both token files (off the event loop)."""
        if self._agent_token is not None:
            task = asyncio.get_running_loop().create_task(self.reload_tokens())
            self._reloads.add(task)
            task.add_done_callback(self._reloads.discard)

    async def reload_tokens(self) -> None:
        """Use the tokens now in the token files; the previous ones stay valid for
        ``token_rotation_grace_s``. A bad file (or the same token for both roles) keeps the
        current tokens and is logged."""
        try:
            agent = await asyncio.to_thread(self._agent_token.peek)
            admin = await asyncio.to_thread(self._admin_token.peek)
            check_distinct_tokens(agent, admin)
        except TokenFileError as exc:
            log.error("tokens not reloaded (the current ones stay in use): %s", exc)
            return
        changed = [name for name, rot, tok in (("agent", self._agent_token, agent), ("admin", self._admin_token, admin))
                   if rot.use(tok)]  # fmt: skip
        grace = self.config.token_rotation_grace_s
        log.warning("tokens reloaded: %s", f"new {' and '.join(changed)} token (the old one is accepted for {grace:g}s)"
                    if changed else "unchanged")  # fmt: skip

    async def _wait_stop(self) -> None:
        await self._stop.wait()
        raise _StopRequested

    async def run(self) -> None:
        """Start, serve until :meth:`request_stop` (or a supervised task fails), then stop."""
        if not self._started:
            try:
                await self.start()
            except BaseException:
                await self._abort_start()
                raise
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.master.detector_loop(), name="detector")
                tg.create_task(self._wait_stop(), name="stop-waiter")
        except* _StopRequested:
            pass
        finally:
            await self.stop()

    async def _abort_start(self) -> None:
        """Release what a failed :meth:`start` had set up (the caller reports why)."""
        if self._http_runner is not None:
            await self._http_runner.cleanup()
        if self._server is not None:
            await self._server.stop(0)
        await self.master.close()

    async def stop(self) -> None:
        """Stop accepting, give running RPCs ``shutdown_grace_s``, then stop. Safe to call twice."""
        if not self._started:
            return
        self._started = False
        log.info("master stopping (grace %.1fs)", self.config.shutdown_grace_s)
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        if self._http_runner is not None:
            await self._http_runner.cleanup()
        if self._server is not None:
            self.master.end_sessions()  # so the grace is not spent waiting on agent streams
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.config.shutdown_grace_s
            while self.master.attached_sessions() and loop.time() < deadline:
                await asyncio.sleep(0.01)  # let the session handlers send their final status
            await self._server.stop(self.config.shutdown_grace_s)
        await self.master.close()
