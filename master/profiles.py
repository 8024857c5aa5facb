"""The master's cache of model profiles measured by agents (``Profile`` commands).

A job spec without ``profile:`` is profiled on the first plannable node's device: the master
sends that node's agent a ``Profile`` command, the agent runs ``python -m oobleck.worker.profiler``
and acks with the ``oobleck-profile/1`` document. Results are cached next to the master's state
file (``profiles/profile-<key>.json``), keyed by what the measurement depends on: the model and
its config, microbatch size, sequence length, precision and the node's device class (CPU, or a
GPU with its memory size), so resubmitting the job (or restarting the master) does not measure
again. Everything here is blocking file I/O: call it off the event loop.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from oobleck.common.files import NotRegularFile, open_regular, read_bounded, write_json
from oobleck.common.profilekey import node_device, profile_key

log = logging.getLogger(__name__)


def cache_key(spec: Any, slots: int, gpu_memory_bytes: int) -> str:
    """Key of a profile measured for ``spec`` on a node with ``slots`` slots and that GPU memory
    per slot (0: CPU): the key the node's own profiler cache uses too (common/profilekey)."""
    return profile_key(spec, node_device(slots, gpu_memory_bytes))


def cache_path(state_file: str, key: str) -> Path:
    return Path(state_file).resolve().parent / "profiles" / f"profile-{key}.json"


def read_cached(path: Path) -> dict[str, Any] | None:
    """The cached profile at ``path``, None when absent or unreadable (then it is measured again)."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable cached profile %s: %s", path, exc)
        return None


def write_cached(path: Path, data: dict[str, Any]) -> None:
    """Write atomically (temp file + rename): a crash never leaves half a profile."""
    write_json(path, data, indent=1)


MAX_PROFILE_BYTES = 16 << 20


class ProfileFileError(ValueError):
    """A job spec's ``profile:`` the master refuses to read; the message never quotes the file."""


def profile_dir(config: Any) -> Path:
    """Where ``profile:`` files may be: ``profile_dir``, or the state file's directory."""
    return Path(config.profile_dir or Path(config.state_file).resolve().parent).resolve()


def read_profile_file(directory: Path, name: str) -> dict[str, Any]:
    """The JSON document ``name`` (relative to ``directory``, or absolute inside it): only a
    regular file inside ``directory`` (symbolic links resolved), opened non-blocking, at most
    ``MAX_PROFILE_BYTES``. Errors say why without quoting the file's content."""
    path = (directory / name).resolve()
    if path != directory and directory not in path.parents:
        raise ProfileFileError(f"{name!r} is outside the master's profile directory {str(directory)!r}")
    try:
        fd, info = open_regular(path)
    except NotRegularFile:
        raise ProfileFileError(f"{name!r}: not a regular file") from None
    except OSError as exc:
        raise ProfileFileError(f"{name!r}: cannot open: {exc.strerror or exc}") from None
    try:
        if info.st_size > MAX_PROFILE_BYTES:
            raise ProfileFileError(f"{name!r}: {info.st_size} bytes, more than {MAX_PROFILE_BYTES}")
        data = read_bounded(fd, MAX_PROFILE_BYTES)
    except OSError as exc:
        raise ProfileFileError(f"{name!r}: cannot read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_PROFILE_BYTES:
        raise ProfileFileError(f"{name!r}: more than {MAX_PROFILE_BYTES} bytes")
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:
        where = f" at line {exc.lineno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise ProfileFileError(f"{name!r}: not an oobleck-profile/1 JSON document (invalid JSON{where})") from None
