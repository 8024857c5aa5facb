from . import plan_pb2 as _plan_pb2
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WorkerState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WORKER_STATE_UNSPECIFIED: _ClassVar[WorkerState]
    WORKER_STATE_STARTING: _ClassVar[WorkerState]
    WORKER_STATE_RUNNING: _ClassVar[WorkerState]
    WORKER_STATE_EXITED: _ClassVar[WorkerState]
    WORKER_STATE_HUNG: _ClassVar[WorkerState]
WORKER_STATE_UNSPECIFIED: WorkerState
WORKER_STATE_STARTING: WorkerState
WORKER_STATE_RUNNING: WorkerState
WORKER_STATE_EXITED: WorkerState
WORKER_STATE_HUNG: WorkerState

class RegisterRequest(_message.Message):
    __slots__ = ("node_name", "address", "slots", "gpu_memory_bytes", "software_version", "nonce", "store_port", "node_id", "protocol_version")
    NODE_NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    GPU_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    SOFTWARE_VERSION_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    STORE_PORT_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    node_name: str
    address: str
    slots: int
    gpu_memory_bytes: int
    software_version: str
    nonce: str
    store_port: int
    node_id: int
    protocol_version: int
    def __init__(self, node_name: _Optional[str] = ..., address: _Optional[str] = ..., slots: _Optional[int] = ..., gpu_memory_bytes: _Optional[int] = ..., software_version: _Optional[str] = ..., nonce: _Optional[str] = ..., store_port: _Optional[int] = ..., node_id: _Optional[int] = ..., protocol_version: _Optional[int] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("node_id", "lease_s", "heartbeat_interval_s", "heartbeat_timeout_s", "job_spec_yaml", "generation", "protocol_version", "software_version")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_S_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    JOB_SPEC_YAML_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SOFTWARE_VERSION_FIELD_NUMBER: _ClassVar[int]
    node_id: int
    lease_s: float
    heartbeat_interval_s: float
    heartbeat_timeout_s: float
    job_spec_yaml: str
    generation: int
    protocol_version: int
    software_version: str
    def __init__(self, node_id: _Optional[int] = ..., lease_s: _Optional[float] = ..., heartbeat_interval_s: _Optional[float] = ..., heartbeat_timeout_s: _Optional[float] = ..., job_spec_yaml: _Optional[str] = ..., generation: _Optional[int] = ..., protocol_version: _Optional[int] = ..., software_version: _Optional[str] = ...) -> None: ...

class SessionHello(_message.Message):
    __slots__ = ("node_id", "nonce", "last_generation", "last_command_id")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    LAST_GENERATION_FIELD_NUMBER: _ClassVar[int]
    LAST_COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    node_id: int
    nonce: str
    last_generation: int
    last_command_id: int
    def __init__(self, node_id: _Optional[int] = ..., nonce: _Optional[str] = ..., last_generation: _Optional[int] = ..., last_command_id: _Optional[int] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("seq",)
    SEQ_FIELD_NUMBER: _ClassVar[int]
    seq: int
    def __init__(self, seq: _Optional[int] = ...) -> None: ...

class WorkerReport(_message.Message):
    __slots__ = ("slot", "pid", "state", "exit_code", "detail")
    SLOT_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    slot: int
    pid: int
    state: WorkerState
    exit_code: int
    detail: str
    def __init__(self, slot: _Optional[int] = ..., pid: _Optional[int] = ..., state: _Optional[_Union[WorkerState, str]] = ..., exit_code: _Optional[int] = ..., detail: _Optional[str] = ...) -> None: ...

class StepReport(_message.Message):
    __slots__ = ("generation", "step", "loss", "samples_per_s", "samples")
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_PER_S_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    generation: int
    step: int
    loss: float
    samples_per_s: float
    samples: int
    def __init__(self, generation: _Optional[int] = ..., step: _Optional[int] = ..., loss: _Optional[float] = ..., samples_per_s: _Optional[float] = ..., samples: _Optional[int] = ...) -> None: ...

class PhaseTimes(_message.Message):
    __slots__ = ("regroup_s", "copy_s")
    REGROUP_S_FIELD_NUMBER: _ClassVar[int]
    COPY_S_FIELD_NUMBER: _ClassVar[int]
    regroup_s: float
    copy_s: float
    def __init__(self, regroup_s: _Optional[float] = ..., copy_s: _Optional[float] = ...) -> None: ...

class CommandAck(_message.Message):
    __slots__ = ("command_id", "generation", "ok", "error", "phases", "profile_json", "step")
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    PHASES_FIELD_NUMBER: _ClassVar[int]
    PROFILE_JSON_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    command_id: int
    generation: int
    ok: bool
    error: str
    phases: PhaseTimes
    profile_json: str
    step: int
    def __init__(self, command_id: _Optional[int] = ..., generation: _Optional[int] = ..., ok: _Optional[bool] = ..., error: _Optional[str] = ..., phases: _Optional[_Union[PhaseTimes, _Mapping]] = ..., profile_json: _Optional[str] = ..., step: _Optional[int] = ...) -> None: ...

class NodeFailure(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class Leaving(_message.Message):
    __slots__ = ("reason", "deadline_s")
    REASON_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_S_FIELD_NUMBER: _ClassVar[int]
    reason: str
    deadline_s: float
    def __init__(self, reason: _Optional[str] = ..., deadline_s: _Optional[float] = ...) -> None: ...

class AgentMessage(_message.Message):
    __slots__ = ("hello", "heartbeat", "worker", "step", "ack", "failure", "leaving")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    FAILURE_FIELD_NUMBER: _ClassVar[int]
    LEAVING_FIELD_NUMBER: _ClassVar[int]
    hello: SessionHello
    heartbeat: Heartbeat
    worker: WorkerReport
    step: StepReport
    ack: CommandAck
    failure: NodeFailure
    leaving: Leaving
    def __init__(self, hello: _Optional[_Union[SessionHello, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., worker: _Optional[_Union[WorkerReport, _Mapping]] = ..., step: _Optional[_Union[StepReport, _Mapping]] = ..., ack: _Optional[_Union[CommandAck, _Mapping]] = ..., failure: _Optional[_Union[NodeFailure, _Mapping]] = ..., leaving: _Optional[_Union[Leaving, _Mapping]] = ...) -> None: ...

class Reconfigure(_message.Message):
    __slots__ = ("plan",)
    PLAN_FIELD_NUMBER: _ClassVar[int]
    plan: _plan_pb2.Plan
    def __init__(self, plan: _Optional[_Union[_plan_pb2.Plan, _Mapping]] = ...) -> None: ...

class Start(_message.Message):
    __slots__ = ("plan", "job_spec_yaml")
    PLAN_FIELD_NUMBER: _ClassVar[int]
    JOB_SPEC_YAML_FIELD_NUMBER: _ClassVar[int]
    plan: _plan_pb2.Plan
    job_spec_yaml: str
    def __init__(self, plan: _Optional[_Union[_plan_pb2.Plan, _Mapping]] = ..., job_spec_yaml: _Optional[str] = ...) -> None: ...

class Stop(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class Drain(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class Kill(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class Profile(_message.Message):
    __slots__ = ("job_spec_yaml",)
    JOB_SPEC_YAML_FIELD_NUMBER: _ClassVar[int]
    job_spec_yaml: str
    def __init__(self, job_spec_yaml: _Optional[str] = ...) -> None: ...

class Command(_message.Message):
    __slots__ = ("command_id", "generation", "start", "reconfigure", "stop", "drain", "kill", "profile")
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    RECONFIGURE_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    DRAIN_FIELD_NUMBER: _ClassVar[int]
    KILL_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    command_id: int
    generation: int
    start: Start
    reconfigure: Reconfigure
    stop: Stop
    drain: Drain
    kill: Kill
    profile: Profile
    def __init__(self, command_id: _Optional[int] = ..., generation: _Optional[int] = ..., start: _Optional[_Union[Start, _Mapping]] = ..., reconfigure: _Optional[_Union[Reconfigure, _Mapping]] = ..., stop: _Optional[_Union[Stop, _Mapping]] = ..., drain: _Optional[_Union[Drain, _Mapping]] = ..., kill: _Optional[_Union[Kill, _Mapping]] = ..., profile: _Optional[_Union[Profile, _Mapping]] = ...) -> None: ...

class HeartbeatTerms(_message.Message):
    __slots__ = ("interval_s", "timeout_s")
    INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    interval_s: float
    timeout_s: float
    def __init__(self, interval_s: _Optional[float] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class MasterMessage(_message.Message):
    __slots__ = ("command", "terms")
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    TERMS_FIELD_NUMBER: _ClassVar[int]
    command: Command
    terms: HeartbeatTerms
    def __init__(self, command: _Optional[_Union[Command, _Mapping]] = ..., terms: _Optional[_Union[HeartbeatTerms, _Mapping]] = ...) -> None: ...
