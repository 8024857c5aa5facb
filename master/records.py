"""The master's records: errors it answers with, what it keeps per node, session and command,
and the views it shows. Plain data; the logic that changes them lives in the modules named
for what they do (see ``docs/architecture.md``)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from oobleck.master.store import CommandRow, NodeRow

STATUS_NODES = 1000  # nodes listed in /api/status (ListNodes pages through all)


def ids_text(ids: list[int], shown: int = 20) -> str:
    """A list of node ids for a log line, the first ``shown`` of them."""
    return str(ids) if len(ids) <= shown else f"{ids[:shown]} and {len(ids) - shown} more"


def degradation(pipelines: int, ft: int, idle: list[int]) -> str:
    """Why a running job with ``pipelines`` pipelines and the live nodes ``idle`` left out is
    degraded ("" when it is not)."""
    reasons = []
    if pipelines < ft + 1:
        reasons.append(
            f"{pipelines} pipeline{'s' if pipelines != 1 else ''}, fewer than ft+1 = {ft + 1}: one more failure "
            "may lose every copy of some layer (a checkpoint restore)"
        )
    if idle:
        reasons.append(f"nodes {idle} idle: no mix of templates uses them")
    return "; ".join(reasons)


class MasterError(Exception):
    """A request the master refuses; ``code`` is a grpc.StatusCode name."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class NodeLost(Exception):
    """The node measuring a profile died (the measurement moves to another node)."""

    def __init__(self, node_id: int) -> None:
        super().__init__(f"node {node_id} died")
        self.node_id = node_id


class StateUnavailable(MasterError):
    """The state file cannot be written: a state change is refused (and undone in memory)."""

    def __init__(self, failure: str) -> None:
        super().__init__(
            "UNAVAILABLE",
            f"the master cannot write its state ({failure}); it refuses state changes until a write "
            "succeeds again (free space or fix the state file's permissions; it retries on its own)",
        )


@dataclass
class RegisterInfo:
    node_name: str
    address: str
    slots: int
    gpu_memory_bytes: int
    software_version: str
    nonce: str
    store_port: int
    node_id: int
    identity: str = ""  # under mTLS: the client certificate's identity ("" without mTLS)
    protocol_version: int = 0  # the agent<->master protocol the agent speaks (0: before versions)


@dataclass
class RegisterResult:
    node_id: int
    lease_s: float
    heartbeat_interval_s: float
    heartbeat_timeout_s: float
    job_spec_yaml: str
    generation: int


@dataclass
class Close:
    code: str | None = None
    message: str = ""


class SessionHandle:
    """The outgoing side of one agent session: messages queued for the stream writer."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Any] = asyncio.Queue()  # MasterMessage, or Close

    def send(self, msg: Any) -> None:
        self.queue.put_nowait(msg)

    def close(self, code: str | None = None, message: str = "") -> None:
        self.queue.put_nowait(Close(code, message))


@dataclass
class NodeRuntime:
    row: NodeRow
    last_seen_s: float
    detached_since_s: float | None = None
    failed_reason: str | None = None
    session: SessionHandle | None = None
    reattach_by_s: float | None = None  # set when state is loaded after a restart; cleared on attach
    joined_s: float = 0.0  # when it registered (or the master loaded it): for the scale-up delay
    leaving: bool = False  # its agent announced it is going away (pre-emption notice)
    dead_since_s: float | None = None  # when it was declared dead (or loaded dead): purged after retention
    timeout_s: float | None = None  # the heartbeat timeout it was given (None: the config's)
    interval_s: float | None = None  # ... and the interval
    attached: bool = False  # a session has attached since it registered (or the master loaded it)


@dataclass
class AckOutcome:
    """The acks of one generation's start / reconfigure commands (see ``Master._await_acks``)."""

    bad: list[int] = field(default_factory=list)  # nodes that nacked, died or missed the deadline
    errors: dict[int, str] = field(default_factory=dict)  # node -> why (nack message, or no ack in time)
    ok_nodes: list[int] = field(default_factory=list)
    steps: dict[int, int] = field(default_factory=dict)  # node -> position its workers are ready at
    phases: dict[str, float] = field(default_factory=lambda: {"regroup": 0.0, "copy": 0.0})  # max over nodes
    complete: bool = False  # every node acked ok


@dataclass(frozen=True)
class Ack:
    """What a node answered to a command (or what the master concluded: node dead, timed out)."""

    ok: bool
    error: str = ""
    phases: dict[str, float] = field(default_factory=dict)
    step: int | None = None  # start / reconfigure: the position the node's workers are ready at


@dataclass
class PendingCommand:
    row: CommandRow
    future: asyncio.Future = field(repr=False)  # resolves to an Ack
    profile_json: str = field(default="", repr=False)  # what a Profile command's ack carried
    profile_key: str | None = field(default=None, repr=False)  # a Profile command's cache key ("": none)


@dataclass
class StatusView:
    job_id: str = ""
    state: str = "NONE"
    reason: str = ""
    generation: int = 0
    step: int = 0
    total_steps: int = 0
    loss: float = 0.0
    samples_per_s: float = 0.0
    nodes_alive: int = 0
    nodes_dead: int = 0
    spares: int = 0
    plan: Any = None  # the plan in force (oobleck.v1.Plan, secret cleared), None without one


@dataclass
class NodeView:
    node_id: int
    name: str
    address: str
    slots: int
    state: str
    last_seen_s_ago: float
    reason: str
