from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Stage(_message.Message):
    __slots__ = ("layer_start", "layer_end", "node_index", "gpus")
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    NODE_INDEX_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    layer_start: int
    layer_end: int
    node_index: int
    gpus: int
    def __init__(self, layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ..., node_index: _Optional[int] = ..., gpus: _Optional[int] = ...) -> None: ...

class Template(_message.Message):
    __slots__ = ("num_nodes", "stages", "iteration_ms")
    NUM_NODES_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    ITERATION_MS_FIELD_NUMBER: _ClassVar[int]
    num_nodes: int
    stages: _containers.RepeatedCompositeFieldContainer[Stage]
    iteration_ms: float
    def __init__(self, num_nodes: _Optional[int] = ..., stages: _Optional[_Iterable[_Union[Stage, _Mapping]]] = ..., iteration_ms: _Optional[float] = ...) -> None: ...

class Pipeline(_message.Message):
    __slots__ = ("node_ids", "microbatches")
    NODE_IDS_FIELD_NUMBER: _ClassVar[int]
    MICROBATCHES_FIELD_NUMBER: _ClassVar[int]
    node_ids: _containers.RepeatedScalarFieldContainer[int]
    microbatches: int
    def __init__(self, node_ids: _Optional[_Iterable[int]] = ..., microbatches: _Optional[int] = ...) -> None: ...

class NodeRanks(_message.Message):
    __slots__ = ("node_id", "ranks")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    node_id: int
    ranks: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, node_id: _Optional[int] = ..., ranks: _Optional[_Iterable[int]] = ...) -> None: ...

class Endpoint(_message.Message):
    __slots__ = ("host", "port", "secret")
    HOST_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    host: str
    port: int
    secret: str
    def __init__(self, host: _Optional[str] = ..., port: _Optional[int] = ..., secret: _Optional[str] = ...) -> None: ...

class Plan(_message.Message):
    __slots__ = ("generation", "templates", "pipelines", "ranks", "rendezvous", "resume_step", "world_size", "restore_from_checkpoint", "job_id")
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    TEMPLATES_FIELD_NUMBER: _ClassVar[int]
    PIPELINES_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    RENDEZVOUS_FIELD_NUMBER: _ClassVar[int]
    RESUME_STEP_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    RESTORE_FROM_CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    generation: int
    templates: _containers.RepeatedCompositeFieldContainer[Template]
    pipelines: _containers.RepeatedCompositeFieldContainer[Pipeline]
    ranks: _containers.RepeatedCompositeFieldContainer[NodeRanks]
    rendezvous: Endpoint
    resume_step: int
    world_size: int
    restore_from_checkpoint: bool
    job_id: str
    def __init__(self, generation: _Optional[int] = ..., templates: _Optional[_Iterable[_Union[Template, _Mapping]]] = ..., pipelines: _Optional[_Iterable[_Union[Pipeline, _Mapping]]] = ..., ranks: _Optional[_Iterable[_Union[NodeRanks, _Mapping]]] = ..., rendezvous: _Optional[_Union[Endpoint, _Mapping]] = ..., resume_step: _Optional[int] = ..., world_size: _Optional[int] = ..., restore_from_checkpoint: _Optional[bool] = ..., job_id: _Optional[str] = ...) -> None: ...
