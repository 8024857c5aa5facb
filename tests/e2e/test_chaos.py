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


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_small_seeded_drill_ends_equal_to_the_reference(tmp_path) -> None:
    """Five nodes, ft=1, 30 steps, two kill events, every killed node restarted: the job scales
    back up each time and its final parameters equal the reference (fp64: to ~1e-15)."""
    work = tmp_path / "chaos"
    argv = [sys.executable, str(SCRIPT), "--seed", "3", "--nodes", "5", "--ft", "1", "--steps", "30",
            "--kills", "2", "--restart-prob", "1", "--work-dir", str(work), "--timeout-s", "240"]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=270)
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
    result = json.loads(out.strip().splitlines()[-1])
    assert result["ok"] is True and result["max_abs_diff"] < 1e-9, result
    assert result["kills"] >= 2 and result["restarts"] == result["kills"], result
    assert result["scale_ups"] >= 1 and result["generations"] >= 3, result
    assert processes_under(work) == {}


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
