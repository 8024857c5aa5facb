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

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def cache_key(spec: Any, slots: int, gpu_memory_bytes: int) -> str:
    """Key of a profile measured for ``spec`` on a node with ``slots`` slots and that GPU memory
    (0: CPU)."""
    key = {
        "model": spec.model.name,
        "config": spec.model.config,
        "microbatch_size": spec.microbatch_size,
        "seq_len": spec.data.seq_len,
        "precision": spec.precision,
        "device": f"gpu-{gpu_memory_bytes}" if gpu_memory_bytes > 0 else "cpu",
        "slots": slots,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]


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
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".profile-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
