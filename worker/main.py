"""The worker process: ``python -m oobleck.worker`` (spawned by ``oobleck-agent``, one per slot).

The agent sets ``OOBLECK_AGENT_SOCKET``, ``OOBLECK_NODE_ID``, ``OOBLECK_SLOT``,
``OOBLECK_WORK_DIR``, ``OOBLECK_AGENT_PID`` and ``OOBLECK_WORKER_HEARTBEAT_INTERVAL_S``; the
worker attaches to the agent first (before importing torch, so the liveness heartbeat starts at
once), waits for ``Start``, trains, applies ``Reconfigure`` commands and exits 0 after the last
step or on ``Stop``. The loop itself is :mod:`oobleck.worker.run`.

Settings come from ``OOBLECK_*`` variables (:mod:`oobleck.worker.settings`; the drills' hold
file: :mod:`oobleck.worker.drills`).

Exit status: 0 (finished, or stopped by the agent's ``Stop``), 1 (failed; the agent was told
with a fatal error: :func:`failure_report`), 2 (bad environment or no agent to attach to), 75
(the agent went away, see ``agent_link``), 143 (SIGTERM: the engine is closed first; a second
SIGTERM ends at once).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import traceback
from collections.abc import Sequence

from oobleck.common.logs import setup_logging
from oobleck.common.validate import ConfigError
from oobleck.common.version import version
from oobleck.worker.agent_link import AgentLink, AgentLinkError
from oobleck.worker.failures import WorkerError
from oobleck.worker.settings import WorkerSettings

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_TERMINATED = 128 + signal.SIGTERM  # stopped by SIGTERM: not a finished job
REPORT_CHARS = 4000  # the agent keeps this much of an error message


def failure_report(exc: BaseException, limit: int = REPORT_CHARS) -> str:
    """What the agent is told when the worker fails: ``Type: message``, and for an unexpected
    exception (a bug: not a :class:`WorkerError` or a bad job spec) its traceback (without the
    message again), whose oldest frames are dropped first to keep it within ``limit``
    characters."""
    summary = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, (WorkerError, ConfigError)):
        return summary[:limit]
    trace = "".join(traceback.format_exception(exc)).rstrip()
    trace = trace.removesuffix(summary).rstrip()
    room = limit - len(summary) - 1
    if room <= 0:
        return summary[:limit]
    if len(trace) > room:
        trace = "..." + trace[-(room - 3) :]
    return f"{summary}\n{trace}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m oobleck.worker",
        description=(
            "An Oobleck training worker. Started by oobleck-agent (one per GPU or CPU slot), which "
            "passes the job and plan over its local channel; not meant to be run by hand."
        ),
        epilog="Environment: see the oobleck.worker.settings module docstring.",
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
            link.report_error(generation, failure_report(exc), fatal=True)
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
