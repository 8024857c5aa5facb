"""Schedules: op lists are complete, ordered, bounded in memory, and deadlock-free."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from oobleck.worker import schedule as S


def simulate(name: str, num_stages: int, num_microbatches: int) -> int:
    """Run every stage's list with blocking receives and asynchronous sends; return the number
    of rounds. Raises AssertionError on deadlock or mismatched transfers."""
    lists = [S.make_schedule(name, num_stages, s, num_microbatches) for s in range(num_stages)]
    pc = [0] * num_stages
    sent: set[tuple[str, int, int]] = set()  # (kind, from stage, microbatch)
    rounds = 0
    while any(pc[s] < len(lists[s]) for s in range(num_stages)):
        progressed = False
        for s in range(num_stages):
            while pc[s] < len(lists[s]):
                op = lists[s][pc[s]]
                if op.kind == S.RECV_ACT and ("act", s - 1, op.microbatch) not in sent:
                    break
                if op.kind == S.RECV_GRAD and ("grad", s + 1, op.microbatch) not in sent:
                    break
                if op.kind == S.SEND_ACT:
                    sent.add(("act", s, op.microbatch))
                if op.kind == S.SEND_GRAD:
                    sent.add(("grad", s, op.microbatch))
                pc[s] += 1
                progressed = True
        assert progressed, f"deadlock: {[str(lists[s][pc[s]]) for s in range(num_stages) if pc[s] < len(lists[s])]}"
        rounds += 1
    return rounds


def test_one_f_one_b_two_stages_exact() -> None:
    ops = [str(op) for op in S.one_f_one_b(2, 0, 3)]
    assert ops == ["F0", "SEND_ACT0", "F1", "SEND_ACT1", "RECV_GRAD0", "B0", "F2", "SEND_ACT2", "RECV_GRAD1", "B1",
                   "RECV_GRAD2", "B2"]  # fmt: skip
    last = [str(op) for op in S.one_f_one_b(2, 1, 3)]
    assert last == ["RECV_ACT0", "F0", "B0", "SEND_GRAD0", "RECV_ACT1", "F1", "B1", "SEND_GRAD1", "RECV_ACT2", "F2",
                    "B2", "SEND_GRAD2"]  # fmt: skip


def test_gpipe_all_forwards_first() -> None:
    ops = S.gpipe(3, 1, 4)
    kinds = [op.kind for op in ops if op.kind in (S.FORWARD, S.BACKWARD)]
    assert kinds == [S.FORWARD] * 4 + [S.BACKWARD] * 4


@given(
    name=st.sampled_from(["1f1b", "gpipe"]),
    num_stages=st.integers(1, 6),
    num_microbatches=st.integers(1, 9),
)
def test_schedules_complete_and_deadlock_free(name: str, num_stages: int, num_microbatches: int) -> None:
    for s in range(num_stages):
        ops = S.make_schedule(name, num_stages, s, num_microbatches)
        for kind in (S.FORWARD, S.BACKWARD):
            assert sorted(op.microbatch for op in ops if op.kind == kind) == list(range(num_microbatches))
        for m in range(num_microbatches):
            assert ops.index(S.Op(S.FORWARD, m)) < ops.index(S.Op(S.BACKWARD, m))
        has = {op.kind for op in ops}
        assert (S.RECV_ACT in has) == (s > 0) and (S.SEND_GRAD in has) == (s > 0)
        assert (S.SEND_ACT in has) == (s < num_stages - 1) and (S.RECV_GRAD in has) == (s < num_stages - 1)
    simulate(name, num_stages, num_microbatches)


@given(num_stages=st.integers(1, 6), num_microbatches=st.integers(1, 12))
def test_one_f_one_b_in_flight_bound(num_stages: int, num_microbatches: int) -> None:
    for s in range(num_stages):
        in_flight = peak = 0
        for op in S.one_f_one_b(num_stages, s, num_microbatches):
            in_flight += {S.FORWARD: 1, S.BACKWARD: -1}.get(op.kind, 0)
            peak = max(peak, in_flight)
        assert peak <= num_stages - s


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="schedule"):
        S.make_schedule("zigzag", 2, 0, 2)
    with pytest.raises(ValueError, match="stage"):
        S.make_schedule("1f1b", 2, 2, 2)
    with pytest.raises(ValueError, match="num_microbatches"):
        S.make_schedule("gpipe", 2, 0, 0)
