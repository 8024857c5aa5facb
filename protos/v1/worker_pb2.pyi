from . import plan_pb2 as _plan_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AttachRequest(_message.Message):
    __slots__ = ("slot", "pid")
    SLOT_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    slot: int
    pid: int
    def __init__(self, slot: _Optional[int] = ..., pid: _Optional[int] = ...) -> None: ...

class WorkerStart(_message.Message):
    __slots__ = ("plan", "job_spec_yaml", "node_id")
    PLAN_FIELD_NUMBER: _ClassVar[int]
    JOB_SPEC_YAML_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    plan: _plan_pb2.Plan
    job_spec_yaml: str
    node_id: int
    def __init__(self, plan: _Optional[_Union[_plan_pb2.Plan, _Mapping]] = ..., job_spec_yaml: _Optional[str] = ..., node_id: _Optional[int] = ...) -> None: ...

class WorkerReconfigure(_message.Message):
    __slots__ = ("plan",)
    PLAN_FIELD_NUMBER: _ClassVar[int]
    plan: _plan_pb2.Plan
    def __init__(self, plan: _Optional[_Union[_plan_pb2.Plan, _Mapping]] = ...) -> None: ...

class WorkerStop(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class WorkerCommand(_message.Message):
    __slots__ = ("generation", "start", "reconfigure", "stop")
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    RECONFIGURE_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    generation: int
    start: WorkerStart
    reconfigure: WorkerReconfigure
    stop: WorkerStop
    def __init__(self, generation: _Optional[int] = ..., start: _Optional[_Union[WorkerStart, _Mapping]] = ..., reconfigure: _Optional[_Union[WorkerReconfigure, _Mapping]] = ..., stop: _Optional[_Union[WorkerStop, _Mapping]] = ...) -> None: ...

class WorkerHeartbeatRequest(_message.Message):
    __slots__ = ("slot", "seq")
    SLOT_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    slot: int
    seq: int
    def __init__(self, slot: _Optional[int] = ..., seq: _Optional[int] = ...) -> None: ...

class WorkerHeartbeatResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReportStepRequest(_message.Message):
    __slots__ = ("slot", "generation", "step", "loss", "samples_per_s", "samples")
    SLOT_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_PER_S_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    slot: int
    generation: int
    step: int
    loss: float
    samples_per_s: float
    samples: int
    def __init__(self, slot: _Optional[int] = ..., generation: _Optional[int] = ..., step: _Optional[int] = ..., loss: _Optional[float] = ..., samples_per_s: _Optional[float] = ..., samples: _Optional[int] = ...) -> None: ...

class ReportStepResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReportReadyRequest(_message.Message):
    __slots__ = ("slot", "generation", "regroup_s", "copy_s", "step")
    SLOT_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    REGROUP_S_FIELD_NUMBER: _ClassVar[int]
    COPY_S_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    slot: int
    generation: int
    regroup_s: float
    copy_s: float
    step: int
    def __init__(self, slot: _Optional[int] = ..., generation: _Optional[int] = ..., regroup_s: _Optional[float] = ..., copy_s: _Optional[float] = ..., step: _Optional[int] = ...) -> None: ...

class ReportReadyResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReportErrorRequest(_message.Message):
    __slots__ = ("slot", "generation", "message", "fatal")
    SLOT_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    FATAL_FIELD_NUMBER: _ClassVar[int]
    slot: int
    generation: int
    message: str
    fatal: bool
    def __init__(self, slot: _Optional[int] = ..., generation: _Optional[int] = ..., message: _Optional[str] = ..., fatal: _Optional[bool] = ...) -> None: ...

class ReportErrorResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
