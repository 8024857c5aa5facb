"""No task of the agent fails silently: a failure is logged at ERROR and ends the agent."""

from __future__ import annotations

import asyncio
import logging

import pytest

from oobleck.agent import daemon
from oobleck.agent.config import AgentConfig
from oobleck.agent.errors import ShutdownRequested, TaskFailed
from oobleck.agent.tasks import Background, owned

from .conftest import TOKEN

pytestmark = pytest.mark.timeout(60)


def errors(caplog, logger: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno == logging.ERROR and r.name == logger]


def test_a_failed_long_lived_task_is_logged_and_becomes_a_task_failure(caplog) -> None:
    async def supervise() -> None:
        raise RuntimeError("boom")

    with pytest.raises(TaskFailed, match=r"agent task 'supervisor' failed: RuntimeError\('boom'\)"):
        asyncio.run(owned("supervisor", supervise()))
    [record] = errors(caplog, "oobleck.agent.tasks")
    assert "'supervisor' failed" in record.getMessage() and record.exc_info[0] is RuntimeError


def test_a_planned_stop_passes_through_its_owner(caplog) -> None:
    async def signals() -> None:
        raise ShutdownRequested()

    with pytest.raises(ShutdownRequested):
        asyncio.run(owned("signals", signals()))
    assert not errors(caplog, "oobleck.agent.tasks")


def test_a_failed_background_task_is_logged_and_raised_by_the_watcher(caplog) -> None:
    async def main() -> None:
        background = Background()

        async def lost() -> None:
            raise ValueError("lost?")

        done = background.start(asyncio.sleep(0, "fine"), "fine")
        background.start(lost(), "injected")
        with pytest.raises(TaskFailed, match=r"background task 'injected' failed: ValueError\('lost\?'\)"):
            await asyncio.wait_for(background.watch(), 5)
        assert done.result() == "fine"
        # Cancelled at shutdown: not a failure.
        sleeper = background.start(asyncio.sleep(60), "sleeper")
        await background.cancel()
        assert sleeper.cancelled()

    asyncio.run(main())
    [record] = errors(caplog, "oobleck.agent.tasks")
    assert "'injected' failed" in record.getMessage() and record.exc_info[0] is ValueError


# -- a real agent (in this process) against the fake master ------------------------------------


def run_agent(monkeypatch, master, tmp_path, token_file, inject) -> int:
    """Run an agent until it registers, ``inject(agent)``, and return its exit status."""
    monkeypatch.setattr(daemon, "create_store", lambda *args, **kwargs: (None, 29400, "nowhere (a test)"))
    monkeypatch.setattr(daemon, "gpu_memory_bytes", lambda: 0)
    config = AgentConfig(
        master=f"127.0.0.1:{master.port}",
        token_file=str(token_file),
        node_name="in-process",
        work_dir=str(tmp_path / "work"),
        worker_command="false",
        reconnect_max_backoff_s=0.3,
    )

    async def main() -> int:
        agent = daemon.Agent(config, TOKEN)
        running = asyncio.create_task(agent.run())
        await asyncio.to_thread(master.wait_for, "hello")
        inject(agent)
        return await asyncio.wait_for(running, 30)

    return asyncio.run(main())


def test_an_injected_background_failure_ends_the_agent(monkeypatch, master, tmp_path, token_file, caplog) -> None:
    """The SIGHUP token reload fails in an unforeseen way: the agent logs it and exits 1."""

    def broken_read(path):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(daemon, "read_token_file", broken_read)
    status = run_agent(monkeypatch, master, tmp_path, token_file, lambda agent: agent._request_token_reload())
    assert status == 1
    [record] = errors(caplog, "oobleck.agent.tasks")
    assert "'token-reload' failed" in record.getMessage() and record.exc_info[0] is RuntimeError
    assert any(
        "background task 'token-reload' failed: RuntimeError('disk on fire')" in r.getMessage()
        for r in errors(caplog, "oobleck.agent.daemon")
    )
    master.wait_for("session_end")


def test_a_failed_supervisor_ends_the_agent(monkeypatch, master, tmp_path, token_file, caplog) -> None:
    def broken_check(now):
        raise KeyError("slot")

    status = run_agent(
        monkeypatch, master, tmp_path, token_file, lambda agent: setattr(agent.pool, "check", broken_check)
    )
    assert status == 1
    [record] = errors(caplog, "oobleck.agent.tasks")
    assert "'supervisor' failed" in record.getMessage() and record.exc_info[0] is KeyError
    assert any("agent task 'supervisor' failed" in r.getMessage() for r in errors(caplog, "oobleck.agent.daemon"))
