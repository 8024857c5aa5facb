"""The master's state machines and the one transition that installs a generation (pure: no
sockets, no clock)."""

import pytest

from oobleck.master.generations import DRAINED_BY_OPERATOR, LEFT_OUT, NOT_IN_PLAN, install, release
from oobleck.master.states import IllegalTransition, JobState, NodeState, move_job, move_node
from oobleck.master.store import JobRow, NodeRow

A, S, DG, DD, X = NodeState.ALIVE, NodeState.SPARE, NodeState.DRAINING, NodeState.DRAINED, NodeState.DEAD


def test_a_first_plan_starts_its_nodes_and_makes_every_other_live_node_a_spare():
    states = {1: S, 2: S, 3: S, 4: DD, 5: X, 6: A}
    change = install(states, (), (1, 2, 3), spares_reason=NOT_IN_PLAN)
    assert change.commands == ((1, "start"), (2, "start"), (3, "start"))
    assert change.moves == ((1, A, ""), (2, A, ""), (3, A, ""), (6, S, NOT_IN_PLAN))


def test_a_restore_starts_every_node_of_the_plan_and_leaves_the_others_alone():
    states = {1: S, 2: S, 3: S}
    change = install(states, (), (2, 3))
    assert change.commands == ((2, "start"), (3, "start"))
    assert change.moves == ((2, A, ""), (3, A, ""))


def test_a_reconfiguration_reconfigures_survivors_starts_joiners_and_drains():
    # Old plan [1 2 | 3 4 | 5 6]; 2 died, 4 is drained; the new plan [1 3 | 5 6 7] leaves 1..: 7 joins.
    states = {1: A, 2: X, 3: A, 4: A, 5: A, 6: A, 7: S, 8: S}
    change = install(states, (1, 2, 3, 4, 5, 6), (1, 3, 5, 6, 7), left={2, 4}, drain={4})
    assert change.nodes("reconfigure") == [1, 3, 5, 6]
    assert change.nodes("start") == [7]
    assert change.nodes("drain") == [4]
    assert change.moves == ((4, DG, DRAINED_BY_OPERATOR), (7, A, ""))


def test_survivors_left_out_of_the_new_plan_are_reconfigured_and_become_spares():
    states = {1: A, 2: A, 3: A, 4: X}
    change = install(states, (1, 2, 3, 4), (1, 2), left={4})
    assert change.nodes("reconfigure") == [1, 2, 3]  # 3's agent stops its workers
    assert change.moves == ((3, S, LEFT_OUT),)


def test_a_node_that_died_meanwhile_gets_no_command_and_a_dead_drain_is_ignored():
    states = {1: A, 2: X, 3: A}
    change = install(states, (1, 2, 3), (1, 3), left=set(), drain={2})
    assert change.nodes("reconfigure") == [1, 3] and change.nodes("drain") == []
    assert change.moves == ()


def test_a_scale_up_reconfigures_everyone_and_starts_the_spares_it_takes():
    states = {1: A, 2: A, 3: S, 4: S}
    change = install(states, (1, 2), (1, 2, 3))
    assert change.commands == ((1, "reconfigure"), (2, "reconfigure"), (3, "start"))
    assert change.moves == ((3, A, ""),)


def test_release_stops_the_plan_nodes_in_the_released_states():
    states = {1: A, 2: DG, 3: X, 4: S}
    paused = release(states, (1, 2, 3), "job paused")
    assert paused.commands == ((1, "stop"),) and paused.moves == ((1, S, "job paused"),)
    ended = release(states, (1, 2, 3), "job succeeded", (A, DG))
    assert ended.nodes("stop") == [1, 2] and [m[0] for m in ended.moves] == [1, 2]


def test_state_machines_refuse_what_their_tables_do_not_allow():
    row = NodeRow(7, "n7", "127.0.0.1", 1, 0, "", "nonce", 1, NodeState.SPARE, "")
    move_node(row, NodeState.ALIVE)
    move_node(row, NodeState.DRAINING, "drained by operator")
    move_node(row, NodeState.DRAINED, "drained by operator")
    with pytest.raises(IllegalTransition, match="node 7: drained -> alive"):
        move_node(row, NodeState.ALIVE)
    move_node(row, NodeState.DEAD, "no heartbeat")
    with pytest.raises(IllegalTransition):
        move_node(row, NodeState.SPARE)  # a dead node registers again as a new node
    assert (row.state, row.reason) == (NodeState.DEAD, "no heartbeat") and row.state == "dead"

    job = JobRow("j1", "", JobState.RUNNING, "", 1, b"", {}, 0, 10)
    move_job(job, JobState.RECONFIGURING, "lost nodes [3]")
    move_job(job, JobState.PAUSED, "too few nodes")
    move_job(job, JobState.STARTING, "restoring from checkpoint")
    move_job(job, JobState.SUCCEEDED, "reached step 10 of 10")
    with pytest.raises(IllegalTransition, match="job j1: SUCCEEDED -> RUNNING"):
        move_job(job, JobState.RUNNING)
    with pytest.raises(ValueError):
        move_job(JobRow("j2", "", "RUNNING", "", 1, b"", {}, 0, 10), "BOGUS")
