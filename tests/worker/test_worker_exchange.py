"""The exchange plan of a new generation: a pure function of what every rank carries."""

from __future__ import annotations

import pytest

from oobleck.worker.exchange import Copy, LayersLost, RankFacts, RollForward, choose_position, plan_exchange

NEW = {"step": 5, "epoch": 0, "samples": 60}
OLD = {"step": 4, "epoch": 0, "samples": 48}


def carrying(layers, position=NEW, **kwargs) -> RankFacts:
    return RankFacts(layers=dict.fromkeys(layers, 100), position=position, **kwargs)


def test_choose_position_prefers_the_newest_complete_one() -> None:
    full_new = [carrying([0, 1], NEW), carrying([0, 1], OLD)]
    assert choose_position(full_new, 2) == NEW
    half_new = [carrying([1], NEW), carrying([0, 1], OLD)]
    assert choose_position(half_new, 2) == OLD
    neither = [carrying([1], NEW), carrying([0], OLD)]
    assert choose_position(neither, 2) is None
    one = [carrying([1], NEW), RankFacts()]
    assert choose_position(one, 2) == NEW  # a single position: missing layers are reported later


def test_a_fresh_job_copies_nothing() -> None:
    plan = plan_exchange([RankFacts(), RankFacts()], [[0, 1], [2, 3]], 4)
    assert plan.fresh and plan.copies == () and plan.position is None


def test_copies_come_from_the_carrier_that_sent_least() -> None:
    """Ranks 0 and 1 carry everything; ranks 2 and 3 are new and need it all: the copies
    alternate between the two carriers (ties go to the lower rank), in rank then layer order."""
    everyone = [carrying([0, 1, 2, 3]), carrying([0, 1, 2, 3]), RankFacts(), RankFacts()]
    plan = plan_exchange(everyone, [[0, 1, 2, 3], [0, 1, 2, 3], [0, 1], [2, 3]], 4)
    assert not plan.fresh and plan.position == NEW and not plan.split and plan.dropped == frozenset()
    assert plan.copies == (Copy(0, 0, 2), Copy(1, 1, 2), Copy(2, 0, 3), Copy(3, 1, 3))


def test_bytes_weigh_the_choice_of_source() -> None:
    """Rank 0's layer 0 is large: once it has sent it, rank 1 serves the rest, although it has
    already sent more copies than rank 0."""
    heavy = RankFacts(layers={0: 1000, 1: 10}, position=NEW)
    light = RankFacts(layers={0: 10, 1: 10}, position=NEW)
    plan = plan_exchange([heavy, light, RankFacts(), RankFacts()], [[0, 1], [0, 1], [0, 1], [1, 0]], 2)
    assert plan.copies == (Copy(0, 0, 2), Copy(1, 1, 2), Copy(1, 1, 3), Copy(0, 1, 3))


def test_layers_no_rank_carries_are_lost() -> None:
    with pytest.raises(LayersLost) as info:
        plan_exchange([carrying([0, 1]), RankFacts()], [[0, 1], [2, 3]], 4)
    assert info.value.layers == [2, 3]


def test_split_commit_keeps_the_newest_complete_position_and_drops_the_rest() -> None:
    """A peer died while step 5 was committed: ranks 0 and 1 (a whole pipeline) committed it,
    rank 2 did not. Step 5 is kept; rank 2's layers are stale and copied again."""
    everyone = [carrying([0, 1], NEW), carrying([2, 3], NEW), carrying([0, 1, 2, 3], OLD)]
    plan = plan_exchange(everyone, [[0, 1], [2, 3], [0, 1, 2, 3]], 4)
    assert plan.position == NEW and plan.split and plan.steps == (4, 5)
    assert plan.dropped == frozenset({2})
    assert plan.copies == (Copy(0, 0, 2), Copy(1, 0, 2), Copy(2, 1, 2), Copy(3, 1, 2))


def test_split_commit_without_a_complete_newest_position_rolls_back() -> None:
    everyone = [carrying([0, 1], NEW), carrying([0, 1, 2, 3], OLD)]
    plan = plan_exchange(everyone, [[0, 1], [2, 3]], 4)
    assert plan.position == OLD and plan.dropped == frozenset({0})
    assert plan.copies == (Copy(0, 1, 0), Copy(1, 1, 0))


def test_no_complete_position_at_all_loses_the_layers_of_the_newest() -> None:
    with pytest.raises(LayersLost) as info:
        plan_exchange([carrying([1], NEW), carrying([0], OLD)], [[0, 1], [0, 1]], 2)
    assert info.value.layers == [0]


def test_a_rank_whose_vote_failed_rolls_forward_when_a_peer_committed() -> None:
    committed = carrying([2, 3], NEW, commit={"step": 5, "sq_total": 2.5})
    voted = carrying([0, 1], OLD, voted={"step": 5, "after": NEW})
    plan = plan_exchange([voted, committed], [[0, 1], [2, 3]], 4)
    assert plan.rolled == {0: RollForward(step_index=4, sq_total=2.5)}
    assert plan.position == NEW and not plan.split and plan.copies == ()


def test_no_roll_forward_when_no_peer_committed_the_step() -> None:
    voted = carrying([0, 1], OLD, voted={"step": 5, "after": NEW})
    other = carrying([2, 3], OLD, commit={"step": 4, "sq_total": 1.0})
    plan = plan_exchange([voted, other], [[0, 1], [2, 3]], 4)
    assert plan.rolled == {} and plan.position == OLD


def test_a_rolled_forward_rank_keeps_its_layers_in_a_split_commit() -> None:
    """Rank 0 committed step 5, rank 1 rolls it forward, rank 2 is still at step 4 (it kept
    nothing of the step). Step 5 is complete on ranks 0 and 1: rank 1's rolled-forward layers
    are kept (it is judged at the position it rolls forward to), rank 2's are copied again."""
    committed = carrying([2, 3], NEW, commit={"step": 5, "sq_total": 2.5})
    voted = carrying([0, 1], OLD, voted={"step": 5, "after": NEW})
    behind = carrying([0, 1], OLD)
    plan = plan_exchange([committed, voted, behind], [[2, 3], [0, 1], [0, 1]], 4)
    assert plan.position == NEW and plan.split and plan.dropped == frozenset({2})
    assert 1 in plan.rolled
    assert plan.copies == (Copy(0, 1, 2), Copy(1, 1, 2))
