"""The gRPC edge: servicers (validation, proto <-> dataclass) and the server that hosts them.

:class:`MasterServer` assembles the master: SQLite state, gRPC (agent + admin services, health,
reflection, bearer-token interceptor, TLS), HTTP (metrics, status) and the detector task.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from oobleck.common.auth import RotatingToken, TokenAuthInterceptor, TokenFileError
from oobleck.common.jobspec import MAX_SPEC_BYTES
from oobleck.common.text import escape_control
from oobleck.common.tls import ServerTls, add_port, server_options
from oobleck.master.config import MasterConfig
from oobleck.master.core import Master, MasterError, RegisterInfo
from oobleck.master.membership import RateLimiter, peer_host
from oobleck.protos.v1 import admin_pb2, admin_pb2_grpc, agent_pb2, agent_pb2_grpc

log = logging.getLogger(__name__)

AGENT_SERVICE = agent_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name
ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name
HELLO_TIMEOUT_S = 10.0
MAX_NAME_CHARS = 253
MAX_TEXT_CHARS = 1024
DEFAULT_NODES_PAGE = 1000  # ListNodes without page_size
MAX_NODES_PAGE = 5000
MAX_PROFILE_CHARS = 4 << 20  # an oobleck-profile/1 document in a Profile ack


class _Invalid(Exception):
    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")


def _check_distinct(agent_token: str, admin_token: str) -> None:
    if agent_token == admin_token:
        raise TokenFileError(
            "token_file and admin_token_file hold the same token: every agent could act as an operator; "
            "give each role its own token"
        )


def _text(value: str, field: str, *, max_chars: int = MAX_NAME_CHARS, allow_empty: bool = False) -> str:
    if not value and not allow_empty:
        raise _Invalid(field, "must not be empty")
    if len(value) > max_chars:
        raise _Invalid(field, f"at most {max_chars} characters, got {len(value)}")
    if any(not ch.isprintable() for ch in value):
        raise _Invalid(field, "must not contain control characters")
    return value


def _free_text(value: str, max_chars: int = MAX_TEXT_CHARS) -> str:
    """Free text a node sends (a reason, an error, a detail): control characters escaped (a
    worker's traceback has line breaks; an attacker's may have terminal escapes), cut to size."""
    return escape_control(value, max_chars)


def _json_text(value: str, field: str, max_chars: int) -> str:
    """A JSON document (line breaks allowed; parsed where it is used)."""
    if len(value) > max_chars:
        raise _Invalid(field, f"at most {max_chars} characters, got {len(value)}")
    return value


def _int(value: int, field: str, lo: int, hi: int) -> int:
    if not lo <= value <= hi:
        raise _Invalid(field, f"must be in {lo}..{hi}, got {value}")
    return value


def _finite(value: float, field: str, lo: float = -math.inf) -> float:
    if math.isnan(value) and field.endswith("loss"):
        return value  # a diverging loss is a fact to report, not a bad request
    if not math.isfinite(value) or value < lo:
        raise _Invalid(field, f"must be a finite number >= {lo:g}, got {value!r}")
    return value


def _details(message: str) -> str:
    # Status details travel as UTF-8: escape what cannot be encoded (lone surrogates from input
    # echoed in an error message) rather than failing to send the status at all.
    return message.encode("utf-8", "backslashreplace").decode("utf-8")[:4096]


async def _abort(context: grpc.aio.ServicerContext, exc: Exception) -> None:
    if isinstance(exc, _Invalid):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _details(str(exc)))
    if isinstance(exc, MasterError):
        await context.abort(getattr(grpc.StatusCode, exc.code), _details(exc.message))
    log.exception("internal error", exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}")


def peer_identity(context) -> str:
    """The verified client certificate's identity under mTLS (its subject alternative names, or
    its common name); "" without a client certificate. A node is bound to it at registration."""
    try:
        auth = context.auth_context() or {}
    except Exception:
        return ""
    sans = sorted(v.decode("utf-8", "backslashreplace") for v in auth.get("x509_subject_alternative_name", []))
    if sans:
        return "SAN:" + ",".join(sans)
    cns = [v.decode("utf-8", "backslashreplace") for v in auth.get("x509_common_name", [])]
    return "CN:" + cns[0] if cns else ""


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
                node_name=_text(request.node_name, "node_name"),
                address=_text(request.address, "address"),
                slots=_int(request.slots, "slots", 1, 1024),
                gpu_memory_bytes=_int(request.gpu_memory_bytes, "gpu_memory_bytes", 0, 1 << 50),
                software_version=_text(request.software_version, "software_version", allow_empty=True),
                nonce=_text(request.nonce, "nonce", max_chars=128),
                store_port=_int(request.store_port, "store_port", 0, 65535),
                node_id=_int(request.node_id, "node_id", 0, 1 << 62),
                identity=peer_identity(context),
            )
            if any(ch.isspace() for ch in info.address):
                raise _Invalid("address", "must not contain whitespace")
            res = await self.master.on_register(info)
        except Exception as exc:  # _Invalid, MasterError; anything else is logged as INTERNAL
            await _abort(context, exc)
        return agent_pb2.RegisterResponse(
            node_id=res.node_id,
            lease_s=res.lease_s,
            heartbeat_interval_s=res.heartbeat_interval_s,
            heartbeat_timeout_s=res.heartbeat_timeout_s,
            job_spec_yaml=res.job_spec_yaml,
            generation=res.generation,
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
                raise _Invalid("hello", f"the first message must be hello, got {first.WhichOneof('body')}")
            hello = first.hello
            _int(hello.node_id, "hello.node_id", 1, 1 << 62)
            _text(hello.nonce, "hello.nonce", max_chars=128)
            _int(hello.last_generation, "hello.last_generation", 0, 1 << 62)
            _int(hello.last_command_id, "hello.last_command_id", 0, 1 << 62)
            node = master.session_node(hello.node_id, hello.nonce, peer_identity(context))
        except Exception as exc:  # _Invalid, MasterError; anything else is logged as INTERNAL
            await _abort(context, exc)
        handle = master.attach(node, hello.last_command_id)
        reader = asyncio.get_running_loop().create_task(self._read(node, handle, context))
        try:
            while True:
                item = await handle.queue.get()
                if isinstance(item, agent_pb2.MasterMessage):
                    await context.write(item)
                    continue
                if item.code is not None:
                    await context.abort(getattr(grpc.StatusCode, item.code), _details(item.message))
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
                        _int(s.generation, "step.generation", 0, 1 << 62),
                        _int(s.step, "step.step", 0, 1 << 62),
                        _finite(s.loss, "step.loss"),
                        _finite(s.samples_per_s, "step.samples_per_s", 0.0),
                    )
                elif kind == "ack":
                    a = msg.ack
                    phases = {
                        "regroup": _finite(a.phases.regroup_s, "ack.phases.regroup_s", 0.0),
                        "copy": _finite(a.phases.copy_s, "ack.phases.copy_s", 0.0),
                    }
                    await master.on_ack(
                        node,
                        _int(a.command_id, "ack.command_id", 1, 1 << 62),
                        a.generation,
                        a.ok,
                        _free_text(a.error, MAX_TEXT_CHARS * 4),
                        phases,
                        _json_text(a.profile_json, "ack.profile_json", MAX_PROFILE_CHARS),
                        _int(a.step, "ack.step", 0, 1 << 62) if a.HasField("step") else None,
                    )
                elif kind == "failure":
                    master.on_failure(node, _free_text(msg.failure.reason))
                elif kind == "leaving":
                    await master.on_leaving(
                        node,
                        _free_text(msg.leaving.reason),
                        _finite(msg.leaving.deadline_s, "leaving.deadline_s", 0.0),
                    )
                elif kind == "worker":
                    w = msg.worker
                    master.on_worker_report(
                        node, w.slot, agent_pb2.WorkerState.Name(w.state) if w.state in (0, 1, 2, 3, 4) else "?",
                        w.exit_code, _free_text(w.detail),
                    )  # fmt: skip
                elif kind == "hello":
                    raise _Invalid("hello", "sent twice in one session")
                else:
                    raise _Invalid("body", "empty agent message")
            handle.close()
        except _Invalid as exc:
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
                raise _Invalid("job_spec_yaml", "must not be empty")
            if len(request.job_spec_yaml.encode()) > MAX_SPEC_BYTES:
                raise _Invalid("job_spec_yaml", f"larger than {MAX_SPEC_BYTES} bytes")
            job_id, generation = await self.master.submit_job(request.job_spec_yaml)
        except Exception as exc:  # _Invalid, MasterError; anything else is logged as INTERNAL
            await _abort(context, exc)
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
            size = _int(request.page_size, "page_size", 0, MAX_NODES_PAGE) or DEFAULT_NODES_PAGE
            after = _int(request.after_node_id, "after_node_id", 0, 1 << 62)
        except _Invalid as exc:
            await _abort(context, exc)
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
            since = _int(request.since_id, "since_id", 0, 1 << 62)
        except _Invalid as exc:
            await _abort(context, exc)
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
            await self.master.drain_node(_int(request.node_id, "node_id", 1, 1 << 62))
        except Exception as exc:  # _Invalid, MasterError; anything else is logged as INTERNAL
            await _abort(context, exc)
        return admin_pb2.DrainNodeResponse()

    async def UndrainNode(self, request, context):
        try:
            await self.master.undrain_node(_int(request.node_id, "node_id", 1, 1 << 62))
        except Exception as exc:  # _Invalid, MasterError; anything else is logged as INTERNAL
            await _abort(context, exc)
        return admin_pb2.UndrainNodeResponse()

    async def KillNode(self, request, context):
        try:
            await self.master.kill_node(_int(request.node_id, "node_id", 1, 1 << 62))
        except Exception as exc:  # _Invalid, MasterError; anything else is logged as INTERNAL
            await _abort(context, exc)
        return admin_pb2.KillNodeResponse()

    async def CancelJob(self, request, context):
        try:
            await self.master.cancel_job(_text(request.reason, "reason", max_chars=MAX_TEXT_CHARS, allow_empty=True))
        except Exception as exc:  # _Invalid, MasterError; anything else is logged as INTERNAL
            await _abort(context, exc)
        return admin_pb2.CancelJobResponse()


def write_ready_file(path: str, data: dict[str, Any]) -> None:
    """Write JSON atomically: a temporary file in the same folder, then rename."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


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
        _check_distinct(self._agent_token.current, self._admin_token.current)
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
            await asyncio.to_thread(write_ready_file, cfg.ready_file, ready)
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
            _check_distinct(agent, admin)
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
