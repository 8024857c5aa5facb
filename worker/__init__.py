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

``validate_model_config(spec) -> ModelConfig``: checks ``model.config`` (and its fit with
``data``) at submit time; errors are ``ConfigError`` naming ``model.config.<key>``.

``cached_profile(spec, cache_dir, device="cpu")`` / ``profile_model(spec, device)``: the
``oobleck-profile/1`` JSON the planner reads.

``run_ranks(world_size, target, args)`` with ``train_ranks`` / ``reconfigure_ranks``: run a plan's
ranks (or several generations) as local processes.

Modules: ``config`` (model.config keys, no torch), ``models`` (layers), ``layout`` (plan ->
ranks), ``data`` (datasets, global order), ``schedule`` (1F1B, GPipe op lists), ``executor``
(follows an op list), ``gradsync`` (holder-set groups, all-reduce, norms), ``optim``,
``checkpoint``, ``profiler``, ``reference`` (single-process loop), ``local`` (multi-process
runner), ``planmsg`` (proto -> plan), ``engine``.

Simplifications (documented where they are made): a stage on ``g > 1`` GPUs runs data parallel
inside the stage (each GPU a contiguous share of every microbatch; parameters replicated, not
sharded); the backward is not split into input- and weight-gradient parts; a failure inside the
pipeline phase of a step may leave peers waiting on a receive until the process-group timeout
(``DistInit.timeout_s``); the engine derives the layer copies of a reconfiguration itself from
which process carries which layer (the planner's greedy rule, per rank) rather than taking the
master's node-level copy plan.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TrainingEngine": "engine",
    "StepResult": "engine",
    "StepFailed": "engine",
    "LayersLost": "engine",
    "DistInit": "engine",
    "PlanSpec": "layout",
    "PipelineSpec": "layout",
    "RankAssignment": "layout",
    "assign_ranks": "layout",
    "simple_plan": "layout",
    "plan_from_proto": "planmsg",
    "dist_init_from_proto": "planmsg",
    "DataPosition": "data",
    "ModelConfig": "config",
    "validate_model_config": "config",
    "cached_profile": "profiler",
    "profile_model": "profiler",
    "run_ranks": "local",
    "train_ranks": "local",
    "reconfigure_ranks": "local",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'oobleck.worker' has no attribute {name!r}")
    return getattr(importlib.import_module(f"oobleck.worker.{module}"), name)
