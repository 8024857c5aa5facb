"""Runs one stage's operation list for one step (see :mod:`oobleck.worker.schedule`).

The executor knows nothing about schedules: it follows the list. Activations and gradients move
with ``isend``/``irecv`` (gloo on CPU, NCCL on GPU); sends complete at the end of the step,
receives before the next operation. With several lanes per stage each lane exchanges only the
overlapping sample ranges with the neighbouring stage's lanes (:func:`layout.transfers`).

A transfer that fails (a neighbouring stage's process is gone or has left the process group, or
the timeout expired) raises :class:`TransferFailed`, so the engine can tell a communication
failure, which it must not vote on (the neighbours in this pipeline are blocked on this rank),
from a local error.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from oobleck.worker import schedule as S
from oobleck.worker.failures import PeerGone, communicating
from oobleck.worker.layout import RankAssignment, lane_range, transfers
from oobleck.worker.models import per_sample_loss


class TransferFailed(PeerGone):
    """A point-to-point transfer with a neighbouring stage failed: the process group is unusable."""


@dataclass
class StepIO:
    """What the executor needs from the data side for one step (microbatch indices are local)."""

    inputs: Callable[[int], torch.Tensor]  # first stage: token ids of this lane's share
    labels: Callable[[int], torch.Tensor]  # last stage: labels of this lane's share
    loss_scale: float  # 1 / global_batch_size


class StageExecutor:
    def __init__(
        self,
        layers: Sequence[nn.Module],
        assignment: RankAssignment,
        microbatch_size: int,
        act_shape: tuple[int, ...],  # per-sample activation shape between layers: (seq, hidden)
        device: torch.device,
        comm_dtype: torch.dtype = torch.float32,
        autocast_dtype: torch.dtype | None = None,
        use_tags: bool = True,
    ) -> None:
        self.layers = list(layers)
        self.a = assignment
        self.mbs = microbatch_size
        self.act_shape = tuple(act_shape)
        self.device = device
        self.comm_dtype = comm_dtype
        self.autocast_dtype = autocast_dtype
        self.use_tags = use_tags  # NCCL ignores tags; gloo matches on them
        g = len(assignment.stage_ranks)
        self.share = lane_range(microbatch_size, g, assignment.lane)
        self.recv_pieces = transfers(microbatch_size, g, assignment.lane, assignment.prev_ranks)
        self.send_pieces = transfers(microbatch_size, g, assignment.lane, assignment.next_ranks)

    def _tag(self, microbatch: int, kind: int) -> int:
        return (microbatch * 2 + kind) if self.use_tags else 0

    def _forward_layers(self, x: torch.Tensor) -> torch.Tensor:
        ctx = (
            torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else contextlib.nullcontext()
        )
        with ctx:
            for layer in self.layers:
                x = layer(x)
        return x

    def _recv_ops(self, pieces, microbatch: int, kind: int) -> tuple[list, list[torch.Tensor]]:
        ops, bufs = [], []
        for peer, lo, hi in pieces:
            buf = torch.empty((hi - lo, *self.act_shape), dtype=self.comm_dtype, device=self.device)
            ops.append(dist.P2POp(dist.irecv, buf, peer=peer, tag=self._tag(microbatch, kind)))
            bufs.append(buf)
        return ops, bufs

    def _send_ops(self, tensor: torch.Tensor, pieces, microbatch: int, kind: int) -> list:
        start = self.share[0]
        t = tensor.detach().to(self.comm_dtype)
        return [
            dist.P2POp(dist.isend, t[lo - start : hi - start].contiguous(), peer=peer, tag=self._tag(microbatch, kind))
            for peer, lo, hi in pieces
        ]

    def _transfer(self, send_ops: list, recv: tuple[list, list[torch.Tensor]] | None, pending: list):
        """Issue sends and (optionally) the next receive as one batch; wait for the receive only.

        A send followed by a receive is batched so that, on NCCL where transfers between two
        ranks share one stream, stage ``s`` sending activations while stage ``s+1`` sends
        gradients back cannot block each other (the 1F1B steady state)."""
        recv_ops, bufs = recv if recv is not None else ([], [])
        both = send_ops + recv_ops
        with _comm("transfer"):
            if not both:
                works = []
            elif self.use_tags:  # gloo: every transfer is asynchronous already, no batch needed
                works = [op.op(op.tensor, op.peer, tag=op.tag) for op in both]
            else:
                works = dist.batch_isend_irecv(both)
            pending.extend(zip(works[: len(send_ops)], send_ops, strict=True))
            for w in works[len(send_ops) :]:
                w.wait()
        if not bufs:
            return None
        return bufs[0] if len(bufs) == 1 else torch.cat(bufs)

    def run(self, ops: Sequence[S.Op], io: StepIO) -> torch.Tensor:
        """Run the ops; returns the sum of per-sample losses of this lane (0 unless last stage).

        Gradients accumulate into the layers' ``.grad`` (scaled by ``io.loss_scale``).
        """
        a = self.a
        if self.share[0] == self.share[1]:
            return torch.zeros((), dtype=torch.float64)  # an empty lane: nothing to do
        inputs: dict[int, torch.Tensor] = {}
        outputs: dict[int, torch.Tensor] = {}
        losses: dict[int, torch.Tensor] = {}
        grads: dict[int, torch.Tensor] = {}
        pending: list = []
        loss_sum = torch.zeros((), dtype=torch.float64)

        def recv_of(op: S.Op) -> tuple[list, list[torch.Tensor]]:
            if op.kind == S.RECV_ACT:
                return self._recv_ops(self.recv_pieces, op.microbatch, 0)
            return self._recv_ops(self.send_pieces, op.microbatch, 1)

        def received(op: S.Op, tensor: torch.Tensor) -> None:
            if op.kind == S.RECV_ACT:
                inputs[op.microbatch] = tensor.requires_grad_(True)
            else:
                grads[op.microbatch] = tensor

        i = 0
        while i < len(ops):
            op = ops[i]
            m = op.microbatch
            if op.kind in (S.RECV_ACT, S.RECV_GRAD):
                received(op, self._transfer([], recv_of(op), pending))
            elif op.kind in (S.SEND_ACT, S.SEND_GRAD):
                if op.kind == S.SEND_ACT:
                    send = self._send_ops(outputs[m], self.send_pieces, m, 0)
                else:
                    send = self._send_ops(inputs.pop(m).grad, self.recv_pieces, m, 1)
                nxt = ops[i + 1] if i + 1 < len(ops) else None
                if nxt is not None and nxt.kind in (S.RECV_ACT, S.RECV_GRAD):
                    received(nxt, self._transfer(send, recv_of(nxt), pending))
                    i += 1
                else:
                    self._transfer(send, None, pending)
            elif op.kind == S.FORWARD:
                x = io.inputs(m).to(self.device) if a.is_first else inputs[m]
                if a.is_first:
                    inputs[m] = x
                y = self._forward_layers(x)
                if a.is_last:
                    per_sample = per_sample_loss(y, io.labels(m).to(self.device))
                    losses[m] = per_sample.sum() * io.loss_scale
                    loss_sum += per_sample.detach().double().sum().cpu()
                else:
                    outputs[m] = y
            elif op.kind == S.BACKWARD:
                if a.is_last:
                    losses.pop(m).backward()
                else:
                    y = outputs.pop(m)
                    torch.autograd.backward(y, grads.pop(m).to(y.dtype))
                if a.is_first:
                    inputs.pop(m, None)
            else:
                raise ValueError(f"unknown operation {op.kind!r}")
            i += 1
        with _comm("send"):
            for work, _buf in pending:
                work.wait()
        return loss_sum


def _comm(what: str):
    """Turn a torch.distributed error of a point-to-point ``what`` into :class:`TransferFailed`
    (see :mod:`oobleck.worker.failures`)."""
    return communicating(f"{what} with a neighbouring stage failed", TransferFailed)
