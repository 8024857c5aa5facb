"""Spawning and stopping worker processes.

Each worker runs in its own session (``start_new_session=True``) with ``PR_SET_PDEATHSIG`` set
to SIGKILL, so it dies with the agent even when the agent is SIGKILLed. Stopping is SIGTERM to
the process group, one monotonic deadline, then SIGKILL; calling it twice is harmless.

The parent-death signal fires when the *thread* that forked the worker exits, so workers must
be spawned from a long-lived thread (the agent spawns from its event-loop thread).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence

log = logging.getLogger(__name__)

_POLL_S = 0.02


@functools.cache
def _setpriv() -> str | None:
    return shutil.which("setpriv")


def spawn_worker(argv: Sequence[str], env: Mapping[str, str], *, cwd: str | None = None) -> subprocess.Popen:
    """Start one worker in its own session, killed with SIGKILL when the spawning thread dies.

    The parent-death signal is set by ``setpriv --pdeathsig KILL`` (util-linux), which then
    execs the worker (same pid), so no Python runs between fork and exec: a ``preexec_fn`` in
    a process with gRPC and torch threads can crash the child. Without setpriv, the worker's
    :class:`~oobleck.worker.agent_link.AgentLink` sets it itself (``$OOBLECK_AGENT_PID``).
    """
    setpriv = _setpriv()
    full = [setpriv, "--pdeathsig", "KILL", "--", *argv] if setpriv else list(argv)
    return subprocess.Popen(
        full,
        env=dict(env),
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
    )


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:  # the group leader changed its group: signal the process itself
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)


async def stop_processes(
    procs: Iterable[subprocess.Popen], timeout_s: float, *, kill_now: bool = False, grace_s: float = 0.0
) -> None:
    """Wait up to ``grace_s`` for the processes to exit on their own (they were asked to stop),
    then SIGTERM (or SIGKILL when ``kill_now``: no grace) each process group, wait until
    ``timeout_s`` (one monotonic deadline for all), SIGKILL what is left and reap it. Safe to
    call again."""
    procs = [p for p in procs if p.poll() is None]
    if not kill_now and grace_s > 0:
        polite = time.monotonic() + grace_s
        while any(p.poll() is None for p in procs) and time.monotonic() < polite:
            await asyncio.sleep(_POLL_S)
        procs = [p for p in procs if p.poll() is None]
    if not procs:
        return
    first = signal.SIGKILL if kill_now else signal.SIGTERM
    for proc in procs:
        _signal_group(proc, first)
        _signal_group(proc, signal.SIGCONT)  # a stopped process cannot act on SIGTERM
    deadline = time.monotonic() + timeout_s
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        await asyncio.sleep(_POLL_S)
    left = [p for p in procs if p.poll() is None]
    for proc in left:
        log.warning("worker pid %d ignored SIGTERM for %.1fs: SIGKILL", proc.pid, timeout_s)
        _signal_group(proc, signal.SIGKILL)
    for proc in left:
        while proc.poll() is None:
            await asyncio.sleep(_POLL_S)


def kill_processes_now(procs: Iterable[subprocess.Popen]) -> None:
    """SIGKILL every live process group and reap synchronously (last-resort cleanup)."""
    procs = [p for p in procs if p.poll() is None]
    for proc in procs:
        _signal_group(proc, signal.SIGKILL)
    for proc in procs:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            log.error("worker pid %d did not die after SIGKILL", proc.pid)
