"""One hand-computed scenario per event type, on tiny inputs, under intent and research semantics."""

import pytest

from oobleck.sim import RESEARCH, SimInputError, SystemInputs, parse_trace, simulate


def trace(n_nodes: int, *rows: str, end_ms: int) -> object:
    lines = [f"0,add,node{i}" for i in range(1, n_nodes + 1)]
    lines += list(rows)
    lines.append(f"{end_ms},add,sentinel")  # the hard stop: this row is never processed
    return parse_trace("\n".join(lines), "test")


def oobleck(table: dict[int, float], **kw) -> SystemInputs:
    return SystemInputs(system="oobleck", batch_samples=100, throughput_sps=table, reconfiguration_s=2.0, **kw)


# 100 samples at 20 samples/s = 5 s steps with 13+ nodes; 10 s with 12.
FAST_13 = {12: 10.0, 13: 20.0, 14: 20.0}


def test_steady_state_add_only():
    r = simulate(oobleck(FAST_13), trace(13, end_ms=100_000))
    # Ready at 45 s; the start-up rendezvous takes 0 s; steps of 5 s end at 50, 55, ..., 100 s.
    assert r.steps_kept == 10  # the step ending exactly at the hard stop is not counted
    assert r.throughput_sps == pytest.approx(10 * 100 / 55)
    assert r.breakdown.useful_s == pytest.approx(50.0)
    assert r.breakdown.lost_s == pytest.approx(5.0)  # the step in flight at the end
    assert r.reconfigurations == 0


def test_node_added_while_running_is_used_at_the_next_rendezvous():
    rows = ("50000,add,late", "62000,remove,node1")
    r = simulate(oobleck({12: 10.0, 13: 20.0, 14: 40.0}), trace(13, *rows, end_ms=100_000))
    # 13 nodes: 5 s steps at 50, 55, 60 s; `late` is ready at 95 s, after the last reconfiguration.
    # Removal at 62 s: the step since 60 s is lost, 12 nodes after 64 s: 10 s steps at 74, 84, 94 s.
    assert r.steps_kept == 6
    r2 = simulate(oobleck({12: 10.0, 13: 20.0, 14: 40.0}), trace(13, "10000,add,late", *rows[1:], end_ms=100_000))
    # Ready at 55 s while running: idle until the removal's rendezvous, then 13 nodes (5 s steps).
    # 14 nodes after 55 s, but the step time stays the 13-node one (5 s, not 2.5 s) until the removal;
    # then 13 nodes: 5 s steps end at 69 .. 99 s.
    assert r2.steps_kept == 3 + 7


def test_remove_during_a_step_intent():
    r = simulate(oobleck(FAST_13), trace(13, "62000,remove,node13", end_ms=100_000))
    # Steps end at 50, 55, 60 s; the one started at 60 s is lost at 62 s; reconfiguration until 64 s;
    # 12 nodes: 10 s steps end at 74, 84, 94 s; the one in flight at 100 s is not completed.
    assert r.steps_kept == 6
    assert r.reconfigurations == 1
    assert r.throughput_sps == pytest.approx(600 / 55)
    b = r.breakdown
    assert (b.useful_s, b.lost_s, b.reconfiguration_s, b.stopped_s) == pytest.approx((45.0, 8.0, 2.0, 0.0))


def test_remove_during_a_step_research_keeps_stepping_until_the_rendezvous_completes():
    r = simulate(oobleck(FAST_13), trace(13, "62000,remove,node13", end_ms=100_000), RESEARCH)
    # The step started at 60 s would end at 65 s: discarded by the rendezvous at 64 s.
    assert r.steps_kept == 6
    assert r.throughput_sps == pytest.approx(600 / 49)  # averaged up to the last completion (94 s)


def test_remove_during_a_reconfiguration():
    rows = ("62000,remove,node14", "63000,remove,node13")
    intent = simulate(oobleck(FAST_13), trace(14, *rows, end_ms=100_000))
    # Intent: the reconfiguration starts over at 63 s and completes at 65 s with 12 nodes.
    assert intent.reconfigurations == 2
    assert intent.stops == 0
    assert intent.steps_kept == 3 + 3  # 50, 55, 60 s; then 75, 85, 95 s
    assert intent.breakdown.reconfiguration_s == pytest.approx(3.0)
    research = simulate(oobleck(FAST_13), trace(14, *rows, end_ms=100_000), RESEARCH)
    # Research: the first completion (64 s) restarts training, the second (65 s) finds no
    # participants and stops the system although 12 nodes are alive.
    assert research.stops == 1
    assert research.steps_kept == 3
    assert research.throughput_sps == pytest.approx(300 / 15)


def test_out_of_memory_node_count_gives_zero_throughput():
    table = {12: 0.0, 13: 20.0}
    r = simulate(oobleck(table), trace(13, "62000,remove,node13", end_ms=100_000))
    assert r.steps_kept == 3  # before the removal
    assert r.stops == 1
    assert r.breakdown.stopped_s == pytest.approx(100 - 64)
    never = simulate(oobleck(table), trace(12, end_ms=100_000))
    assert never.throughput_sps == 0.0
    assert never.steps_completed == 0


def test_too_few_nodes_stop_until_a_node_is_ready():
    rows = ("62000,remove,node13", "70000,add,spare")
    r = simulate(oobleck({11: 10.0, 12: 10.0, 13: 20.0}, min_nodes=12), trace(12, *rows, end_ms=200_000))
    # 12 nodes, 10 s steps from 45 s; removing a node that does not exist changes nothing.
    assert r.stops == 0
    r = simulate(oobleck({11: 10.0, 12: 10.0, 13: 20.0}), trace(12, "62000,remove,node12", *rows[1:], end_ms=200_000))
    # 11 nodes after 62 s: stopped; `spare` is ready at 115 s and opens a rendezvous: 10 s steps again.
    assert r.stops == 1
    assert r.steps_kept == 1 + 8  # 55 s; then 125 .. 195 s
    assert r.breakdown.stopped_s == pytest.approx(115 - 64)


# --------------------------------------------------------------------------------------- Varuna


def varuna() -> SystemInputs:
    return SystemInputs(
        system="varuna",
        batch_samples=100,
        throughput_sps={12: 10.0, 13: 10.0},  # 10 s steps
        restart_s=5.0,
        checkpoint_s=1.0,
        checkpoint_interval_steps=2,
    )


def test_checkpoint_boundary_removal_during_the_checkpoint_rolls_back_further():
    # Start-up restart 5 s: training from 50 s. Steps end 60, 70 (checkpoint until 71), 81,
    # 91 (checkpoint until 92). A removal at 91.5 s fails that checkpoint: steps 3 and 4 are lost.
    r = simulate(varuna(), trace(13, "91500,remove,node13", end_ms=120_000))
    assert r.failed_checkpoints == 1
    assert r.restarts == 1
    # Restart until 96.5 s; steps end 106.5, 116.5 s (a checkpoint starts at 116.5 s).
    assert r.steps_completed == 6
    assert r.steps_kept == 4
    assert r.checkpoints == 3
    assert r.throughput_sps == pytest.approx(400 / 70)


def test_checkpoint_boundary_removal_just_after_the_checkpoint_keeps_it():
    r = simulate(varuna(), trace(13, "92500,remove,node13", end_ms=120_000))
    assert r.failed_checkpoints == 0
    # Only the step in flight (since 92 s) is lost; restart until 97.5 s; steps end 107.5, 117.5 s.
    assert r.steps_kept == 6
    assert r.breakdown.checkpoint_s == pytest.approx(1 + 1 + 1)  # 70-71, 91-92, 117.5-118.5
    assert r.breakdown.reconfiguration_s == pytest.approx(5)  # the start-up one is before the window


def test_varuna_removal_before_any_checkpoint_loses_everything():
    r = simulate(varuna(), trace(13, "65000,remove,node13", end_ms=80_000))
    # Step 1 (60 s) had no checkpoint after it: rolled back. Restart 65-70 s, step ends 80 s = stop.
    assert r.steps_kept == 0
    assert r.throughput_sps == 0.0


# --------------------------------------------------------------------------------------- Bamboo


def bamboo(table=None) -> SystemInputs:
    return SystemInputs(
        system="bamboo",
        batch_samples=100,
        throughput_sps=table or {12: 10.0, 13: 10.0, 14: 10.0},  # 10 s steps
        restart_s=1.0,
        global_rendezvous_s=1.0,
        reconfiguration_s=3.0,
        slowdown_factor=1.5,
        redundancy_overhead_fraction=0.8,
    )


def test_bamboo_failover_slows_the_step_in_flight_then_reconfigures():
    r = simulate(bamboo(), trace(14, "60000,remove,node5", end_ms=95_000))
    # Start-up rendezvous 1 s; steps end 56 s; the one ending at 66 s is slowed by 0.5 * 6 s -> 69 s.
    # Then node4 covers two stages and two nodes wait: local reconfiguration 69-72 s; steps end 82, 92 s.
    assert r.restarts == 0
    assert r.reconfigurations == 1
    assert r.steps_kept == 4
    assert r.breakdown.reconfiguration_s == pytest.approx(3)  # the start-up one is before the window
    assert r.breakdown.redundant_s == pytest.approx(0.2 * r.breakdown.useful_s)


def test_bamboo_losing_the_node_that_covers_a_failed_stage_restarts():
    r = simulate(bamboo(), trace(14, "60000,remove,node5", "61000,remove,node4", end_ms=95_000))
    # node4 already covers stage 4 when it is lost: a fatal failure, global rendezvous 61-62 s, the step
    # in flight is lost; 12 nodes: steps end 72, 82, 92 s.
    assert r.restarts == 1
    assert r.steps_kept == 4


def test_bamboo_out_of_memory_model_gives_zero():
    r = simulate(bamboo({12: 0.0}), trace(14, end_ms=95_000))
    assert r.throughput_sps == 0.0
    assert r.stops >= 1


# --------------------------------------------------------------------------------------- inputs


def test_trace_errors_name_the_line_and_field():
    with pytest.raises(SimInputError, match=r"test:2: action"):
        parse_trace("0,add,a\n5,explode,a", "test")
    with pytest.raises(SimInputError, match=r"test:2: time_ms: rows must be sorted"):
        parse_trace("5,add,a\n1,add,b", "test")


def test_inputs_are_validated():
    with pytest.raises(SimInputError, match=r"throughput_sps\[12\]"):
        oobleck({12: -1.0})
    with pytest.raises(SimInputError, match="checkpoint_interval_steps"):
        SystemInputs(system="varuna", batch_samples=1, throughput_sps={12: 1.0})
