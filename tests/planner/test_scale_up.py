"""Scale-up: growing a running plan onto nodes that joined (planner.scale_up)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from oobleck.planner import InfeasibleError, InvalidInputError, instantiate, scale_up

try:
    from .test_reconfigure import PROFILE, cluster, layer_map, template_set
except ImportError:
    from test_reconfigure import PROFILE, cluster, layer_map, template_set


def _missing(before, after):
    return {
        (n, layer)
        for n, (a, b) in after.items()
        for layer in range(a, b)
        if not (n in before and before[n][0] <= layer < before[n][1])
    }


def _check(old, added, got, templates, microbatches):
    current = [n for p in old for n in p]
    used = [n for p in got.pipelines for n in p.nodes]
    assert set(current) <= set(used), "every node of the old plan stays in the plan"
    assert len(used) > len(current)
    assert sorted(used + list(got.spares)) == sorted(current + list(added))
    assert [len(p.nodes) for p in got.pipelines] == sorted(len(p.nodes) for p in got.pipelines)
    best = instantiate(templates, PROFILE, cluster(1), current + sorted(added), microbatches=microbatches)
    assert sorted(p.template_nodes for p in got.pipelines) == [p.template_nodes for p in best.pipelines]
    assert sum(p.microbatches for p in got.pipelines) == microbatches
    assert [r for n in used for r in got.ranks[n]] == list(range(len(used)))
    before = layer_map(old, templates)
    after = {
        n: templates.for_nodes(p.template_nodes).node_layers(i) for p in got.pipelines for i, n in enumerate(p.nodes)
    }
    assert {(c.dst, c.layer) for c in got.copies} == _missing(before, after)
    for c in got.copies:
        assert before[c.src][0] <= c.layer < before[c.src][1]
    assert got.restore_layers == ()


def test_two_pipelines_of_two_grow_to_two_and_three():
    templates = template_set(2, 4, ft=1)
    old = [[0, 1], [2, 3]]
    got = scale_up(old, [9], templates=templates, profile=PROFILE, cluster=cluster(1), microbatches=10)
    _check(old, [9], got, templates, 10)
    assert [p.nodes for p in got.pipelines] == [(0, 1), (2, 3, 9)]  # [0, 1] kept: nothing to copy there
    assert {c.dst for c in got.copies} <= {2, 3, 9} and any(c.dst == 9 for c in got.copies)
    assert got.spares == ()
    assert "scaled up from 4 to 5 nodes with [9]" in got.reason and "1 kept as they were" in got.reason
    again = scale_up(old, [9], templates=templates, profile=PROFILE, cluster=cluster(1), microbatches=10)
    assert again == got


def test_no_gain_keeps_the_added_nodes_spare():
    templates = template_set(2, 2, ft=0)  # only pipelines of two nodes: a third node is of no use
    with pytest.raises(InfeasibleError, match=r"no gain: the best mix over 3 nodes uses 2.*\[5\] stay spares"):
        scale_up([[0, 1]], [5], templates=templates, profile=PROFILE, cluster=cluster(1), microbatches=4)


def test_leftover_added_nodes_stay_spares():
    templates = template_set(2, 2, ft=0)
    got = scale_up([[0, 1]], [7, 5, 6], templates=templates, profile=PROFILE, cluster=cluster(1), microbatches=4)
    assert [p.nodes for p in got.pipelines] == [(0, 1), (5, 6)]
    assert got.spares == (7,)
    assert "[7] stay spares" in got.reason


@pytest.mark.parametrize(
    ("pipelines", "added", "match"),
    [
        ([[0, 1]], [1], "added: node 1 is already in the plan"),
        ([[0, 1]], [2, 2], "added: a node appears more than once"),
        ([[0, 1]], "2", "added: expected node ids"),
        ([[0, 1]], [None], r"added\[0\]: expected an integer node id"),
        ([[0, 1, 2, 3, 4, 5, 6]], [9], r"pipelines\[0\]: no template for 7 nodes"),
    ],
)
def test_malformed_inputs(pipelines, added, match):
    with pytest.raises(InvalidInputError, match=match):
        scale_up(pipelines, added, templates=template_set(2, 5), profile=PROFILE, cluster=cluster(1), microbatches=8)


@st.composite
def plans_and_added(draw):
    sizes = draw(st.lists(st.integers(2, 5), min_size=1, max_size=5))
    ids = draw(st.permutations(range(sum(sizes) + 6)))
    pipelines, pos = [], 0
    for s in sizes:
        pipelines.append(list(ids[pos : pos + s]))
        pos += s
    added = list(ids[pos : pos + draw(st.integers(1, 6))])
    return pipelines, added


@settings(max_examples=150, deadline=None)
@given(case=plans_and_added(), ft=st.integers(0, 1), microbatches=st.integers(12, 30))
def test_scale_up_properties(case, ft, microbatches):
    old, added = case
    templates = template_set(2, 5, ft=ft)
    try:
        got = scale_up(old, added, templates=templates, profile=PROFILE, cluster=cluster(1), microbatches=microbatches)
    except InfeasibleError as exc:
        assert "no gain" in str(exc) or "microbatches" in str(exc)
        return
    _check(old, added, got, templates, microbatches)
