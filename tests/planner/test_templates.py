"""Pipeline templates and the node specification: C planner against the brute force."""

from __future__ import annotations

import itertools
import math
import random
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from reference_templates import Layout, best_time_pareto, m_ref, reference_plan, sums_with_parts

from oobleck.planner import (
    InfeasibleError,
    InvalidInputError,
    LayerProfile,
    Profile,
    plan_templates,
)
from oobleck.planner.types import Cluster, Template, TemplateSet

GIB = 2**30


def make_profile(rows) -> Profile:
    layers = tuple(
        LayerProfile(f"l{i}", fwd, bwd, params, acts, out) for i, (fwd, bwd, params, acts, out) in enumerate(rows)
    )
    return Profile(model="m", microbatch_size=1, layers=layers)


def uniform_profile(num_layers: int) -> Profile:
    return make_profile([(1.0 + 0.1 * (i % 3), 2.0, 10**9, 10**8, 10**7) for i in range(num_layers)])


def cluster(nodes: int, gpus: int, memory: int = 80 * GIB, **kw) -> Cluster:
    kw.setdefault("intra_node_bytes_per_s", 3e11)
    kw.setdefault("inter_node_bytes_per_s", 2.5e10)
    return Cluster(nodes=nodes, gpus_per_node=gpus, gpu_memory_bytes=memory, **kw)


def random_case(rng: random.Random, integral: bool):
    """A small random profile and cluster; memory so tight that some layouts do not fit."""
    num_layers = rng.choice([1, 2, 3, 4, 5, 6, 6, 7, 7, 8, 8, 8])
    if integral:  # small integers: many exact ties exercise the tie rules
        rows = [
            (
                float(rng.randint(0, 3)),
                float(rng.randint(0, 3)),
                rng.randint(0, 4) * 10**6,
                rng.randint(0, 3) * 10**6,
                rng.randint(0, 3) * 10**6,
            )
            for _ in range(num_layers)
        ]
        bw = {"intra_node_bytes_per_s": 4e9, "inter_node_bytes_per_s": 1e9}
    else:
        rows = [
            (
                rng.uniform(0.1, 5),
                rng.uniform(0.1, 10),
                rng.randint(1, 10**9),
                rng.randint(1, 10**8),
                rng.randint(1, 10**8),
            )
            for _ in range(num_layers)
        ]
        bw = {"intra_node_bytes_per_s": rng.uniform(1e10, 3e11), "inter_node_bytes_per_s": rng.uniform(1e9, 2.5e10)}
    profile = make_profile(rows)
    gpus = rng.choice([1, 2])
    factor = rng.choice([1.0, 2.0, 4.0])
    total = factor * sum(r[2] for r in rows) + num_layers * sum(r[3] for r in rows)
    memory = max(1, int(total * rng.uniform(0.2, 1.0) / gpus)) if rng.random() < 0.8 else 10**15
    c = Cluster(
        nodes=rng.randint(1, 3),
        gpus_per_node=gpus,
        gpu_memory_bytes=memory,
        optimizer_state_factor=factor,
        **bw,
    )
    return profile, c, rng.randint(0, 1), rng.randint(1, 24)


def assert_matches(template: Template, layout: Layout, m: int) -> None:
    got = tuple(s.layers for s in template.stages)
    want = tuple(zip(layout.bounds[:-1], layout.bounds[1:], strict=True))
    assert got == want
    assert tuple(s.gpus for s in template.stages) == layout.gpus
    assert tuple(s.node for s in template.stages) == layout.nodes
    assert math.isclose(template.iteration_ms, layout.time_ms(m), rel_tol=1e-9, abs_tol=1e-12)
    assert math.isclose(template.bottleneck_ms, layout.max_ms, rel_tol=1e-9, abs_tol=1e-12)
    for stage, lat, mem in zip(template.stages, layout.latencies, layout.memory, strict=True):
        assert math.isclose(stage.latency_ms, lat, rel_tol=1e-9, abs_tol=1e-12)
        assert stage.memory_bytes == math.ceil(mem)
    assert template.gap == 0.0


def check_against_reference(profile: Profile, c: Cluster, ft: int, batch: int, min_nodes=None) -> None:
    want = reference_plan(profile, c, ft, batch, min_nodes)
    if want == "infeasible":
        with pytest.raises(InfeasibleError):
            plan_templates(profile, c, ft=ft, microbatches=batch, min_nodes=min_nodes)
        return
    if want == "too few nodes":
        with pytest.raises(InvalidInputError, match="too few nodes"):
            plan_templates(profile, c, ft=ft, microbatches=batch, min_nodes=min_nodes)
        return
    got = plan_templates(profile, c, ft=ft, microbatches=batch, min_nodes=min_nodes)
    spec = got.node_spec
    assert (spec.min_nodes, spec.max_nodes, spec.ft) == (want.min_nodes, want.max_nodes, ft)
    assert spec.guaranteed_range == ((ft + 1) * want.min_nodes, c.nodes)
    assert spec.uncovered == want.uncovered
    assert [t.num_nodes for t in got.templates] == sorted(want.layouts)
    for template in got.templates:
        assert_matches(template, want.layouts[template.num_nodes], m_ref(batch, template.num_nodes, c.nodes))


@pytest.mark.parametrize("integral", [False, True], ids=["float", "integer-ties"])
def test_exact_against_brute_force_random(integral):
    rng = random.Random(1234 + integral)
    for _ in range(600):
        check_against_reference(*random_case(rng, integral))


def test_exact_against_brute_force_with_min_nodes_and_four_gpus():
    rng = random.Random(99)
    for _ in range(150):
        profile, _, ft, batch = random_case(rng, integral=rng.random() < 0.5)
        c = cluster(rng.randint(2, 4), 4, memory=10**15, intra_node_bytes_per_s=rng.uniform(1e9, 1e11))
        min_nodes = rng.randint(1, min(c.nodes, profile.num_layers))
        check_against_reference(profile, c, ft, batch, min_nodes)


def test_exact_against_brute_force_larger():
    # Up to 11 layers on 4 nodes (some hundred thousand layouts in all).
    rng = random.Random(2024)
    for _ in range(80):
        integral = rng.random() < 0.5
        profile, c, ft, batch = random_case(rng, integral)
        rows = [
            (x.forward_ms, x.backward_ms, x.param_bytes, x.activation_bytes, x.output_bytes) for x in profile.layers
        ]
        while len(rows) < rng.randint(9, 11):
            rows.append(rows[rng.randrange(len(rows))])
        gpus = rng.choice([1, 2, 4])
        c = Cluster(
            nodes=rng.randint(3, 4),
            gpus_per_node=gpus,
            gpu_memory_bytes=max(1, c.gpu_memory_bytes * c.gpus_per_node // gpus),
            optimizer_state_factor=c.optimizer_state_factor,
            intra_node_bytes_per_s=c.intra_node_bytes_per_s,
            inter_node_bytes_per_s=c.inter_node_bytes_per_s,
        )
        check_against_reference(make_profile(rows), c, ft, batch)


@settings(max_examples=120, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), num_layers=st.integers(6, 16), nodes=st.integers(2, 6))
def test_optimum_matches_an_independent_pareto_dp(seed, num_layers, nodes):
    # Beyond the brute force: the least T(m_ref) equals that of a Pareto (sum, max) DP.
    rng = random.Random(seed)
    profile, c, _, _ = random_case(rng, integral=rng.random() < 0.5)
    rows = [(x.forward_ms, x.backward_ms, x.param_bytes, x.activation_bytes, x.output_bytes) for x in profile.layers]
    rows = [rows[i % len(rows)] for i in range(num_layers)]
    gpus = rng.choice([1, 2, 4])
    state = c.optimizer_state_factor * sum(r[2] for r in rows) + num_layers * sum(r[3] for r in rows)
    c = Cluster(
        nodes=nodes,
        gpus_per_node=gpus,
        gpu_memory_bytes=max(1, int(state * rng.uniform(0.03, 0.6) / gpus)) if rng.random() < 0.7 else 10**15,
        optimizer_state_factor=c.optimizer_state_factor,
        intra_node_bytes_per_s=c.intra_node_bytes_per_s,
        inter_node_bytes_per_s=c.inter_node_bytes_per_s,
    )
    profile = make_profile(rows)
    batch = rng.choice([1, 2, 5, 16, 100])
    wants = {n: best_time_pareto(profile, c, n, m_ref(batch, n, nodes)) for n in range(1, min(nodes, num_layers) + 1)}
    if all(w is None for w in wants.values()):
        with pytest.raises(InfeasibleError):
            plan_templates(profile, c, ft=0, microbatches=batch, min_nodes=1)
        return
    got = {t.num_nodes: t for t in plan_templates(profile, c, ft=0, microbatches=batch, min_nodes=1).templates}
    assert set(got) == {n for n, w in wants.items() if w is not None}
    for n, template in got.items():
        assert math.isclose(template.iteration_ms, wants[n], rel_tol=1e-9, abs_tol=1e-12)


def test_identical_layers_tie_break_is_the_documented_one():
    # One node of two GPUs, m = 1 (T = sum of latencies): sharding a stage over both GPUs costs
    # 10 ms of shard sync, so two one-GPU stages win, and all their splits have the same sum.
    layer = (1.0, 1.0, 10**9, 0, 0)
    one = plan_templates(make_profile([layer] * 4), cluster(1, 2), ft=0, microbatches=1)
    (template,) = one.templates
    assert [s.layers for s in template.stages] == [(0, 2), (2, 4)]  # ties on T: smaller max
    assert [s.gpus for s in template.stages] == [1, 1]
    (template,) = plan_templates(make_profile([layer] * 3), cluster(1, 2), ft=0, microbatches=1).templates
    assert [s.layers for s in template.stages] == [(0, 1), (1, 3)]  # ties on T and max: boundaries
    # Without parameters sharding is free: one stage on both GPUs has the smallest sum.
    (template,) = plan_templates(make_profile([(1.0, 1.0, 0, 0, 0)] * 4), cluster(1, 2), ft=0, microbatches=8).templates
    assert [(s.layers, s.gpus) for s in template.stages] == [((0, 4), 2)]


def test_uniform_model_template_shapes():
    got = plan_templates(uniform_profile(8), cluster(3, 2), ft=0, microbatches=8)
    assert got.node_spec.min_nodes == 1
    assert got.node_spec.max_nodes == 3
    assert [t.num_nodes for t in got.templates] == [1, 2, 3]
    for template in got.templates:
        stages = template.stages
        assert stages[0].layers[0] == 0 and stages[-1].layers[1] == 8
        assert all(a.layers[1] == b.layers[0] for a, b in itertools.pairwise(stages))
        assert {s.node for s in stages} == set(range(template.num_nodes))
        for node in range(template.num_nodes):
            assert sum(s.gpus for s in stages if s.node == node) == 2
        assert math.isclose(template.time_ms(m_ref(8, template.num_nodes, 3)), template.iteration_ms)
    assert isinstance(got, TemplateSet)
    assert got.for_nodes(2).num_nodes == 2


def test_large_inputs_run_and_keep_the_invariants():
    got = plan_templates(uniform_profile(32), cluster(32, 1), ft=1, microbatches=256)
    assert got.node_spec.min_nodes == 2  # 32 GiB of optimizer state do not fit one 80 GiB GPU
    assert got.node_spec.max_nodes == 30
    assert [t.num_nodes for t in got.templates] == list(range(2, 31))
    for template in got.templates:
        assert template.num_stages == template.num_nodes
        assert template.bottleneck_ms == max(s.latency_ms for s in template.stages)


# ---- node specification -----------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    num_layers=st.integers(1, 7),
    nodes=st.integers(1, 24),
    gpus=st.sampled_from([1, 2]),
    ft=st.integers(0, 4),
    use_min=st.booleans(),
    data=st.data(),
)
def test_node_spec_guarantee(num_layers, nodes, gpus, ft, use_min, data):
    profile = uniform_profile(num_layers)
    c = cluster(nodes, gpus)
    min_nodes = data.draw(st.integers(1, min(nodes, num_layers))) if use_min else None
    n0 = min_nodes or 1  # memory is ample: n = 1 fits
    if nodes < (ft + 1) * n0:
        with pytest.raises(InvalidInputError, match=rf"{nodes} nodes < \(ft\+1\)\*"):
            plan_templates(profile, c, ft=ft, microbatches=4, min_nodes=min_nodes)
        return
    got = plan_templates(profile, c, ft=ft, microbatches=4, min_nodes=min_nodes)
    spec = got.node_spec
    assert spec.min_nodes == n0
    assert spec.max_nodes == min(nodes - ft * n0, num_layers)
    sizes = [t.num_nodes for t in got.templates]
    assert sizes == list(range(spec.min_nodes, spec.max_nodes + 1))
    lo, hi = spec.guaranteed_range
    assert (lo, hi) == ((ft + 1) * n0, nodes)
    covered = sums_with_parts(sizes, lo, hi, ft + 1)
    assert set(spec.uncovered) == set(range(lo, hi + 1)) - covered
    assert list(spec.uncovered) == sorted(spec.uncovered)
    if spec.max_nodes >= 2 * spec.min_nodes - 1:
        assert spec.uncovered == ()


def test_node_spec_with_one_size_lists_every_uncovered_count():
    # Only 3-node templates (3 layers, min_nodes 3): every count that is not a multiple of 3 is
    # uncovered; more of them than the wrapper's first guess at the output size.
    got = plan_templates(uniform_profile(3), cluster(1000, 1), ft=0, microbatches=4, min_nodes=3)
    assert [t.num_nodes for t in got.templates] == [3]
    assert got.node_spec.uncovered == tuple(m for m in range(3, 1001) if m % 3)
    assert len(got.node_spec.uncovered) == 665


def test_node_spec_reports_uncovered_counts():
    # Sizes 3..4 (4 layers), no fault tolerance: 5 = 3 + 2 is not reachable from {3, 4}.
    got = plan_templates(uniform_profile(4), cluster(10, 1), ft=0, microbatches=4, min_nodes=3)
    assert got.node_spec.guaranteed_range == (3, 10)
    assert [t.num_nodes for t in got.templates] == [3, 4]
    assert got.node_spec.uncovered == (5,)


# ---- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ft": -1, "microbatches": 4}, r"^ft: must be >= 0, got -1$"),
        ({"ft": 0, "microbatches": 0}, r"^microbatches: must be >= 1, got 0$"),
        ({"ft": 0, "microbatches": 4, "min_nodes": 9}, r"^min_nodes: must be between 1 and .* = 8, got 9$"),
        ({"ft": 0, "microbatches": 4, "min_nodes": 0}, r"^min_nodes: must be between 1"),
        ({"ft": 3, "microbatches": 4, "min_nodes": 3}, r"8 nodes < \(ft\+1\)\*min_nodes = \(3\+1\)\*3 = 12"),
        ({"ft": 8, "microbatches": 4}, r"8 nodes < \(ft\+1\)\*n0 = \(8\+1\)\*1 = 9"),
        ({"ft": 0.5, "microbatches": 4}, r"^ft: expected an integer"),
        ({"ft": 0, "microbatches": 2**40}, r"^microbatches: must be between"),
    ],
)
def test_invalid_arguments(kwargs, message):
    with pytest.raises(InvalidInputError, match=message):
        plan_templates(uniform_profile(8), cluster(8, 2), **kwargs)


def test_costs_that_overflow_are_rejected():
    with pytest.raises(InvalidInputError, match="costs too large"):
        plan_templates(uniform_profile(4), cluster(2, 1, inter_node_bytes_per_s=1e-300), ft=0, microbatches=4)


def test_infeasible_memory_names_the_layer_and_the_excess():
    rows = [(1.0, 1.0, 1000, 10, 1)] * 3
    rows[1] = (1.0, 1.0, 10**6, 10, 1)
    with pytest.raises(InfeasibleError) as info:
        plan_templates(make_profile(rows), cluster(4, 2, memory=100_000), ft=0, microbatches=4)
    # layer 1 alone: 4 * 1e6 / 2 + 10 / 2 = 2,000,005 bytes per GPU
    assert "layer 1 alone on all 2 GPUs" in str(info.value)
    assert "needs 2000005 bytes per GPU, 1900005 more than the 100000 available" in str(info.value)


def test_infeasible_pipeline_depth_names_the_stage():
    # Each layer fits alone, but activations of many in-flight microbatches do not.
    rows = [(1.0, 1.0, 0, 1000, 1)] * 4
    with pytest.raises(InfeasibleError, match=r"stage 0 \(layers \[0, 2\)\) with 2 microbatches in flight"):
        plan_templates(make_profile(rows), cluster(2, 1, memory=2500), ft=0, microbatches=4)


def test_too_few_nodes_for_the_smallest_feasible_template():
    # Each node holds at most two layers: 4 layers need n0 = 2 nodes, and ft = 1 needs 4 nodes.
    rows = [(1.0, 1.0, 100, 0, 1)] * 4
    c = cluster(3, 1, memory=800)
    with pytest.raises(InvalidInputError, match=r"3 nodes < \(ft\+1\)\*n0 = \(1\+1\)\*2 = 4"):
        plan_templates(make_profile(rows), c, ft=1, microbatches=4)
    assert plan_templates(make_profile(rows), c, ft=0, microbatches=4).node_spec.min_nodes == 2


# ---- determinism and threads ---------------------------------------------------------------------


def test_deterministic_and_thread_safe():
    rng = random.Random(7)
    rows = [(rng.uniform(1, 3), rng.uniform(2, 6), rng.randint(10**8, 10**9), 10**8, 10**7) for _ in range(24)]
    profile = make_profile(rows)
    c = cluster(12, 4, memory=8 * GIB)
    serial = plan_templates(profile, c, ft=1, microbatches=64)
    assert plan_templates(profile, c, ft=1, microbatches=64) == serial
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda _: plan_templates(profile, c, ft=1, microbatches=64), range(8)))
    assert all(r == serial for r in results)
