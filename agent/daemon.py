"""The agent daemon: registration and session with the master, workers and their channel.

Long-lived tasks under one ``asyncio.TaskGroup`` (the first failure stops the agent):

- master loop: ``Register`` (retried with backoff on ``UNAVAILABLE``), then the ``Session``
  stream (hello, heartbeats, reports, acks out; commands in). A broken stream re-registers with
  the same node id and nonce, so a master restart or a short network break keeps the node.
- command loop: applies commands one at a time, each at most once (command ids are increasing;
  a re-sent command that was already acked gets its ack again; commands of a generation older
  than the newest applied one are refused). Bad commands are nacked, never fatal.
- supervisor: probes workers every ``probe_interval_s`` and decides with the pure
  :func:`~oobleck.agent.supervision.decide_worker`; a failed or hung worker makes the node
  failed (WorkerReport + NodeFailure) and the other workers are stopped.
- shutdown: SIGTERM / SIGINT stop the workers (SIGTERM -> deadline -> SIGKILL) and exit 0;
  a Kill drill SIGKILLs them and exits 1 without acking.

Workers talk to the agent through :mod:`oobleck.agent.channel` on a Unix socket. The agent also
hosts a torch TCPStore for the rendezvous of generations whose plan starts on this node, bound to
the node's ``address`` where it can be (:func:`_create_store`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime
import errno
import ipaddress
import logging
import math
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from oobleck.agent import channel as worker_channel
from oobleck.agent.config import MAX_UNIX_SOCKET_PATH, AgentConfig
from oobleck.agent.processes import kill_processes_now, spawn_worker, stop_processes
from oobleck.agent.profiling import ProfileFailed, run_profiler
from oobleck.agent.supervision import LivenessConfig, Verdict, WorkerProbe, decide_worker, read_proc_state
from oobleck.common.auth import TokenFileError, bearer_metadata, read_token_file
from oobleck.common.files import write_json
from oobleck.common.jobspec import parse_job_spec
from oobleck.common.tls import ClientTls, aio_channel, is_loopback_host, split_host_port
from oobleck.common.validate import ConfigError
from oobleck.common.version import PROTOCOL_VERSION, version
from oobleck.common.worker_link import (
    ENV_AGENT_PID,
    ENV_AGENT_SOCKET,
    ENV_HEARTBEAT_INTERVAL_S,
    ENV_NODE_ID,
    ENV_SLOT,
    ENV_WORK_DIR,
)
from oobleck.protos.v1 import agent_pb2, agent_pb2_grpc, plan_pb2, worker_pb2

log = logging.getLogger(__name__)

SOCKET_NAME = "agent.sock"
DEFAULT_HEARTBEAT_INTERVAL_S = 0.5
INITIAL_BACKOFF_S = 0.05
STABLE_SESSION_S = 5.0  # a session that lasted this long resets the reconnection backoff
MAX_REMEMBERED_ACKS = 1024
MAX_OUTBOX = 10_000  # droppable reports are dropped beyond this many queued messages
STORE_TIMEOUT_S = 300.0
LEAVE_POLL_S = 0.1  # while leaving: how often the agent looks whether its workers are out of the plan
LEAVE_FLUSH_S = 1.0  # ... and how long it waits for its last messages to reach the master
# Register errors that retrying cannot fix: the agent exits (systemd shows why).
FATAL_CODES = frozenset(
    {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT}
)

State = agent_pb2.WorkerState


class CommandError(Exception):
    """A command the agent refuses; the message (naming the field) becomes the nack's error."""


class KillRequested(Exception):
    """The master's Kill drill: exit with status 1 without acking."""


class ShutdownRequested(Exception):
    """SIGTERM / SIGINT."""


class FatalError(Exception):
    """The agent cannot go on (e.g. the master refuses its token)."""


class SessionBroken(Exception):
    """The session stream ended; re-register."""


@dataclass(eq=False)
class Worker:
    slot: int
    proc: subprocess.Popen
    started_at: float
    commands: asyncio.Queue = field(default_factory=asyncio.Queue)
    last_heartbeat_at: float | None = None
    attached: bool = False
    stopping: bool = False  # its exit is expected: not a failure
    exit_reported: bool = False
    ready: bool = False  # reported ready for a generation: its start-up allowance is over


@dataclass
class PendingReconfigure:
    """A Start or Reconfigure command acked once every worker reported ready for its generation
    (an ack means "ready to train", not "spawned")."""

    command_id: int
    generation: int
    waiting: set[int]
    regroup_s: float = 0.0
    copy_s: float = 0.0
    step: int | None = None  # the position the workers are ready at (after any restore)


def _resolve(host: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The distinct IP addresses ``host`` resolves to here, in resolver order."""
    found: list = []
    for *_, sockaddr in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM):
        ip = ipaddress.ip_address(sockaddr[0])
        if ip not in found:
            found.append(ip)
    return found


def store_listen_host(
    address: str, *, master_on_loopback: bool, resolve: Callable[[str], list] = _resolve
) -> tuple[str | None, str]:
    """Where the rendezvous store listens, and why: ``address`` (the host other nodes are told to
    connect to) when it is an IP address, or the one address it resolves to; ``None`` (every
    interface) when that cannot be decided here. Pure but for ``resolve``.

    A name resolving to loopback while the master is elsewhere (``127.0.1.1`` in ``/etc/hosts``)
    is not bound: other nodes resolve it to the node's real address.
    """
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        pass
    else:
        return str(ip), f"address {address} is an IP address"
    try:
        found = resolve(address)
    except (OSError, UnicodeError) as exc:
        return None, f"address {address!r} does not resolve here ({exc})"
    if len(found) != 1:
        shown = ", ".join(str(ip) for ip in found[:4])
        return None, f"address {address!r} resolves to {len(found)} addresses ({shown})"
    ip = found[0]
    if ip.is_loopback and not master_on_loopback:
        return None, f"address {address!r} resolves here to {ip}, a loopback address other nodes cannot reach"
    return str(ip), f"address {address!r} resolves to {ip}"


def _bound_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (an IP address), not yet listening."""
    family, kind, proto, _, sockaddr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a fixed port survives a restart
        sock.bind(sockaddr)
    except BaseException:
        sock.close()
        raise
    return sock


def _create_store(address: str, port: int, *, master_on_loopback: bool) -> tuple[object, int, str]:
    """The rendezvous TCPStore server: (store, its port, where it listens). torch is imported here,
    off the event loop.

    torch's store has no authentication, and its server listens on every interface unless it is
    handed a socket already bound (``master_listen_fd``, libuv server): the agent binds one to
    ``address`` (see :func:`store_listen_host`), so the store is not reachable on the node's
    other addresses. When no single address can be chosen, or ``address`` is not one of this
    host's (behind NAT), it listens everywhere as before, with a warning naming the reason.
    What still reaches it is covered by the generation's secret (see ``Endpoint.secret``)."""
    from torch.distributed import TCPStore

    timeout = datetime.timedelta(seconds=STORE_TIMEOUT_S)
    host, why = store_listen_host(address, master_on_loopback=master_on_loopback)
    sock = None
    if host is not None:
        try:
            sock = _bound_socket(host, port)
        except OSError as exc:
            if exc.errno != errno.EADDRNOTAVAIL:
                raise
            host, why = None, f"address {address!r} is not an address of this host ({exc.strerror})"
    if sock is None:
        log.warning(
            "rendezvous store: listening on all interfaces because %s; set address to this node's cluster IP "
            "to listen only there",
            why,
        )
        store = TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False, timeout=timeout)
        return store, int(store.port), "all interfaces"
    try:
        store = TCPStore(
            host,
            sock.getsockname()[1],
            is_master=True,
            wait_for_workers=False,
            timeout=timeout,
            master_listen_fd=sock.fileno(),
            use_libuv=True,
        )
    except BaseException:
        sock.close()
        raise
    sock.detach()  # the store's server owns the descriptor now and closes it with the store
    return store, int(store.port), host


def parse_gpu_memory_mib(text: str) -> int:
    """Smallest GPU memory in bytes from ``nvidia-smi --query-gpu=memory.total
    --format=csv,noheader,nounits`` output (MiB per line); 0 when there is none."""
    sizes = [int(line.strip()) for line in text.splitlines() if line.strip().isdigit()]
    return min(sizes) * 2**20 if sizes else 0


def _gpu_memory_bytes() -> int:
    """Per-GPU memory, asked of nvidia-smi: the agent must not create a CUDA context itself
    (it would hold memory on the workers' GPU)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return 0
    try:
        out = subprocess.run(
            [smi, "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("nvidia-smi failed (%s): reporting 0 GPU memory", exc)
        return 0
    return parse_gpu_memory_mib(out)


class Agent:
    """One node's agent. ``await Agent(config, token).run()`` returns the exit status."""

    def __init__(self, config: AgentConfig, token: str) -> None:
        self.config = config
        self._metadata = bearer_metadata(token)
        self.nonce = secrets.token_hex(16)
        self.node_id = 0
        self.store_port = 0
        self._gpu_memory_bytes = 0
        self._store = None
        self._heartbeat_interval_s = DEFAULT_HEARTBEAT_INTERVAL_S
        self._job_spec_yaml = ""
        self._last_command_id = 0
        self._last_generation = 0
        self._acks: collections.OrderedDict[int, agent_pb2.CommandAck] = collections.OrderedDict()
        self._outbox: asyncio.Queue[agent_pb2.AgentMessage] = asyncio.Queue()
        self._unsent: collections.deque[agent_pb2.AgentMessage] = collections.deque()
        self._connected = False
        self._heartbeat_seq = 0
        self._commands: asyncio.Queue[agent_pb2.Command] = asyncio.Queue()
        self._workers: dict[int, Worker] = {}
        self._workers_lock = asyncio.Lock()
        self._pending: PendingReconfigure | None = None
        self._failed_reason = ""
        self._liveness = LivenessConfig(config.liveness_timeout_s, config.startup_timeout_s)
        self.work_dir = Path()
        self.socket_path = Path()
        self._owned_dirs: list[Path] = []
        self._stop_requested: asyncio.Event | None = None
        self._leaving = False  # SIGTERM received: no new start is accepted
        self._last_step: agent_pb2.StepReport | None = None  # re-sent at every (re)attach
        self._background: set[asyncio.Task] = set()

    # -- top level -------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._stop_requested = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop_requested.set)
        loop.add_signal_handler(signal.SIGHUP, self._request_token_reload)
        status = 0
        killed = False
        server = None
        channel = None
        try:
            await asyncio.to_thread(self._prepare_dirs)
            server = await worker_channel.start_server(self, str(self.socket_path))
            master_host, _ = split_host_port(self.config.master)
            try:
                self._store, self.store_port, where = await asyncio.to_thread(
                    _create_store,
                    self.config.address,
                    self.config.store_port,
                    master_on_loopback=is_loopback_host(master_host),
                )
            except (OSError, RuntimeError) as exc:  # torch's DistNetworkError is a RuntimeError
                log.error("rendezvous store: cannot listen on port %d: %s", self.config.store_port, exc)
                return 1
            self._gpu_memory_bytes = await asyncio.to_thread(_gpu_memory_bytes)
            log.info("rendezvous store listening on %s, port %d", where, self.store_port)
            tls = None
            if self.config.tls:
                tls = ClientTls(self.config.tls_ca_file, self.config.tls_cert_file, self.config.tls_key_file)
            # The token goes as explicit per-call metadata rather than through the channel's
            # interceptor: grpc.aio files a multi-kind client interceptor under unary-unary only,
            # and intercepted streams leave pending tasks behind when cancelled.
            channel = aio_channel(self.config.master, token=None, tls=tls, allow_insecure=self.config.allow_insecure)
            try:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(self._master_loop(agent_pb2_grpc.AgentServiceStub(channel)), name="master")
                    tg.create_task(self._command_loop(), name="commands")
                    tg.create_task(self._supervise_loop(), name="supervisor")
                    tg.create_task(self._wait_for_stop(), name="signals")
            except* ShutdownRequested:
                log.info("shutting down (signal)")
            except* KillRequested:
                log.warning("kill drill: workers killed, exiting with status 1")
                status, killed = 1, True
            except* FatalError as group:
                log.error("%s", group.exceptions[0])
                status = 1
        finally:
            await self._stop_workers("agent shutting down", kill_now=killed)
            if server is not None:
                await server.stop(grace=0.2)
            if channel is not None:
                await channel.close()
            self._store = None
            await asyncio.to_thread(self._cleanup_dirs)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
        return status

    def _request_token_reload(self) -> None:
        """SIGHUP: re-read the token file (off the event loop); later calls use the new token (the
        master accepts the old one for its rotation grace period)."""
        self._run_in_background(self._reload_token())

    async def _reload_token(self) -> None:
        try:
            token = await asyncio.to_thread(read_token_file, self.config.token_file)
        except TokenFileError as exc:
            log.error("token not reloaded (the current one stays in use): %s", exc)
            return
        changed = bearer_metadata(token) != self._metadata
        self._metadata = bearer_metadata(token)
        log.warning("token file re-read: %s", "a new token" if changed else "unchanged")

    def emergency_cleanup(self) -> None:
        """Synchronous last resort (the event loop died): SIGKILL every worker."""
        kill_processes_now([w.proc for w in self._workers.values()])

    async def _wait_for_stop(self) -> None:
        """The first SIGTERM / SIGINT while this node trains is a pre-emption or maintenance
        notice: the agent tells the master it is leaving (the master drains it at a step
        boundary, so no step is lost) and exits once its workers are out of the plan, or after
        ``leave_timeout_s``. A second signal, or a node without workers, exits at once."""
        assert self._stop_requested is not None
        await self._stop_requested.wait()
        self._stop_requested.clear()
        if self._training() and self.config.leave_timeout_s > 0:
            self._leaving = True
            wait_s = self.config.leave_timeout_s
            log.warning(
                "node %d: SIGTERM: leaving; asking the master to drain this node (up to %gs)", self.node_id, wait_s
            )
            notice = agent_pb2.Leaving(reason="agent received SIGTERM (pre-emption or maintenance)", deadline_s=wait_s)
            self._send(agent_pb2.AgentMessage(leaving=notice))
            deadline = time.monotonic() + wait_s
            # Until the master's drain (or a plan without this node) has stopped the workers.
            while self._workers and not self._stop_requested.is_set() and time.monotonic() < deadline:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop_requested.wait(), LEAVE_POLL_S)
            if self._workers:
                log.warning("node %d: not drained within %gs: stopping the workers", self.node_id, wait_s)
            else:
                log.info("node %d: drained: leaving", self.node_id)
                await self._flush(LEAVE_FLUSH_S)  # the drain's ack
        raise ShutdownRequested()

    async def _flush(self, timeout_s: float) -> None:
        """Wait (briefly) until every queued message has been written to the master."""
        deadline = time.monotonic() + timeout_s
        while (self._unsent or not self._outbox.empty()) and self._connected and time.monotonic() < deadline:
            await asyncio.sleep(LEAVE_POLL_S / 5)

    def _training(self) -> bool:
        """Some worker of this node runs (is not being stopped)."""
        return any(not w.stopping for w in self._workers.values())

    def _prepare_dirs(self) -> None:
        if self.config.work_dir:
            self.work_dir = Path(self.config.work_dir).resolve()
            self.work_dir.mkdir(parents=True, exist_ok=True)
        else:
            self.work_dir = Path(tempfile.mkdtemp(prefix="oobleck-agent-"))
            self._owned_dirs.append(self.work_dir)
        self.socket_path = self.work_dir / SOCKET_NAME
        if len(str(self.socket_path)) > MAX_UNIX_SOCKET_PATH:
            short = Path(tempfile.mkdtemp(prefix="oobleck-agent-sock-"))
            self._owned_dirs.append(short)
            self.socket_path = short / SOCKET_NAME
        self.socket_path.unlink(missing_ok=True)

    def _cleanup_dirs(self) -> None:
        self.socket_path.unlink(missing_ok=True)
        for path in self._owned_dirs:
            shutil.rmtree(path, ignore_errors=True)

    # -- master side -----------------------------------------------------------------------

    def _register_request(self) -> agent_pb2.RegisterRequest:
        return agent_pb2.RegisterRequest(
            node_name=self.config.node_name,
            address=self.config.address,
            slots=self.config.slots,
            gpu_memory_bytes=self._gpu_memory_bytes,
            software_version=version(),
            nonce=self.nonce,
            store_port=self.store_port,
            node_id=self.node_id,
            protocol_version=PROTOCOL_VERSION,
        )

    async def _master_loop(self, stub: agent_pb2_grpc.AgentServiceStub) -> None:
        backoff = INITIAL_BACKOFF_S
        while True:
            try:
                response = await stub.Register(
                    self._register_request(), timeout=self.config.rpc_timeout_s, metadata=self._metadata
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() in FATAL_CODES:
                    raise FatalError(f"master refused registration: {exc.code().name}: {exc.details()}") from None
                log.warning("register with %s failed (%s); retrying", self.config.master, exc.code().name)
                await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
                backoff = min(backoff * 2, self.config.reconnect_max_backoff_s)
                continue
            await self._on_registered(response)
            started = time.monotonic()
            retry_now = False
            try:
                await self._session(stub)
            except SessionBroken as exc:
                log.warning("node %d: session broken (%s); re-registering", self.node_id, exc)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                    raise FatalError(f"master refused the session: {exc.details()}") from None
                retry_now = exc.code() == grpc.StatusCode.FAILED_PRECONDITION
                log.warning("node %d: session ended: %s: %s", self.node_id, exc.code().name, exc.details())
            if time.monotonic() - started > STABLE_SESSION_S:
                backoff = INITIAL_BACKOFF_S
            if not retry_now:
                await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
                backoff = min(backoff * 2, self.config.reconnect_max_backoff_s)

    async def _on_registered(self, response: agent_pb2.RegisterResponse) -> None:
        if response.software_version and response.software_version != version():
            log.warning(
                "master runs %s (protocol %d), this agent %s (protocol %d)",
                response.software_version, response.protocol_version, version(), PROTOCOL_VERSION,
            )  # fmt: skip
        if self.node_id and response.node_id != self.node_id and self._leaving:
            # Declared dead while leaving: this node is going away, it does not join again.
            raise ShutdownRequested()
        if self.node_id and response.node_id != self.node_id:
            # The master declared this node dead or lost its state: a new node to it, whose
            # command ids and generations start afresh. Messages still queued belong to the old
            # node (a NodeFailure would fail the new one): dropped. The old workers are stopped
            # in the background: stopping may take up to stop_timeout_s (a node failure may be
            # stopping them already, holding the workers lock), and the new node must open its
            # session and heartbeat at once or the master declares it dead too.
            log.warning("master gave node id %d (was %d): joining as a spare", response.node_id, self.node_id)
            self._drop_queued_messages()
            self._pending = None
            self._last_step = None
            old = list(self._workers.values())
            self._run_in_background(
                self._stop_workers(f"node id changed from {self.node_id} to {response.node_id}", only=old)
            )
            self._last_command_id = 0
            self._last_generation = 0
            self._acks.clear()
        first = self.node_id == 0
        self.node_id = response.node_id
        interval = response.heartbeat_interval_s
        self._heartbeat_interval_s = interval if math.isfinite(interval) and 0 < interval <= 60 else 0.5
        if response.job_spec_yaml:
            self._job_spec_yaml = response.job_spec_yaml
        log.info(
            "node %d (%s) %s with %s; heartbeat every %.2fs; master generation %d",
            self.node_id,
            self.config.node_name,
            "registered" if first else "re-registered",
            self.config.master,
            self._heartbeat_interval_s,
            response.generation,
        )
        if self.config.ready_file:
            info = {"pid": os.getpid(), "node_id": self.node_id, "store_port": self.store_port}
            await asyncio.to_thread(write_json, Path(self.config.ready_file), info)

    async def _session(self, stub: agent_pb2_grpc.AgentServiceStub) -> None:
        call = stub.Session(metadata=self._metadata)
        try:
            hello = agent_pb2.SessionHello(
                node_id=self.node_id,
                nonce=self.nonce,
                last_generation=self._last_generation,
                last_command_id=self._last_command_id,
            )
            await call.write(agent_pb2.AgentMessage(hello=hello))
            if self._last_step is not None:
                await call.write(agent_pb2.AgentMessage(step=self._last_step))
            self._connected = True
            try:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(self._session_reader(call))
                    tg.create_task(self._session_writer(call))
                    tg.create_task(self._heartbeats())
            except* (SessionBroken, grpc.aio.AioRpcError) as group:
                raise group.exceptions[0] from None
        finally:
            self._connected = False
            call.cancel()

    async def _session_reader(self, call) -> None:
        while True:
            message = await call.read()
            if message is grpc.aio.EOF:
                raise SessionBroken("the master closed the session")
            body = message.WhichOneof("body")
            if body == "command":
                self._commands.put_nowait(message.command)
            elif body == "terms":
                interval = message.terms.interval_s
                if math.isfinite(interval) and 0 < interval <= 60:
                    log.info("node %d: heartbeat every %.2fs from now on", self.node_id, interval)
                    self._heartbeat_interval_s = interval
            else:
                log.warning("ignored a master message with an unknown body")

    async def _session_writer(self, call) -> None:
        while True:
            message = self._unsent.popleft() if self._unsent else await self._outbox.get()
            try:
                await call.write(message)
            except BaseException as exc:
                if message.WhichOneof("body") != "heartbeat":
                    self._unsent.appendleft(message)  # sent again on the next session
                if isinstance(exc, Exception):
                    raise SessionBroken(f"write failed: {exc!r}") from None
                raise

    async def _heartbeats(self) -> None:
        while True:
            self._heartbeat_seq += 1
            self._outbox.put_nowait(agent_pb2.AgentMessage(heartbeat=agent_pb2.Heartbeat(seq=self._heartbeat_seq)))
            await asyncio.sleep(self._heartbeat_interval_s)

    def _send(self, message: agent_pb2.AgentMessage, *, droppable: bool = False) -> None:
        if droppable and (not self._connected or self._outbox.qsize() >= MAX_OUTBOX):
            return
        self._outbox.put_nowait(message)

    def _ack(
        self,
        command_id: int,
        generation: int,
        *,
        error: str = "",
        phases=None,
        profile_json: str = "",
        step: int | None = None,
    ) -> None:
        ack = agent_pb2.CommandAck(
            command_id=command_id,
            generation=generation,
            ok=not error,
            error=error,
            profile_json=profile_json,
            step=step,
        )
        if phases is not None:
            ack.phases.CopyFrom(phases)
        if error:
            log.warning("node %d: command %d (generation %d) refused: %s", self.node_id, command_id, generation, error)
        self._acks[command_id] = ack
        while len(self._acks) > MAX_REMEMBERED_ACKS:
            self._acks.popitem(last=False)
        self._send(agent_pb2.AgentMessage(ack=ack))

    def _report_worker(self, worker: Worker, state: int, *, exit_code: int = 0, detail: str = "") -> None:
        report = agent_pb2.WorkerReport(
            slot=worker.slot, pid=worker.proc.pid, state=state, exit_code=exit_code, detail=detail
        )
        self._send(agent_pb2.AgentMessage(worker=report))

    # -- commands --------------------------------------------------------------------------

    async def _command_loop(self) -> None:
        while True:
            command = await self._commands.get()
            await self._handle_command(command)

    async def _handle_command(self, command: agent_pb2.Command) -> None:
        cid, generation = command.command_id, command.generation
        body = command.WhichOneof("body")
        if cid <= 0:  # cannot be acked (an ack names a positive command id): dropped
            log.warning("node %d: ignored a command with command_id %d (must be > 0)", self.node_id, cid)
            return
        if cid <= self._last_command_id:
            previous = self._acks.get(cid)
            if previous is not None:
                log.info("node %d: command %d delivered again: repeating its ack", self.node_id, cid)
                self._send(agent_pb2.AgentMessage(ack=previous))
            else:
                log.info("node %d: command %d already being applied: ignored", self.node_id, cid)
            return
        self._last_command_id = cid
        if body is None:
            self._ack(cid, generation, error="body: empty or unknown command (this agent is " + version() + ")")
            return
        if generation < self._last_generation:
            self._ack(cid, generation, error=f"generation: {generation} is older than {self._last_generation}: ignored")
            return
        log.info("node %d: command %d: %s for generation %d", self.node_id, cid, body, generation)
        try:
            if body == "start":
                await self._apply_start(cid, generation, command.start)
            elif body == "reconfigure":
                await self._apply_reconfigure(cid, generation, command.reconfigure)
            elif body in ("stop", "drain"):
                reason = getattr(command, body).reason or body
                await self._stop_workers(f"{body}: {reason}", polite=True)
                self._last_generation = max(self._last_generation, generation)
                self._ack(cid, generation)
            elif body == "profile":
                await self._apply_profile(cid, generation, command.profile)
            elif body == "kill":
                log.warning("node %d: kill drill (%s): SIGKILL workers", self.node_id, command.kill.reason)
                await self._stop_workers(f"kill: {command.kill.reason}", kill_now=True)
                raise KillRequested()
        except CommandError as exc:
            self._ack(cid, generation, error=str(exc))
        except (KillRequested, asyncio.CancelledError):
            raise
        except Exception as exc:  # a bad command must never take the agent down
            log.exception("node %d: command %d failed", self.node_id, cid)
            self._ack(cid, generation, error=f"internal error: {exc!r}")

    async def _apply_profile(self, cid: int, generation: int, profile: agent_pb2.Profile) -> None:
        try:
            parse_job_spec(profile.job_spec_yaml)
        except ConfigError as exc:
            raise CommandError(f"profile.job_spec_yaml: {exc}") from None
        try:
            text = await run_profiler(
                profile.job_spec_yaml, self.work_dir, self.config.profile_timeout_s, tag=f"profile-{cid}"
            )
        except ProfileFailed as exc:
            raise CommandError(f"profile: {exc}") from None
        self._ack(cid, generation, profile_json=text)

    def _check_plan(self, where: str, generation: int, plan: plan_pb2.Plan, present: bool) -> list[int] | None:
        """Validate ``plan``; return this node's ranks, or None when the node is not in it."""
        if not present:
            raise CommandError(f"{where}.plan: missing")
        if plan.generation not in (0, generation):
            raise CommandError(
                f"{where}.plan.generation: {plan.generation} differs from the command's generation {generation}"
            )
        if plan.world_size < 1:
            raise CommandError(f"{where}.plan.world_size: must be >= 1, got {plan.world_size}")
        seen: set[int] = set()
        mine = None
        for entry in plan.ranks:
            if entry.node_id in seen:
                raise CommandError(f"{where}.plan.ranks: node {entry.node_id} listed twice")
            seen.add(entry.node_id)
            for rank in entry.ranks:
                if not 0 <= rank < plan.world_size:
                    raise CommandError(
                        f"{where}.plan.ranks: rank {rank} of node {entry.node_id} outside 0..{plan.world_size - 1}"
                    )
            if entry.node_id == self.node_id:
                mine = list(entry.ranks)
        if not plan.rendezvous.host or not 0 < plan.rendezvous.port < 65536:
            raise CommandError(
                f"{where}.plan.rendezvous: needs a host and a port in 1..65535, "
                f"got {plan.rendezvous.host!r}:{plan.rendezvous.port}"
            )
        if mine is not None and len(mine) != self.config.slots:
            raise CommandError(
                f"{where}.plan.ranks: node {self.node_id} has {len(mine)} ranks but {self.config.slots} slots"
            )
        return mine

    async def _apply_start(self, cid: int, generation: int, start: agent_pb2.Start) -> None:
        if self._leaving:
            raise CommandError("start: this node is leaving (its agent received SIGTERM)")
        mine = self._check_plan("start", generation, start.plan, start.HasField("plan"))
        if mine is None:
            raise CommandError(f"start.plan.ranks: node {self.node_id} is not in the plan")
        spec_yaml = start.job_spec_yaml or self._job_spec_yaml
        if not spec_yaml:
            raise CommandError("start.job_spec_yaml: empty and no job spec came with registration")
        try:
            parse_job_spec(spec_yaml)
        except ConfigError as exc:
            raise CommandError(f"start.job_spec_yaml: {exc}") from None
        self._job_spec_yaml = spec_yaml
        first = worker_pb2.WorkerCommand(
            generation=generation,
            start=worker_pb2.WorkerStart(plan=start.plan, job_spec_yaml=spec_yaml, node_id=self.node_id),
        )
        async with self._workers_lock:
            await self._stop_workers_locked("replaced by a new start", kill_now=False)
            self._failed_reason = ""
            self._last_generation = generation
            try:
                for slot in range(self.config.slots):
                    self._spawn(slot, first)
            except OSError as exc:
                await self._stop_workers_locked("start failed", kill_now=True)
                raise CommandError(f"worker_command: cannot start {self.config.worker_argv[0]!r}: {exc}") from None
            # Acked when every worker reports ready (joined, layers copied or restored).
            self._pending = PendingReconfigure(cid, generation, waiting=set(self._workers))
        log.info("node %d: generation %d: started %d workers (ranks %s)", self.node_id, generation, len(mine), mine)

    def _spawn(self, slot: int, first: worker_pb2.WorkerCommand) -> None:
        env = dict(os.environ)
        env.update(
            {
                ENV_AGENT_SOCKET: str(self.socket_path),
                ENV_AGENT_PID: str(os.getpid()),
                ENV_NODE_ID: str(self.node_id),
                ENV_SLOT: str(slot),
                ENV_WORK_DIR: str(self.work_dir),
                ENV_HEARTBEAT_INTERVAL_S: f"{self.config.worker_heartbeat_interval_s:g}",
            }
        )
        proc = spawn_worker(self.config.worker_argv, env)
        worker = Worker(slot=slot, proc=proc, started_at=time.monotonic())
        worker.commands.put_nowait(first)
        self._workers[slot] = worker
        log.info("node %d: slot %d: worker pid %d spawned", self.node_id, slot, proc.pid)
        self._report_worker(worker, State.WORKER_STATE_STARTING)

    async def _apply_reconfigure(self, cid: int, generation: int, reconfigure: agent_pb2.Reconfigure) -> None:
        plan = reconfigure.plan
        mine = self._check_plan("reconfigure", generation, plan, reconfigure.HasField("plan"))
        if mine is None:
            await self._stop_workers(f"not in the plan of generation {generation}: spare", polite=True)
            self._last_generation = generation
            self._ack(cid, generation)
            return
        live = [w for w in self._workers.values() if not w.stopping]
        if len(live) != self.config.slots:
            why = self._failed_reason or "no workers were started"
            raise CommandError(f"reconfigure: {len(live)} of {self.config.slots} workers running ({why})")
        if self._pending is not None:
            log.info("node %d: generation %d supersedes %d", self.node_id, generation, self._pending.generation)
        self._last_generation = generation
        self._pending = PendingReconfigure(cid, generation, waiting={w.slot for w in live})
        message = worker_pb2.WorkerCommand(generation=generation, reconfigure=worker_pb2.WorkerReconfigure(plan=plan))
        for worker in live:
            worker.commands.put_nowait(message)

    # -- workers ---------------------------------------------------------------------------

    async def _stop_workers(
        self, reason: str, *, kill_now: bool = False, only: list[Worker] | None = None, polite: bool = False
    ) -> None:
        async with self._workers_lock:
            await self._stop_workers_locked(reason, kill_now=kill_now, only=only, polite=polite)

    async def _stop_workers_locked(
        self, reason: str, *, kill_now: bool, only: list[Worker] | None = None, polite: bool = False
    ) -> None:
        """Stop every worker, or those of ``only`` that are still this agent's workers. ``polite``
        (the master's Stop or Drain, or a plan without this node): the workers get
        ``stop_grace_s`` to act on the stop command and exit 0 before SIGTERM."""
        workers = list(self._workers.values())
        if only is not None:
            workers = [w for w in workers if w in only]
        else:
            self._pending = None
        if not workers:
            return
        log.info("node %d: stopping %d workers (%s)", self.node_id, len(workers), reason)
        stop = worker_pb2.WorkerCommand(generation=self._last_generation, stop=worker_pb2.WorkerStop(reason=reason))
        for worker in workers:
            if not worker.stopping:
                worker.stopping = True
                worker.commands.put_nowait(stop)
        grace_s = self.config.stop_grace_s if polite else 0.0
        await stop_processes([w.proc for w in workers], self.config.stop_timeout_s, kill_now=kill_now, grace_s=grace_s)
        for worker in workers:
            if not worker.exit_reported:
                worker.exit_reported = True
                self._report_worker(
                    worker, State.WORKER_STATE_EXITED, exit_code=worker.proc.returncode or 0, detail=reason
                )
            if self._workers.get(worker.slot) is worker:
                del self._workers[worker.slot]

    async def _supervise_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.probe_interval_s)
            now = time.monotonic()
            for worker in list(self._workers.values()):
                if worker.stopping:
                    continue
                exit_code = worker.proc.poll()
                # /proc is a pseudo file system (no disk I/O): read on the loop.
                proc_state = read_proc_state(worker.proc.pid) if exit_code is None else None
                probe = WorkerProbe(worker.started_at, worker.last_heartbeat_at, exit_code, proc_state, worker.ready)
                verdict, reason = decide_worker(now, probe, self._liveness)
                if verdict is Verdict.FINISHED:
                    worker.stopping = True
                    worker.exit_reported = True
                    log.info("node %d: slot %d: worker finished", self.node_id, worker.slot)
                    self._report_worker(worker, State.WORKER_STATE_EXITED, exit_code=0, detail=reason)
                elif verdict in (Verdict.EXITED, Verdict.HUNG):
                    await self._node_failure(worker, verdict, reason)
                    break

    async def _node_failure(self, worker: Worker, verdict: Verdict, reason: str) -> None:
        async with self._workers_lock:
            if self._workers.get(worker.slot) is not worker or worker.stopping:
                return  # replaced or stopped meanwhile
            detail = f"slot {worker.slot} (pid {worker.proc.pid}): {reason}"
            log.error("node %d: generation %d: node failed: %s", self.node_id, self._last_generation, detail)
            state = State.WORKER_STATE_HUNG if verdict is Verdict.HUNG else State.WORKER_STATE_EXITED
            worker.exit_reported = verdict is Verdict.EXITED
            self._report_worker(worker, state, exit_code=worker.proc.returncode or 0, detail=reason)
            self._send(agent_pb2.AgentMessage(failure=agent_pb2.NodeFailure(reason=detail)))
            self._failed_reason = detail
            pending, self._pending = self._pending, None
            if pending is not None:  # the start or reconfiguration cannot complete on this node
                self._ack(pending.command_id, pending.generation, error=f"node failed: {detail}")
            await self._stop_workers_locked(f"node failure: {detail}", kill_now=False)

    # -- worker channel callbacks (called by oobleck.agent.channel) ------------------------

    def worker_for_attach(self, slot: int, pid: int) -> Worker:
        worker = self._workers.get(slot)
        if worker is None or worker.stopping:
            raise LookupError(f"slot {slot}: no worker of this agent expects to attach")
        if worker.attached:
            raise LookupError(f"slot {slot}: a worker is already attached")
        if pid != worker.proc.pid:
            log.warning("slot %d: attach from pid %d, spawned pid %d (a wrapper?)", slot, pid, worker.proc.pid)
        worker.attached = True
        worker.last_heartbeat_at = time.monotonic()
        log.info("node %d: slot %d: worker pid %d attached", self.node_id, slot, worker.proc.pid)
        self._report_worker(worker, State.WORKER_STATE_RUNNING)
        return worker

    def _live_worker(self, slot: int) -> Worker | None:
        worker = self._workers.get(slot)
        if worker is None or worker.stopping:
            return None
        worker.last_heartbeat_at = time.monotonic()  # any call proves the process runs
        return worker

    def on_worker_heartbeat(self, slot: int) -> None:
        self._live_worker(slot)

    def on_worker_step(self, request: worker_pb2.ReportStepRequest) -> None:
        if self._live_worker(request.slot) is None:
            return
        live = [s for s, w in self._workers.items() if not w.stopping]
        if request.slot != min(live):
            return
        step = agent_pb2.StepReport(
            generation=request.generation,
            step=request.step,
            loss=request.loss,
            samples_per_s=request.samples_per_s,
            samples=request.samples,
        )
        # Reports are dropped while the master is unreachable, but the latest one is kept and
        # sent again at the next session: a job that finished while the master was down is
        # completed from it.
        self._last_step = step
        self._send(agent_pb2.AgentMessage(step=step), droppable=True)

    def on_worker_ready(self, request: worker_pb2.ReportReadyRequest) -> None:
        worker = self._live_worker(request.slot)
        if worker is None:
            return
        worker.ready = True
        log.info(
            "node %d: slot %d: ready for generation %d (regroup %.3fs, copy %.3fs)",
            self.node_id,
            request.slot,
            request.generation,
            request.regroup_s,
            request.copy_s,
        )
        pending = self._pending
        if pending is None or request.generation != pending.generation or request.slot not in pending.waiting:
            return
        pending.waiting.discard(request.slot)
        pending.regroup_s = max(pending.regroup_s, request.regroup_s)
        pending.copy_s = max(pending.copy_s, request.copy_s)
        if request.HasField("step"):
            pending.step = request.step if pending.step is None else max(pending.step, request.step)
        if not pending.waiting:
            self._pending = None
            phases = agent_pb2.PhaseTimes(regroup_s=pending.regroup_s, copy_s=pending.copy_s)
            self._ack(pending.command_id, pending.generation, phases=phases, step=pending.step)

    def on_worker_error(self, request: worker_pb2.ReportErrorRequest) -> None:
        worker = self._live_worker(request.slot)
        if worker is None:
            return
        log.error(
            "node %d: slot %d: generation %d: worker error%s: %s",
            self.node_id,
            request.slot,
            request.generation,
            " (fatal)" if request.fatal else "",
            request.message,
        )
        if not request.fatal:
            self._report_worker(worker, State.WORKER_STATE_RUNNING, detail=request.message)
            return
        pending = self._pending
        if pending is not None and pending.generation == request.generation:
            self._pending = None
            self._ack(pending.command_id, pending.generation, error=f"slot {request.slot}: {request.message}")
        self._run_in_background(self._node_failure(worker, Verdict.EXITED, f"worker error: {request.message}"))

    def _run_in_background(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)  # keep a reference until it is done
        task.add_done_callback(self._background.discard)

    def _drop_queued_messages(self) -> None:
        """Forget every message not yet sent to the master (they were the old node's)."""
        self._unsent.clear()
        while not self._outbox.empty():
            self._outbox.get_nowait()
