"""Instantiation and batch distribution (docs/planner.md "Instantiation and batch distribution").

The optimisation runs in C (``obk_instantiate``: a DP over pipelines and node counts for each
candidate bottleneck, never an enumeration of template mixes); this module converts the typed
inputs, computes ``W`` from the templates and the profile, and builds the result dataclasses.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from oobleck.planner import native
from oobleck.planner._native import ffi, lib
from oobleck.planner.errors import InvalidInputError
from oobleck.planner.profile import Profile
from oobleck.planner.types import Cluster, Instantiation, PipelinePlan, Template, TemplateSet

_INT64 = (-(2**63), 2**63 - 1)


def node_id(value: Any, where: str) -> int:
    """``value`` as a node id (a 64-bit integer, not a bool); InvalidInputError naming ``where``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInputError(f"{where}: expected an integer node id, got {value!r}")
    if not _INT64[0] <= value <= _INT64[1]:
        raise InvalidInputError(f"{where}: node id {value} does not fit in 64 bits")
    return value


def check_count(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInputError(f"{name}: expected an integer, got {value!r}")
    if value < minimum:
        raise InvalidInputError(f"{name}: must be >= {minimum}, got {value}")
    if value > 2**31 - 1:
        raise InvalidInputError(f"{name}: must be < 2**31, got {value}")
    return value


def costs_to_c(templates: Sequence[Template]) -> Any:
    """A C array ``obk_pipeline_cost[]`` for ``templates`` (T(m) inputs only)."""
    arr = ffi.new("obk_pipeline_cost[]", max(len(templates), 1))
    sums: dict[int, float] = {}  # sum_latency_ms is an fsum over stages: once per distinct template
    for i, t in enumerate(templates):
        total = sums.get(id(t))
        if total is None:
            total = sums[id(t)] = t.sum_latency_ms
        arr[i].num_nodes = t.num_nodes
        arr[i].sum_latency_ms = total
        arr[i].bottleneck_ms = t.bottleneck_ms
    return arr


def template_holdings(template: Template, num_layers: int) -> list[tuple[int, int]]:
    """The layer range of each of the template's nodes; InvalidInputError if it does not fit the profile."""
    ranges = []
    for i in range(template.num_nodes):
        try:
            a, b = template.node_layers(i)
        except IndexError as exc:
            raise InvalidInputError(f"template for {template.num_nodes} nodes: {exc}") from exc
        if not 0 <= a < b <= num_layers:
            raise InvalidInputError(
                f"template for {template.num_nodes} nodes: node {i} holds layers [{a}, {b}), "
                f"outside the profile's {num_layers} layers"
            )
        ranges.append((a, b))
    return ranges


def max_node_param_bytes(templates: TemplateSet, profile: Profile) -> int:
    """``W``: the largest sum of ``param_bytes`` held by one node in any template of the set."""
    prefix = [0, *itertools.accumulate(layer.param_bytes for layer in profile.layers)]
    most = 0
    for template in templates.templates:
        for a, b in template_holdings(template, profile.num_layers):
            most = max(most, prefix[b] - prefix[a])
    return most


def _check_templates(templates: TemplateSet) -> None:
    if not isinstance(templates, TemplateSet):
        raise InvalidInputError(f"templates: expected a TemplateSet, got {type(templates).__name__}")
    if not templates.templates:
        raise InvalidInputError("templates: the template set is empty")


def distribute_batch(templates: Sequence[Template], microbatches: int) -> list[int]:
    """Canonical split of ``microbatches`` over pipelines running ``templates`` (one entry each).

    Every pipeline starts with 1; the rest go one at a time to the pipeline with the smallest
    ``T_p(m_p + 1)`` (ties: lower index). InfeasibleError when there are fewer microbatches than
    pipelines.
    """
    templates = list(templates)
    check_count(microbatches, "microbatches", 1)
    if not templates:
        raise InvalidInputError("templates: at least one pipeline is required")
    return list(distribute_with_times(templates, microbatches)[0])


def distribute_with_times(templates: Sequence[Template], microbatches: int) -> tuple[list[int], list[float]]:
    """:func:`distribute_batch` and each pipeline's ``T_p(m_p)`` as computed by the C side."""
    out_m = ffi.new("int32_t[]", len(templates))
    out_ms = ffi.new("double[]", len(templates))
    native.call(lib.obk_distribute_batch, costs_to_c(templates), len(templates), microbatches, out_m, out_ms)
    return list(out_m), list(out_ms)


def instantiate(
    templates: TemplateSet,
    profile: Profile,
    cluster: Cluster,
    nodes: Sequence[int],
    *,
    microbatches: int,
) -> Instantiation:
    """The best mix of pipelines for ``nodes`` (in the caller's order) and its batch split.

    ``ft`` comes from ``templates.node_spec.ft``. Pipelines are listed by template size
    ascending and take nodes in the caller's order; nodes that no mix can use are ``spares``.
    Fewer than ``ft + 1`` pipelines only when there are too few nodes (``degraded``).
    """
    _check_templates(templates)
    nodes = [node_id(n, f"nodes[{i}]") for i, n in enumerate(nodes)]
    if len(set(nodes)) != len(nodes):
        seen: set[int] = set()
        dup = next(n for n in nodes if n in seen or seen.add(n))
        raise InvalidInputError(f"nodes: node {dup} appears more than once")
    check_count(microbatches, "microbatches", 1)
    w = max_node_param_bytes(templates, profile)
    tpls = templates.templates
    capacity = max(len(nodes) // max(tpls[0].num_nodes, 1), 1)
    out_t = ffi.new("int32_t[]", capacity)
    out_m = ffi.new("int32_t[]", capacity)
    out_ms = ffi.new("double[]", capacity)
    summary = ffi.new("obk_instantiation *")
    native.call(
        lib.obk_instantiate,
        costs_to_c(tpls),
        len(tpls),
        len(nodes),
        templates.node_spec.ft,
        microbatches,
        float(w),
        float(cluster.inter_node_bytes_per_s),
        out_t,
        out_m,
        out_ms,
        capacity,
        summary,
    )
    pipelines = []
    pos = 0
    for i in range(summary.num_pipelines):
        t = tpls[out_t[i]]
        pipelines.append(
            PipelinePlan(
                template_nodes=t.num_nodes,
                nodes=tuple(nodes[pos : pos + t.num_nodes]),
                microbatches=out_m[i],
                estimated_ms=out_ms[i],
            )
        )
        pos += t.num_nodes
    assert pos == summary.used_nodes, (pos, summary.used_nodes)
    return Instantiation(
        pipelines=tuple(pipelines),
        iteration_ms=summary.iteration_ms,
        sync_ms=summary.sync_ms,
        degraded=bool(summary.degraded),
        spares=tuple(nodes[pos:]),
    )


def sync_ms(num_pipelines: int, max_node_param_bytes: float, inter_node_bytes_per_s: float) -> float:
    """``1000 * 2 * (P-1)/P * W / inter_node_bytes_per_s`` (same operation order as the C side)."""
    return 1000.0 * 2.0 * (num_pipelines - 1) / num_pipelines * max_node_param_bytes / inter_node_bytes_per_s


__all__ = ["distribute_batch", "instantiate", "max_node_param_bytes", "sync_ms"]
