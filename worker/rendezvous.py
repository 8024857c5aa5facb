"""Joining and leaving a generation's process group.

A generation's ranks meet at the agent's store (:mod:`oobleck.worker.store`): each connects,
counts itself in (the arrival barrier, polled so that a superseded generation is given up at
once) and joins the default process group. Every call here only communicates, so its failures
are :class:`~oobleck.worker.failures.PeerGone`. Leaving is the engine's (it must drop its own
references to the groups first: see :meth:`TrainingEngine.abandon
<oobleck.worker.engine.TrainingEngine.abandon>`).
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from oobleck.worker.failures import PeerGone, RendezvousAbandoned, communicating
from oobleck.worker.store import make_store

ARRIVED_KEY = "oobleck/arrived"
ARRIVE_POLL_S = 0.05


@dataclass(frozen=True)
class DistInit:
    """How to join the process group: a ready ``store``, a TCPStore ``host``/``port`` (client; the
    agent hosts it), or a FileStore ``file``. ``backend``: gloo (CPU) or nccl (GPU). ``secret``:
    the generation's rendezvous secret (see :class:`~oobleck.worker.store.SecretKeyStore`;
    empty: plain keys)."""

    backend: str = "gloo"
    store: Any = None
    host: str | None = None
    port: int | None = None
    file: str | None = None
    timeout_s: float = 300.0
    nccl_options: Mapping[str, Any] | None = None  # e.g. {"is_high_priority_stream": True}
    secret: str = field(default="", repr=False)  # never in a repr, a log line or an error

    def __post_init__(self) -> None:
        if self.backend not in ("gloo", "nccl"):
            raise ValueError(f"backend: must be gloo or nccl, got {self.backend!r}")
        if not isinstance(self.secret, str):
            raise ValueError(f"secret: must be a string, got {type(self.secret).__name__}")
        if sum(x is not None for x in (self.store, self.host, self.file)) != 1:
            raise ValueError("DistInit: give exactly one of store, host/port, file")
        if self.host is not None and not self.port:
            raise ValueError("port: required with host")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s: must be > 0, got {self.timeout_s}")


def arrive(store: Any, world_size: int, timeout_s: float, interrupt: Callable[[], str | None]) -> None:
    """Wait until every rank of the generation has arrived at its store, polling: a rank that
    died before arriving would otherwise keep the others in ``init_process_group`` until the
    timeout, although the master has already superseded the generation (its next command is
    then waiting, and ``interrupt()`` says so: :class:`RendezvousAbandoned`)."""
    store.add(ARRIVED_KEY, 1)
    deadline = time.monotonic() + timeout_s
    while True:
        arrived = store.add(ARRIVED_KEY, 0)
        if arrived >= world_size:
            return
        why = interrupt()
        if why:
            raise RendezvousAbandoned(f"{arrived} of {world_size} ranks arrived: {why}")
        if time.monotonic() >= deadline:
            raise PeerGone(f"rendezvous: {arrived} of {world_size} ranks arrived within {timeout_s:g}s")
        time.sleep(ARRIVE_POLL_S)


def join_group(
    init: DistInit,
    world_size: int,
    generation: int,
    rank: int,
    device: torch.device,
    interrupt: Callable[[], str | None] | None = None,
) -> Any:
    """Collective: join generation ``generation``'s default process group as ``rank``. Returns
    the store object, which the caller keeps as long as the group (torch calls it from C++).
    With ``interrupt``, the store connection and the arrival are polled (see :func:`arrive`)."""
    kwargs: dict[str, Any] = {}
    if init.backend == "nccl" and init.nccl_options:
        opts = dist.ProcessGroupNCCL.Options()
        for key, value in init.nccl_options.items():
            setattr(opts, key, value)
        kwargs["pg_options"] = opts
    if init.backend == "nccl" and device.type == "cuda":
        kwargs["device_id"] = device
    with communicating(f"rendezvous of generation {generation}"):
        store = make_store(init, world_size, generation, interrupt)
        if interrupt is not None:
            arrive(store, world_size, init.timeout_s, interrupt)
        dist.init_process_group(
            init.backend,
            store=store,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=init.timeout_s),
            **kwargs,
        )
    return store


def abort_group(backend: str) -> None:
    """NCCL: abort the communicators first (destroying one with a failed operation may hang)."""
    abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
    if backend == "nccl" and abort is not None:
        abort()


def destroy_group() -> None:
    """Destroy the default process group and every group made from it, if any."""
    if dist.is_initialized():
        dist.destroy_process_group()
