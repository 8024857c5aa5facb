"""Process helpers shared by the launcher and the tests."""

from __future__ import annotations

import os
import select


def wait_pid_gone(pid: int, timeout_s: float) -> bool:
    """True once ``pid`` has exited (a zombie counts as exited), False at the deadline.

    Waits on a pidfd, so it wakes the moment the process ends (no polling).
    """
    try:
        fd = os.pidfd_open(pid)
    except (ProcessLookupError, OSError):
        return True
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(max(0.0, timeout_s) * 1000))
    finally:
        os.close(fd)
