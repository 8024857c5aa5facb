"""How a worker tells a peer that is gone from a bug of its own.

gloo reports a peer that died or left with a plain ``RuntimeError`` ("Connection closed by
peer"), NCCL and the store with ``torch.distributed.DistError`` kinds (also ``RuntimeError``\\ s),
a store connection attempt sometimes with ``TimeoutError``: the exception type cannot tell a
communication failure from a bug. The *call* can: every call that only communicates with the
generation's peers (the rendezvous, a collective, a point-to-point transfer, a barrier) runs
inside :func:`communicating`, which turns such an error into :class:`PeerGone`. The worker loop
treats only :class:`PeerGone` as "leave this generation and wait for the next one"; anything
else is a bug (or a local failure) and ends the worker, reported to its agent with the
traceback.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class PeerGone(RuntimeError):
    """Communication with the generation's peers failed: a peer died, left or timed out (or the
    rendezvous could not complete). The process group is unusable; nothing was committed here by
    the failed call. The worker leaves the group and waits for the next generation."""


class WorkerError(RuntimeError):
    """The worker cannot go on (reported to the agent as a fatal error)."""


@contextlib.contextmanager
def communicating(what: str, kind: type[PeerGone] = PeerGone) -> Iterator[None]:
    """Run a block that only communicates with peers: a ``RuntimeError`` or ``TimeoutError``
    raised in it is a communication failure, raised again as ``kind`` (a :class:`PeerGone`)
    naming ``what``. Keep local computation out of the block: an error there is a bug."""
    try:
        yield
    except PeerGone:
        raise
    except (RuntimeError, TimeoutError) as exc:
        raise kind(f"{what}: {exc}") from exc


class RendezvousAbandoned(PeerGone):
    """A generation's rendezvous was given up: a newer command is waiting (it is superseded)."""
