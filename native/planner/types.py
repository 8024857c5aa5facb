"""Plain dataclasses for the planner's inputs and outputs (see docs/planner.md).

Units: times in milliseconds, sizes in bytes, bandwidth in bytes per second. Layer ranges are
half-open ``(start, end)``. Node ids are the caller's integers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from oobleck.planner.errors import InvalidInputError

_CLUSTER_FIELDS = (
    "nodes",
    "gpus_per_node",
    "gpu_memory_bytes",
    "intra_node_bytes_per_s",
    "inter_node_bytes_per_s",
    "optimizer_state_factor",
    "reserved_bytes",
)


@dataclass(frozen=True)
class Cluster:
    """The cluster a plan is made for. Validated on construction; errors name the field."""

    nodes: int
    gpus_per_node: int
    gpu_memory_bytes: int
    intra_node_bytes_per_s: float
    inter_node_bytes_per_s: float
    optimizer_state_factor: float = 4.0
    reserved_bytes: int = 0

    def __post_init__(self) -> None:
        _int_field(self.nodes, "nodes", 1)
        _int_field(self.gpus_per_node, "gpus_per_node", 1)
        _int_field(self.gpu_memory_bytes, "gpu_memory_bytes", 1)
        _int_field(self.reserved_bytes, "reserved_bytes", 0)
        if self.reserved_bytes >= self.gpu_memory_bytes:
            raise InvalidInputError(
                f"reserved_bytes: must be less than gpu_memory_bytes ({self.gpu_memory_bytes}), "
                f"got {self.reserved_bytes}"
            )
        _positive(self.intra_node_bytes_per_s, "intra_node_bytes_per_s")
        _positive(self.inter_node_bytes_per_s, "inter_node_bytes_per_s")
        _positive(self.optimizer_state_factor, "optimizer_state_factor")

    @classmethod
    def from_dict(cls, data: Any) -> Cluster:
        if not isinstance(data, dict):
            raise InvalidInputError(f"cluster: expected a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - set(_CLUSTER_FIELDS))
        if unknown:
            raise InvalidInputError(f"{unknown[0]}: unknown cluster field (known: {', '.join(_CLUSTER_FIELDS)})")
        for key in _CLUSTER_FIELDS[:5]:
            if key not in data:
                raise InvalidInputError(f"{key}: missing from cluster")
        kwargs = dict(data)
        for key in ("gpu_memory_bytes", "reserved_bytes"):
            value = kwargs.get(key)
            if isinstance(value, float) and math.isfinite(value) and value == int(value):
                kwargs[key] = int(value)
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _CLUSTER_FIELDS}


def _int_field(value: Any, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInputError(f"{name}: expected an integer, got {value!r}")
    if value < minimum:
        raise InvalidInputError(f"{name}: must be >= {minimum}, got {value}")


def _positive(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidInputError(f"{name}: expected a number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise InvalidInputError(f"{name}: must be a finite number > 0, got {value!r}")


@dataclass(frozen=True)
class Stage:
    """Layers ``[layers[0], layers[1])`` on ``gpus`` GPUs of the template's node ``node`` (an index)."""

    layers: tuple[int, int]
    node: int
    gpus: int
    latency_ms: float
    memory_bytes: int


@dataclass(frozen=True)
class Template:
    """The optimal pipeline layout for ``num_nodes`` nodes."""

    num_nodes: int
    stages: tuple[Stage, ...]
    iteration_ms: float  # T(m_ref)
    bottleneck_ms: float  # max_s L_s
    gap: float = 0.0  # relative gap to a proven lower bound (0 when exact)

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def sum_latency_ms(self) -> float:
        return math.fsum(s.latency_ms for s in self.stages)

    def time_ms(self, microbatches: int) -> float:
        """``T(m) = sum_s L_s + (m - 1) * max_s L_s``."""
        return self.sum_latency_ms + (microbatches - 1) * self.bottleneck_ms

    def node_layers(self, node: int) -> tuple[int, int]:
        """The contiguous layer range held by the template's node index ``node``."""
        mine = [s.layers for s in self.stages if s.node == node]
        if not mine:
            raise IndexError(f"template for {self.num_nodes} nodes has no node {node}")
        return (mine[0][0], mine[-1][1])


@dataclass(frozen=True)
class NodeSpec:
    min_nodes: int  # n0
    max_nodes: int  # n_max
    ft: int
    guaranteed_range: tuple[int, int]  # every M in this range has a plan with >= ft+1 pipelines
    uncovered: tuple[int, ...] = ()  # node counts in the range without such a plan (n_max < 2*n0-1)


@dataclass(frozen=True)
class TemplateSet:
    node_spec: NodeSpec
    templates: tuple[Template, ...]  # ascending num_nodes, one per size in [n0, n_max]

    def for_nodes(self, n: int) -> Template:
        for t in self.templates:
            if t.num_nodes == n:
                return t
        raise KeyError(f"no template for {n} nodes")


@dataclass(frozen=True)
class PipelinePlan:
    template_nodes: int
    nodes: tuple[int, ...]  # node ids in stage order
    microbatches: int
    estimated_ms: float


@dataclass(frozen=True)
class Instantiation:
    pipelines: tuple[PipelinePlan, ...]  # by template size ascending
    iteration_ms: float  # Z + sync
    sync_ms: float
    degraded: bool = False  # fewer than ft+1 pipelines (too few nodes)
    spares: tuple[int, ...] = ()


@dataclass(frozen=True)
class LayerCopy:
    layer: int
    src: int
    dst: int
    bytes: int


@dataclass(frozen=True)
class Reconfiguration:
    pipelines: tuple[PipelinePlan, ...]
    ranks: dict[int, tuple[int, ...]] = field(default_factory=dict)  # node id -> global ranks
    copies: tuple[LayerCopy, ...] = ()
    copy_ms: float = 0.0
    restore_layers: tuple[int, ...] = ()  # layers with no surviving copy: restore from checkpoint
    reason: str = ""
    spares: tuple[int, ...] = ()  # survivors left out when re-instantiation cannot use every node
