"""Owners of the agent's tasks: a task that fails is logged at ERROR and ends the agent.

The long-lived tasks (master session, commands, supervisor, signals) run under
:func:`owned`; the short ones started on the side (a token reload, a node failure reported by
a worker, the old node's workers stopped after a node id change) under :class:`Background`.
Either way an exception is logged at ERROR with its traceback, naming the task, and becomes a
:class:`~oobleck.agent.errors.TaskFailed` (a :class:`~oobleck.agent.errors.FatalError`) that
stops the agent with status 1: a dead supervisor or a lost node failure must not leave a node
that looks alive. :class:`~oobleck.agent.errors.AgentStop` exceptions (shutdown, kill drill,
fatal errors) pass through as they are.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

from oobleck.agent.errors import AgentStop, TaskFailed

log = logging.getLogger(__name__)


async def owned(name: str, coro: Coroutine[Any, Any, Any]) -> Any:
    """Await ``coro``; an exception other than :class:`AgentStop` is logged at ERROR and
    raised again as :class:`TaskFailed` naming the task."""
    try:
        return await coro
    except AgentStop:
        raise
    except Exception as exc:
        log.error("agent task %r failed: %r", name, exc, exc_info=exc)
        raise TaskFailed(f"agent task {name!r} failed: {exc!r}") from exc


class Background:
    """The agent's background tasks: each is kept referenced until done, and the first failure
    is logged at ERROR and kept for :meth:`watch` (run among the agent's long-lived tasks),
    which raises it so that the agent stops."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task] = set()
        self._failure: BaseException | None = None
        self._failed = asyncio.Event()

    def start(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            return
        name = task.get_name()
        if isinstance(exc, AgentStop):
            failure: BaseException = exc
        else:
            log.error("background task %r failed: %r", name, exc, exc_info=exc)
            failure = TaskFailed(f"background task {name!r} failed: {exc!r}")
            failure.__cause__ = exc
        if self._failure is None:
            self._failure = failure
            self._failed.set()

    async def watch(self) -> None:
        """Wait for the first failure of a background task and raise it."""
        await self._failed.wait()
        assert self._failure is not None
        raise self._failure

    async def cancel(self) -> None:
        """Cancel what still runs (the agent is stopping) and wait for it."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
