"""Restoring a generation from the job's checkpoints: the newest one every rank can load.

A checkpoint being published right now may be visible to some ranks only, and a file may be
corrupt, so the ranks agree: each lists the job's complete checkpoints, they try the newest one
all of them see, and each says whether its layers loaded. A checkpoint some rank could not load
is reported (and set aside by rank 0 when corrupt), and the next older one is tried.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch.distributed as dist

from oobleck.worker import checkpoint as ckpt
from oobleck.worker.failures import WorkerError, communicating

log = logging.getLogger(__name__)


def restorable_steps(directory: str | None, job_id: str) -> list[int]:
    """Steps of the complete checkpoints in ``directory`` that belong to job ``job_id`` (a
    checkpoint or a plan without a job id matches any), newest first."""
    if not directory:
        return []
    steps = []
    for step in ckpt.complete_steps(directory):
        try:
            owner = ckpt.read_manifest(ckpt.step_dir(directory, step))[0].get("job_id") or ""
        except ckpt.CheckpointError:
            owner = ""  # unreadable: found corrupt (and set aside) when it is tried
        if not (owner and job_id and owner != job_id):
            steps.append(step)
    return steps


def _gather(value: Any) -> list[Any]:
    everyone: list[Any] = [None] * dist.get_world_size()
    with communicating("the checkpoint restore failed"):
        dist.all_gather_object(everyone, value)
    return everyone


def restore_newest(engine, directory: str | None, *, generation: int, required: bool, who: str) -> None:
    """Collective: load the newest checkpoint of the engine's job in ``directory`` that every rank
    sees complete and whose files all match its manifest. With no checkpoint at all, a job at
    step 0 starts fresh (logged when ``required``: the plan asked for a restore); otherwise, and
    when every checkpoint failed, raises :class:`WorkerError`."""
    seen = _gather(restorable_steps(directory, engine.plan.job_id))
    common = sorted(set.intersection(*(set(s) for s in seen)), reverse=True)
    tried = []
    for step in common:
        root = ckpt.step_dir(Path(directory), step)
        try:
            engine.load_checkpoint(root)
            problem = None
        except ckpt.CheckpointError as exc:
            problem = (isinstance(exc, ckpt.CheckpointCorrupt), str(exc))
        bad = [p for p in _gather(problem) if p is not None]
        if not bad:
            log.info("%s: restored the checkpoint of step %d from %s", who, step, directory)
            return
        tried.append(f"{root.name}: {bad[0][1]}")
        log.error("%s: checkpoint %s cannot be restored (%s): trying an older one", who, root, bad[0][1])
        if engine.rank == 0 and any(corrupt for corrupt, _ in bad):
            ckpt.quarantine(directory, root)
    if tried:
        raise WorkerError(f"generation {generation}: no checkpoint could be restored: {'; '.join(tried)}")
    where = directory or "the job spec names no checkpoint directory"
    if engine.position.step != 0:
        raise WorkerError(f"generation {generation}: the plan restores from a checkpoint, but there is none ({where})")
    if required:
        log.warning("%s: no checkpoint to restore from (%s): starting from step 0", who, where)
