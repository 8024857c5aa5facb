"""One training step of one rank, and its commit vote.

The global batch is cut into microbatches; this rank runs its stage's operation list for its
pipeline's microbatches, gradients are all-reduced among each layer's holders, the global
gradient norm is agreed on by every rank (one world all-reduce that also carries the loss and an
error flag: the *commit vote*), then every rank applies the optimizer step, or none does: a
local failure on any rank is reported by all ranks as :class:`StepFailed` and the step is not
committed. A failed transfer between stages, gradient sync or vote (a peer is gone) raises
:class:`CommFailed` at once instead of voting; the caller then leaves the process group so that
peers blocked on this rank fail too. Anything else raised here is a bug and propagates.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from oobleck.worker import optim
from oobleck.worker.data import DataPosition, GlobalOrder, make_example
from oobleck.worker.drills import FaultPoint, Faults
from oobleck.worker.executor import StageExecutor, StepIO, TransferFailed
from oobleck.worker.failures import PeerGone, communicating
from oobleck.worker.gradsync import GradSync
from oobleck.worker.layout import RankAssignment, lane_range
from oobleck.worker.schedule import make_schedule

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepResult:
    step: int  # steps completed after this one
    loss: float  # mean loss over the global batch
    samples: int  # samples consumed by this step (the global batch)
    grad_norm: float


class StepFailed(RuntimeError):
    """A step failed on some rank; no rank applied its update."""


class CommFailed(PeerGone):
    """A collective of the step failed (a peer is gone or timed out); no update was applied here.
    The process group is unusable: abandon it and reconfigure. ``voted``: set when only the vote
    failed here, after every gradient all-reduce (``{"step", "after"}``): the gradients are kept,
    and if a peer committed the step the next reconfiguration applies it here too."""

    def __init__(self, message: str, voted: dict | None = None) -> None:
        super().__init__(message)
        self.voted = voted


@dataclass(frozen=True)
class Committed:
    result: StepResult
    after: DataPosition  # the position after the step
    sq_total: float  # the global squared gradient norm it was applied with


class StepRunner:
    """The step of one rank under one generation's plan (built again at each reconfiguration)."""

    def __init__(
        self,
        spec,
        me: RankAssignment,
        executor: StageExecutor,
        sync: GradSync,
        optimizer: torch.optim.Optimizer,
        order: GlobalOrder,
        dataset,
        vocab_size: int,
        objective: str,
        comm_device: torch.device,
    ) -> None:
        self.spec = spec
        self.me = me
        self.executor = executor
        self.sync = sync
        self.optimizer = optimizer
        self.order = order
        self.dataset = dataset
        self.vocab_size = vocab_size
        self.objective = objective
        self.comm_device = comm_device
        self.ops = make_schedule(spec.schedule, me.num_stages, me.stage, me.microbatches)

    def _io(self, batch: list[int], epoch: int) -> StepIO:
        me, spec = self.me, self.spec
        a, b = lane_range(spec.microbatch_size, len(me.stage_ranks), me.lane)

        @functools.cache  # built on first use (first and last stages only), for the whole step
        def examples() -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
            # One dataset call for all of this lane's microbatches (every row depends only on
            # its sample), then split per microbatch: the same tensors, less per-call overhead.
            parts = [self.order.microbatch(batch, me.microbatch_offset + m)[a:b] for m in range(me.microbatches)]
            idx = [i for part in parts for i in part]
            inputs, labels = make_example(
                self.dataset.tokens(idx), idx, self.objective, self.vocab_size - 1, spec.data.seed, epoch
            )
            sizes = [len(part) for part in parts]
            return inputs.split(sizes), labels.split(sizes)

        return StepIO(
            inputs=lambda m: examples()[0][m],
            labels=lambda m: examples()[1][m],
            loss_scale=1.0 / spec.global_batch_size,
        )

    def run(
        self, position: DataPosition, params: Mapping[object, nn.Parameter], faults: Faults | None = None
    ) -> Committed:
        """Collective: the step on the global batch at ``position`` (steps are numbered from 1 in
        messages: the step after ``position.step`` committed ones, as logs and reports do)."""
        number, rank = position.step + 1, self.me.rank
        start = self.order.step_start(position)
        batch, after = self.order.batch(position)
        error = 0.0
        loss_sum = torch.zeros((), dtype=torch.float64)
        try:
            loss_sum = self.executor.run(self.ops, self._io(batch, start.epoch))
            if faults is not None:
                faults.at(FaultPoint.BACKWARD_DONE, position.step)
        except TransferFailed as exc:
            # A neighbouring stage is gone. The other neighbour may be blocked on this rank (in a
            # pipeline of three or more stages): going on to the gradient sync with healthy peers
            # would keep it blocked, and them with it, until their timeout. Raise instead, so the
            # caller abandons the group at once and the failure spreads to every rank.
            log.warning("step %d failed on rank %d in a transfer: %s", number, rank, exc)
            self.optimizer.zero_grad(set_to_none=True)
            raise CommFailed(f"step {number}: {exc}") from exc
        except Exception:
            log.exception("step %d failed on rank %d before gradient sync", number, rank)
            error = 1.0
        # Collectives run on every rank even after a local failure, so no peer is left waiting
        # in a group; the vote below then cancels the update everywhere.
        try:
            self.sync.all_reduce(params)
        except PeerGone as exc:
            # A peer is gone (or timed out). Going on to the vote would leave the peers of the
            # groups skipped here waiting on this rank until their timeout, while it waits on
            # them; raise instead, so the caller abandons the group and the peers fail too.
            log.warning("step %d failed on rank %d in gradient sync: %s", number, rank, exc)
            self.optimizer.zero_grad(set_to_none=True)
            raise CommFailed(f"step {number}: {exc}") from exc
        sq = self.sync.local_sq_norm(params)
        counts_loss = self.me.is_last
        agreed = torch.stack([sq, loss_sum if counts_loss else torch.zeros((), dtype=torch.float64)])
        agreed = torch.cat([agreed, torch.tensor([error], dtype=torch.float64)]).to(self.comm_device)
        try:
            with communicating("the commit vote failed"):
                dist.all_reduce(agreed)
                if faults is not None:
                    faults.at(FaultPoint.VOTED, position.step)
        except PeerGone as exc:
            # The vote did not complete here; it may have on other ranks (a peer died while it
            # ran). This rank's gradients are complete (every gradient all-reduce finished), so
            # they are kept: if a peer committed the step, the next reconfiguration applies it
            # here too (the roll-forward) instead of losing it.
            voted = {"step": after.step, "after": after.to_dict()} if error == 0.0 else None
            raise CommFailed(f"step {number}: {exc}", voted=voted) from exc
        sq_total, loss_total, errors = agreed.cpu().tolist()
        if errors > 0:
            self.optimizer.zero_grad(set_to_none=True)
            raise StepFailed(f"step {number} failed on {int(errors)} rank(s); no update applied")
        norm = math.sqrt(sq_total)
        clip = self.spec.optimizer.grad_clip_norm
        if clip is not None:
            coef = clip / (norm + 1e-6)
            if coef < 1.0:
                for p in params.values():
                    if p.grad is not None:
                        p.grad.mul_(coef)
        optim.set_lr(self.optimizer, optim.lr_at(self.spec.optimizer, position.step))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        result = StepResult(
            step=after.step,
            loss=loss_total / self.spec.global_batch_size,
            samples=self.spec.global_batch_size,
            grad_norm=norm,
        )
        return Committed(result=result, after=after, sq_total=sq_total)
