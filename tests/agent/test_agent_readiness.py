"""When a node is ready for a generation, and what the master hears: pure decisions, no sockets."""

from __future__ import annotations

import pytest

from oobleck.agent.commands import Command, Dedupe, decide_command
from oobleck.agent.readiness import Pending, Readiness, ReadyReport, decide_ready


def test_the_node_is_ready_once_every_worker_reported_with_the_slowest_times() -> None:
    pending = Pending(command_id=7, generation=3, waiting=frozenset({0, 1, 2}))
    state, decision, _ = decide_ready(pending, ReadyReport(0, 3, regroup_s=0.5, copy_s=0.1))
    assert decision is Readiness.WAITING and state.waiting == {1, 2}
    state, decision, why = decide_ready(state, ReadyReport(2, 3, regroup_s=0.2, copy_s=0.3))
    assert decision is Readiness.WAITING and state.waiting == {1} and "1 of" in why
    state, decision, _ = decide_ready(state, ReadyReport(1, 3, regroup_s=0.1, copy_s=0.2))
    assert decision is Readiness.READY and not state.waiting
    assert (state.command_id, state.generation, state.regroup_s, state.copy_s) == (7, 3, 0.5, 0.3)
    assert state.step is None  # no worker said where it is ready: the ack carries no step
    assert pending.waiting == {0, 1, 2}  # pure: the input is left as it was


@pytest.mark.parametrize(("steps", "expected"), [((None, 12), 12), ((10, 12), 12), ((12, 10), 12), ((0, None), 0)])
def test_the_ack_carries_the_furthest_step_a_worker_is_ready_at(steps, expected) -> None:
    state = Pending(1, 1, frozenset({0, 1}))
    for slot, step in enumerate(steps):
        state, decision, _ = decide_ready(state, ReadyReport(slot, 1, step=step))
    assert decision is Readiness.READY and state.step == expected


def test_reports_that_change_nothing() -> None:
    pending = Pending(4, 5, frozenset({0, 1}))
    assert decide_ready(None, ReadyReport(0, 5))[:2] == (None, Readiness.IGNORED)
    # Another generation (a late report of the one before), a slot not awaited, a repeat.
    for report in (ReadyReport(0, 4), ReadyReport(9, 5)):
        state, decision, why = decide_ready(pending, report)
        assert (state, decision) == (pending, Readiness.IGNORED) and why
    once, _, _ = decide_ready(pending, ReadyReport(0, 5, regroup_s=1.0))
    again, decision, _ = decide_ready(once, ReadyReport(0, 5, regroup_s=9.0))
    assert decision is Readiness.IGNORED and again == once


# -- which commands are applied ----------------------------------------------------------------


def cmd(command_id: int, generation: int = 2, kind: str | None = "stop") -> Command:
    return Command(command_id, generation, kind)


@pytest.mark.parametrize(
    ("command", "decision", "words"),
    [
        (cmd(0), Dedupe.DROP, "must be > 0"),
        (cmd(-3), Dedupe.DROP, "must be > 0"),
        (cmd(4), Dedupe.REPEAT_ACK, "repeating its ack"),
        (cmd(5), Dedupe.IGNORE, "already being applied"),
        (cmd(6, kind=None), Dedupe.REFUSE, "body: empty or unknown command"),
        (cmd(6, generation=1), Dedupe.REFUSE, "generation: 1 is older than 2"),
        (cmd(6, generation=2), Dedupe.APPLY, "command 6: stop for generation 2"),
        (cmd(6, generation=3), Dedupe.APPLY, "for generation 3"),
    ],
)
def test_each_command_is_applied_at_most_once_and_in_order(command, decision, words) -> None:
    got, why = decide_command(command, last_command_id=5, last_generation=2, acked={3, 4})
    assert got is decision and words in why
