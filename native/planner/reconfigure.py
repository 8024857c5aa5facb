"""Reconfiguration after failures, compacted ranks and the layer-copy plan (docs/planner.md).

The policy (steps 1-4), the ranks and the copy plan run in C; this module validates the typed
inputs, decides step 5 (re-instantiate when a pipeline size has no template), redistributes the
batch and assembles a :class:`Reconfiguration`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from oobleck.planner import native
from oobleck.planner._native import ffi, lib
from oobleck.planner.errors import InfeasibleError, InvalidInputError
from oobleck.planner.instantiate import (
    check_count,
    distribute_with_times,
    instantiate,
    node_id,
    template_holdings,
)
from oobleck.planner.profile import Profile, layers_to_c
from oobleck.planner.types import Cluster, LayerCopy, PipelinePlan, Reconfiguration, TemplateSet


def _pipelines(pipelines: Any) -> list[list[int]]:
    if isinstance(pipelines, (str, bytes)) or not isinstance(pipelines, Sequence):
        raise InvalidInputError(f"pipelines: expected a list of lists of node ids, got {pipelines!r}")
    out = []
    for i, p in enumerate(pipelines):
        if isinstance(p, (str, bytes)) or not isinstance(p, Sequence):
            raise InvalidInputError(f"pipelines[{i}]: expected a list of node ids, got {p!r}")
        out.append([node_id(n, f"pipelines[{i}][{j}]") for j, n in enumerate(p)])
    return out


def _lost(lost: Any) -> list[int]:
    if isinstance(lost, (str, bytes)) or not isinstance(lost, Iterable):
        raise InvalidInputError(f"lost: expected node ids, got {lost!r}")
    return [node_id(n, f"lost[{i}]") for i, n in enumerate(lost)]


def _i64_array(values: Sequence[int]) -> Any:
    return ffi.new("int64_t[]", list(values) or [0])


def reconfigure_pipelines(
    pipelines: Sequence[Sequence[int]], lost: Iterable[int], *, min_nodes: int
) -> list[list[int]]:
    """Policy steps 1-4: the surviving pipelines as node lists (sorted, by ``(len, first node)``).

    Lost ids that are in no pipeline are ignored. InfeasibleError ``insufficient nodes ...`` when
    the survivors cannot form one pipeline of ``min_nodes``.
    """
    pls = _pipelines(pipelines)
    lost_ids = _lost(lost)
    check_count(min_nodes, "min_nodes", 1)
    return _policy(pls, lost_ids, min_nodes)


def _policy(pls: list[list[int]], lost_ids: list[int], min_nodes: int) -> list[list[int]]:
    flat = [n for p in pls for n in p]
    out_nodes = ffi.new("int64_t[]", max(len(flat), 1))
    out_sizes = ffi.new("int32_t[]", max(len(pls), 1))
    out_n = ffi.new("int32_t *")
    native.call(
        lib.obk_reconfigure_pipelines,
        _i64_array(flat),
        ffi.new("int32_t[]", [len(p) for p in pls] or [0]),
        len(pls),
        _i64_array(lost_ids),
        len(lost_ids),
        min_nodes,
        out_nodes,
        out_sizes,
        out_n,
    )
    result, pos = [], 0
    for k in range(out_n[0]):
        size = out_sizes[k]
        result.append(list(out_nodes[pos : pos + size]))
        pos += size
    return result


def compact_ranks(pipelines: Sequence[Sequence[int]], gpus_per_node: int) -> dict[int, tuple[int, ...]]:
    """Global ranks per node: pipelines in order, nodes in pipeline order, GPUs in node order."""
    pls = _pipelines(pipelines)
    check_count(gpus_per_node, "gpus_per_node", 1)
    return _ranks(pls, gpus_per_node)


def _ranks(pls: Sequence[Sequence[int]], gpus_per_node: int) -> dict[int, tuple[int, ...]]:
    flat = [n for p in pls for n in p]
    first = ffi.new("int64_t[]", max(len(flat), 1))
    world = ffi.new("int64_t *")
    native.call(
        lib.obk_compact_ranks, ffi.new("int32_t[]", [len(p) for p in pls] or [0]), len(pls), gpus_per_node, first, world
    )
    return {n: tuple(range(first[j], first[j] + gpus_per_node)) for j, n in enumerate(flat)}


def _holdings_to_c(holdings: list[tuple[int, int, int]]) -> Any:
    arr = ffi.new("obk_holding[]", max(len(holdings), 1))
    for i, (node, a, b) in enumerate(holdings):
        arr[i].node = node
        arr[i].layer_start = a
        arr[i].layer_end = b
    return arr


class _Ranges:
    """Layer range of each node index per template size, computed once per size."""

    def __init__(self, templates: TemplateSet, num_layers: int) -> None:
        self.templates = templates
        self.num_layers = num_layers
        self.by_size: dict[int, list[tuple[int, int]]] = {}

    def __call__(self, size: int) -> list[tuple[int, int]]:
        ranges = self.by_size.get(size)
        if ranges is None:
            template = self.templates.for_nodes(size)  # KeyError when no template has that size
            ranges = self.by_size[size] = template_holdings(template, self.num_layers)
        return ranges


def _holdings(pipelines: list[list[int]], ranges: _Ranges, what: str) -> list:
    sizes = [t.num_nodes for t in ranges.templates.templates]
    out = []
    for i, p in enumerate(pipelines):
        try:
            held = ranges(len(p))
        except KeyError:
            raise InvalidInputError(
                f"{what}[{i}]: no template for {len(p)} nodes (template sizes {_sizes_text(sizes)})"
            ) from None
        out.extend((node, a, b) for node, (a, b) in zip(p, held, strict=True))
    return out


def plan_copies(
    before: list[tuple[int, int, int]],
    after: list[tuple[int, int, int]],
    lost: Sequence[int],
    profile: Profile,
    cluster: Cluster,
) -> tuple[tuple[LayerCopy, ...], float, tuple[int, ...]]:
    """Copies for every missing ``(node, layer)`` of ``after`` (``(node, start, end)`` ranges).

    Returns ``(copies, copy_ms, restore_layers)``.
    """
    capacity = sum(b - a for _, a, b in after)
    copies = ffi.new("obk_copy[]", max(capacity, 1))
    restore = ffi.new("int32_t[]", max(profile.num_layers, 1))
    n_copies = ffi.new("int32_t *")
    n_restore = ffi.new("int32_t *")
    copy_ms = ffi.new("double *")
    native.call(
        lib.obk_plan_copies,
        layers_to_c(profile.layers),
        profile.num_layers,
        float(cluster.optimizer_state_factor),
        float(cluster.inter_node_bytes_per_s),
        _holdings_to_c(before),
        len(before),
        _i64_array(lost),
        len(lost),
        _holdings_to_c(after),
        len(after),
        copies,
        capacity,
        n_copies,
        restore,
        n_restore,
        copy_ms,
    )
    out = tuple(
        LayerCopy(layer=c.layer, src=c.src, dst=c.dst, bytes=round(c.bytes))
        for c in (copies[i] for i in range(n_copies[0]))
    )
    return out, copy_ms[0], tuple(restore[i] for i in range(n_restore[0]))


def _lay_out(
    mix: Sequence[int], candidates: Sequence[Sequence[int]], pool: Sequence[int]
) -> tuple[list[list[int]], list[int]]:
    """Place a mix of pipeline sizes on nodes, moving as few layers as possible: each candidate
    pipeline (in order) whose size is still wanted is kept as it is; the nodes of the other
    candidates (in stage order), then ``pool``, fill the remaining pipelines, smallest first.
    Returns the pipelines (by size, kept ones first within a size) and the nodes left over."""
    wanted: dict[int, int] = {}
    for size in mix:
        wanted[size] = wanted.get(size, 0) + 1
    kept: list[list[int]] = []
    rest: list[int] = []
    for p in candidates:
        if wanted.get(len(p), 0) > 0:
            wanted[len(p)] -= 1
            kept.append(list(p))
        else:
            rest.extend(p)
    rest.extend(pool)
    filled: list[list[int]] = []
    for size in sorted(wanted):
        for _ in range(wanted[size]):
            filled.append(rest[:size])
            rest = rest[size:]
    both = kept + filled
    order = sorted(range(len(both)), key=lambda i: (len(both[i]), i))
    return [both[i] for i in order], rest


def _sizes_text(sizes: Sequence[int]) -> str:
    sizes = sorted(sizes)
    if sizes and sizes == list(range(sizes[0], sizes[-1] + 1)):
        return f"{sizes[0]}-{sizes[-1]}"
    return ",".join(map(str, sizes))


def reconfigure(
    pipelines: Sequence[Sequence[int]],
    lost: Iterable[int],
    *,
    templates: TemplateSet,
    profile: Profile,
    cluster: Cluster,
    microbatches: int,
) -> Reconfiguration:
    """Full reconfiguration: policy steps 1-5, batch split, compacted ranks and the copy plan.

    "Held before" are the layers of each node under the old pipelines' templates (the template
    for ``len(pipeline)`` nodes). A pipeline size without a template after steps 1-4 makes the
    planner re-instantiate on all survivors (ascending node id) and say so in ``reason``.
    """
    if not isinstance(templates, TemplateSet) or not templates.templates:
        raise InvalidInputError("templates: expected a non-empty TemplateSet")
    old = _pipelines(pipelines)
    lost_ids = _lost(lost)
    check_count(microbatches, "microbatches", 1)
    ranges = _Ranges(templates, profile.num_layers)
    before = _holdings(old, ranges, "pipelines")
    sizes = [t.num_nodes for t in templates.templates]
    new = _policy(old, lost_ids, sizes[0])
    lost_set = set(lost_ids)
    removed = sorted({n for p in old for n in p} & lost_set)
    bad = [p for p in new if len(p) not in set(sizes)]
    spares: tuple[int, ...] = ()
    if bad:
        survivors = sorted(n for p in new for n in p)
        inst = instantiate(templates, profile, cluster, survivors, microbatches=microbatches)
        # The mix instantiate picks, laid out to move as few layers as possible: old pipelines that
        # lost no node keep their nodes; the survivors of the others (in stage order) fill the
        # remaining pipelines. Left-out nodes (spares) leave the job's process group, so they can
        # be no copy source: keeping intact pipelines keeps every layer on a node that stays.
        intact = [p for p in old if not set(p) & lost_set]
        pool = [n for p in old if set(p) & lost_set for n in p if n not in lost_set]
        new, spares = _lay_out([p.template_nodes for p in inst.pipelines], intact, pool)
        spares = tuple(sorted(spares))
        by_size = {t.num_nodes: t for t in templates.templates}
        shares, times = distribute_with_times([by_size[len(p)] for p in new], microbatches)
        plans = tuple(
            PipelinePlan(template_nodes=len(p), nodes=tuple(p), microbatches=m, estimated_ms=ms)
            for p, m, ms in zip(new, shares, times, strict=True)
        )
        reason = (
            f"pipeline {bad[0]} has {len(bad[0])} nodes and no template has that size "
            f"(sizes {_sizes_text(sizes)}): re-instantiated on the {len(survivors)} surviving nodes"
        )
        if spares:
            reason += (
                f" ({len(plans)} pipelines over {len(survivors) - len(spares)} nodes; no mix of template sizes "
                f"uses all of them, so {list(spares)} wait as spares)"
            )
    else:
        by_size = {t.num_nodes: t for t in templates.templates}
        tpls = [by_size[len(p)] for p in new]
        shares, times = distribute_with_times(tpls, microbatches)
        plans = tuple(
            PipelinePlan(template_nodes=len(p), nodes=tuple(p), microbatches=m, estimated_ms=ms)
            for p, m, ms in zip(new, shares, times, strict=True)
        )
        reason = (
            f"removed lost node(s) {removed}; {len(plans)} pipelines of sizes {[len(p) for p in new]}"
            if removed
            else f"no pipeline lost a node; {len(plans)} pipelines of sizes {[len(p) for p in new]}"
        )
    after = _holdings([list(p.nodes) for p in plans], ranges, "new pipelines")
    # Spares are no source: they leave the job's process group (see above).
    copies, copy_ms, restore = plan_copies(before, after, sorted(lost_set | set(spares)), profile, cluster)
    if restore:
        reason += f"; layers {list(restore)} have no surviving copy: restore them from the checkpoint"
    return Reconfiguration(
        pipelines=tuple(plans),
        ranks=_ranks([p.nodes for p in plans], cluster.gpus_per_node),
        copies=copies,
        copy_ms=copy_ms,
        restore_layers=restore,
        reason=reason,
        spares=spares,
    )


__all__ = ["compact_ranks", "plan_copies", "reconfigure", "reconfigure_pipelines"]


def scale_up(
    pipelines: Sequence[Sequence[int]],
    added: Iterable[int],
    *,
    templates: TemplateSet,
    profile: Profile,
    cluster: Cluster,
    microbatches: int,
) -> Reconfiguration:
    """Grow a running plan onto the nodes ``added`` (spares that joined; docs/planner.md "Scale-up"):
    instantiation over the plan's nodes plus ``added``, laid out to move as few layers as possible.

    The mix is the one :func:`instantiate` picks for that many nodes. Every current pipeline whose
    size is in the new mix keeps its nodes (nothing to copy); the nodes of the other pipelines (in
    stage order) and then the added nodes (ascending id) fill the remaining pipelines, smallest
    first. Current nodes are always used before added ones, so the new plan holds every node of
    the old one. Pipelines are listed by size, kept ones first within a size; the batch split,
    ranks and the copy plan (from the old holders; nothing is lost) follow.

    Raises :class:`InfeasibleError` when the new mix uses no more nodes than the current plan
    (the added nodes stay spares), InvalidInputError on malformed input or an added node that is
    already in the plan.
    """
    if not isinstance(templates, TemplateSet) or not templates.templates:
        raise InvalidInputError("templates: expected a non-empty TemplateSet")
    old = _pipelines(pipelines)
    if isinstance(added, (str, bytes)) or not isinstance(added, Iterable):
        raise InvalidInputError(f"added: expected node ids, got {added!r}")
    new_ids = [node_id(n, f"added[{i}]") for i, n in enumerate(added)]
    current = [n for p in old for n in p]
    in_plan = set(current)
    for n in new_ids:
        if n in in_plan:
            raise InvalidInputError(f"added: node {n} is already in the plan")
    if len(set(new_ids)) != len(new_ids):
        raise InvalidInputError("added: a node appears more than once")
    check_count(microbatches, "microbatches", 1)
    ranges = _Ranges(templates, profile.num_layers)
    before = _holdings(old, ranges, "pipelines")
    new_ids.sort()
    inst = instantiate(templates, profile, cluster, current + new_ids, microbatches=microbatches)
    used = sum(p.template_nodes for p in inst.pipelines)
    if used <= len(current):
        raise InfeasibleError(
            f"no gain: the best mix over {len(current) + len(new_ids)} nodes uses {used}, "
            f"the current plan already uses {len(current)}; nodes {new_ids} stay spares"
        )
    new, pool = _lay_out([p.template_nodes for p in inst.pipelines], old, new_ids)
    kept = [p for p in new if p in old]
    by_size = {t.num_nodes: t for t in templates.templates}
    shares, times = distribute_with_times([by_size[len(p)] for p in new], microbatches)
    plans = tuple(
        PipelinePlan(template_nodes=len(p), nodes=tuple(p), microbatches=m, estimated_ms=ms)
        for p, m, ms in zip(new, shares, times, strict=True)
    )
    after = _holdings(new, ranges, "new pipelines")
    copies, copy_ms, restore = plan_copies(before, after, [], profile, cluster)
    assert not restore, restore  # every layer had a holder before and nothing was lost
    joined = sorted(set(new_ids) - set(pool))
    reason = (
        f"scaled up from {len(current)} to {used} nodes with {joined}: {len(plans)} pipelines of sizes "
        f"{[len(p) for p in new]}, {len(kept)} kept as they were"
    )
    if pool:
        reason += f"; {pool} stay spares (no mix uses every node)"
    return Reconfiguration(
        pipelines=plans,
        ranks=_ranks(new, cluster.gpus_per_node),
        copies=copies,
        copy_ms=copy_ms,
        reason=reason,
        spares=tuple(pool),
    )
