"""Waiting for a condition with a deadline: never a bare sleep as synchronisation. Polling is
for conditions nothing signals (another process's state, a gRPC status); code that can signal
uses a condition variable or an event instead."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def wait_until(predicate: Callable[[], object], timeout_s: float = 10.0, what: str = "condition") -> None:
    """Poll ``predicate`` on the event loop until it is true; AssertionError at the deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.01)


async def poll_until_async(
    probe: Callable[[], Awaitable[T]], accept: Callable[[T], object], what: str, timeout_s: float = 10.0
) -> T:
    """Await ``probe()`` until ``accept(value)`` holds, and return that value; AssertionError (with
    the last value seen) at the deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        value = await probe()
        if accept(value):
            return value
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}; last: {value}")
        await asyncio.sleep(0.02)


def poll_until(probe: Callable[[], T], what: str, timeout_s: float = 60.0, interval_s: float = 0.1) -> T:
    """Call ``probe`` until it returns something truthy, and return that; AssertionError (with
    the last value seen) at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what} (last: {value!r})")
        time.sleep(interval_s)


def wait_on(cond, predicate: Callable[[], T], timeout_s: float, what: str) -> T:
    """With ``cond`` (a threading.Condition) held, wait until ``predicate()`` is truthy (every
    change is notified on ``cond``) and return it; AssertionError at the deadline."""
    deadline = time.monotonic() + timeout_s
    with cond:
        while not (value := predicate()):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
            cond.wait(left)
        return value
