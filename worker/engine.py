"""The training engine of one worker process: one rank of a hybrid pipeline/data-parallel plan.

Lifecycle (the caller owns it)::

    engine = TrainingEngine(spec, plan, rank, DistInit(store=...))
    try:
        while engine.position.step < spec.steps:
            result = engine.train_step()
    finally:
        engine.close()

The engine holds one rank's state across generations (layers, optimizer, data position) and ties
the parts together: :mod:`~oobleck.worker.rendezvous` joins the generation's process group,
:mod:`~oobleck.worker.step` runs a step and its commit vote, :mod:`~oobleck.worker.exchange`
decides what a new generation starts from and which layers are copied (a pure function of what
every rank carries) and :mod:`~oobleck.worker.transfers` copies them,
:mod:`~oobleck.worker.layerstate` moves a layer's state to and from CPU tensors, and
:mod:`~oobleck.worker.checkpoint` saves and loads.

A failed transfer, gradient sync or vote (a peer is gone) raises :class:`CommFailed` (a
:class:`~oobleck.worker.failures.PeerGone`); the caller then calls :meth:`abandon` so that peers
blocked on this rank fail too. :meth:`reconfigure` exports this process's layer states to host
memory, leaves the old process group, joins the new one and rebuilds layers, gradient groups and
schedule for the new plan, then runs the exchange. A process new to the job simply constructs
an engine for the new generation: the constructor runs the same exchange.
"""

from __future__ import annotations

import datetime
import gc
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from oobleck.common.modelconfig import validate_model_config
from oobleck.worker import checkpoint as ckpt
from oobleck.worker import layerstate, optim
from oobleck.worker.data import DataPosition, GlobalOrder, make_dataset
from oobleck.worker.drills import FaultPoint, Faults
from oobleck.worker.exchange import LayersLost, RankFacts, plan_exchange
from oobleck.worker.executor import StageExecutor
from oobleck.worker.failures import communicating
from oobleck.worker.gradsync import GradSync, local_params, placement
from oobleck.worker.layout import PlanSpec, RankAssignment, assign_ranks, layer_holders
from oobleck.worker.models import ModelDef, param_dtype
from oobleck.worker.rendezvous import DistInit, abort_group, destroy_group, join_group
from oobleck.worker.step import CommFailed, StepFailed, StepResult, StepRunner
from oobleck.worker.transfers import run_copies

__all__ = ["CommFailed", "DistInit", "LayersLost", "StepFailed", "StepResult", "TrainingEngine"]

log = logging.getLogger(__name__)


class TrainingEngine:
    """One rank of training under a plan. See the module docstring."""

    def __init__(
        self,
        spec,
        plan: PlanSpec,
        rank: int,
        init: DistInit,
        device: str | torch.device = "cpu",
        position: DataPosition | None = None,
        interrupt: Callable[[], str | None] | None = None,
        restore: bool = False,
    ) -> None:
        #: Asked while waiting for the other ranks of a generation to arrive: a reason (a newer
        #: command is waiting: this generation is superseded) ends the wait at once.
        self.interrupt = interrupt
        self.spec = spec
        self.model_config = validate_model_config(spec)
        self.model = ModelDef(self.model_config, spec.seed)
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # NCCL collectives and object gathers use it
        self.dataset = make_dataset(spec.data, self.model_config.vocab_size, self.model_config.objective)
        self.order = GlobalOrder(self.dataset.num_samples, spec.global_batch_size, spec.microbatch_size, spec.data.seed)
        self.position = position or DataPosition()
        #: Test hook ``fn(step, phase)`` called at fixed points of a step (see :mod:`step`);
        #: raising there injects a deterministic fault.
        self.faults: Faults | None = None  # fault injection (tests, drills), see worker.drills
        # bf16 autocast (parameters, optimizer state and transfers stay fp32); meant for GPUs, also
        # honoured on CPU so the code path is tested there.
        self.autocast_dtype = torch.bfloat16 if spec.precision == "bf16" else None
        self.param_dtype = param_dtype(spec.precision)
        self._owns_group = False
        self._store: Any = None  # the process group's store object, kept alive as long as the group
        self._checkpoints = ckpt.BackgroundWriter()
        self.optimizer: torch.optim.Optimizer | None = None
        self._carried: dict[int, dict[str, torch.Tensor]] | None = None  # see reconfigure()
        self._voted: dict | None = None  # a step whose vote failed here, gradients kept (see step.py)
        self._carried_voted: dict | None = None  # ... as carried into a reconfiguration
        self._last_commit: dict | None = None  # the last committed step and its global squared grad norm
        #: No rank carried any training state into this generation (every process is new): the
        #: layers are the deterministic initial ones, and the caller restores from the job's
        #: checkpoint when one exists (never train from scratch past a checkpoint).
        self.fresh = True
        #: The last exchange: ``exchange_s``, and ``copies`` (in all) and ``received`` (by this
        #: rank) when layers were exchanged; empty while one runs or after one failed.
        self.last_exchange: dict[str, float] = {}
        self._setup(plan, rank, init)
        try:
            self._exchange({})
        except LayersLost as exc:
            if not restore:
                raise
            # The caller restores every layer from a checkpoint (``restore``): keep the process
            # group, the initial layers are overwritten by the restore.
            log.warning("rank %d: %s", rank, exc)

    # -- set-up ---------------------------------------------------------------------------------

    def _setup(self, plan: PlanSpec, rank: int, init: DistInit) -> None:
        """Join the generation's process group and build what ``rank`` holds under ``plan``."""
        spec = self.spec
        if plan.num_microbatches != spec.num_microbatches:
            raise ValueError(
                f"plan: pipelines have {plan.num_microbatches} microbatches, the job has {spec.num_microbatches}"
            )
        if not 0 <= rank < plan.world_size:
            raise ValueError(f"rank: must be in [0, {plan.world_size}), got {rank}")
        self.plan = plan
        self.rank = rank
        self._init = init
        self.assignments = assign_ranks(plan, self.model.num_layers)
        self.me: RankAssignment = self.assignments[rank]
        self.holders = layer_holders(self.assignments, self.model.num_layers)
        self.where = placement(self.holders, self.model.tied, self.model.num_layers)
        self.layers: dict[int, nn.Module] = self.model.build_layers(
            self.me.layer_indices, self.device, self.param_dtype
        )
        self.optimizer = optim.make_optimizer(spec.optimizer, self._params().values())
        if not dist.is_initialized():
            self._store = join_group(init, plan.world_size, plan.generation, rank, self.device, self.interrupt)
            self._owns_group = True
        elif dist.get_world_size() != plan.world_size:
            raise ValueError(f"plan: world size {plan.world_size}, the process group has {dist.get_world_size()}")
        self.sync = GradSync(self.where, rank, timeout=datetime.timedelta(seconds=init.timeout_s))
        cfg = self.model_config
        self.executor = StageExecutor(
            [self.layers[i] for i in self.me.layer_indices],
            self.me,
            spec.microbatch_size,
            (spec.data.seq_len, cfg.hidden_size),
            self.device,
            comm_dtype=self.param_dtype,
            autocast_dtype=self.autocast_dtype,
            use_tags=init.backend == "gloo",
        )
        self.steps = StepRunner(
            spec,
            self.me,
            self.executor,
            self.sync,
            self.optimizer,
            self.order,
            self.dataset,
            cfg.vocab_size,
            cfg.objective,
            self._comm_device(),
        )

    def _comm_device(self) -> torch.device:
        return self.device if self._init.backend == "nccl" else torch.device("cpu")

    def _params(self) -> dict:
        return local_params(self.layers, self.where)

    # -- one step -------------------------------------------------------------------------------

    def train_step(self) -> StepResult:
        """Run one step on the global batch at :attr:`position` (see :mod:`oobleck.worker.step`):
        raises :class:`StepFailed` if any rank failed, :class:`CommFailed` if a peer is gone."""
        self._voted = None
        try:
            done = self.steps.run(self.position, self._params(), self.faults)
        except CommFailed as exc:
            self._voted = exc.voted
            raise
        self.position = done.after
        self._last_commit = {"step": done.after.step, "sq_total": done.sq_total}
        return done.result

    # -- generations ----------------------------------------------------------------------------

    def _exchange(self, carried: Mapping[int, Mapping[str, torch.Tensor]]) -> dict[str, float]:
        """Collective: give every rank the state of the layers it holds under the current plan.

        ``carried``: layer states this process kept from the previous generation (empty for a new
        process). One all-gather of what every rank carries, the exchange plan (the same on every
        rank), then the roll-forward, the position and the copies it names. With no carried state
        anywhere (a fresh job), every rank keeps its deterministic initial layers.
        """
        t0 = time.perf_counter()
        self.last_exchange = {}
        mine = RankFacts(
            layers={i: layerstate.state_bytes(st) for i, st in carried.items()},
            position=self.position.to_dict() if carried else None,
            voted=self._carried_voted if carried else None,
            commit=self._last_commit if carried else None,
        )
        everyone: list[Any] = [None] * self.plan.world_size
        with communicating("gathering what every rank carries failed"):
            dist.all_gather_object(everyone, mine)
        plan = plan_exchange(everyone, [a.layer_indices for a in self.assignments], self.model.num_layers)
        self.fresh = plan.fresh
        if plan.fresh:
            self.last_exchange = {"exchange_s": time.perf_counter() - t0}
            return self.last_exchange
        roll = plan.rolled.get(self.rank)
        if roll is not None:
            carried = layerstate.roll_forward(carried, self.spec.optimizer, roll.sq_total, roll.step_index)
            log.warning(
                "rank %d: applied step %d, which peers committed as its vote failed here",
                self.rank,
                roll.step_index + 1,
            )
        carried = layerstate.without_grads(carried)
        if plan.split:
            log.warning(
                "ranks carry steps %s (a peer died while a step was being committed): continuing from step %d; "
                "layers carried at other steps are dropped and copied again",
                list(plan.steps),
                plan.position["step"],
            )
        if self.rank in plan.dropped:
            carried = {}
        self.position = DataPosition.from_dict(plan.position)
        received = run_copies(plan.copies, carried, self.rank, self._comm_device())
        states = {i: carried[i] for i in self.me.layer_indices if i in carried}
        states.update(received)
        self.import_layers(states)
        self.last_exchange = {
            "exchange_s": time.perf_counter() - t0,
            "copies": float(len(plan.copies)),
            "received": float(len(received)),
        }
        return self.last_exchange

    def reconfigure(self, plan: PlanSpec, rank: int, init: DistInit) -> dict[str, float]:
        """Move to a new generation: keep this process's layer states, leave the old process
        group, join the new one as ``rank``, build the layers held under ``plan`` and copy the
        missing ones (parameters + optimizer state) from ranks that have them. Training resumes
        at the recorded position with the new batch split. Returns each phase's duration.

        Raises :class:`LayersLost` if some layer has no surviving copy (restore from checkpoint).
        ``faults`` are called once the new process group is joined, before the copy (drills).
        """
        t0 = time.perf_counter()
        # A reconfiguration that failed half-way (a peer died during the rendezvous or the copy)
        # has already replaced the layers with fresh ones: the retry uses the state exported by
        # the first attempt, kept until one completes.
        if self._carried is None:
            self._carried = self.export_layers(with_grads=self._voted is not None)
            self._carried_voted, self._voted = self._voted, None
        carried = self._carried
        if self._checkpoints.leave_behind():
            log.warning("reconfigure: not waiting for the background checkpoint (it finishes or fails on its own)")
        t1 = time.perf_counter()
        self._teardown()
        self._setup(plan, rank, init)
        t2 = time.perf_counter()
        if self.faults is not None:
            self.faults.at(FaultPoint.BEFORE_COPY, plan.generation)
        try:
            phases = self._exchange(carried)
        except LayersLost:
            self._carried = None  # the caller restores every layer from a checkpoint
            self._carried_voted = None
            raise
        self._carried = None
        self._carried_voted = None
        return {"export_s": t1 - t0, "regroup_s": t2 - t1, **phases}

    def abandon(self) -> None:
        """Leave the process group after a step or reconfiguration failed on a communication
        error (a peer died), so that peers blocked on this rank fail at once instead of at their
        timeout. Layer state and position are kept; the next :meth:`reconfigure` joins the new
        generation. Safe to call twice."""
        if not self._owns_group or not dist.is_initialized():
            return
        abort_group(self._init.backend)
        self._release_groups()

    def _release_groups(self) -> None:
        """Destroy the process groups and drop this engine's references to them: gloo closes a
        group's connections (which is what makes blocked peers fail) only once no Python object
        refers to it any more. The caller must not hold a traceback of a failed collective."""
        destroy_group()
        self._store = None  # torch calls it no more (a SecretKeyStore: see its docstring)
        self.sync = None
        self.steps = None  # holds the gradient groups too
        gc.collect()

    def _teardown(self) -> None:
        if not self._owns_group and dist.is_initialized():
            raise RuntimeError("reconfigure: the process group was created outside the engine")
        self._release_groups()
        self._owns_group = False

    # -- layer state ----------------------------------------------------------------------------

    def export_layers(
        self, indices: Iterable[int] | None = None, *, with_grads: bool = False
    ) -> dict[int, dict[str, torch.Tensor]]:
        """Parameters (``param.<name>``) and optimizer state (``opt.<name>.<key>``) of held layers,
        as CPU tensor copies (and the gradients, ``grad.<name>``, when asked). Default: every
        held layer."""
        indices = self.me.layer_indices if indices is None else indices
        return layerstate.export_layers(
            self.layers, self.optimizer, indices, with_grads=with_grads, holder=f"rank {self.rank}"
        )

    def import_layers(self, layers: Mapping[int, Mapping[str, torch.Tensor]]) -> None:
        """Load parameters and optimizer state of layers this rank holds (from :meth:`export_layers`
        on any rank, or from a checkpoint)."""
        layerstate.import_layers(self.layers, self.optimizer, layers, holder=f"rank {self.rank}")

    # -- checkpoints ----------------------------------------------------------------------------

    def save_checkpoint(self, directory: str | Path, wait: bool = True) -> Path:
        """Collective entry (every rank calls it at the same step): copy the layers this rank is
        the lowest holder of to host memory, then write them (in a background thread unless
        ``wait``) into this attempt's staging directory; rank 0 publishes the checkpoint once
        every writer is done (see :mod:`oobleck.common.checkpoint`). With ``wait`` every rank
        returns after the checkpoint is published. Returns the checkpoint's directory."""
        self.wait_checkpoint()
        held = [i for i in self.me.layer_indices if self.holders[i][0] == self.rank]
        extra = {
            "job_id": self.plan.job_id,
            "generation": self.plan.generation,
            "position": self.position.to_dict(),
            "model": self.model_config.key(),
            "seed": self.spec.seed,
            "num_layers": self.model.num_layers,
            "rng_state": ckpt.rng_text(),
        }
        # One staging directory per attempt: the job and generation are the same on every rank
        # of this attempt, and differ for any other attempt at the same step.
        return ckpt.save(
            Path(directory),
            step=self.position.step,
            attempt=f"{self.plan.job_id or 'job'}-g{self.plan.generation}",
            layers=self.export_layers(held),
            rank=self.rank,
            writers={h[0] for h in self.holders.values()},
            manifest_extra=extra,
            timeout_s=self._init.timeout_s,
            background=None if wait else self._checkpoints,
        )

    def wait_checkpoint(self) -> None:
        """Wait for a background checkpoint of this rank (rank 0: until its manifest is written);
        re-raises its error."""
        self._checkpoints.wait()

    def load_checkpoint(self, path: str | Path) -> DataPosition:
        """Load held layers and the data position from a checkpoint directory (a ``step-*`` one,
        or the parent: its latest). Works under any plan. Raises :class:`ckpt.CheckpointCorrupt`
        when a file this rank needs does not match the manifest (nothing is changed then), and
        :class:`ckpt.CheckpointError` when the checkpoint is of another model."""
        manifest, root = ckpt.read_manifest(Path(path))
        if manifest.get("num_layers") != self.model.num_layers or manifest.get("model") != self.model_config.key():
            raise ckpt.CheckpointError(f"checkpoint {root}: model differs from the job's model")
        self.import_layers(ckpt.load_layers(root, manifest, self.me.layer_indices))
        ckpt.restore_rng(manifest["rng_state"])
        self.position = DataPosition.from_dict(manifest["position"])
        return self.position

    # -- teardown -------------------------------------------------------------------------------

    def close(self) -> None:
        """Finish a background checkpoint, destroy the process group if this engine created it.
        Safe to call twice."""
        try:
            self.wait_checkpoint()
        finally:
            self._close_group()

    def _close_group(self) -> None:
        if self._owns_group and dist.is_initialized():
            self._release_groups()
        self._owns_group = False
