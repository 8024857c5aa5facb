"""Fixtures: a fake master on its own thread and real ``oobleck-agent`` subprocesses."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from oobleck.common import procs
from oobleck.common.files import write_secret
from oobleck.common.procs import wait_pid_gone

from .fake_master import FakeMaster

BIN = Path(sys.executable).parent
FAKE_WORKER = Path(__file__).resolve().parent / "fake_worker.py"
TOKEN = "agent-test-token-" + "c" * 16


@dataclass
class AgentProcess:
    proc: subprocess.Popen
    work_dir: Path
    ready_file: Path
    log_path: Path
    worker_pids: set[int] = field(default_factory=set)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait(self, timeout_s: float = 30) -> int:
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"agent did not exit in {timeout_s}s; log:\n{self.log()[-4000:]}") from None


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "agent.token"
    write_secret(path, TOKEN)
    return path


@pytest.fixture
def master():
    m = FakeMaster(TOKEN)
    m.start()
    try:
        yield m
    finally:
        m.stop()


@pytest.fixture
def start_agent(tmp_path, token_file, master):
    """Factory: start an agent against the fake master; everything it started dies at teardown."""
    started: list[AgentProcess] = []

    def start(
        *extra: str,
        slots: int = 2,
        env: dict[str, str] | None = None,
        token: Path | None = None,
        master_host: str = "127.0.0.1",
        fake_master: FakeMaster | None = None,
    ):
        index = len(started)
        work_dir = tmp_path / f"agent{index}"
        log_path = tmp_path / f"agent{index}.log"
        ready_file = tmp_path / f"agent{index}.ready.json"
        argv = [
            str(BIN / "oobleck-agent"),
            "--master", f"{master_host}:{(fake_master or master).port}",
            "--token-file", str(token or token_file),
            "--node-name", f"node{index}",
            "--slots", str(slots),
            "--work-dir", str(work_dir),
            "--worker-command", f"{sys.executable} {FAKE_WORKER}",
            "--liveness-timeout-s", "1.5",
            "--stop-timeout-s", "3",
            "--probe-interval-s", "0.05",
            "--reconnect-max-backoff-s", "0.3",
            "--ready-file", str(ready_file),
            "--log-level", "DEBUG",
            *extra,
        ]  # fmt: skip
        full_env = dict(os.environ)
        full_env.update(env or {})
        with log_path.open("wb") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=full_env, start_new_session=True)
        handle = AgentProcess(proc, work_dir, ready_file, log_path)
        started.append(handle)
        return handle

    try:
        yield start
    finally:
        for handle in started:
            pids = {e.msg.pid for e in master.events("worker") if e.msg.pid} | handle.worker_pids
            if handle.proc.poll() is None:
                handle.proc.send_signal(signal.SIGKILL)
                handle.proc.wait(timeout=30)
            for pid in pids:
                if _is_our_worker(pid, handle.work_dir):  # never signal a recycled pid
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            for pid in pids:
                wait_pid_gone(pid, 10)


def _is_our_worker(pid: int, work_dir: Path) -> bool:
    return procs.environ_var(pid, "OOBLECK_WORK_DIR") == str(work_dir)
