"""Process helpers shared by the agent, the launcher, the benchmarks and the tests: waiting for a
process to end, and the one reader of ``/proc``."""

from __future__ import annotations

import os
import select
from pathlib import Path


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


# -- /proc readers (Linux): every reader returns None (or empty) for a process that is gone ------------
PROC = Path("/proc")


def pids(root: Path = PROC) -> list[int]:
    """Every process id, in no particular order."""
    return [int(p) for p in os.listdir(root) if p.isdigit()]


def stat_fields(pid: int, root: Path = PROC) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (field 3 onwards: state, ppid,
    ...): the name is in parentheses and may hold spaces and parentheses, so the split is
    after the last ')'."""
    try:
        text = (root / str(pid) / "stat").read_text()
    except OSError:
        return None
    _, sep, rest = text.rpartition(")")
    fields = rest.split()
    return fields if sep and fields else None


def state(pid: int, root: Path = PROC) -> str | None:
    """The one-letter state (``R``, ``S``, ``T``, ``Z``...), None when the process is gone."""
    fields = stat_fields(pid, root)
    return fields[0] if fields else None


def alive(pid: int, root: Path = PROC) -> bool:
    """The process exists and is not a zombie."""
    return state(pid, root) not in (None, "Z", "X")


def parent(pid: int, root: Path = PROC) -> int | None:
    fields = stat_fields(pid, root)
    return int(fields[1]) if fields and len(fields) > 1 else None


def cpu_seconds(pid: int, root: Path = PROC) -> float | None:
    """User plus system CPU time the process has used."""
    fields = stat_fields(pid, root)
    if not fields or len(fields) < 13:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int, root: Path = PROC) -> int | None:
    """Resident memory (``VmRSS``)."""
    try:
        lines = (root / str(pid) / "status").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return None


def environ_var(pid: int, name: str, root: Path = PROC) -> str | None:
    """One variable of the process's initial environment (readable for our own user's processes)."""
    try:
        items = (root / str(pid) / "environ").read_bytes().split(b"\0")
    except OSError:
        return None
    prefix = name.encode() + b"="
    for item in items:
        if item.startswith(prefix):
            return item[len(prefix) :].decode("utf-8", "replace")
    return None


def cmdline(pid: int, root: Path = PROC) -> str:
    """The command line, arguments joined by spaces ("" when the process is gone)."""
    try:
        return (root / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:
        return ""
