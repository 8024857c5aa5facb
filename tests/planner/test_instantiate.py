"""Instantiation and batch distribution: C planner against the brute-force reference."""

from __future__ import annotations

import concurrent.futures
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oobleck.planner import (
    InfeasibleError,
    InvalidInputError,
    LayerProfile,
    Profile,
    distribute_batch,
    instantiate,
    load_profile,
)
from oobleck.planner.instantiate import max_node_param_bytes
from oobleck.planner.types import Cluster

try:
    from . import reference_plans as ref
except ImportError:
    import reference_plans as ref

LAYERS = 6


def cluster(bw: float = 1e6, gpus: int = 1) -> Cluster:
    return Cluster(
        nodes=16,
        gpus_per_node=gpus,
        gpu_memory_bytes=10**10,
        intra_node_bytes_per_s=1e11,
        inter_node_bytes_per_s=bw,
    )


@st.composite
def template_sets(draw, max_n0=3, max_types=4, contiguous=False):
    n0 = draw(st.integers(1, max_n0))
    n_max = draw(st.integers(n0, min(n0 + max_types - 1, LAYERS)))
    sizes = list(range(n0, n_max + 1))
    if not contiguous and len(sizes) > 2 and draw(st.booleans()):
        sizes.pop(draw(st.integers(1, len(sizes) - 2)))
    # Integer latencies keep costs away from 1e-9 near-ties, so the reference's and C's tie
    # rules see the same order.
    templates = [ref.make_template(n, draw(st.lists(st.integers(1, 9), min_size=n, max_size=n)), LAYERS) for n in sizes]
    ft = draw(st.integers(0, 2))
    return ref.make_template_set(templates, ft)


def counts_of(inst, templates):
    return tuple(sum(1 for p in inst.pipelines if p.template_nodes == t.num_nodes) for t in templates.templates)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    templates=template_sets(),
    num_nodes=st.integers(1, 12),
    microbatches=st.integers(1, 12),
    param_units=st.lists(st.integers(0, 5), min_size=LAYERS, max_size=LAYERS),
    bw=st.sampled_from([1e3, 1e5, 1e6]),
)
def test_instantiation_matches_brute_force_over_all_mixes_and_splits(
    templates, num_nodes, microbatches, param_units, bw
):
    profile = ref.make_profile([u * 1000 for u in param_units])
    w = ref.max_node_param_bytes(templates, profile)
    assert max_node_param_bytes(templates, profile) == w
    nodes = list(range(100, 100 + num_nodes))
    try:
        expected = ref.brute_instantiate(templates.templates, num_nodes, templates.node_spec.ft, microbatches, w, bw)
    except ValueError as exc:
        with pytest.raises(InfeasibleError, match="too few nodes" if "nodes" in str(exc) else "microbatches"):
            instantiate(templates, profile, cluster(bw), nodes, microbatches=microbatches)
        return
    got = instantiate(templates, profile, cluster(bw), nodes, microbatches=microbatches)
    assert counts_of(got, templates) == expected["counts"]
    assert [p.microbatches for p in got.pipelines] == expected["shares"]
    assert got.iteration_ms == pytest.approx(expected["estimate"], rel=1e-12)
    assert got.sync_ms == pytest.approx(expected["sync"], rel=1e-12)
    assert got.degraded == expected["degraded"]
    # Pipelines by template size ascending, nodes handed out in the caller's order.
    assert [p.template_nodes for p in got.pipelines] == sorted(p.template_nodes for p in got.pipelines)
    handed = [n for p in got.pipelines for n in p.nodes]
    assert handed + list(got.spares) == nodes
    assert len(handed) == expected["used"]
    assert sum(p.microbatches for p in got.pipelines) == microbatches
    for p in got.pipelines:
        assert p.estimated_ms == templates.for_nodes(p.template_nodes).time_ms(p.microbatches)


@settings(max_examples=120, deadline=None)
@given(templates=template_sets(max_n0=3, contiguous=True), data=st.data())
def test_every_node_count_in_the_guaranteed_range_uses_every_node_with_ft_plus_one_pipelines(templates, data):
    spec = templates.node_spec
    n0, n_max, ft = spec.min_nodes, spec.max_nodes, spec.ft
    if n_max < 2 * n0 - 1:
        return  # not covered by the guarantee (node specification reports such counts)
    m = data.draw(st.integers((ft + 1) * n0, (ft + 1) * n0 + 3 * n_max), label="nodes")
    profile = ref.make_profile([1000] * LAYERS)
    got = instantiate(templates, profile, cluster(), list(range(m)), microbatches=64)
    assert len(got.pipelines) >= ft + 1
    assert not got.degraded
    assert got.spares == ()
    assert sorted(n for p in got.pipelines for n in p.nodes) == list(range(m))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    templates=template_sets(max_n0=2, max_types=7, contiguous=True),
    num_nodes=st.integers(4, 14),
    microbatches=st.integers(4, 40),
    bw=st.sampled_from([1e2, 1e4, 1e6]),
)
def test_more_template_sizes_against_brute_force(templates, num_nodes, microbatches, bw):
    """Up to 7 sizes: exercises the kept/recomputed suffix tables and the pipeline-count bounds."""
    profile = ref.make_profile([1000 * (i + 1) for i in range(LAYERS)])
    w = ref.max_node_param_bytes(templates, profile)
    try:
        expected = ref.brute_instantiate(templates.templates, num_nodes, templates.node_spec.ft, microbatches, w, bw)
    except ValueError:
        return
    got = instantiate(templates, profile, cluster(bw), list(range(num_nodes)), microbatches=microbatches)
    assert counts_of(got, templates) == expected["counts"]
    assert [p.microbatches for p in got.pipelines] == expected["shares"]


def test_guarantee_with_planned_templates():
    """Every node count in the node specification's guaranteed range: >= ft+1 pipelines, all nodes used."""
    from oobleck.planner import plan_templates

    layers = tuple(LayerProfile(f"l{i}", 1.0 + i % 3, 2.0, 10**8, 10**6, 10**5) for i in range(12))
    profile = Profile(model="m", microbatch_size=1, layers=layers)
    c = Cluster(
        nodes=14,
        gpus_per_node=1,
        gpu_memory_bytes=2 * 10**9,
        intra_node_bytes_per_s=3e11,
        inter_node_bytes_per_s=2.5e10,
    )
    templates = plan_templates(profile, c, ft=1, microbatches=32)
    lo, hi = templates.node_spec.guaranteed_range
    assert lo <= hi
    for m in range(lo, hi + 1):
        if m in templates.node_spec.uncovered:
            continue
        got = instantiate(templates, profile, c, list(range(m)), microbatches=32)
        assert len(got.pipelines) >= templates.node_spec.ft + 1, m
        assert sorted(n for p in got.pipelines for n in p.nodes) == list(range(m)), m


def test_distribute_batch_is_the_canonical_split_and_optimal():
    rng = random.Random(7)
    for _ in range(200):
        templates = [
            ref.make_template(n, [rng.randint(1, 9) for _ in range(n)], LAYERS) for n in rng.choices(range(1, 5), k=3)
        ]
        b = rng.randint(3, 11)
        shares = distribute_batch(templates, b)
        assert shares == ref.canonical_split(templates, b)
        z = max(t.time_ms(m) for t, m in zip(templates, shares, strict=True))
        assert z == ref.brute_min_max(templates, b)


def test_distribute_batch_ties_go_to_the_lower_index():
    same = ref.make_template(2, [3, 3], LAYERS)
    assert distribute_batch([same, same, same], 5) == [2, 2, 1]


def test_distribute_batch_errors():
    t = ref.make_template(2, [3, 3], LAYERS)
    with pytest.raises(InfeasibleError, match=r"microbatches \(1\) must be >= the number of pipelines \(2\)"):
        distribute_batch([t, t], 1)
    with pytest.raises(InvalidInputError, match="microbatches"):
        distribute_batch([t], 0)
    with pytest.raises(InvalidInputError, match="at least one pipeline"):
        distribute_batch([], 4)


def small_set(ft=1):
    return ref.make_template_set([ref.make_template(2, [4, 5], LAYERS), ref.make_template(3, [3, 3, 3], LAYERS)], ft=ft)


def test_too_few_nodes_is_an_error_naming_the_numbers():
    with pytest.raises(InfeasibleError, match="too few nodes: 1 available, the smallest pipeline template needs 2"):
        instantiate(small_set(), ref.make_profile([1] * LAYERS), cluster(), [5], microbatches=8)


def test_fewer_microbatches_than_pipelines_is_an_error():
    with pytest.raises(InfeasibleError, match=r"microbatches \(1\) must be >= the number of pipelines \(2 = ft \+ 1\)"):
        instantiate(small_set(ft=1), ref.make_profile([1] * LAYERS), cluster(), list(range(6)), microbatches=1)


def test_degraded_when_fewer_than_ft_plus_one_pipelines_fit():
    got = instantiate(small_set(ft=2), ref.make_profile([1] * LAYERS), cluster(), [1, 2, 3, 4, 5], microbatches=8)
    assert got.degraded
    assert sum(len(p.nodes) for p in got.pipelines) == 5


def test_spares_when_no_mix_uses_every_node():
    templates = ref.make_template_set([ref.make_template(3, [1, 1, 1], LAYERS)], ft=0)
    got = instantiate(templates, ref.make_profile([1] * LAYERS), cluster(), [9, 8, 7, 6, 5], microbatches=4)
    assert [p.nodes for p in got.pipelines] == [(9, 8, 7)]
    assert got.spares == (6, 5)


@pytest.mark.parametrize(
    ("nodes", "microbatches", "match"),
    [
        ([0, 1, 1, 2], 4, "nodes: node 1 appears more than once"),
        ([0, True], 4, r"nodes\[1\]: expected an integer node id"),
        ([0, "x"], 4, r"nodes\[1\]: expected an integer node id"),
        ([0, 1, 2, 3], 0, "microbatches: must be >= 1"),
        ([0, 1, 2, 3], 2.5, "microbatches: expected an integer"),
    ],
)
def test_malformed_inputs_are_typed_errors(nodes, microbatches, match):
    with pytest.raises(InvalidInputError, match=match):
        instantiate(small_set(), ref.make_profile([1] * LAYERS), cluster(), nodes, microbatches=microbatches)


def test_template_outside_the_profile_is_an_error():
    with pytest.raises(InvalidInputError, match="outside the profile's 3 layers"):
        instantiate(small_set(), ref.make_profile([1] * 3), cluster(), list(range(6)), microbatches=4)


def test_c_rejects_malformed_costs_with_its_own_message():
    bad = ref.make_template_set([ref.make_template(3, [1, 1, 1], LAYERS), ref.make_template(2, [1, 1], LAYERS)], 0)
    with pytest.raises(InvalidInputError, match=r"templates\[1\].num_nodes must be larger than the previous"):
        instantiate(bad, ref.make_profile([1] * LAYERS), cluster(), list(range(6)), microbatches=4)


def test_same_input_same_output_on_eight_threads():
    rng = random.Random(3)
    templates = ref.make_template_set(
        [ref.make_template(n, [rng.randint(5, 50) for _ in range(n)], 40) for n in range(2, 11)], ft=2
    )
    profile = ref.make_profile([rng.randint(1, 10) * 10**6 for _ in range(40)])
    nodes = list(range(200))
    expected = instantiate(templates, profile, cluster(2.5e10), nodes, microbatches=1024)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(
            pool.map(lambda _: instantiate(templates, profile, cluster(2.5e10), nodes, microbatches=1024), range(32))
        )
    assert all(r == expected for r in results)
    assert sum(p.microbatches for p in expected.pipelines) == 1024


def test_with_planned_templates(tmp_path):
    """End to end with the template planner on a small profile."""
    from oobleck.planner import plan_templates

    path = tmp_path / "p.json"
    layers = [
        {
            "name": f"l{i}",
            "forward_ms": 1.0 + i % 3,
            "backward_ms": 2.0,
            "param_bytes": 10**6,
            "activation_bytes": 10**4,
            "output_bytes": 10**3,
        }
        for i in range(8)
    ]
    import json

    path.write_text(json.dumps({"format": "oobleck-profile/1", "model": "m", "microbatch_size": 1, "layers": layers}))
    profile = load_profile(path)
    c = Cluster(
        nodes=8, gpus_per_node=1, gpu_memory_bytes=10**9, intra_node_bytes_per_s=1e11, inter_node_bytes_per_s=1e9
    )
    templates = plan_templates(profile, c, ft=1, microbatches=16)
    got = instantiate(templates, profile, c, list(range(8)), microbatches=16)
    assert len(got.pipelines) >= 2
    assert sorted(n for p in got.pipelines for n in p.nodes) == list(range(8))
