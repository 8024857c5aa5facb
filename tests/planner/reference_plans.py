"""Pure-Python reference implementations (brute force) of instantiation, batch split,
reconfiguration and the layer-copy plan, written straight from docs/planner.md for small inputs.

Also small builders of hand-made templates for tests.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

from oobleck.planner.profile import LayerProfile, Profile
from oobleck.planner.types import NodeSpec, Stage, Template, TemplateSet

# ---- builders ------------------------------------------------------------------------------


def make_template(num_nodes: int, latencies: Sequence[float], num_layers: int) -> Template:
    """A template with one stage per node (latencies[i] on node i), layers split evenly."""
    assert len(latencies) == num_nodes <= num_layers
    bounds = [round(i * num_layers / num_nodes) for i in range(num_nodes + 1)]
    stages = tuple(
        Stage(layers=(bounds[i], bounds[i + 1]), node=i, gpus=1, latency_ms=float(lat), memory_bytes=0)
        for i, lat in enumerate(latencies)
    )
    m_ref = 1
    sum_l = math.fsum(s.latency_ms for s in stages)
    bottleneck = max(s.latency_ms for s in stages)
    return Template(
        num_nodes=num_nodes, stages=stages, iteration_ms=sum_l + (m_ref - 1) * bottleneck, bottleneck_ms=bottleneck
    )


def make_template_set(templates: Sequence[Template], ft: int, total_nodes: int | None = None) -> TemplateSet:
    sizes = [t.num_nodes for t in templates]
    n0, n_max = sizes[0], sizes[-1]
    hi = total_nodes if total_nodes is not None else (ft + 1) * n_max
    return TemplateSet(
        node_spec=NodeSpec(min_nodes=n0, max_nodes=n_max, ft=ft, guaranteed_range=((ft + 1) * n0, hi)),
        templates=tuple(templates),
    )


def make_profile(param_bytes: Sequence[int]) -> Profile:
    layers = tuple(
        LayerProfile(name=f"l{i}", forward_ms=1.0, backward_ms=2.0, param_bytes=p, activation_bytes=10, output_bytes=10)
        for i, p in enumerate(param_bytes)
    )
    return Profile(model="ref", microbatch_size=1, layers=layers)


# ---- batch split -----------------------------------------------------------------------------


def canonical_split(templates: Sequence[Template], microbatches: int) -> list[int]:
    """Start at 1 each, then hand out one at a time to the smallest T_p(m_p + 1) (ties: lower index)."""
    m = [1] * len(templates)
    for _ in range(microbatches - len(templates)):
        best = min(range(len(templates)), key=lambda p: (templates[p].time_ms(m[p] + 1), p))
        m[best] += 1
    return m


def brute_min_max(templates: Sequence[Template], microbatches: int) -> float:
    """min over all splits (m_p >= 1, sum = B) of max_p T_p(m_p), by enumerating every split."""
    p = len(templates)
    best = math.inf
    # compositions of B into p positive parts via bars between B-1 gaps
    for cuts in itertools.combinations(range(1, microbatches), p - 1):
        parts = [b - a for a, b in zip((0, *cuts), (*cuts, microbatches), strict=True)]
        best = min(best, max(t.time_ms(m) for t, m in zip(templates, parts, strict=True)))
    return best


# ---- instantiation ---------------------------------------------------------------------------


def sync_ms(p: int, w: float, bw: float) -> float:
    return 1000.0 * 2.0 * (p - 1) / p * w / bw


def _tie(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-9 * max(abs(a), abs(b))


def max_node_param_bytes(templates: TemplateSet, profile: Profile) -> int:
    most = 0
    for t in templates.templates:
        for i in range(t.num_nodes):
            a, b = t.node_layers(i)
            most = max(most, sum(layer.param_bytes for layer in profile.layers[a:b]))
    return most


def brute_instantiate(
    templates: Sequence[Template], num_nodes: int, ft: int, microbatches: int, w: float, bw: float
) -> dict:
    """Every count vector, every split: the plan of docs/planner.md, as
    ``{"counts", "shares", "z", "sync", "estimate", "used", "degraded"}``.
    Raises ValueError("too few nodes" / "microbatches") like the C errors."""
    sizes = [t.num_nodes for t in templates]
    n0 = sizes[0]
    if num_nodes < n0:
        raise ValueError("too few nodes")
    degraded = num_nodes < (ft + 1) * n0
    p_lo = 1 if degraded else ft + 1
    if microbatches < p_lo:
        raise ValueError("microbatches")
    mixes = []
    for counts in itertools.product(*(range(num_nodes // s + 1) for s in sizes)):
        used = sum(k * s for k, s in zip(counts, sizes, strict=True))
        p = sum(counts)
        if used <= num_nodes and p_lo <= p <= microbatches:
            mixes.append((used, p, counts))
    used_max = max(u for u, _, _ in mixes)
    best = None
    for _, p, counts in sorted(m for m in mixes if m[0] == used_max):  # P ascending, then counts lex
        pipes = [t for t, k in zip(templates, counts, strict=True) for _ in range(k)]
        z = brute_min_max(pipes, microbatches) if microbatches <= 14 else None
        shares = canonical_split(pipes, microbatches)
        zc = max(t.time_ms(m) for t, m in zip(pipes, shares, strict=True))
        if z is not None:
            assert zc == z, (counts, zc, z)  # the canonical split is an optimal split
        est = zc + sync_ms(p, w, bw)
        if best is None or (est < best["estimate"] and not _tie(est, best["estimate"])):
            best = {
                "counts": counts,
                "shares": shares,
                "z": zc,
                "sync": sync_ms(p, w, bw),
                "estimate": est,
                "used": used_max,
                "degraded": degraded,
            }
    return best


# ---- reconfiguration -------------------------------------------------------------------------


class Insufficient(Exception):
    pass


def policy(pipelines: Sequence[Sequence[int]], lost: set[int], min_nodes: int) -> list[list[int]]:
    """Steps 1-4 of docs/planner.md "Reconfiguration after failures", literally."""
    pls = [[n for n in p if n not in lost] for p in pipelines]
    state = ["keep"] * len(pls)
    for i, p in enumerate(pls):
        if not p:
            state[i] = "drop"
            continue
        while len(p) < min_nodes:
            donors = [j for j, q in enumerate(pls) if j != i and state[j] != "drop" and len(q) > min_nodes]
            if not donors:
                state[i] = "short"
                break
            top = max(len(pls[j]) for j in donors)
            donor = pls[[j for j in donors if len(pls[j]) == top][-1]]
            while len(p) < min_nodes and len(donor) > min_nodes:
                p.append(donor.pop())
    short = [pls[i] for i in range(len(pls)) if state[i] == "short"]
    rest = [pls[i] for i in range(len(pls)) if state[i] == "keep"]
    while short:
        cur = short.pop(0)
        while len(cur) < min_nodes:
            if short:
                cur.extend(short.pop(0))
            elif rest:
                cur.extend(rest.pop(0))
            else:
                raise Insufficient
        rest.append(cur)
    if not rest:
        raise Insufficient
    return sorted((sorted(p) for p in rest), key=lambda p: (len(p), p[0]))


def copy_plan(
    before: dict[int, tuple[int, int]],
    after: dict[int, tuple[int, int]],
    lost: set[int],
    param_bytes: Sequence[int],
    factor: float,
    bw: float,
):
    """Greedy copy plan of docs/planner.md: returns (copies as (layer, src, dst, bytes), copy_ms, restore)."""
    sent: dict[int, float] = {}
    recv: dict[int, float] = {}
    copies, restore = [], []
    for layer in range(len(param_bytes)):
        holders = sorted(n for n, (a, b) in before.items() if a <= layer < b and n not in lost)
        size = param_bytes[layer] * max(factor - 1.0, 0.0)
        for dst in sorted(after):
            a, b = after[dst]
            if not a <= layer < b:
                continue
            if dst in before and before[dst][0] <= layer < before[dst][1]:
                continue
            if not holders:
                if layer not in restore:
                    restore.append(layer)
                continue
            src = min(holders, key=lambda n: (sent.get(n, 0.0), n))
            copies.append((layer, src, dst, round(size)))
            sent[src] = sent.get(src, 0.0) + size
            recv[dst] = recv.get(dst, 0.0) + size
    most = max([0.0, *sent.values(), *recv.values()])
    return copies, 1000.0 * most / bw, restore
