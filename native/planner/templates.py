"""Pipeline templates and the node specification (docs/planner.md), computed by the C planner.

``plan_templates`` is pure computation and releases the GIL while the C code runs; the master
calls it through ``asyncio.to_thread``.
"""

from __future__ import annotations

from typing import Any

from oobleck.planner import native
from oobleck.planner._native import lib
from oobleck.planner.errors import InvalidInputError, PlannerError
from oobleck.planner.profile import Profile, layers_to_c
from oobleck.planner.types import Cluster, NodeSpec, Stage, Template, TemplateSet

_INT32_MAX = 2**31 - 1


def cluster_to_c(cluster: Cluster) -> Any:
    """A C ``obk_cluster`` for ``cluster`` (owned by the returned cdata)."""
    c = native.new("obk_cluster *")
    c.num_nodes = cluster.nodes
    c.gpus_per_node = cluster.gpus_per_node
    c.gpu_memory_bytes = cluster.gpu_memory_bytes
    c.reserved_bytes = cluster.reserved_bytes
    c.intra_node_bytes_per_s = cluster.intra_node_bytes_per_s
    c.inter_node_bytes_per_s = cluster.inter_node_bytes_per_s
    c.optimizer_state_factor = cluster.optimizer_state_factor
    return c


def _int_arg(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInputError(f"{name}: expected an integer, got {value!r}")
    if value < minimum or value > _INT32_MAX:
        raise InvalidInputError(f"{name}: must be between {minimum} and {_INT32_MAX}, got {value}")
    return value


def plan_templates(
    profile: Profile,
    cluster: Cluster,
    *,
    ft: int,
    microbatches: int,
    min_nodes: int | None = None,
) -> TemplateSet:
    """The optimal template for every node count in ``[n0, n_max]`` and the node specification.

    ``microbatches`` is the global batch ``B`` in microbatches; the template for ``n`` nodes
    minimises ``T(m_ref)`` with ``m_ref = max(1, floor(B * n / N + 1/2))``. ``min_nodes`` is
    ``n0``; by default the smallest node count with a layout that fits in memory.
    Raises InvalidInputError (bad argument, too few nodes for ``ft``) and InfeasibleError
    (no layout fits in GPU memory), with the C planner's message.
    """
    # Range checks (ft < 0, microbatches < 1, min_nodes too large) are the C side's; Python only
    # makes sure the values are integers that fit its int32 arguments.
    ft = _int_arg(ft, "ft", -(2**31))
    microbatches = _int_arg(microbatches, "microbatches", -(2**31))
    if min_nodes is not None:
        min_nodes = _int_arg(min_nodes, "min_nodes", 1)  # 0 is the C default marker
    layers = layers_to_c(profile.layers)
    c_cluster = cluster_to_c(cluster)
    spec = native.new("obk_node_spec *")
    n_all = min(cluster.nodes, profile.num_layers)
    cap_templates = max(n_all, 1)
    cap_stages = max(min(n_all * profile.num_layers, 1 << 20), 1)
    cap_uncovered = 256
    for _attempt in range(2):
        templates = native.new("obk_template[]", cap_templates)
        stages = native.new("obk_stage[]", cap_stages)
        uncovered = native.new("int32_t[]", cap_uncovered)
        try:
            native.call(
                lib.obk_plan_templates,
                layers,
                profile.num_layers,
                c_cluster,
                ft,
                microbatches,
                min_nodes or 0,
                spec,
                templates,
                cap_templates,
                stages,
                cap_stages,
                uncovered,
                cap_uncovered,
            )
            break
        except PlannerError as exc:
            if exc.code != lib.OBK_ERANGE:
                raise
            cap_templates = max(spec.num_templates, 1)
            cap_stages = max(spec.num_stages, 1)
            cap_uncovered = max(spec.num_uncovered, 1)
    else:  # pragma: no cover - the second call has exact sizes
        raise PlannerError("planner output sizes kept growing", code=lib.OBK_ERANGE)

    result = []
    for i in range(spec.num_templates):
        t = templates[i]
        stage_list = tuple(
            Stage(
                layers=(s.layer_start, s.layer_end),
                node=s.node,
                gpus=s.gpus,
                latency_ms=s.latency_ms,
                memory_bytes=int(s.memory_bytes),
            )
            for s in (stages[t.first_stage + k] for k in range(t.num_stages))
        )
        result.append(
            Template(
                num_nodes=t.num_nodes,
                stages=stage_list,
                iteration_ms=t.iteration_ms,
                bottleneck_ms=t.bottleneck_ms,
                gap=t.gap,
            )
        )
    node_spec = NodeSpec(
        min_nodes=spec.min_nodes,
        max_nodes=spec.max_nodes,
        ft=spec.ft,
        guaranteed_range=(spec.range_lo, spec.range_hi),
        uncovered=tuple(uncovered[i] for i in range(spec.num_uncovered)),
    )
    return TemplateSet(node_spec=node_spec, templates=tuple(result))
