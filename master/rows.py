"""The rows of the master's state file, as the master holds them in memory (see
:mod:`~oobleck.master.store`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class NodeRow:
    node_id: int
    name: str
    address: str
    slots: int
    gpu_memory_bytes: int
    software_version: str
    nonce: str
    store_port: int
    state: str  # alive | spare | draining | dead
    reason: str = ""
    identity: str = ""  # under mTLS: the client certificate's identity; only it may claim this node


@dataclass
class JobRow:
    job_id: str
    spec_yaml: str
    state: str  # JobState name without prefix: STARTING, RUNNING, ...
    reason: str
    generation: int
    plan: bytes | None  # serialized oobleck.v1.Plan
    plan_json: dict[str, Any] = field(default_factory=dict)  # planner-side data (pipelines, cluster, profile)
    step: int = 0
    total_steps: int = 0


@dataclass
class CommandRow:
    command_id: int
    node_id: int
    generation: int
    kind: str
    payload: bytes  # serialized oobleck.v1.Command
    acked: bool = False
    ok: bool = False
    error: str = ""


@dataclass
class EventRow:
    id: int
    unix_time_s: float
    kind: str
    node_id: int
    generation: int
    step: int
    message: str
    durations_s: dict[str, float] = field(default_factory=dict)
    loss: float = 0.0  # progress ("step") events only; those are not stored
    samples_per_s: float = 0.0


@dataclass
class Snapshot:
    """Everything loaded at start-up."""

    job: JobRow | None
    nodes: list[NodeRow]
    pending_commands: list[CommandRow]
    next_node_id: int
    next_command_id: int
    last_event_id: int


class StoreError(Exception):
    """A read or write of the state file failed (disk full, read-only, I/O error, corrupt file).

    The message names the file, the operation and SQLite's reason."""

    def __init__(self, path: str, op: str, cause: BaseException) -> None:
        super().__init__(f"state file {path}: {op} failed: {cause}")
        self.path, self.op, self.cause = path, op, cause
