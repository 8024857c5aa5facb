"""A worker's link to the agent of its node (gRPC ``WorkerService`` over a Unix socket).

Typical use in a worker's entry point::

    link = AgentLink.from_env()          # reads OOBLECK_AGENT_SOCKET, OOBLECK_SLOT, ...
    link.attach()                        # heartbeat side thread + command reader thread
    try:
        cmd = link.next_command()        # WorkerCommand(kind="start", plan=..., job_spec_yaml=...)
        ...                              # build process groups for cmd.generation
        link.report_ready(cmd.generation, regroup_s=..., copy_s=...)
        while training:
            cmd = link.poll_command()    # None, or a "reconfigure" / "stop" command
            ...
            link.report_step(generation, step, loss=..., samples_per_s=..., samples=...)
    finally:
        link.close()

The heartbeat runs on its own thread, so a worker blocked in a collective stays alive in the
agent's eyes; a stopped or wedged process does not. When the command stream ends or fails
before the worker was told to stop (the agent died), the link calls ``on_agent_lost``, which by
default exits the whole process at once with :data:`AGENT_LOST_EXIT_CODE` (the main thread may
be blocked in a collective and could not react). The agent spawns workers with
``PR_SET_PDEATHSIG`` = SIGKILL (``setpriv``), and :meth:`AgentLink.attach` sets it again.

Plans are delivered as ``oobleck.protos.v1.plan_pb2.Plan`` messages, as the master sent them;
the worker loop takes its commands through :class:`oobleck.worker.commands.Inbox`, which converts
them to dataclasses. The names shared with the agent (environment, command kinds) are in
:mod:`oobleck.common.worker_link`. This module imports no torch.
"""

from __future__ import annotations

import ctypes
import logging
import os
import queue
import signal
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import grpc

from oobleck.common.worker_link import (
    AGENT_LOST_EXIT_CODE,
    ENV_AGENT_PID,
    ENV_AGENT_SOCKET,
    ENV_HEARTBEAT_INTERVAL_S,
    ENV_NODE_ID,
    ENV_SLOT,
    ENV_WORK_DIR,
    MAX_MESSAGE_BYTES,
    RECONFIGURE,
    START,
    STOP,
)
from oobleck.protos.v1 import plan_pb2, worker_pb2, worker_pb2_grpc

__all__ = [
    "AGENT_LOST_EXIT_CODE",
    "ENV_AGENT_PID",
    "ENV_AGENT_SOCKET",
    "ENV_HEARTBEAT_INTERVAL_S",
    "ENV_NODE_ID",
    "ENV_SLOT",
    "ENV_WORK_DIR",
    "MAX_MESSAGE_BYTES",
    "RECONFIGURE",
    "START",
    "STOP",
    "AgentLink",
    "AgentLinkError",
    "WorkerCommand",
    "command_from_proto",
    "die_with_parent",
]

log = logging.getLogger(__name__)

DEFAULT_HEARTBEAT_INTERVAL_S = 0.5


class AgentLinkError(RuntimeError):
    """The agent could not be reached or refused a call."""


@dataclass(frozen=True)
class WorkerCommand:
    """One command from the agent. ``plan`` is set for start and reconfigure."""

    kind: str  # START, RECONFIGURE or STOP
    generation: int
    plan: plan_pb2.Plan | None = field(default=None, repr=False)  # holds the rendezvous secret
    job_spec_yaml: str = ""  # start only
    node_id: int = 0  # start only
    reason: str = ""  # stop only


def command_from_proto(msg: worker_pb2.WorkerCommand) -> WorkerCommand:
    body = msg.WhichOneof("body")
    if body == "start":
        return WorkerCommand(
            START, msg.generation, plan=msg.start.plan, job_spec_yaml=msg.start.job_spec_yaml, node_id=msg.start.node_id
        )
    if body == "reconfigure":
        return WorkerCommand(RECONFIGURE, msg.generation, plan=msg.reconfigure.plan)
    if body == "stop":
        return WorkerCommand(STOP, msg.generation, reason=msg.stop.reason)
    raise AgentLinkError(f"agent sent a command with an unknown body ({body!r})")


PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> bool:
    """SIGKILL this process when its parent ``parent_pid`` dies (Linux ``PR_SET_PDEATHSIG``).

    Only for a direct child: behind a wrapper (``sh -c``, a launcher) the parent is the wrapper,
    and this returns False (the channel's end of stream still stops the worker). If the parent
    dies between the check and the call, exits at once.
    """
    if os.getppid() != parent_pid:
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed: %s", os.strerror(ctypes.get_errno()))
        return False
    if os.getppid() != parent_pid:
        _exit_now()
    return True


def _exit_now() -> None:
    log.critical("agent channel closed: the agent is gone; exiting with status %d", AGENT_LOST_EXIT_CODE)
    logging.shutdown()
    os._exit(AGENT_LOST_EXIT_CODE)


class AgentLink:
    """Client side of the worker channel. Thread-safe for the report methods."""

    def __init__(
        self,
        socket_path: str,
        slot: int,
        *,
        node_id: int = 0,
        work_dir: str = "",
        agent_pid: int = 0,
        heartbeat_interval_s: float = DEFAULT_HEARTBEAT_INTERVAL_S,
        rpc_timeout_s: float = 10.0,
        on_agent_lost: Callable[[], None] | None = _exit_now,
    ) -> None:
        if not socket_path:
            raise ValueError(f"socket_path: must not be empty (set ${ENV_AGENT_SOCKET})")
        if slot < 0:
            raise ValueError(f"slot: must be >= 0, got {slot}")
        if not heartbeat_interval_s > 0:
            raise ValueError(f"heartbeat_interval_s: must be > 0, got {heartbeat_interval_s}")
        self.socket_path = socket_path
        self.slot = slot
        self.node_id = node_id
        self.work_dir = work_dir
        self.agent_pid = agent_pid
        self.heartbeat_interval_s = heartbeat_interval_s
        self.rpc_timeout_s = rpc_timeout_s
        self._on_agent_lost = on_agent_lost
        self._commands: queue.Queue[WorkerCommand | None] = queue.Queue()
        self._closing = threading.Event()
        self._stop_received = threading.Event()
        self._heartbeat_stop = threading.Event()
        self._channel: grpc.Channel | None = None
        self._stub: worker_pb2_grpc.WorkerServiceStub | None = None
        self._stream = None
        self._threads: list[threading.Thread] = []
        self._hb_seq = 0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **kwargs) -> AgentLink:
        """A link configured from the variables the agent sets (``OOBLECK_*``)."""
        env = os.environ if environ is None else environ
        socket_path = env.get(ENV_AGENT_SOCKET, "")
        if not socket_path:
            raise AgentLinkError(f"${ENV_AGENT_SOCKET} is not set: this process was not started by an oobleck-agent")
        try:
            slot = int(env.get(ENV_SLOT, ""))
            node_id = int(env.get(ENV_NODE_ID, "0"))
            agent_pid = int(env.get(ENV_AGENT_PID, "0"))
            interval = float(env.get(ENV_HEARTBEAT_INTERVAL_S, str(DEFAULT_HEARTBEAT_INTERVAL_S)))
        except ValueError as exc:
            raise AgentLinkError(f"bad agent environment (${ENV_SLOT}, ${ENV_NODE_ID}, ...): {exc}") from None
        kwargs.setdefault("heartbeat_interval_s", interval)
        return cls(
            socket_path, slot, node_id=node_id, work_dir=env.get(ENV_WORK_DIR, ""), agent_pid=agent_pid, **kwargs
        )

    # -- lifecycle -------------------------------------------------------------------------

    def attach(self) -> None:
        """Connect, send a first heartbeat (raises :class:`AgentLinkError` if the agent is not
        there), open the command stream and start the reader and heartbeat threads. With
        ``agent_pid`` set, the process also dies with the agent (``PR_SET_PDEATHSIG``)."""
        if self._channel is not None:
            raise AgentLinkError("attach: already attached")
        if self.agent_pid and self._on_agent_lost is not None:
            die_with_parent(self.agent_pid)
        target = "unix:" + os.path.abspath(self.socket_path)
        self._channel = grpc.insecure_channel(
            target,
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ],
        )
        self._stub = worker_pb2_grpc.WorkerServiceStub(self._channel)
        self._heartbeat_once()
        self._stream = self._stub.Attach(worker_pb2.AttachRequest(slot=self.slot, pid=os.getpid()))
        for target_fn, name in ((self._read_commands, "agent-link-reader"), (self._heartbeat_loop, "agent-link-hb")):
            thread = threading.Thread(target=target_fn, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def close(self) -> None:
        """Stop the threads and close the channel; the agent is not told (it sees the exit)."""
        if self._closing.is_set():
            return
        self._closing.set()
        self._heartbeat_stop.set()
        if self._stream is not None:
            self._stream.cancel()
        if self._channel is not None:
            self._channel.close()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout=5)

    def __enter__(self) -> AgentLink:
        self.attach()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- commands --------------------------------------------------------------------------

    def next_command(self, timeout_s: float | None = None) -> WorkerCommand | None:
        """The next command, waiting up to ``timeout_s`` (forever if None); None on timeout or
        once the stream has ended after a stop."""
        try:
            return self._commands.get(timeout=timeout_s)
        except queue.Empty:
            return None

    def has_command(self) -> bool:
        """Whether a command is waiting (never blocks, takes nothing)."""
        return not self._commands.empty()

    def poll_command(self) -> WorkerCommand | None:
        """The next command if one is waiting, else None (never blocks)."""
        try:
            return self._commands.get_nowait()
        except queue.Empty:
            return None

    # -- reports ---------------------------------------------------------------------------

    def report_step(
        self, generation: int, step: int, *, loss: float = 0.0, samples_per_s: float = 0.0, samples: int = 0
    ) -> None:
        """One committed step (the agent forwards the lowest slot's reports to the master)."""
        self._call(
            "ReportStep",
            worker_pb2.ReportStepRequest(
                slot=self.slot,
                generation=generation,
                step=step,
                loss=loss,
                samples_per_s=samples_per_s,
                samples=samples,
            ),
        )

    def report_ready(self, generation: int, *, regroup_s: float = 0.0, copy_s: float = 0.0, step: int = 0) -> None:
        """This worker applied the plan of ``generation`` (phase times in seconds) and is ready to
        train from position ``step`` (steps completed, after any restore)."""
        self._call(
            "ReportReady",
            worker_pb2.ReportReadyRequest(
                slot=self.slot, generation=generation, regroup_s=regroup_s, copy_s=copy_s, step=step
            ),
        )

    def report_error(self, generation: int, message: str, *, fatal: bool = True) -> None:
        """Something failed; ``fatal`` makes the agent report its node as failed."""
        self._call(
            "ReportError",
            worker_pb2.ReportErrorRequest(slot=self.slot, generation=generation, message=message[:4000], fatal=fatal),
        )

    def stop_heartbeat(self) -> None:
        """Silence the side-thread heartbeat (fault drills and tests: the agent will call this
        worker hung after its liveness timeout)."""
        self._heartbeat_stop.set()

    # -- internals -------------------------------------------------------------------------

    def _call(self, method: str, request) -> None:
        if self._stub is None:
            raise AgentLinkError(f"{method}: not attached")
        try:
            getattr(self._stub, method)(request, timeout=self.rpc_timeout_s)
        except grpc.RpcError as exc:
            raise AgentLinkError(f"{method} to the agent failed: {exc.code().name}: {exc.details()}") from None

    def _heartbeat_once(self) -> None:
        self._hb_seq += 1
        self._call("Heartbeat", worker_pb2.WorkerHeartbeatRequest(slot=self.slot, seq=self._hb_seq))

    def _heartbeat_loop(self) -> None:
        while not self._heartbeat_stop.wait(self.heartbeat_interval_s):
            try:
                self._heartbeat_once()
            except AgentLinkError as exc:
                # The reader thread notices a dead agent; a slow call is only logged.
                log.debug("heartbeat failed: %s", exc)

    def _read_commands(self) -> None:
        error: str = "end of stream"
        try:
            for msg in self._stream:
                try:
                    cmd = command_from_proto(msg)
                except AgentLinkError as exc:  # a newer agent: skip what this worker cannot know
                    log.warning("ignored a command: %s", exc)
                    continue
                if cmd.kind == STOP:
                    self._stop_received.set()
                self._commands.put(cmd)
        except grpc.RpcError as exc:
            error = f"{exc.code().name}: {exc.details()}"
        self._commands.put(None)
        if self._closing.is_set() or self._stop_received.is_set():
            return
        log.error("lost the agent (%s)", error)
        if self._on_agent_lost is not None:
            self._on_agent_lost()
