"""Layer states sent point to point: the copies of an exchange plan.

A state is sent as one pickled header (names, shapes, dtypes) followed by its tensors; the
receiver allocates them and keeps CPU copies. Copies run in the plan's global order on every
rank, so no two ranks wait on each other in opposite orders. These calls only communicate: a
failure is :class:`~oobleck.worker.failures.PeerGone`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from oobleck.worker.exchange import Copy
from oobleck.worker.failures import communicating

State = Mapping[str, torch.Tensor]


def send_state(state: State, dst: int, device: torch.device) -> None:
    meta = [(k, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for k, t in state.items()]
    dist.send_object_list([meta], dst=dst, device=device)
    for t in state.values():
        dist.send(t.to(device).contiguous(), dst=dst)


def recv_state(src: int, device: torch.device) -> dict[str, torch.Tensor]:
    box: list[Any] = [None]
    dist.recv_object_list(box, src=src, device=device)
    out = {}
    for key, shape, dtype in box[0]:
        buf = torch.empty(shape, dtype=getattr(torch, dtype), device=device)
        dist.recv(buf, src=src)
        out[key] = buf.cpu()
    return out


def run_copies(
    copies: Sequence[Copy], carried: Mapping[int, State], rank: int, device: torch.device
) -> dict[int, dict[str, torch.Tensor]]:
    """Collective over the copies' ranks: send what ``rank`` is the source of (from ``carried``),
    receive what it is the destination of; returns the received states by layer."""
    received: dict[int, dict[str, torch.Tensor]] = {}
    with communicating("layer copy"):
        for c in copies:
            if c.src == rank:
                send_state(carried[c.layer], c.dst, device)
            elif c.dst == rank:
                received[c.layer] = recv_state(c.src, device)
    return received
