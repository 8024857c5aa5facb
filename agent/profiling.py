"""The agent's side of the master's ``Profile`` command: run the profiler in a child process.

The child is ``python -m oobleck.worker.profiler`` (the agent's own interpreter, or
``profiler_argv``), in its own session, on this node's device (``OOBLECK_WORKER_DEVICE``, as the
workers use), with the spec and the result in files under the agent's work directory and a
cache of earlier measurements there. A child that fails, or runs past ``timeout_s`` (its
process group is then SIGKILLed), becomes a :class:`ProfileFailed` whose message (the child's
last stderr line) goes back to the master in the nack.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

MAX_PROFILE_BYTES = 4 << 20  # what the master accepts in an ack


class ProfileFailed(RuntimeError):
    """The profiling run failed; the message says why (for the master's nack)."""


def profiler_argv(python: str = sys.executable) -> list[str]:
    return [python, "-m", "oobleck.worker.profiler"]


def _threads() -> str:
    text = os.environ.get("OOBLECK_TORCH_THREADS", "1").strip()
    return text if text.isdigit() and int(text) > 0 else "1"


async def run_profiler(
    spec_yaml: str,
    work_dir: Path,
    timeout_s: float,
    *,
    argv: Sequence[str] | None = None,
    tag: str = "profile",
    device_key: str = "",
) -> str:
    """Measure the model of ``spec_yaml`` here; returns the ``oobleck-profile/1`` JSON text."""
    spec_path = work_dir / f"{tag}.yaml"
    out_path = work_dir / f"{tag}.json"
    await asyncio.to_thread(spec_path.write_text, spec_yaml)
    out_path.unlink(missing_ok=True)
    cmd = [
        *(argv or profiler_argv()),
        "--spec", str(spec_path), "--out", str(out_path),
        "--device", os.environ.get("OOBLECK_WORKER_DEVICE", "auto") or "auto",
        "--threads", _threads(),
        "--cache-dir", str(work_dir / "profile-cache"),
        *(["--device-key", device_key] if device_key else []),
    ]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        _, err = await asyncio.wait_for(proc.communicate(), timeout=timeout_s)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        raise ProfileFailed(f"the profiler ran past {timeout_s:g}s and was killed") from None
    finally:
        if proc.returncode is None:  # cancelled: never leave the child behind
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    lines = [ln for ln in err.decode("utf-8", "replace").splitlines() if ln.strip()]
    if proc.returncode != 0:
        last = lines[-1] if lines else "no message"
        raise ProfileFailed(f"the profiler exited with {proc.returncode}: {last[:500]}")
    try:
        text = await asyncio.to_thread(out_path.read_text)
    except OSError as exc:
        raise ProfileFailed(f"the profiler wrote no result: {exc}") from None
    if len(text.encode()) > MAX_PROFILE_BYTES:
        raise ProfileFailed(f"the profile is {len(text.encode())} bytes, more than {MAX_PROFILE_BYTES}")
    log.info("profile measured: %d bytes", len(text))
    return text
