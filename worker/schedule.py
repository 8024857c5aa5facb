"""Pipeline schedules as explicit per-stage operation lists.

A schedule is a pure function ``(num_stages, stage, num_microbatches) -> list[Op]``. The executor
only follows the list, so a new schedule needs no executor change. Operations (microbatch
indices are local to the pipeline):

- ``RECV_ACT m`` / ``SEND_ACT m``: activations of microbatch ``m`` from the previous stage / to
  the next stage (absent on the first / last stage),
- ``F m``: forward of this stage's layers (on the last stage it also computes the loss),
- ``RECV_GRAD m`` / ``SEND_GRAD m``: gradient of this stage's output from the next stage / of
  its input to the previous stage,
- ``B m``: backward through this stage's layers.

Sends are asynchronous (completed at the end of the step); receives complete before the next
operation. Both built-in schedules are deadlock-free under that rule because every stage issues
its receives in the order its neighbour issues the matching sends.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

RECV_ACT = "RECV_ACT"
SEND_ACT = "SEND_ACT"
FORWARD = "F"
RECV_GRAD = "RECV_GRAD"
BACKWARD = "B"
SEND_GRAD = "SEND_GRAD"


@dataclass(frozen=True)
class Op:
    kind: str
    microbatch: int

    def __str__(self) -> str:
        return f"{self.kind}{self.microbatch}"


def _forward(stage: int, num_stages: int, m: int) -> list[Op]:
    ops = []
    if stage > 0:
        ops.append(Op(RECV_ACT, m))
    ops.append(Op(FORWARD, m))
    if stage < num_stages - 1:
        ops.append(Op(SEND_ACT, m))
    return ops


def _backward(stage: int, num_stages: int, m: int) -> list[Op]:
    ops = []
    if stage < num_stages - 1:
        ops.append(Op(RECV_GRAD, m))
    ops.append(Op(BACKWARD, m))
    if stage > 0:
        ops.append(Op(SEND_GRAD, m))
    return ops


def _check(num_stages: int, stage: int, num_microbatches: int) -> None:
    if num_stages < 1 or not 0 <= stage < num_stages:
        raise ValueError(f"stage: must be in [0, {num_stages}), got {stage}")
    if num_microbatches < 1:
        raise ValueError(f"num_microbatches: must be >= 1, got {num_microbatches}")


def gpipe(num_stages: int, stage: int, num_microbatches: int) -> list[Op]:
    """All forwards, then all backwards (in the same microbatch order)."""
    _check(num_stages, stage, num_microbatches)
    ops: list[Op] = []
    for m in range(num_microbatches):
        ops += _forward(stage, num_stages, m)
    for m in range(num_microbatches):
        ops += _backward(stage, num_stages, m)
    return ops


def one_f_one_b(num_stages: int, stage: int, num_microbatches: int) -> list[Op]:
    """1F1B: ``S - s - 1`` warm-up forwards, then alternate one forward and one backward, then
    drain the remaining backwards. At most ``S - s`` microbatches are in flight at stage ``s``."""
    _check(num_stages, stage, num_microbatches)
    warmup = min(num_stages - stage - 1, num_microbatches)
    ops: list[Op] = []
    for m in range(warmup):
        ops += _forward(stage, num_stages, m)
    backward_next = 0
    for m in range(warmup, num_microbatches):
        ops += _forward(stage, num_stages, m)
        ops += _backward(stage, num_stages, backward_next)
        backward_next += 1
    for m in range(backward_next, num_microbatches):
        ops += _backward(stage, num_stages, m)
    return ops


SCHEDULES: dict[str, Callable[[int, int, int], list[Op]]] = {"1f1b": one_f_one_b, "gpipe": gpipe}


def make_schedule(name: str, num_stages: int, stage: int, num_microbatches: int) -> list[Op]:
    try:
        fn = SCHEDULES[name]
    except KeyError:
        raise ValueError(f"schedule: must be one of {', '.join(SCHEDULES)}, got {name!r}") from None
    return fn(num_stages, stage, num_microbatches)
