"""Pure-Python brute force for pipeline templates and the node specification (docs/planner.md).

It enumerates every layout, so it is only usable on tiny inputs. It follows the same written
rules as the C planner (see the template section of native/include/oobleck_planner.h): one GPU
count per node, ``g = G / q`` for the ``q`` stages of a node, ``q`` dividing ``G``, and the tie
rules with a relative tolerance of 1e-9.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

from oobleck.planner import Profile
from oobleck.planner.types import Cluster

EPS = 1e-9


@dataclass(frozen=True)
class Layout:
    bounds: tuple[int, ...]  # 0 = b_0 < b_1 < ... < b_S = L
    gpus: tuple[int, ...]  # per stage
    nodes: tuple[int, ...]  # per stage: index of the node within the template
    latencies: tuple[float, ...]
    memory: tuple[float, ...]

    @property
    def num_stages(self) -> int:
        return len(self.gpus)

    @property
    def sum_ms(self) -> float:
        return sum(self.latencies)

    @property
    def max_ms(self) -> float:
        return max(self.latencies)

    def time_ms(self, m: int) -> float:
        return self.sum_ms + (m - 1) * self.max_ms


def m_ref(microbatches: int, n: int, nodes: int) -> int:
    """``max(1, floor(B n / N + 1/2))`` in exact integer arithmetic."""
    return max(1, (2 * microbatches * n + nodes) // (2 * nodes))


def _stage_counts(gpus_per_node: int, num_layers: int) -> list[int]:
    return [q for q in range(1, min(gpus_per_node, num_layers) + 1) if gpus_per_node % q == 0]


def _compositions(total: int, parts: int, allowed: list[int]):
    """Tuples of `parts` values from `allowed` summing to `total`."""
    if parts == 0:
        if total == 0:
            yield ()
        return
    for q in allowed:
        if q <= total - (parts - 1):
            for rest in _compositions(total - q, parts - 1, allowed):
                yield (q, *rest)


def _evaluate(profile: Profile, cluster: Cluster, bounds: tuple[int, ...], per_node: tuple[int, ...]):
    layers = profile.layers
    G = cluster.gpus_per_node
    S = len(bounds) - 1
    capacity = cluster.gpu_memory_bytes - cluster.reserved_bytes
    gpus, nodes, firsts, lasts = [], [], [], []
    for node, q in enumerate(per_node):
        for i in range(q):
            gpus.append(G // q)
            nodes.append(node)
            firsts.append(i == 0)
            lasts.append(i == q - 1)

    def link(boundary: int, same_node: bool) -> float:
        bw = cluster.intra_node_bytes_per_s if same_node else cluster.inter_node_bytes_per_s
        return 1000 * layers[boundary - 1].output_bytes / bw

    lat, mem = [], []
    for s in range(S):
        a, b, g = bounds[s], bounds[s + 1], gpus[s]
        work = sum(layer.forward_ms + layer.backward_ms for layer in layers[a:b])
        params = sum(layer.param_bytes for layer in layers[a:b])
        acts = sum(layer.activation_bytes for layer in layers[a:b])
        compute = work / g
        sync = 1000 * 2 * (g - 1) / g * params / cluster.intra_node_bytes_per_s if g > 1 else 0.0
        c_in = 0.0 if s == 0 else link(a, not firsts[s])
        c_out = 0.0 if s == S - 1 else link(b, not lasts[s])
        memory = (cluster.optimizer_state_factor * params + (S - s) * acts) / g
        if memory > capacity:
            return None
        lat.append(compute + sync + c_in + c_out)
        mem.append(memory)
    return Layout(tuple(bounds), tuple(gpus), tuple(nodes), tuple(lat), tuple(mem))


def all_layouts(profile: Profile, cluster: Cluster, n: int):
    """Every layout for `n` nodes that fits in memory."""
    L, G = profile.num_layers, cluster.gpus_per_node
    allowed = _stage_counts(G, L)
    for S in range(n, min(L, n * G) + 1):
        for cuts in itertools.combinations(range(1, L), S - 1):
            bounds = (0, *cuts, L)
            for per_node in _compositions(S, n, allowed):
                layout = _evaluate(profile, cluster, bounds, per_node)
                if layout is not None:
                    yield layout


def best_layout(profile: Profile, cluster: Cluster, n: int, m: int) -> Layout | None:
    """The optimal layout for `n` nodes and `m` microbatches under the tie rules, or None."""
    layouts = list(all_layouts(profile, cluster, n))
    if not layouts:
        return None
    t_star = min(x.time_ms(m) for x in layouts)
    t_thr = t_star + EPS * abs(t_star)
    m_star = min(x.max_ms for x in layouts if x.time_ms(m) <= t_thr)
    cap = m_star + EPS * abs(m_star)
    budget = t_thr - (m - 1) * m_star
    tied = [x for x in layouts if x.max_ms <= cap and x.sum_ms <= budget]
    return min(tied, key=lambda x: (x.num_stages, x.bounds, x.gpus))


def sums_with_parts(sizes: list[int], lo: int, hi: int, parts: int) -> set[int]:
    """Values in [lo, hi] that are a sum of at least `parts` values from `sizes` (repeats allowed)."""
    if not sizes:
        return set()
    exact: set[int] = {0}
    covered: set[int] = set()
    count = 0
    while exact:
        exact = {v + s for v in exact for s in sizes if v + s <= hi}
        count += 1
        if count >= parts:
            covered |= exact
    return {v for v in covered if lo <= v <= hi}


@dataclass(frozen=True)
class ReferencePlan:
    min_nodes: int
    max_nodes: int
    layouts: dict[int, Layout]  # by node count, only sizes with a feasible layout
    uncovered: tuple[int, ...]


def reference_plan(
    profile: Profile, cluster: Cluster, ft: int, microbatches: int, min_nodes: int | None = None
) -> ReferencePlan | str:
    """The brute-force plan, or "infeasible" / "too few nodes" for the two error cases."""
    N = cluster.nodes
    feasible = [n for n in range(1, min(N, profile.num_layers) + 1) if next(all_layouts(profile, cluster, n), None)]
    if min_nodes is not None and (ft + 1) * min_nodes > N:
        return "too few nodes"
    if not feasible:
        return "infeasible"
    n0 = min_nodes if min_nodes is not None else feasible[0]
    if (ft + 1) * n0 > N:
        return "too few nodes"
    n_max = min(N - ft * n0, feasible[-1])
    sizes = [n for n in feasible if n0 <= n <= n_max]
    if not sizes:
        return "infeasible"
    layouts = {}
    for n in sizes:
        layout = best_layout(profile, cluster, n, m_ref(microbatches, n, N))
        assert layout is not None
        layouts[n] = layout
    lo = (ft + 1) * n0
    covered = sums_with_parts(sizes, lo, N, ft + 1)
    uncovered = tuple(v for v in range(lo, N + 1) if v not in covered)
    return ReferencePlan(n0, n_max, layouts, uncovered)


def best_time_pareto(profile: Profile, cluster: Cluster, n: int, m: int) -> float | None:
    """min T(m) over layouts of `n` nodes by a different exact method (no caps, no search).

    A DP over (first layer, nodes left, stages left, node's stage count, stages left in the node)
    keeping, per state, every Pareto-optimal (sum, max) pair of the stages from there on. Usable
    well beyond the brute force (tens of layers); returns None when nothing fits.
    """
    layers = profile.layers
    L, G = profile.num_layers, cluster.gpus_per_node
    allowed = _stage_counts(G, L)
    capacity = cluster.gpu_memory_bytes - cluster.reserved_bytes

    def link(boundary: int, intra: bool | None) -> float:
        if intra is None:
            return 0.0
        bw = cluster.intra_node_bytes_per_s if intra else cluster.inter_node_bytes_per_s
        return 1000 * layers[boundary - 1].output_bytes / bw

    def latency(a: int, b: int, g: int, link_in: bool | None, link_out: bool | None) -> float:
        work = sum(x.forward_ms + x.backward_ms for x in layers[a:b])
        params = sum(x.param_bytes for x in layers[a:b])
        sync = 1000 * 2 * (g - 1) / g * params / cluster.intra_node_bytes_per_s if g > 1 else 0.0
        return work / g + sync + link(a, link_in) + link(b, link_out)

    def fits(a: int, b: int, g: int, k: int) -> bool:
        params = sum(x.param_bytes for x in layers[a:b])
        acts = sum(x.activation_bytes for x in layers[a:b])
        return (cluster.optimizer_state_factor * params + k * acts) / g <= capacity

    def pareto(points):
        front, best_max = [], math.inf
        for s, mx in sorted(set(points)):
            if mx < best_max:
                front.append((s, mx))
                best_max = mx
        return tuple(front)

    @functools.cache
    def suffix(x: int, j: int, k: int, q: int, t: int):
        if k < t + j - 1 or k - t > (j - 1) * G or k > L - x:
            return ()
        g = G // q
        link_in = True if t < q else (False if x > 0 else None)
        points = []
        for y in range(x + 1, L + 1):
            if not fits(x, y, g, k):
                break
            if y == L:
                if t == 1 and j == 1 and k == 1:
                    lat = latency(x, y, g, link_in, None)
                    points.append((lat, lat))
                continue
            if t > 1:
                lat, rest = latency(x, y, g, link_in, True), suffix(y, j, k - 1, q, t - 1)
            elif j > 1:
                lat = latency(x, y, g, link_in, False)
                rest = tuple(p for q2 in allowed for p in suffix(y, j - 1, k - 1, q2, q2))
            else:
                continue
            points.extend((lat + s, max(lat, mx)) for s, mx in rest)
        return pareto(points)

    roots = [p for k in range(n, min(L, n * G) + 1) for q in allowed for p in suffix(0, n, k, q, q)]
    return min((s + (m - 1) * mx for s, mx in roots), default=None)
