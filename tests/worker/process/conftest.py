"""Fixtures: a TCPStore (the rendezvous an agent would host), fake node agents, worker processes."""

from __future__ import annotations

import datetime
import shutil
import tempfile
from pathlib import Path

import pytest

from .fake_agent import FakeNodeAgent, WorkerProcesses


@pytest.fixture
def store_port():
    from torch.distributed import TCPStore

    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=datetime.timedelta(seconds=60))
    try:
        yield int(store.port)
    finally:
        del store


@pytest.fixture
def agents():
    """Factory ``agents(node_id) -> FakeNodeAgent``; sockets live in a short path (108-byte limit)."""
    sock_dir = Path(tempfile.mkdtemp(prefix="oow-"))
    started: list[FakeNodeAgent] = []

    def make(node_id: int) -> FakeNodeAgent:
        agent = FakeNodeAgent(sock_dir / f"n{node_id}.sock", node_id)
        agent.start()
        started.append(agent)
        return agent

    try:
        yield make
    finally:
        for agent in started:
            agent.stop()
        shutil.rmtree(sock_dir, ignore_errors=True)


@pytest.fixture
def workers(tmp_path, agents):
    """Worker processes, stopped (SIGTERM, then SIGKILL) before the agents go away."""
    procs = WorkerProcesses(tmp_path)
    try:
        yield procs
    finally:
        procs.stop_all()
