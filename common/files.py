"""Durable file writes, and careful reads of files named by users, shared by the daemons, the
workers and the tools."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in directory ``path`` durable (a no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):  # some file systems refuse fsync on directories
            os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes | Callable[[BinaryIO], object], *, mode: int = 0o644) -> None:
    """Write ``data`` (bytes, or a function writing to a binary file) to ``path`` atomically: a
    temporary file in the same directory, flushed and fsynced, renamed over ``path``, and the
    directory fsynced. Readers see the old content or the new one, never a mix; a crash leaves
    at most a hidden temporary file (``.<name>.*``)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            if isinstance(data, bytes | bytearray):
                f.write(data)
            else:
                data(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_json(path: Path, data: Any, *, indent: int | None = None) -> None:
    """Write ``data`` as JSON to ``path`` with :func:`atomic_write` (creating its folder): ready
    files, cached profiles, anything a reader may open at any moment."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, (json.dumps(data, indent=indent) + "\n").encode())


def write_secret(path: Path, text: str) -> None:
    """Write ``text`` (and a newline) to a new file readable by its owner only (0600)."""
    path = Path(path)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")


class NotRegularFile(ValueError):
    """A path that names something other than a regular file; ``kind`` says what, in words."""

    def __init__(self, kind: str) -> None:
        super().__init__(f"{kind}, not a regular file")
        self.kind = kind


def file_kind(mode: int) -> str:
    """What a file of this mode is, in words (for errors)."""
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISLNK, "a symbolic link"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: str | Path) -> tuple[int, os.stat_result]:
    """Open ``path`` read-only and non-blocking (a FIFO cannot block the open, a terminal does not
    become the controlling one) and check with ``fstat`` that what was opened is a regular file.
    Returns ``(fd, stat)``; raises :class:`NotRegularFile` (the descriptor closed) or the
    ``OSError`` of the open or the fstat."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotRegularFile(file_kind(info.st_mode))
    except BaseException:
        os.close(fd)
        raise
    return fd, info


def read_bounded(fd: int, limit: int) -> bytes:
    """Read from ``fd`` until end of file or until more than ``limit`` bytes (then the result is
    longer than ``limit``: the caller refuses it without reading the rest)."""
    chunks, total = [], 0
    while total <= limit:
        chunk = os.read(fd, min(1 << 20, limit + 1 - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)
