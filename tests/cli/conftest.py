"""Helpers for the ``oobleck-launch`` tests: run the launcher, find and reap everything it started."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from oobleck.common import procs
from oobleck.common.procs import wait_pid_gone

REPO = Path(__file__).resolve().parents[2]
FAKE_WORKER = REPO / "tests" / "agent" / "fake_worker.py"
FAKE_WORKER_COMMAND = f"{sys.executable} {FAKE_WORKER}"

#: Layers of a synthetic profile (the master's real planner plans from it; the fake worker ignores it).
PROFILE = {
    "format": "oobleck-profile/1",
    "model": "test",
    "microbatch_size": 4,
    "layers": [
        {
            "name": f"layer{i}",
            "forward_ms": 1.0,
            "backward_ms": 2.0,
            "param_bytes": 1 << 16,
            "activation_bytes": 1 << 14,
            "output_bytes": 1 << 12,
        }
        for i in range(6)
    ],
}


def spec_text(*, steps: int, profile: str | None = None, extra: str = "") -> str:
    lines = [
        "name: launch-test",
        "model: {name: gpt, config: {num_layers: 4, hidden_size: 32, num_heads: 4, vocab_size: 64}}",
        "data: {kind: synthetic, seq_len: 8, num_samples: 1024, seed: 0}",
        "optimizer: {name: adamw, lr: 0.001}",
        "global_batch_size: 16",
        "microbatch_size: 4",
        "ft: 1",
        f"steps: {steps}",
    ]
    if profile:
        lines.append(f"profile: {profile}")
    return "\n".join(lines) + "\n" + extra


def pids_under(work_dir: Path) -> set[int]:
    """Live processes started for ``work_dir``: daemons from their ready files (checked against
    their command line, so a recycled pid is never reported) and workers by ``$OOBLECK_WORK_DIR``."""
    found: set[int] = set()
    for ready in work_dir.glob("*.ready.json"):
        with contextlib.suppress(OSError, ValueError, KeyError):
            pid = int(json.loads(ready.read_text())["pid"])
            if str(work_dir) in procs.cmdline(pid):
                found.add(pid)
    for pid in procs.pids():
        if (procs.environ_var(pid, "OOBLECK_WORK_DIR") or "").startswith(str(work_dir)):
            found.add(pid)
    return {p for p in found if procs.alive(p)}


@dataclass
class LauncherRun:
    proc: subprocess.Popen
    work_dir: Path
    lines: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)
    _new_line: threading.Condition = field(default_factory=threading.Condition)
    _threads: list[threading.Thread] = field(default_factory=list)

    def wait_for_line(self, needle: str, timeout_s: float) -> str:
        with self._new_line:
            ok = self._new_line.wait_for(
                lambda: any(needle in line for line in self.lines) or self.proc.poll() is not None, timeout_s
            )
        hits = [line for line in self.lines if needle in line]
        assert ok and hits, f"no line with {needle!r}; stdout:\n{''.join(self.lines)}\nstderr:\n{''.join(self.stderr)}"
        return hits[0]

    def finish(self, timeout_s: float) -> int:
        rc = self.proc.wait(timeout=timeout_s)
        for t in self._threads:
            t.join(timeout=10)
        return rc

    def summary(self) -> dict:
        last = [line for line in self.lines if line.startswith("{")][-1]
        return json.loads(last)

    def output(self) -> str:
        return "".join(self.lines) + "\n--- stderr ---\n" + "".join(self.stderr)


@pytest.fixture
def launcher(tmp_path):
    """Factory: start ``oobleck-launch`` with args; everything it started is killed at teardown."""
    runs: list[LauncherRun] = []

    def start(*args: str, work_dir: Path | None = None, env: dict[str, str] | None = None) -> LauncherRun:
        work = work_dir or tmp_path / f"w{len(runs)}"
        argv = [sys.executable, "-m", "oobleck.cli.launch", *args, "--work-dir", str(work)]
        full_env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), **(env or {})}
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=full_env,
            cwd=tmp_path,
            start_new_session=True,
        )
        run = LauncherRun(proc, work)
        for stream, sink in ((proc.stdout, run.lines), (proc.stderr, run.stderr)):

            def pump(stream=stream, sink=sink):
                for line in stream:
                    with run._new_line:
                        sink.append(line)
                        run._new_line.notify_all()
                with run._new_line:
                    run._new_line.notify_all()

            t = threading.Thread(target=pump, daemon=True)
            t.start()
            run._threads.append(t)
        runs.append(run)
        return run

    try:
        yield start
    finally:
        for run in runs:
            if run.proc.poll() is None:
                run.proc.send_signal(signal.SIGKILL)
                run.proc.wait(timeout=30)
            leftovers = pids_under(run.work_dir) if run.work_dir.exists() else set()
            for pid in leftovers:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            for pid in leftovers:
                wait_pid_gone(pid, 10)
