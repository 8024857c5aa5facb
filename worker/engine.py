"""The training engine of one worker process: one rank of a hybrid pipeline/data-parallel plan.

Lifecycle (the caller owns it)::

    engine = TrainingEngine(spec, plan, rank, DistInit(store=...))
    try:
        while engine.position.step < spec.steps:
            result = engine.train_step()
    finally:
        engine.close()

A step: the global batch is cut into microbatches; this rank runs its stage's operation list
for its pipeline's microbatches, gradients are all-reduced among each layer's holders, the
global gradient norm is agreed on by every rank (one world all-reduce that also carries the
loss and an error flag), then every rank applies the optimizer step, or none does: a failure on
any rank is reported by all ranks as :class:`StepFailed` and the step is not committed. A failed
transfer between stages or a failed gradient sync (a peer is gone) raises :class:`CommFailed` at
once instead of voting; the caller then calls :meth:`TrainingEngine.abandon` so that peers
blocked on this rank fail too.

Generations: :meth:`TrainingEngine.reconfigure` exports this process's layer states to host
memory, leaves the old process group, joins the new one and rebuilds layers, gradient groups
and schedule for the new plan; one all-gather tells every rank who carries which layer, then
missing layers are sent point to point in one global order. A process new to the job simply
constructs an engine for the new generation: the constructor runs the same exchange.
"""

from __future__ import annotations

import base64
import datetime
import functools
import gc
import hashlib
import hmac
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from oobleck.worker import checkpoint as ckpt
from oobleck.worker import optim
from oobleck.worker.config import validate_model_config
from oobleck.worker.data import DataPosition, GlobalOrder, make_dataset, make_example
from oobleck.worker.executor import StageExecutor, StepIO, TransferFailed
from oobleck.worker.gradsync import GradSync, local_params, placement
from oobleck.worker.layout import PlanSpec, RankAssignment, assign_ranks, lane_range, layer_holders
from oobleck.worker.models import ModelDef, param_dtype
from oobleck.worker.schedule import make_schedule

log = logging.getLogger(__name__)


def choose_position(everyone: list[dict], num_layers: int) -> dict | None:
    """The training position a new generation resumes from, given what every rank carries
    (``{"layers": {layer: bytes}, "position": dict | None}``; ``None``: nothing carried).

    Normally every carrier is at the same position. A peer dying while the commit vote of a step
    completes can leave some ranks past that step and others not (the vote is one all-reduce);
    then the newest position at which every layer is still carried by some rank wins (the step is
    kept when a whole pipeline committed it, rolled back otherwise), and layers carried at other
    positions are discarded. None when no position has every layer.
    """
    by_key: dict[str, tuple[dict, set[int]]] = {}
    for e in everyone:
        if e["position"]:
            key = json.dumps(e["position"], sort_keys=True)
            by_key.setdefault(key, (e["position"], set()))[1].update(int(i) for i in e["layers"])
    ordered = sorted(by_key.values(), key=lambda pl: (pl[0]["step"], pl[0].get("samples", 0)), reverse=True)
    if len(ordered) == 1:
        return ordered[0][0]
    for position, layers in ordered:
        if layers >= set(range(num_layers)):
            return position
    return None


ARRIVED_KEY = "oobleck/arrived"
ARRIVE_POLL_S = 0.05
STORE_CONNECT_ATTEMPT_S = 1.0


class RendezvousAbandoned(RuntimeError):
    """A generation's rendezvous was given up: a newer command is waiting (it is superseded)."""


class StepFailed(RuntimeError):
    """A step failed on some rank; no rank applied its update."""


class CommFailed(RuntimeError):
    """A collective of the step failed (a peer is gone or timed out); no update was applied here.
    The process group is unusable: :meth:`TrainingEngine.abandon` it and reconfigure."""


class LayersLost(RuntimeError):
    """No process carries some layer any more: restore from a checkpoint."""

    def __init__(self, layers: list[int]) -> None:
        super().__init__(f"no surviving copy of layers {layers}: restore from checkpoint")
        self.layers = layers


def _send_state(state: Mapping[str, torch.Tensor], dst: int, device: torch.device) -> None:
    meta = [(k, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for k, t in state.items()]
    dist.send_object_list([meta], dst=dst, device=device)
    for t in state.values():
        dist.send(t.to(device).contiguous(), dst=dst)


def _recv_state(src: int, device: torch.device) -> dict[str, torch.Tensor]:
    box: list[Any] = [None]
    dist.recv_object_list(box, src=src, device=device)
    out = {}
    for key, shape, dtype in box[0]:
        buf = torch.empty(shape, dtype=getattr(torch, dtype), device=device)
        dist.recv(buf, src=src)
        out[key] = buf.cpu()
    return out


@dataclass(frozen=True)
class StepResult:
    step: int  # steps completed after this one
    loss: float  # mean loss over the global batch
    samples: int  # samples consumed by this step (the global batch)
    grad_norm: float


@dataclass(frozen=True)
class DistInit:
    """How to join the process group: a ready ``store``, a TCPStore ``host``/``port`` (client; the
    agent hosts it), or a FileStore ``file``. ``backend``: gloo (CPU) or nccl (GPU). ``secret``:
    the generation's rendezvous secret (see :class:`SecretKeyStore`; empty: plain keys)."""

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


class RendezvousTampered(RuntimeError):
    """A value in the rendezvous store does not carry the generation's tag: a client without the
    secret wrote or altered it. The rendezvous fails instead of using it."""


def _as_bytes(value: bytes | str) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)


class SecretKeyStore(dist.Store):
    """A generation's view of the agent's TCPStore under the plan's rendezvous secret.

    The store has no authentication and any client may list its keys, so a secret key prefix
    would show itself. Instead every key is stored as ``oobleck/gen<G>/<HMAC-SHA256(secret,
    key)>``: a listing shows digests from which no key of the generation can be derived, and keys
    cannot be written before the ranks write them. Every value carries an HMAC-SHA256 tag over
    its key and itself, checked when read: a value written or altered by a client without the
    secret raises :class:`RendezvousTampered` (the rendezvous fails, nothing connects to an
    address it planted). Values are not encrypted, and counters (``add``) cannot carry a tag:
    a client that reaches the port can still read values and delay or fail a rendezvous.

    torch calls this object from C++ (a pybind11 trampoline, which finds the Python methods only
    while the Python object lives): its owner keeps it as long as the process group, and clones
    are kept here. The trampoline looks up ``deleteKey`` and ``getNumKeys`` by their C++ names.
    """

    def __init__(self, store: Any, secret: str, generation: int) -> None:
        super().__init__()
        if not secret:
            raise ValueError("secret: required")
        self._store = store
        self._secret = secret.encode()
        self._generation = generation
        self._prefix = f"oobleck/gen{generation}/"
        self._clones: list[SecretKeyStore] = []

    def __repr__(self) -> str:
        return f"SecretKeyStore(generation={self._generation})"

    def _key(self, key: str) -> str:
        digest = hmac.new(self._secret, f"key:{self._prefix}{key}".encode(), hashlib.sha256).hexdigest()
        return self._prefix + digest

    def _tag(self, key: str, value: bytes) -> bytes:
        name = key.encode()
        message = b"value:" + len(name).to_bytes(4, "big") + name + value
        return hmac.new(self._secret, message, hashlib.sha256).digest()

    def _seal(self, key: str, value: bytes | str) -> bytes:
        value = _as_bytes(value)
        return value + self._tag(key, value)

    def _open(self, key: str, sealed: bytes) -> bytes:
        sealed = _as_bytes(sealed)
        size = hashlib.sha256().digest_size
        value, tag = sealed[:-size], sealed[-size:]
        if len(sealed) < size or not hmac.compare_digest(tag, self._tag(key, value)):
            raise RendezvousTampered(
                f"rendezvous store: a value of generation {self._generation} fails its integrity check "
                "(written by a client without the generation's secret)"
            )
        return value

    def set(self, key: str, value: bytes | str) -> None:
        self._store.set(self._key(key), self._seal(key, value))

    def get(self, key: str) -> bytes:
        return self._open(key, self._store.get(self._key(key)))

    def compare_set(self, key: str, expected: bytes | str, desired: bytes | str) -> bytes:
        # An empty ``expected`` means "only if absent" and stays empty; every stored value is sealed.
        expected = _as_bytes(expected)
        sealed = self._seal(key, expected) if expected else b""
        current = self._store.compare_set(self._key(key), sealed, self._seal(key, desired))
        return self._open(key, current) if current else b""

    def add(self, key: str, amount: int) -> int:
        return self._store.add(self._key(key), amount)

    def check(self, keys: list[str]) -> bool:
        return self._store.check([self._key(k) for k in keys])

    def wait(self, keys: list[str], timeout: datetime.timedelta | None = None) -> None:
        hashed = [self._key(k) for k in keys]
        if timeout is None:
            self._store.wait(hashed)
        else:
            self._store.wait(hashed, timeout)

    def deleteKey(self, key: str) -> bool:  # the C++ name the trampoline looks up
        return self._store.delete_key(self._key(key))

    def getNumKeys(self) -> int:  # the C++ name the trampoline looks up
        return self._store.num_keys()

    def clone(self) -> SecretKeyStore:
        copy = SecretKeyStore(self._store.clone(), self._secret.decode(), self._generation)
        self._clones.append(copy)
        return copy


def _make_store(init: DistInit, world_size: int, generation: int, interrupt: Callable[[], str | None] | None = None):
    """The generation's store: under the plan's secret (:class:`SecretKeyStore`), or without one
    (a test, a FileStore) keys prefixed by the generation so one store can serve several.

    With ``interrupt``, connecting to a TCPStore is retried in short attempts, asking
    ``interrupt()`` in between: the agent hosting it may have died with its node, and the master
    then supersedes the generation (without this, the connection attempt lasts the whole timeout).
    """
    if init.store is not None:
        store = init.store
    elif init.file is not None:
        store = dist.FileStore(init.file, world_size)
    else:
        timeout = datetime.timedelta(seconds=init.timeout_s)
        if interrupt is None:
            store = dist.TCPStore(init.host, init.port, world_size, is_master=False, timeout=timeout)
        else:
            store = _connect_store(init, world_size, interrupt)
            store.set_timeout(timeout)
    if init.secret:
        return SecretKeyStore(store, init.secret, generation)
    return dist.PrefixStore(f"oobleck/gen{generation}/", store)


def _connect_store(init: DistInit, world_size: int, interrupt: Callable[[], str | None]):
    deadline = time.monotonic() + init.timeout_s
    attempt = datetime.timedelta(seconds=STORE_CONNECT_ATTEMPT_S)
    while True:
        try:
            return dist.TCPStore(init.host, init.port, world_size, is_master=False, timeout=attempt)
        except (RuntimeError, TimeoutError) as exc:  # DistStoreError and its kinds are RuntimeErrors
            why = interrupt()
            if why:
                raise RendezvousAbandoned(f"store {init.host}:{init.port} unreachable ({exc}): {why}") from None
            if time.monotonic() >= deadline:
                raise


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
        #: Test hook ``fn(step, phase)`` called at fixed points of a step (phase
        #: ``"backward_done"``); raising there injects a deterministic fault.
        self.fault_hook = None
        # bf16 autocast (parameters, optimizer state and transfers stay fp32); meant for GPUs, also
        # honoured on CPU so the code path is tested there.
        self.autocast_dtype = torch.bfloat16 if spec.precision == "bf16" else None
        self.param_dtype = param_dtype(spec.precision)
        self._owns_group = False
        self._store: Any = None  # the process group's store object, kept alive as long as the group
        self._ckpt_thread: threading.Thread | None = None
        self._ckpt_error: BaseException | None = None
        self._ckpt_orphans: set[threading.Thread] = set()  # background checkpoints reconfigure() left
        self.optimizer: torch.optim.Optimizer | None = None
        self._carried: dict[int, dict[str, torch.Tensor]] | None = None  # see reconfigure()
        self._voted: dict | None = None  # a step whose vote failed here, gradients kept (see train_step)
        self._carried_voted: dict | None = None  # ... as carried into a reconfiguration
        self._last_commit: dict | None = None  # the last committed step and its global squared grad norm
        self.fresh = True  # see _exchange
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
            store = self._store = _make_store(init, plan.world_size, plan.generation, self.interrupt)
            if self.interrupt is not None:
                self._arrive(store, plan.world_size, init.timeout_s)
            kwargs: dict[str, Any] = {}
            if init.backend == "nccl" and init.nccl_options:
                opts = dist.ProcessGroupNCCL.Options()
                for key, value in init.nccl_options.items():
                    setattr(opts, key, value)
                kwargs["pg_options"] = opts
            if init.backend == "nccl" and self.device.type == "cuda":
                kwargs["device_id"] = self.device
            dist.init_process_group(
                init.backend,
                store=store,
                rank=rank,
                world_size=plan.world_size,
                timeout=datetime.timedelta(seconds=init.timeout_s),
                **kwargs,
            )
            self._owns_group = True
        elif dist.get_world_size() != plan.world_size:
            raise ValueError(f"plan: world size {plan.world_size}, the process group has {dist.get_world_size()}")
        self.sync = GradSync(self.where, rank, timeout=datetime.timedelta(seconds=init.timeout_s))
        self._build_executor()

    def _arrive(self, store, world_size: int, timeout_s: float) -> None:
        """Wait until every rank of the generation has arrived at its store, polling: a rank
        that died before arriving would otherwise keep the others in ``init_process_group``
        until the timeout, although the master has already superseded the generation (its next
        command is then waiting, and :attr:`interrupt` says so)."""
        store.add(ARRIVED_KEY, 1)
        deadline = time.monotonic() + timeout_s
        while True:
            arrived = store.add(ARRIVED_KEY, 0)
            if arrived >= world_size:
                return
            why = self.interrupt()
            if why:
                raise RendezvousAbandoned(f"{arrived} of {world_size} ranks arrived: {why}")
            if time.monotonic() >= deadline:
                raise RuntimeError(f"rendezvous: {arrived} of {world_size} ranks arrived within {timeout_s:g}s")
            time.sleep(ARRIVE_POLL_S)

    def _exchange(self, carried: Mapping[int, Mapping[str, torch.Tensor]]) -> dict[str, float]:
        """Collective: give every rank the state of the layers it holds under the current plan.

        ``carried``: layer states this process kept from the previous generation (empty for a new
        process). Layers are copied from a carrying rank (the one that has sent the fewest bytes
        so far, ties: lowest rank), in one global order so transfers cannot deadlock. With no
        carried state anywhere (a fresh job), every rank keeps its deterministic initial layers.
        """
        t0 = time.perf_counter()
        info = {
            "layers": {
                i: sum(t.numel() * t.element_size() for k, t in st.items() if not k.startswith("grad."))
                for i, st in carried.items()
            },
            "position": self.position.to_dict() if carried else None,
            "voted": self._carried_voted if carried else None,
            "commit": self._last_commit if carried else None,
        }
        everyone: list[dict | None] = [None] * self.plan.world_size
        dist.all_gather_object(everyone, info)
        #: No rank carried any training state into this generation (every process is new): the
        #: layers are the deterministic initial ones, and the caller restores from the job's
        #: checkpoint when one exists (never train from scratch past a checkpoint).
        self.fresh = not any(e["position"] for e in everyone)
        if self.fresh:
            return {"exchange_s": time.perf_counter() - t0}
        # A step some ranks committed while others lost the end of its vote: those with their
        # gradients kept apply it now (every rank decides the same for every rank).
        committed = {e["commit"]["step"]: e["commit"]["sq_total"] for e in everyone if e["commit"]}
        for r, e in enumerate(everyone):
            v = e["voted"]
            if v and v["step"] in committed and e["position"]["step"] == v["step"] - 1:
                if r == self.rank:
                    carried = self._roll_forward(carried, committed[v["step"]], e["position"]["step"])
                    log.warning("rank %d: applied step %d, which peers committed as its vote failed here", r, v["step"])
                e["position"] = v["after"]
        carried = {i: {k: t for k, t in st.items() if not k.startswith("grad.")} for i, st in carried.items()}
        chosen = choose_position(everyone, self.model.num_layers)
        if chosen is None:  # a split commit and no position with every layer: restore from a checkpoint
            newest = max((e for e in everyone if e["position"]), key=lambda e: e["position"]["step"])["position"]
            held = {int(i) for e in everyone if e["position"] == newest for i in e["layers"]}
            raise LayersLost(sorted(set(range(self.model.num_layers)) - held))
        if len({json.dumps(e["position"], sort_keys=True) for e in everyone if e["position"]}) > 1:
            log.warning(
                "ranks carry steps %s (a peer died while a step was being committed): continuing from step %d; "
                "layers carried at other steps are dropped and copied again",
                sorted({e["position"]["step"] for e in everyone if e["position"]}),
                chosen["step"],
            )
            for e in everyone:
                if e["position"] != chosen:
                    e["layers"] = {}
            if info["position"] != chosen:
                carried = {}
        self.position = DataPosition.from_dict(chosen)
        sent: dict[int, int] = {}
        copies: list[tuple[int, int, int]] = []
        missing: set[int] = set()
        for a in self.assignments:
            for layer in a.layer_indices:
                if layer in everyone[a.rank]["layers"]:
                    continue
                sources = [r for r, e in enumerate(everyone) if layer in e["layers"]]
                if not sources:
                    missing.add(layer)
                    continue
                src = min(sources, key=lambda r: (sent.get(r, 0), r))
                sent[src] = sent.get(src, 0) + everyone[src]["layers"][layer]
                copies.append((layer, src, a.rank))
        if missing:
            raise LayersLost(sorted(missing))
        received: dict[int, dict[str, torch.Tensor]] = {}
        for layer, src, dst in copies:
            if src == self.rank:
                _send_state(carried[layer], dst, self._comm_device())
            elif dst == self.rank:
                received[layer] = _recv_state(src, self._comm_device())
        mine = {i: carried[i] for i in self.me.layer_indices if i in carried}
        mine.update(received)
        self.import_layers(mine)
        return {"exchange_s": time.perf_counter() - t0, "copies": float(len(copies))}

    def _roll_forward(
        self, carried: Mapping[int, Mapping[str, torch.Tensor]], sq_total: float, step_index: int
    ) -> dict[int, dict[str, torch.Tensor]]:
        """Apply the update of the step at ``step_index`` (0-based) to carried layer states that
        hold its gradients (``grad.<name>``), exactly as :meth:`train_step` would have: the same
        clipping by the global norm ``sqrt(sq_total)``, learning rate and optimizer."""
        norm = math.sqrt(sq_total)
        clip = self.spec.optimizer.grad_clip_norm
        coef = clip / (norm + 1e-6) if clip is not None else 1.0
        out: dict[int, dict[str, torch.Tensor]] = {}
        for layer, state in carried.items():
            names = [k.removeprefix("param.") for k in state if k.startswith("param.")]
            params = {n: nn.Parameter(state[f"param.{n}"].clone()) for n in names}
            opt = optim.make_optimizer(self.spec.optimizer, params.values())
            for n, p in params.items():
                grad = state.get(f"grad.{n}")
                p.grad = None if grad is None else grad.clone()
                if p.grad is not None and coef < 1.0:
                    p.grad.mul_(coef)
                prefix = f"opt.{n}."
                optim.import_state(opt, p, {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
            optim.set_lr(opt, optim.lr_at(self.spec.optimizer, step_index))
            opt.step()
            new: dict[str, torch.Tensor] = {}
            for n, p in params.items():
                new[f"param.{n}"] = p.detach()
                for key, value in optim.export_state(opt, p).items():
                    new[f"opt.{n}.{key}"] = value
            out[layer] = new
        return out

    def reconfigure(
        self, plan: PlanSpec, rank: int, init: DistInit, *, before_copy: Callable[[], None] | None = None
    ) -> dict[str, float]:
        """Move to a new generation: keep this process's layer states, leave the old process
        group, join the new one as ``rank``, build the layers held under ``plan`` and copy the
        missing ones (parameters + optimizer state) from ranks that have them. Training resumes
        at the recorded position with the new batch split. Returns each phase's duration.

        Raises :class:`LayersLost` if some layer has no surviving copy (restore from checkpoint).
        ``before_copy`` is called once the new process group is joined, before the copy (drills).
        """
        t0 = time.perf_counter()
        # A reconfiguration that failed half-way (a peer died during the rendezvous or the copy)
        # has already replaced the layers with fresh ones: the retry uses the state exported by
        # the first attempt, kept until one completes.
        if self._carried is None:
            self._carried = self.export_layers(with_grads=self._voted is not None)
            self._carried_voted, self._voted = self._voted, None
        carried = self._carried
        if self._ckpt_thread is not None and self._ckpt_thread.is_alive():
            # Rank 0's thread may be waiting for a writer that died: it ends at its own deadline.
            log.warning("reconfigure: not waiting for the background checkpoint (it finishes or fails on its own)")
            self._ckpt_orphans.add(self._ckpt_thread)
            self._ckpt_thread = None
        t1 = time.perf_counter()
        self._teardown()
        self._setup(plan, rank, init)
        t2 = time.perf_counter()
        if before_copy is not None:
            before_copy()
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
        abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
        if self._init.backend == "nccl" and abort is not None:
            abort()  # NCCL: destroying a communicator with a failed operation may hang
        self._release_groups()

    def _release_groups(self) -> None:
        """Destroy the process groups and drop this engine's references to them: gloo closes a
        group's connections (which is what makes blocked peers fail) only once no Python object
        refers to it any more. The caller must not hold a traceback of a failed collective."""
        if dist.is_initialized():
            dist.destroy_process_group()
        self._store = None  # torch calls it no more (a SecretKeyStore: see its docstring)
        self.sync = None
        gc.collect()

    def _teardown(self) -> None:
        if not self._owns_group and dist.is_initialized():
            raise RuntimeError("reconfigure: the process group was created outside the engine")
        self._release_groups()
        self._owns_group = False

    def _comm_device(self) -> torch.device:
        return self.device if self._init.backend == "nccl" else torch.device("cpu")

    def _params(self) -> dict:
        return local_params(self.layers, self.where)

    def _build_executor(self) -> None:
        cfg = self.model_config
        self.ops = make_schedule(self.spec.schedule, self.me.num_stages, self.me.stage, self.me.microbatches)
        self.executor = StageExecutor(
            [self.layers[i] for i in self.me.layer_indices],
            self.me,
            self.spec.microbatch_size,
            (self.spec.data.seq_len, cfg.hidden_size),
            self.device,
            comm_dtype=self.param_dtype,
            autocast_dtype=self.autocast_dtype,
            use_tags=self._init.backend == "gloo",
        )

    # -- one step -------------------------------------------------------------------------------

    def _step_io(self, batch: list[int], epoch: int) -> StepIO:
        me, spec, cfg = self.me, self.spec, self.model_config
        a, b = lane_range(spec.microbatch_size, len(me.stage_ranks), me.lane)

        @functools.cache  # built on first use (first and last stages only), for the whole step
        def examples() -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
            # One dataset call for all of this lane's microbatches (every row depends only on
            # its sample), then split per microbatch: the same tensors, less per-call overhead.
            parts = [self.order.microbatch(batch, me.microbatch_offset + m)[a:b] for m in range(me.microbatches)]
            idx = [i for part in parts for i in part]
            inputs, labels = make_example(
                self.dataset.tokens(idx), idx, cfg.objective, cfg.vocab_size - 1, spec.data.seed, epoch
            )
            sizes = [len(part) for part in parts]
            return inputs.split(sizes), labels.split(sizes)

        return StepIO(
            inputs=lambda m: examples()[0][m],
            labels=lambda m: examples()[1][m],
            loss_scale=1.0 / spec.global_batch_size,
        )

    def train_step(self) -> StepResult:
        """Run one step on the global batch at :attr:`position`; raises StepFailed if any rank failed.
        Messages number steps from 1 (the step after ``position.step`` committed ones), as the
        worker's logs and step reports do."""
        start = self.order.step_start(self.position)
        batch, after = self.order.batch(self.position)
        params = self._params()
        self._voted = None
        error = 0.0
        loss_sum = torch.zeros((), dtype=torch.float64)
        sq = torch.zeros((), dtype=torch.float64)
        try:
            loss_sum = self.executor.run(self.ops, self._step_io(batch, start.epoch))
            if self.fault_hook is not None:
                self.fault_hook(self.position.step, "backward_done")
        except TransferFailed as exc:
            # A neighbouring stage is gone. The other neighbour may be blocked on this rank (in a
            # pipeline of three or more stages): going on to the gradient sync with healthy peers
            # would keep it blocked, and them with it, until their timeout. Raise instead, so the
            # caller abandons the group at once and the failure spreads to every rank.
            log.warning("step %d failed on rank %d in a transfer: %s", self.position.step + 1, self.rank, exc)
            self.optimizer.zero_grad(set_to_none=True)
            raise CommFailed(f"step {self.position.step + 1}: {exc}") from exc
        except Exception:
            log.exception("step %d failed on rank %d before gradient sync", self.position.step + 1, self.rank)
            error = 1.0
        # Collectives run on every rank even after a local failure, so no peer is left waiting
        # in a group; the vote below then cancels the update everywhere.
        try:
            self.sync.all_reduce(params)
            sq = self.sync.local_sq_norm(params)
        except Exception as exc:
            # The gradient sync only communicates: its failure means a peer is gone (or timed
            # out). Going on to the vote would leave the peers of the groups skipped here waiting
            # on this rank until their timeout, while it waits on them; raise instead, so the
            # caller can abandon() the group at once and the peers fail too.
            log.warning("step %d failed on rank %d in gradient sync: %s", self.position.step + 1, self.rank, exc)
            self.optimizer.zero_grad(set_to_none=True)
            raise CommFailed(f"step {self.position.step + 1}: gradient sync failed: {exc}") from exc
        counts_loss = self.me.is_last
        agreed = torch.stack([sq, loss_sum if counts_loss else torch.zeros((), dtype=torch.float64)])
        agreed = torch.cat([agreed, torch.tensor([error], dtype=torch.float64)]).to(self._comm_device())
        try:
            dist.all_reduce(agreed)
            if self.fault_hook is not None:
                self.fault_hook(self.position.step, "voted")
        except Exception as exc:
            # The vote did not complete here; it may have on other ranks (a peer died while it
            # ran). This rank's gradients are complete (every gradient all-reduce finished), so
            # they are kept: if a peer committed the step, the next reconfiguration applies it
            # here too (see _roll_forward) instead of losing it.
            if error == 0.0:
                self._voted = {"step": after.step, "after": after.to_dict()}
            raise CommFailed(f"step {self.position.step + 1}: the commit vote failed: {exc}") from exc
        sq_total, loss_total, errors = agreed.cpu().tolist()
        if errors > 0:
            self.optimizer.zero_grad(set_to_none=True)
            raise StepFailed(f"step {self.position.step + 1} failed on {int(errors)} rank(s); no update applied")
        norm = math.sqrt(sq_total)
        clip = self.spec.optimizer.grad_clip_norm
        if clip is not None:
            coef = clip / (norm + 1e-6)
            if coef < 1.0:
                for p in params.values():
                    if p.grad is not None:
                        p.grad.mul_(coef)
        optim.set_lr(self.optimizer, optim.lr_at(self.spec.optimizer, self.position.step))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.position = after
        self._last_commit = {"step": after.step, "sq_total": sq_total}
        return StepResult(
            step=after.step,
            loss=loss_total / self.spec.global_batch_size,
            samples=self.spec.global_batch_size,
            grad_norm=norm,
        )

    # -- layer state ----------------------------------------------------------------------------

    def export_layers(
        self, indices: Iterable[int] | None = None, *, with_grads: bool = False
    ) -> dict[int, dict[str, torch.Tensor]]:
        """Parameters (``param.<name>``) and optimizer state (``opt.<name>.<key>``) of held layers,
        as CPU tensor copies (and the gradients, ``grad.<name>``, when asked). Default: every
        held layer."""
        out = {}
        for i in self.me.layer_indices if indices is None else indices:
            if i not in self.layers:
                raise KeyError(f"layer {i} is not held by rank {self.rank}")
            state: dict[str, torch.Tensor] = {}
            for name, p in self.layers[i].named_parameters(remove_duplicate=False):
                if f"param.{name}" in state:
                    continue
                state[f"param.{name}"] = p.detach().to("cpu", copy=True)
                if with_grads and p.grad is not None:
                    state[f"grad.{name}"] = p.grad.detach().to("cpu", copy=True)
                for key, value in optim.export_state(self.optimizer, p).items():
                    state[f"opt.{name}.{key}"] = value
            out[i] = state
        return out

    def import_layers(self, layers: Mapping[int, Mapping[str, torch.Tensor]]) -> None:
        """Load parameters and optimizer state of layers this rank holds (from :meth:`export_layers`
        on any rank, or from a checkpoint)."""
        for i, state in layers.items():
            if i not in self.layers:
                raise KeyError(f"layer {i} is not held by rank {self.rank} (holds {self.me.layers})")
            module = self.layers[i]
            for name, p in module.named_parameters(remove_duplicate=False):
                key = f"param.{name}"
                if key not in state:
                    raise KeyError(f"layer {i}: missing {key}")
                with torch.no_grad():
                    p.copy_(state[key])
                prefix = f"opt.{name}."
                opt_state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
                optim.import_state(self.optimizer, p, opt_state)

    # -- checkpoints ----------------------------------------------------------------------------

    def save_checkpoint(self, directory: str | Path, wait: bool = True) -> Path:
        """Collective entry (every rank calls it at the same step): copy the layers this rank is
        the lowest holder of to host memory, then write them (in a background thread unless
        ``wait``) into this attempt's staging directory; rank 0 publishes the checkpoint once
        every writer is done (see :mod:`oobleck.common.checkpoint`). With ``wait`` every rank
        returns after the checkpoint is published. Returns the checkpoint's directory."""
        self.wait_checkpoint()
        directory = Path(directory)
        step = self.position.step
        root = ckpt.step_dir(directory, step)
        # One staging directory per attempt: the job and generation are the same on every rank
        # of this attempt, and differ for any other attempt at the same step.
        staging = ckpt.staging_dir(directory, step, f"{self.plan.job_id or 'job'}-g{self.plan.generation}")
        held = [i for i in self.me.layer_indices if self.holders[i][0] == self.rank]
        layers = self.export_layers(held)
        writers = {h[0] for h in self.holders.values()}
        extra = {
            "job_id": self.plan.job_id,
            "generation": self.plan.generation,
            "position": self.position.to_dict(),
            "model": self.model_config.key(),
            "seed": self.spec.seed,
            "num_layers": self.model.num_layers,
            "rng_state": base64.b64encode(bytes(torch.get_rng_state().tolist())).decode(),
        }
        rank, timeout = self.rank, self._init.timeout_s

        def write() -> None:
            ckpt.write_layers(staging, layers, rank)
            if rank == 0:
                files = ckpt.collect_sidecars(staging, writers, timeout)
                ckpt.publish(directory, staging, step=step, files=files, manifest_extra=extra)

        if wait:
            write()
            dist.barrier()
        else:
            self._ckpt_error = None
            self._ckpt_thread = threading.Thread(target=self._background, args=(write,), name="checkpoint", daemon=True)
            self._ckpt_thread.start()
        return root

    def _background(self, write) -> None:
        try:
            write()
        except BaseException as exc:
            log.exception("background checkpoint failed")
            if threading.current_thread() not in self._ckpt_orphans:  # not one left behind by reconfigure()
                self._ckpt_error = exc

    def wait_checkpoint(self) -> None:
        """Wait for a background checkpoint of this rank (rank 0: until its manifest is written);
        re-raises its error."""
        thread, self._ckpt_thread = self._ckpt_thread, None
        if thread is not None:
            thread.join()
            if self._ckpt_error is not None:
                error, self._ckpt_error = self._ckpt_error, None
                raise ckpt.CheckpointError(f"background checkpoint failed: {error}") from error

    def load_checkpoint(self, path: str | Path) -> DataPosition:
        """Load held layers and the data position from a checkpoint directory (a ``step-*`` one,
        or the parent: its latest). Works under any plan. Raises :class:`ckpt.CheckpointCorrupt`
        when a file this rank needs does not match the manifest (nothing is changed then), and
        :class:`ckpt.CheckpointError` when the checkpoint is of another model."""
        manifest, root = ckpt.read_manifest(Path(path))
        if manifest.get("num_layers") != self.model.num_layers or manifest.get("model") != self.model_config.key():
            raise ckpt.CheckpointError(f"checkpoint {root}: model differs from the job's model")
        layers = ckpt.load_layers(root, manifest, self.me.layer_indices)
        self.import_layers(layers)
        rng = torch.tensor(list(base64.b64decode(manifest["rng_state"])), dtype=torch.uint8)
        torch.set_rng_state(rng)
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
