"""oobleck.worker: the training engine of one worker process (hybrid pipeline + data parallel).

Importing this package is cheap (no torch); the names below load their module on first use.

Public API
----------
``TrainingEngine(spec, plan, rank, init, device="cpu", position=None)``
    One rank of training. ``spec``: :class:`oobleck.common.jobspec.JobSpec`; ``plan``:
    :class:`PlanSpec`; ``init``: :class:`DistInit`. Joins the process group (unless one is
    already initialised), builds only the layers this rank holds, its optimizer, gradient
    groups and schedule.

    - ``train_step() -> StepResult(step, loss, samples, grad_norm)``: one step on the global
      batch at ``engine.position``; every rank gets the same loss (mean over the global batch).
      A failure on any rank raises :class:`StepFailed` on every rank that reaches the commit
      all-reduce, and no rank applies the update.
    - ``export_layers(indices=None) -> {layer: {"param.<name>": t, "opt.<name>.<key>": t}}`` and
      ``import_layers(states)``: a layer's parameters and optimizer state as CPU tensors.
    - ``save_checkpoint(dir, wait=True) -> Path`` (every rank calls it at the same step; with
      ``wait=False`` only the copy to host memory stalls training, files are written by a
      background thread; ``wait_checkpoint()`` joins it) and ``load_checkpoint(path) ->
      DataPosition``: per-layer files + manifest, loadable under any plan.
    - ``reconfigure(plan, rank, init) -> {phase: seconds}``: move to a new generation (new
      process group, new rank, new layers); layers this process lacks are copied (parameters +
      optimizer state) from processes that carry them; a process joining late just constructs a
      ``TrainingEngine`` with the new generation's plan and receives its layers the same way.
      Raises :class:`LayersLost` when some layer has no surviving copy (restore from checkpoint).
    - ``position``: :class:`DataPosition` ``(epoch, step, samples)``; ``close()`` (safe twice).

``DistInit(backend="gloo"|"nccl", store=... | host=..., port=... | file=..., timeout_s=300,
nccl_options=None, secret="")``: how to join the generation's process group (the agent hosts a
TCPStore; ``secret``, the plan's rendezvous secret, hides and tags the generation's keys).

``PlanSpec(pipelines=(PipelineSpec(nodes, microbatches), ...), templates={n: Template},
ranks={node_id: (rank, ...)}, gpus_per_node=1, generation=0)``; ``simple_plan(stage_layer_counts,
microbatches)`` builds one with one node per stage; ``assign_ranks(plan, num_layers)`` is the
pure plan -> per-rank layers function (:class:`RankAssignment`).

``plan_from_proto(plan_msg) -> PlanSpec`` and ``dist_init_from_proto(plan_msg, backend) ->
DistInit``: the ``oobleck.v1.Plan`` message a worker receives, converted at the edge.

``PeerGone``: the one exception that means "a peer is gone" (leave the generation, wait for
the next); anything else a worker raises is a bug and ends it.

``cached_profile(spec, cache_dir, device="cpu")`` / ``profile_model(spec, device)``: the
``oobleck-profile/1`` JSON the planner reads.

``run_ranks(world_size, target, args)`` with ``train_ranks`` / ``reconfigure_ranks``: run a plan's
ranks (or several generations) as local processes.

Model settings (``model.config`` validation, no torch) are :mod:`oobleck.common.modelconfig`;
the names shared with the agent are :mod:`oobleck.common.worker_link`.

Modules (docs/worker.md describes how they fit together):

- the process and its loop: ``main`` (entry point, failure reports), ``run`` (the loop across
  generations), ``commands`` (the agent's commands as dataclasses), ``agent_link`` (the channel
  to the agent), ``planmsg`` (Plan message -> dataclasses), ``settings`` (``OOBLECK_*``),
  ``drills`` (the hold file), ``restore`` (restoring from the newest common checkpoint);
- the engine: ``engine`` (one rank across generations), ``rendezvous`` and ``store`` (joining a
  generation's process group), ``step`` (a step and its commit vote), ``exchange`` (the pure
  exchange plan: position, roll-forward, copies), ``transfers`` (the copies), ``layerstate``
  (a layer's state as CPU tensors), ``checkpoint`` (saving, loading), ``failures`` (peer gone
  or bug);
- training pieces: ``models`` (layers), ``layout`` (plan -> ranks), ``data`` (datasets, global
  order), ``schedule`` (1F1B, GPipe op lists), ``executor`` (follows an op list), ``gradsync``
  (holder-set groups, all-reduce, norms), ``optim``;
- tools: ``profiler``, ``reference`` (single-process loop), ``local`` (multi-process runner).

Simplifications (documented where they are made): a stage on ``g > 1`` GPUs runs data parallel
inside the stage (each GPU a contiguous share of every microbatch; parameters replicated, not
sharded); the backward is not split into input- and weight-gradient parts; a failure inside the
pipeline phase of a step may leave peers waiting on a receive until the process-group timeout
(``DistInit.timeout_s``).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TrainingEngine": "oobleck.worker.engine",
    "StepResult": "oobleck.worker.step",
    "StepFailed": "oobleck.worker.step",
    "CommFailed": "oobleck.worker.step",
    "PeerGone": "oobleck.worker.failures",
    "LayersLost": "oobleck.worker.exchange",
    "DistInit": "oobleck.worker.rendezvous",
    "PlanSpec": "oobleck.worker.layout",
    "PipelineSpec": "oobleck.worker.layout",
    "RankAssignment": "oobleck.worker.layout",
    "assign_ranks": "oobleck.worker.layout",
    "simple_plan": "oobleck.worker.layout",
    "plan_from_proto": "oobleck.worker.planmsg",
    "dist_init_from_proto": "oobleck.worker.planmsg",
    "DataPosition": "oobleck.worker.data",
    "ModelConfig": "oobleck.common.modelconfig",
    "validate_model_config": "oobleck.common.modelconfig",
    "cached_profile": "oobleck.worker.profiler",
    "profile_model": "oobleck.worker.profiler",
    "run_ranks": "oobleck.worker.local",
    "train_ranks": "oobleck.worker.local",
    "reconfigure_ranks": "oobleck.worker.local",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'oobleck.worker' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
