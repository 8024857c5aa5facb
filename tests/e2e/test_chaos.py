"""``scripts/chaos.py``: its seeded schedule (pure parts) and a small seeded drill run for real."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from .cluster import processes_under

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "chaos.py"


def _load():
    spec = importlib.util.spec_from_file_location("oobleck_chaos_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


chaos = _load()


def test_victims_never_take_a_layer_or_the_last_nodes_away() -> None:
    rng = random.Random(0)
    pipelines = [[1, 2], [3, 4, 5]]
    for _ in range(200):
        victims = chaos.choose_victims(rng, pipelines, ft=2)
        assert 1 <= len(victims) <= 2
        assert any(not set(p) & set(victims) for p in pipelines)  # one pipeline intact: every layer kept
    assert chaos.choose_victims(rng, [[1, 2]], ft=1) == []  # a single pipeline cannot lose a node
    assert chaos.choose_victims(rng, [[1, 2], [3, 4]], ft=3) in ([1], [2], [3], [4], [1, 2], [3, 4])


def test_kill_steps_are_seeded_distinct_and_inside_the_job() -> None:
    a = chaos.kill_steps(random.Random(5), 40, 4)
    assert a == chaos.kill_steps(random.Random(5), 40, 4)
    assert a == sorted(set(a)) and len(a) == 4 and all(2 <= s < 36 for s in a)
    assert chaos.kill_steps(random.Random(5), 5, 4) == []


def test_fault_schedule_is_seeded_and_has_every_kind() -> None:
    kinds = ["kill", "overkill", "master", "freeze"]
    for seed in range(30):
        events = chaos.fault_schedule(random.Random(seed), 40, 5, kinds)
        assert events == chaos.fault_schedule(random.Random(seed), 40, 5, kinds)
        steps = [at for at, _ in events]
        assert steps == sorted(set(steps)) and all(2 <= at < 40 for at in steps), events
        assert sorted({k for _, k in events}) == sorted(kinds), events
        assert all(at > chaos.CHECKPOINT_INTERVAL for at, k in events if k == "overkill"), events
    ends = {chaos.fault_schedule(random.Random(seed), 40, 4, kinds)[-1] for seed in range(30)}
    assert any(k == "master" and at >= 37 for at, k in ends)  # some jobs end while the master is down
    with pytest.raises(ValueError, match="fewer than the 4 fault kinds"):
        chaos.fault_schedule(random.Random(0), 40, 3, kinds)
    assert chaos.fault_schedule(random.Random(0), 40, 0, kinds) == []


def test_overkill_takes_every_copy_of_a_layer() -> None:
    from oobleck.protos.v1 import plan_pb2

    plan = plan_pb2.Plan(
        templates=[
            plan_pb2.Template(num_nodes=2, stages=[plan_pb2.Stage(layer_start=0, layer_end=3, node_index=0),
                                                   plan_pb2.Stage(layer_start=3, layer_end=6, node_index=1)]),
            plan_pb2.Template(num_nodes=3, stages=[plan_pb2.Stage(layer_start=0, layer_end=2, node_index=0),
                                                   plan_pb2.Stage(layer_start=2, layer_end=4, node_index=1),
                                                   plan_pb2.Stage(layer_start=4, layer_end=6, node_index=2)]),
        ]
    )  # fmt: skip
    pipelines = [[1, 2], [3, 4, 5]]
    holders = chaos.layer_holders(plan, pipelines)
    assert holders[0] == {1, 3} and holders[3] == {2, 4} and holders[5] == {2, 5}
    rng = random.Random(1)
    for _ in range(100):
        victims = chaos.choose_overkill(rng, plan, pipelines, ft=1)
        assert 2 <= len(victims) < 5
        assert any(h <= set(victims) for h in holders.values()), victims  # some layer has no copy left
    assert len(chaos.choose_overkill(rng, plan, pipelines, ft=3)) == 4  # one node is left
    assert chaos.choose_overkill(rng, plan, pipelines, ft=4) == []  # losing 5 of 5 leaves nothing to restart on


def run_drill(work: Path, *args: str, timeout_s: float = 270) -> dict:
    argv = [sys.executable, str(SCRIPT), *args, "--work-dir", str(work), "--timeout-s", str(timeout_s - 30)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # the drill stops its cluster on the way out
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
            proc.kill()
        for pid in processes_under(work):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-4000:]
    assert processes_under(work) == {}
    result = json.loads(out.strip().splitlines()[-1])
    assert result["ok"] is True and result["max_abs_diff"] < 1e-9, result
    assert result["checkpoints_intact"] is True and result["step_went_back"] == 0, result
    return result


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_small_seeded_drill_ends_equal_to_the_reference(tmp_path) -> None:
    """Five nodes, ft=1, 30 steps, two kill events, every killed node restarted: the job scales
    back up each time and its final parameters equal the reference (fp64: to ~1e-15)."""
    result = run_drill(
        tmp_path / "chaos", "--seed", "3", "--nodes", "5", "--ft", "1", "--steps", "30", "--kills", "2",
        "--restart-prob", "1",
    )  # fmt: skip
    assert result["kills"] >= 2 and result["restarts"] == result["kills"], result
    assert result["scale_ups"] >= 1 and result["generations"] >= 3, result


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("kind", "extra"),
    [
        ("overkill", ()),  # more nodes than ft: pause or restore in place, from the checkpoint
        ("master", ("--master-down-s", "4-10")),  # SIGKILL the master, restart it later
        ("freeze", ("--freeze-s", "3-6")),  # SIGSTOP a whole node, then SIGCONT
    ],
)
def test_small_seeded_drill_of_each_fault_kind(tmp_path, kind, extra) -> None:
    result = run_drill(
        tmp_path / "chaos", "--seed", "4", "--nodes", "5", "--ft", "1", "--steps", "30", "--kills", "1",
        "--faults", kind, "--restart-prob", "1", *extra,
    )  # fmt: skip
    assert result["faults"] == {kind: 1}, result
    if kind == "overkill":
        assert result["restores"] >= 1 and result["kills"] >= 2, result
    if kind == "freeze":
        assert result["generations"] >= 2, result  # the frozen node was declared dead: a reconfiguration


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_an_impossible_drill_is_a_one_line_error(tmp_path) -> None:
    work = tmp_path / "chaos"
    argv = [sys.executable, str(SCRIPT), "--seed", "1", "--nodes", "3", "--ft", "1", "--steps", "10", "--kills", "0",
            "--work-dir", str(work)]  # fmt: skip
    res = subprocess.run(argv, capture_output=True, text=True, timeout=110)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "the master rejected the job" in res.stderr and "too few nodes for ft" in res.stderr, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1])["ok"] is False
    assert processes_under(work) == {}


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_sigterm_stops_the_drill_and_its_cluster(tmp_path) -> None:
    work = tmp_path / "chaos"
    argv = [sys.executable, str(SCRIPT), "--seed", "1", "--nodes", "4", "--ft", "1", "--steps", "100000",
            "--kills", "0", "--work-dir", str(work)]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:  # ends at EOF if the drill dies first
            if "job submitted" in line:
                break
        assert processes_under(work), "the drill's cluster is not running"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in processes_under(work):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert proc.returncode == 143 and "chaos: terminated" in out, out[-2000:]
    assert processes_under(work) == {}
