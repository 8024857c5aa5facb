"""Reconfiguration after failures, compacted ranks and the layer-copy plan."""

from __future__ import annotations

import concurrent.futures

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from oobleck.planner import InfeasibleError, InvalidInputError, reconfigure, reconfigure_pipelines
from oobleck.planner.types import Cluster

try:
    from . import reference_plans as ref
except ImportError:
    import reference_plans as ref

EXAMPLE = [[0, 1], [2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12, 13]]
LAYERS = 10


# ---- the worked examples of docs/planner.md -------------------------------------------------


def test_example_lost_one_node_keeps_every_pipeline():
    assert reconfigure_pipelines(EXAMPLE, [2], min_nodes=2) == [[0, 1], [3, 4], [5, 6, 7, 8], [9, 10, 11, 12, 13]]


def test_example_lost_two_nodes_of_one_pipeline():
    assert reconfigure_pipelines(EXAMPLE, [6, 8], min_nodes=2) == [[0, 1], [5, 7], [2, 3, 4], [9, 10, 11, 12, 13]]


def test_example_lost_most_nodes_merges_into_one_pipeline():
    assert reconfigure_pipelines(EXAMPLE, range(1, 12), min_nodes=2) == [[0, 12, 13]]


def test_borrowing_takes_the_last_node_of_the_largest_pipeline():
    # [0] is short; the largest pipeline with more than 2 nodes is the last [9..13]; it gives 13.
    assert reconfigure_pipelines([[0, 1], [5, 6, 7], [9, 10, 11, 12, 13]], [1], min_nodes=2) == [
        [0, 13],
        [5, 6, 7],
        [9, 10, 11, 12],
    ]


def test_insufficient_nodes():
    with pytest.raises(InfeasibleError, match="insufficient nodes: 1 surviving, a pipeline needs at least 2"):
        reconfigure_pipelines(EXAMPLE, range(1, 14), min_nodes=2)
    with pytest.raises(InfeasibleError, match="insufficient nodes: 0 surviving"):
        reconfigure_pipelines(EXAMPLE, range(14), min_nodes=2)


@pytest.mark.parametrize(
    ("pipelines", "lost", "min_nodes", "match"),
    [
        ([[0, 1], [1, 2]], [], 2, "node 1 appears more than once"),
        ([[0, "a"]], [], 2, r"pipelines\[0\]\[1\]: expected an integer node id"),
        ([[0, 1]], ["x"], 2, r"lost\[0\]: expected an integer node id"),
        ("01", [], 2, "pipelines: expected a list"),
        ([[0, 1]], [], 0, "min_nodes: must be >= 1"),
        ([[0, 2**63]], [], 1, "does not fit in 64 bits"),
    ],
)
def test_malformed_inputs(pipelines, lost, min_nodes, match):
    with pytest.raises(InvalidInputError, match=match):
        reconfigure_pipelines(pipelines, lost, min_nodes=min_nodes)


# ---- properties against the reference -------------------------------------------------------


@st.composite
def pipelines_and_lost(draw, max_pipelines=6, max_len=6):
    sizes = draw(st.lists(st.integers(1, max_len), min_size=1, max_size=max_pipelines))
    ids = draw(st.permutations(range(sum(sizes))))
    ids = [i * 3 + 1 for i in ids]  # arbitrary, non-contiguous ids
    pipelines, pos = [], 0
    for s in sizes:
        pipelines.append(ids[pos : pos + s])
        pos += s
    lost = draw(st.sets(st.sampled_from(ids))) if ids else set()
    extra = draw(st.sets(st.integers(1000, 1010), max_size=2))  # lost ids in no pipeline are ignored
    return pipelines, lost | extra


@settings(max_examples=300, deadline=None)
@given(case=pipelines_and_lost(), min_nodes=st.integers(1, 4))
def test_policy_matches_reference_and_uses_every_survivor_once(case, min_nodes):
    pipelines, lost = case
    survivors = sorted(n for p in pipelines for n in p if n not in lost)
    try:
        expected = ref.policy(pipelines, lost, min_nodes)
    except ref.Insufficient:
        with pytest.raises(InfeasibleError, match="insufficient nodes"):
            reconfigure_pipelines(pipelines, lost, min_nodes=min_nodes)
        return
    got = reconfigure_pipelines(pipelines, lost, min_nodes=min_nodes)
    assert got == expected
    assert sorted(n for p in got for n in p) == survivors
    assert all(len(p) >= min_nodes for p in got)
    assert got == sorted(got, key=lambda p: (len(p), p[0]))
    assert reconfigure_pipelines(pipelines, lost, min_nodes=min_nodes) == got  # same input, same output


def template_set(n0: int, n_max: int, ft: int = 0):
    templates = [ref.make_template(n, [2 + (i * 7 + n) % 5 for i in range(n)], LAYERS) for n in range(n0, n_max + 1)]
    return ref.make_template_set(templates, ft)


def cluster(gpus: int = 2) -> Cluster:
    return Cluster(
        nodes=64,
        gpus_per_node=gpus,
        gpu_memory_bytes=10**10,
        intra_node_bytes_per_s=1e11,
        inter_node_bytes_per_s=1e9,
        optimizer_state_factor=4,
    )


PROFILE = ref.make_profile([(i + 1) * 1000 for i in range(LAYERS)])


def layer_map(pipelines, templates):
    held = {}
    for p in pipelines:
        t = templates.for_nodes(len(p))
        for i, n in enumerate(p):
            held[n] = t.node_layers(i)
    return held


@settings(max_examples=200, deadline=None)
@given(
    case=pipelines_and_lost(max_pipelines=5, max_len=5),
    n0=st.integers(1, 2),
    gpus=st.integers(1, 3),
    microbatches=st.integers(6, 20),
)
def test_full_reconfiguration_properties(case, n0, gpus, microbatches):
    pipelines, lost = case
    pipelines = [p for p in pipelines if len(p) >= n0]
    if not pipelines:
        return
    templates = template_set(n0, 5)
    try:
        got = reconfigure(
            pipelines, lost, templates=templates, profile=PROFILE, cluster=cluster(gpus), microbatches=microbatches
        )
    except InfeasibleError as exc:
        assert "insufficient nodes" in str(exc) or "microbatches" in str(exc)
        return
    survivors = sorted(n for p in pipelines for n in p if n not in lost)
    used = [n for p in got.pipelines for n in p.nodes]
    assert sorted(used + list(got.spares)) == survivors  # every survivor once, never a lost one
    assert not set(used) & lost
    assert not {c.src for c in got.copies} & set(got.spares)  # spares leave: they send nothing
    for p in got.pipelines:
        assert templates.for_nodes(len(p.nodes)).num_nodes == p.template_nodes  # every pipeline has a template
    assert sum(p.microbatches for p in got.pipelines) == microbatches
    # Ranks: pipelines in order, nodes in order, GPUs in order: 0..W-1 without gaps.
    flat = [r for n in used for r in got.ranks[n]]
    assert flat == list(range(len(used) * gpus))
    # Copy plan: exactly the missing pairs, each from a surviving old holder; equals the reference.
    before = layer_map(pipelines, templates)
    after = {
        n: templates.for_nodes(p.template_nodes).node_layers(i) for p in got.pipelines for i, n in enumerate(p.nodes)
    }
    missing = {
        (n, layer)
        for n, (a, b) in after.items()
        for layer in range(a, b)
        if not (n in before and before[n][0] <= layer < before[n][1])
    }
    restore = set(got.restore_layers)
    assert {(c.dst, c.layer) for c in got.copies} == {(n, la) for n, la in missing if la not in restore}
    assert len(got.copies) == len({(c.dst, c.layer) for c in got.copies})
    gone = set(lost) | set(got.spares)  # spares leave the process group: no source either
    for c in got.copies:
        assert c.src not in gone
        assert before[c.src][0] <= c.layer < before[c.src][1]
        assert c.bytes == PROFILE.layers[c.layer].param_bytes * 3
    for layer in restore:
        assert all(not (a <= layer < b) or n in gone for n, (a, b) in before.items())
    copies, copy_ms, exp_restore = ref.copy_plan(
        before, after, gone, [layer.param_bytes for layer in PROFILE.layers], 4.0, 1e9
    )
    assert [(c.layer, c.src, c.dst, c.bytes) for c in got.copies] == copies
    assert got.copy_ms == pytest.approx(copy_ms, rel=1e-12)
    assert list(got.restore_layers) == exp_restore
    again = reconfigure(
        pipelines, lost, templates=templates, profile=PROFILE, cluster=cluster(gpus), microbatches=microbatches
    )
    assert again == got


def test_reconfigure_keeps_pipelines_and_copies_to_the_shrunk_one():
    templates = template_set(2, 5)
    got = reconfigure(EXAMPLE, [2], templates=templates, profile=PROFILE, cluster=cluster(1), microbatches=16)
    assert [list(p.nodes) for p in got.pipelines] == [[0, 1], [3, 4], [5, 6, 7, 8], [9, 10, 11, 12, 13]]
    assert got.ranks[0] == (0,) and got.ranks[3] == (2,) and got.ranks[13] == (12,)
    assert {c.dst for c in got.copies} <= {3, 4}
    assert got.copies
    assert got.restore_layers == ()
    assert "removed lost node(s) [2]" in got.reason
    assert got.copy_ms > 0


def test_layer_without_surviving_holder_is_restored_from_checkpoint():
    templates = template_set(2, 4)
    # One pipeline of 2: node 1 holds the second half; losing it leaves no holder of those layers.
    got = reconfigure(
        [[0, 1], [2, 3, 4, 5]], [1, 4, 5], templates=templates, profile=PROFILE, cluster=cluster(1), microbatches=8
    )
    holders_after = layer_map([[0, 1], [2, 3, 4, 5]], templates)
    lost_only = [
        la for la in range(LAYERS) if all(not (a <= la < b) for n, (a, b) in holders_after.items() if n in (0, 2, 3))
    ]
    assert list(got.restore_layers) == lost_only
    assert lost_only
    assert "restore them from the checkpoint" in got.reason
    assert not {c.layer for c in got.copies} & set(lost_only)


def test_size_without_template_reinstantiates_on_all_survivors():
    templates = template_set(2, 2, ft=0)
    # [0] is short, no donor (every pipeline has exactly 2): merged into [0, 2, 3] of 3 nodes.
    got = reconfigure([[0, 1], [2, 3]], [1], templates=templates, profile=PROFILE, cluster=cluster(1), microbatches=4)
    assert "no template has that size" in got.reason
    assert "re-instantiated on the 3 surviving nodes (1 pipelines over 2 nodes" in got.reason
    # The intact pipeline keeps its nodes (nothing to copy); the broken one's survivor waits. A
    # spare leaves the job's process group, so [0, 2] (layers of node 3 copied from the spare)
    # would have lost them.
    assert "[0] wait as spares" in got.reason
    assert [p.nodes for p in got.pipelines] == [(2, 3)]
    assert got.spares == (0,) and got.copies == () and got.restore_layers == ()


def test_old_pipeline_without_template_is_an_error():
    with pytest.raises(InvalidInputError, match=r"pipelines\[0\]: no template for 7 nodes \(template sizes 2-5\)"):
        reconfigure(
            [list(range(7))], [], templates=template_set(2, 5), profile=PROFILE, cluster=cluster(), microbatches=4
        )


def test_fewer_microbatches_than_pipelines_is_an_error():
    with pytest.raises(InfeasibleError, match="microbatches"):
        reconfigure(EXAMPLE, [2], templates=template_set(2, 5), profile=PROFILE, cluster=cluster(), microbatches=3)


def test_concurrent_reconfiguration_on_eight_threads():
    templates = template_set(2, 5)
    pipelines = [list(range(i * 5, i * 5 + 5)) for i in range(40)]

    def run(_):
        return reconfigure(
            pipelines,
            [3, 7, 12, 13, 14, 999],
            templates=templates,
            profile=PROFILE,
            cluster=cluster(),
            microbatches=400,
        )

    expected = run(0)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(run, range(32)))
    assert all(r == expected for r in results)
    assert sum(len(p.nodes) for p in expected.pipelines) == 200 - 5
