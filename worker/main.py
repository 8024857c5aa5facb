"""The worker process: ``python -m oobleck.worker`` (spawned by ``oobleck-agent``, one per slot).

The agent sets ``OOBLECK_AGENT_SOCKET``, ``OOBLECK_NODE_ID``, ``OOBLECK_SLOT``,
``OOBLECK_WORK_DIR``, ``OOBLECK_AGENT_PID`` and ``OOBLECK_WORKER_HEARTBEAT_INTERVAL_S``; the
worker attaches to the agent first (before importing torch, so the liveness heartbeat starts at
once), waits for ``Start``, trains, applies ``Reconfigure`` commands and exits 0 after the last
step or on ``Stop``. The loop itself is :mod:`oobleck.worker.run`.

Tuning, from the environment (all optional):

- ``OOBLECK_TORCH_THREADS``: intra-op threads per worker on CPU (default 1: one worker per slot,
  and slots share the machine's cores; ``default`` leaves torch's own choice).
- ``OOBLECK_WORKER_DEVICE``: ``auto`` (default: ``cuda:<slot>`` with NCCL when CUDA is
  available, else CPU with gloo), ``cpu`` or ``cuda``.
- ``OOBLECK_COLLECTIVE_TIMEOUT_S``: rendezvous and collective timeout (default 300).
- ``OOBLECK_RECONFIGURE_WAIT_S``: how long a worker whose step failed on a communication error
  waits for the agent's ``Reconfigure`` before giving up (default 600).
- ``OOBLECK_START_WAIT_S``: how long to wait for ``Start`` after attaching (default 600).
- ``OOBLECK_STEP_RETRIES``: consecutive retries of a step that every rank voted failed
  (a local error on some rank, the process group intact) before giving up (default 2).
- ``OOBLECK_WORKER_HOLD_FILE``: a path for fault drills and tests. While that file exists and
  its words include ``step`` (or it is empty), the worker starts no new step (it keeps applying
  commands); ``step@N`` does the same once N steps are done (training runs up to step N and
  holds there); while they include ``copy``, a reconfiguration waits after joining the new process
  group, before the layer copy. Deleting the file (or rewriting it) lets the worker go on. This
  makes "the cluster changes between these two steps" or "a node dies while layers are being
  copied" reproducible. Unset (the default): nothing is checked.

Exit status: 0 (finished, or stopped by the agent's ``Stop``), 1 (failed; the agent was told
with a fatal error), 2 (bad environment or no agent to attach to), 75 (the agent went away, see
``agent_link``), 143 (SIGTERM: the engine is closed first; a second SIGTERM ends at once).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from oobleck.common.logs import setup_logging
from oobleck.common.validate import ConfigError
from oobleck.common.version import version
from oobleck.worker.agent_link import AgentLink, AgentLinkError

log = logging.getLogger(__name__)

ENV_TORCH_THREADS = "OOBLECK_TORCH_THREADS"
ENV_DEVICE = "OOBLECK_WORKER_DEVICE"
ENV_COLLECTIVE_TIMEOUT_S = "OOBLECK_COLLECTIVE_TIMEOUT_S"
ENV_RECONFIGURE_WAIT_S = "OOBLECK_RECONFIGURE_WAIT_S"
ENV_START_WAIT_S = "OOBLECK_START_WAIT_S"
ENV_STEP_RETRIES = "OOBLECK_STEP_RETRIES"
ENV_HOLD_FILE = "OOBLECK_WORKER_HOLD_FILE"

DEVICES = ("auto", "cpu", "cuda")
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_TERMINATED = 128 + signal.SIGTERM  # stopped by SIGTERM: not a finished job


@dataclass(frozen=True)
class WorkerSettings:
    """Per-process tuning of a worker (from ``OOBLECK_*`` variables, see the module docstring)."""

    torch_threads: int | None = 1  # None: leave torch's default
    device: str = "auto"
    collective_timeout_s: float = 300.0
    reconfigure_wait_s: float = 600.0
    start_wait_s: float = 600.0
    step_retries: int = 2
    hold_file: str | None = None  # fault drills: see OOBLECK_WORKER_HOLD_FILE

    def __post_init__(self) -> None:
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ValueError(f"{ENV_TORCH_THREADS}: must be >= 1, got {self.torch_threads}")
        if self.device not in DEVICES:
            raise ValueError(f"{ENV_DEVICE}: must be one of {', '.join(DEVICES)}, got {self.device!r}")
        for name, value in (
            (ENV_COLLECTIVE_TIMEOUT_S, self.collective_timeout_s),
            (ENV_RECONFIGURE_WAIT_S, self.reconfigure_wait_s),
            (ENV_START_WAIT_S, self.start_wait_s),
        ):
            if not value > 0:
                raise ValueError(f"{name}: must be > 0, got {value}")
        if self.step_retries < 0:
            raise ValueError(f"{ENV_STEP_RETRIES}: must be >= 0, got {self.step_retries}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> WorkerSettings:
        env = os.environ if environ is None else environ

        def number(name: str, kind, default):
            text = env.get(name, "").strip()
            if not text:
                return default
            try:
                return kind(text)
            except ValueError:
                raise ValueError(f"{name}: expected {kind.__name__}, got {text!r}") from None

        threads_text = env.get(ENV_TORCH_THREADS, "").strip().lower()
        threads = None if threads_text == "default" else number(ENV_TORCH_THREADS, int, 1)
        return cls(
            torch_threads=threads,
            device=env.get(ENV_DEVICE, "auto").strip().lower() or "auto",
            collective_timeout_s=number(ENV_COLLECTIVE_TIMEOUT_S, float, cls.collective_timeout_s),
            reconfigure_wait_s=number(ENV_RECONFIGURE_WAIT_S, float, cls.reconfigure_wait_s),
            start_wait_s=number(ENV_START_WAIT_S, float, cls.start_wait_s),
            step_retries=number(ENV_STEP_RETRIES, int, cls.step_retries),
            hold_file=env.get(ENV_HOLD_FILE, "").strip() or None,
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m oobleck.worker",
        description=(
            "An Oobleck training worker. Started by oobleck-agent (one per GPU or CPU slot), which "
            "passes the job and plan over its local channel; not meant to be run by hand."
        ),
        epilog="Environment: see the oobleck.worker.main module docstring.",
    )
    parser.add_argument("--version", action="version", version=f"oobleck-worker {version()}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    build_parser().parse_args(argv)
    setup_logging()
    try:
        settings = WorkerSettings.from_env()
        link = AgentLink.from_env()
    except (ValueError, AgentLinkError) as exc:
        log.error("cannot start: %s", exc)
        return EXIT_USAGE
    try:
        link.attach()  # before torch is imported: the agent hears from us at once
    except AgentLinkError as exc:
        log.error("cannot attach to the agent: %s", exc)
        link.close()
        return EXIT_USAGE

    worker = None
    code = EXIT_FAILED
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        from oobleck.worker.run import Worker  # imports torch

        worker = Worker(link, settings)
        code = worker.run()
    except Terminated:
        log.info("SIGTERM: closing")
        code = EXIT_TERMINATED
    except Exception as exc:
        generation = worker.generation if worker is not None else 0
        if isinstance(exc, ConfigError):
            log.error("generation %d: bad job spec: %s", generation, exc)
        else:
            log.exception("generation %d: worker failed", generation)
        try:
            link.report_error(generation, f"{type(exc).__name__}: {exc}", fatal=True)
        except AgentLinkError as report_exc:
            log.warning("could not report the failure to the agent: %s", report_exc)
        code = EXIT_FAILED
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends a slow clean-up
        code = _close(worker, link, code)
    return code


class Terminated(BaseException):
    """SIGTERM (the agent stops its workers with it): unwinds the loop so the engine is closed.
    A BaseException, so that no handler for step or communication failures takes it."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


def _close(worker, link: AgentLink, code: int) -> int:
    """Close the engine and the process group, then the link; returns the exit status."""
    try:
        if worker is not None:
            worker.close()
        _destroy_process_group()
    except Exception:
        log.exception("closing the worker failed")
        code = code or EXIT_FAILED
    finally:
        link.close()
    return code


def _destroy_process_group() -> None:
    dist_module = sys.modules.get("torch.distributed")
    if dist_module is not None and dist_module.is_available() and dist_module.is_initialized():
        dist_module.destroy_process_group()
