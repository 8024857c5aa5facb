"""The job spec: what to train, on what data, how, and how resiliently.

A job spec is a YAML document submitted with a job (``oobleck-launch --config``, ``oobleckctl
submit``). It parses into the frozen :class:`JobSpec`; every error is a
:class:`~oobleck.common.validate.ConfigError` naming the field path. Example::

    name: demo
    model: {name: gpt, config: {num_layers: 4, hidden_size: 64, num_heads: 4}}
    data: {kind: synthetic, seq_len: 32, num_samples: 4096, seed: 0}
    optimizer: {name: adamw, lr: 0.001}
    global_batch_size: 32      # samples per step
    microbatch_size: 4         # samples per microbatch; global_batch_size must be a multiple
    ft: 1                      # node failures the plan must absorb at once
    steps: 200
    checkpoint: {dir: /var/lib/oobleck/ckpt, interval_steps: 50}

Rules (every field is described in docs/job-spec.md): unknown fields are errors (a typo must not silently
fall back to a default); ``model.config`` is free-form here and checked by the worker's model
registry at submit time; ``checkpoint`` may be omitted (no periodic checkpoints).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from oobleck.common import validate as v
from oobleck.common.validate import ConfigError

MODEL_NAMES = ("gpt", "hf-gpt2", "hf-bert", "hf-llama")
DATA_KINDS = ("synthetic", "text")
OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("1f1b", "gpipe")
PRECISIONS = ("fp32", "bf16", "fp64")
MAX_SPEC_BYTES = 1 << 20


def _set(obj: Any, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    config: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        v.string(self.name, "model.name", choices=MODEL_NAMES)
        config = v.mapping(self.config, "model.config")
        for key, value in config.items():
            if not isinstance(value, (str, int, float, bool, list)) and value is not None:
                raise ConfigError(f"model.config.{key}", f"expected a scalar or list, got {type(value).__name__}")
        _set(self, "config", dict(config))


@dataclass(frozen=True)
class DataSpec:
    kind: str = "synthetic"
    seq_len: int = 64
    seed: int = 0
    num_samples: int = 65536
    path: str | None = None

    def __post_init__(self) -> None:
        v.string(self.kind, "data.kind", choices=DATA_KINDS)
        v.integer(self.seq_len, "data.seq_len", min_value=2, max_value=1 << 20)
        v.integer(self.seed, "data.seed", min_value=0)
        v.integer(self.num_samples, "data.num_samples", min_value=1)
        if self.kind == "text":
            if self.path is None:
                raise ConfigError("data.path", "required when data.kind is 'text'")
            v.string(self.path, "data.path")
        elif self.path is not None:
            raise ConfigError("data.path", "only allowed when data.kind is 'text'")


@dataclass(frozen=True)
class OptimizerSpec:
    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = 0.0
    grad_clip_norm: float | None = None
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        v.string(self.name, "optimizer.name", choices=OPTIMIZERS)
        _set(self, "lr", v.number(self.lr, "optimizer.lr", min_value=0.0, exclusive_min=True))
        _set(self, "weight_decay", v.number(self.weight_decay, "optimizer.weight_decay", min_value=0.0))
        betas = self.betas
        if not isinstance(betas, (list, tuple)) or len(betas) != 2:
            raise ConfigError("optimizer.betas", f"expected a list of two numbers, got {betas!r}")
        _set(
            self,
            "betas",
            tuple(v.number(b, f"optimizer.betas[{i}]", min_value=0.0, max_value=1.0) for i, b in enumerate(betas)),
        )
        _set(self, "eps", v.number(self.eps, "optimizer.eps", min_value=0.0, exclusive_min=True))
        _set(self, "momentum", v.number(self.momentum, "optimizer.momentum", min_value=0.0, max_value=1.0))
        if self.grad_clip_norm is not None:
            _set(
                self,
                "grad_clip_norm",
                v.number(self.grad_clip_norm, "optimizer.grad_clip_norm", min_value=0.0, exclusive_min=True),
            )
        v.integer(self.warmup_steps, "optimizer.warmup_steps", min_value=0)


@dataclass(frozen=True)
class CheckpointSpec:
    dir: str
    interval_steps: int = 100

    def __post_init__(self) -> None:
        v.string(self.dir, "checkpoint.dir")
        v.integer(self.interval_steps, "checkpoint.interval_steps", min_value=1)


@dataclass(frozen=True)
class JobSpec:
    model: ModelSpec
    global_batch_size: int
    microbatch_size: int
    steps: int
    name: str = "job"
    data: DataSpec = field(default_factory=DataSpec)
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    ft: int = 1
    min_nodes: int | None = None
    checkpoint: CheckpointSpec | None = None
    profile: str | None = None
    schedule: str = "1f1b"
    precision: str = "fp32"
    seed: int = 0

    def __post_init__(self) -> None:
        v.string(self.name, "name")
        if not isinstance(self.model, ModelSpec):
            raise ConfigError("model", "required")
        v.integer(self.microbatch_size, "microbatch_size", min_value=1)
        v.integer(self.global_batch_size, "global_batch_size", min_value=1)
        if self.global_batch_size % self.microbatch_size:
            raise ConfigError(
                "global_batch_size",
                f"must be a multiple of microbatch_size ({self.microbatch_size}), got {self.global_batch_size}",
            )
        v.integer(self.steps, "steps", min_value=1)
        v.integer(self.ft, "ft", min_value=0, max_value=1024)
        if self.min_nodes is not None:
            v.integer(self.min_nodes, "min_nodes", min_value=1)
        if self.profile is not None:
            v.string(self.profile, "profile")
        v.string(self.schedule, "schedule", choices=SCHEDULES)
        v.string(self.precision, "precision", choices=PRECISIONS)
        v.integer(self.seed, "seed", min_value=0)

    @property
    def num_microbatches(self) -> int:
        """Microbatches per global batch (``B`` in the planner)."""
        return self.global_batch_size // self.microbatch_size

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "model": {"name": self.model.name, "config": dict(self.model.config)},
            "data": {
                "kind": self.data.kind,
                "seq_len": self.data.seq_len,
                "seed": self.data.seed,
                "num_samples": self.data.num_samples,
            },
            "optimizer": {
                "name": self.optimizer.name,
                "lr": self.optimizer.lr,
                "weight_decay": self.optimizer.weight_decay,
                "betas": list(self.optimizer.betas),
                "eps": self.optimizer.eps,
                "momentum": self.optimizer.momentum,
                "grad_clip_norm": self.optimizer.grad_clip_norm,
                "warmup_steps": self.optimizer.warmup_steps,
            },
            "global_batch_size": self.global_batch_size,
            "microbatch_size": self.microbatch_size,
            "ft": self.ft,
            "steps": self.steps,
            "schedule": self.schedule,
            "precision": self.precision,
            "seed": self.seed,
        }
        if self.data.path is not None:
            out["data"]["path"] = self.data.path
        if self.min_nodes is not None:
            out["min_nodes"] = self.min_nodes
        if self.checkpoint is not None:
            out["checkpoint"] = {"dir": self.checkpoint.dir, "interval_steps": self.checkpoint.interval_steps}
        if self.profile is not None:
            out["profile"] = self.profile
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


_SECTIONS: dict[str, type] = {
    "model": ModelSpec,
    "data": DataSpec,
    "optimizer": OptimizerSpec,
    "checkpoint": CheckpointSpec,
}
_SECTION_FIELDS = {
    "model": frozenset({"name", "config"}),
    "data": frozenset({"kind", "seq_len", "seed", "num_samples", "path"}),
    "optimizer": frozenset(
        {"name", "lr", "weight_decay", "betas", "eps", "momentum", "grad_clip_norm", "warmup_steps"}
    ),
    "checkpoint": frozenset({"dir", "interval_steps"}),
}
_TOP_FIELDS = frozenset(
    {
        "name", "model", "data", "optimizer", "global_batch_size", "microbatch_size", "ft",
        "min_nodes", "steps", "checkpoint", "profile", "schedule", "precision", "seed",
    }
)  # fmt: skip
_REQUIRED = ("model", "global_batch_size", "microbatch_size", "steps")


def job_spec_from_dict(data: Any) -> JobSpec:
    """Validate decoded YAML/JSON into a :class:`JobSpec`; raises ConfigError naming the field."""
    top = v.mapping(data, "")
    v.reject_unknown(top, _TOP_FIELDS, "")
    for key in _REQUIRED:
        if key not in top:
            raise ConfigError(key, "required")
    kwargs: dict[str, Any] = {}
    for key, value in top.items():
        section = _SECTIONS.get(key)
        if section is None:
            kwargs[key] = value
            continue
        if value is None and key == "checkpoint":
            kwargs[key] = None
            continue
        fields = v.mapping(value, key)
        v.reject_unknown(fields, _SECTION_FIELDS[key], key)
        if section is ModelSpec and "name" not in fields:
            raise ConfigError("model.name", "required")
        if section is CheckpointSpec and "dir" not in fields:
            raise ConfigError("checkpoint.dir", "required")
        kwargs[key] = section(**fields)
    return JobSpec(**kwargs)


MAX_YAML_DEPTH = 32


class _SpecLoader(yaml.SafeLoader):
    """YAML's safe loader, without aliases (``*name``: a few hundred bytes of nested aliases
    expand to billions of values, a "billion laughs") and nested at most ``MAX_YAML_DEPTH`` deep.
    A job spec needs neither."""

    _depth = 0

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            problem = "aliases (*name) are not allowed in a job spec"
            raise yaml.composer.ComposerError(None, None, problem, event.start_mark)
        if self._depth >= MAX_YAML_DEPTH:
            raise yaml.composer.ComposerError(
                None, None, f"nested more than {MAX_YAML_DEPTH} levels deep", event.start_mark
            )
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def parse_job_spec(text: str | bytes) -> JobSpec:
    """Parse a YAML job spec. Malformed YAML and invalid fields raise ConfigError."""
    if isinstance(text, bytes):
        if len(text) > MAX_SPEC_BYTES:
            raise ConfigError("document", f"job spec is {len(text)} bytes, more than {MAX_SPEC_BYTES}")
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError("document", f"not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    if len(text) > MAX_SPEC_BYTES:
        raise ConfigError("document", f"job spec is {len(text)} characters, more than {MAX_SPEC_BYTES}")
    try:
        data = yaml.load(text, Loader=_SpecLoader)  # a SafeLoader without aliases
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError("document", f"malformed YAML{where}: {problem}") from exc
    except (ValueError, RecursionError) as exc:  # e.g. an integer of thousands of digits
        raise ConfigError("document", f"unusable YAML: {str(exc)[:200]}") from exc
    if data is None:
        raise ConfigError("document", "empty job spec")
    return job_spec_from_dict(data)


def load_job_spec(path: str | Path) -> JobSpec:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError("document", f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        return parse_job_spec(raw)
    except ConfigError as exc:
        raise ConfigError(exc.field, f"{exc.problem} (in {path})") from exc
