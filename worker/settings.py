"""A worker process's settings, from the ``OOBLECK_*`` environment (all optional).

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
- ``OOBLECK_WORKER_HOLD_FILE``: fault drills and tests, see :mod:`oobleck.worker.drills`.

No torch here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from oobleck.worker.failures import WorkerError

ENV_TORCH_THREADS = "OOBLECK_TORCH_THREADS"
ENV_DEVICE = "OOBLECK_WORKER_DEVICE"
ENV_COLLECTIVE_TIMEOUT_S = "OOBLECK_COLLECTIVE_TIMEOUT_S"
ENV_RECONFIGURE_WAIT_S = "OOBLECK_RECONFIGURE_WAIT_S"
ENV_START_WAIT_S = "OOBLECK_START_WAIT_S"
ENV_STEP_RETRIES = "OOBLECK_STEP_RETRIES"
ENV_HOLD_FILE = "OOBLECK_WORKER_HOLD_FILE"

DEVICES = ("auto", "cpu", "cuda")


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


def choose_device(setting: str, slot: int, cuda_devices: int) -> tuple[str, str]:
    """``(device, backend)`` for a slot: ``cuda:<slot>`` with NCCL when CUDA is wanted or (with
    ``auto``) available, else CPU with gloo."""
    if setting == "cpu" or (setting == "auto" and cuda_devices == 0):
        return "cpu", "gloo"
    if cuda_devices == 0:
        raise WorkerError(f"{ENV_DEVICE}={setting}: no CUDA device is visible")
    if slot >= cuda_devices:
        raise WorkerError(f"slot {slot}: only {cuda_devices} CUDA devices are visible (one per slot)")
    return f"cuda:{slot}", "nccl"
