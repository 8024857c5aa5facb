"""Model settings: the ``model.config`` keys the worker accepts, validated without torch.

Shared by the daemons: the master calls :func:`validate_model_config` when a job is submitted,
``oobleck-launch`` before submitting, the worker when it builds the model. This module imports
no torch so that costs nothing.

Accepted ``model.config`` keys (all optional unless noted; errors name ``model.config.<key>``):

- ``num_layers`` (transformer blocks, default 2), ``hidden_size`` (default 64), ``num_heads``
  (default 4, must divide hidden_size), ``vocab_size`` (default 256), ``ffn_hidden_size``
  (default ``4 * hidden_size``), ``max_seq_len`` (default ``data.seq_len``), ``dropout``
  (default 0.0), ``tie_embeddings`` (default False for gpt and hf-llama, True for hf-gpt2 and
  hf-bert), ``init_std`` (default 0.02), ``layer_norm_eps`` (default 1e-5).
- hf-llama only: ``num_kv_heads`` (default num_heads), ``rope_theta`` (default 10000.0).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from oobleck.common.validate import ConfigError

MODEL_NAMES = ("gpt", "hf-gpt2", "hf-bert", "hf-llama")

_COMMON_KEYS = (
    "num_layers",
    "hidden_size",
    "num_heads",
    "vocab_size",
    "ffn_hidden_size",
    "max_seq_len",
    "dropout",
    "tie_embeddings",
    "init_std",
    "layer_norm_eps",
)
_EXTRA_KEYS = {"hf-llama": ("num_kv_heads", "rope_theta")}


@dataclass(frozen=True)
class ModelConfig:
    """Validated model settings (the union of what every model family understands)."""

    name: str
    num_blocks: int
    hidden_size: int
    num_heads: int
    vocab_size: int
    ffn_hidden_size: int
    max_seq_len: int
    dropout: float
    tie_embeddings: bool
    init_std: float
    layer_norm_eps: float
    num_kv_heads: int
    rope_theta: float

    @property
    def objective(self) -> str:
        """``clm`` (next-token prediction) or ``mlm`` (masked tokens, BERT)."""
        return "mlm" if self.name == "hf-bert" else "clm"

    @property
    def num_layers(self) -> int:
        """Pipeline layers: embeddings, every block, final norm + head."""
        return self.num_blocks + 2

    def key(self) -> dict[str, Any]:
        """A JSON-able description, used as a cache key (profiles) and in checkpoint manifests."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _int(cfg: Mapping[str, Any], key: str, default: int, lo: int, hi: int = 1 << 31) -> int:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"model.config.{key}", f"expected an integer, got {value!r}")
    if not lo <= value <= hi:
        raise ConfigError(f"model.config.{key}", f"must be in [{lo}, {hi}], got {value}")
    return value


def _float(cfg: Mapping[str, Any], key: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"model.config.{key}", f"expected a finite number, got {value!r}")
    if value < lo or value > hi or (lo_open and value == lo):
        bound = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
        raise ConfigError(f"model.config.{key}", f"must be in {bound}, got {value}")
    return float(value)


def parse_model_config(name: str, config: Mapping[str, Any], seq_len: int) -> ModelConfig:
    """Validate ``model.config`` for model ``name``; errors name ``model.config.<key>``."""
    if name not in MODEL_NAMES:
        raise ConfigError("model.name", f"must be one of {', '.join(MODEL_NAMES)}, got {name!r}")
    known = set(_COMMON_KEYS) | set(_EXTRA_KEYS.get(name, ()))
    for key in config:
        if key not in known:
            raise ConfigError(
                f"model.config.{key}", f"unknown key for model {name!r} (known: {', '.join(sorted(known))})"
            )
    hidden = _int(config, "hidden_size", 64, 1)
    heads = _int(config, "num_heads", 4, 1)
    if hidden % heads:
        raise ConfigError("model.config.num_heads", f"must divide hidden_size ({hidden}), got {heads}")
    if name == "hf-llama" and (hidden // heads) % 2:
        raise ConfigError("model.config.num_heads", f"hidden_size / num_heads must be even for rotary, got {heads}")
    kv_heads = _int(config, "num_kv_heads", heads, 1)
    if heads % kv_heads:
        raise ConfigError("model.config.num_kv_heads", f"must divide num_heads ({heads}), got {kv_heads}")
    max_seq = _int(config, "max_seq_len", seq_len, 1)
    if max_seq < seq_len:
        raise ConfigError("model.config.max_seq_len", f"must be >= data.seq_len ({seq_len}), got {max_seq}")
    vocab = _int(config, "vocab_size", 256, 3)
    tie = config.get("tie_embeddings", name in ("hf-gpt2", "hf-bert"))
    if not isinstance(tie, bool):
        raise ConfigError("model.config.tie_embeddings", f"expected true or false, got {tie!r}")
    return ModelConfig(
        name=name,
        num_blocks=_int(config, "num_layers", 2, 1),
        hidden_size=hidden,
        num_heads=heads,
        vocab_size=vocab,
        ffn_hidden_size=_int(config, "ffn_hidden_size", 4 * hidden, 1),
        max_seq_len=max_seq,
        dropout=_float(config, "dropout", 0.0, 0.0, 1.0),
        tie_embeddings=tie,
        init_std=_float(config, "init_std", 0.02, 0.0, 10.0, lo_open=True),
        layer_norm_eps=_float(config, "layer_norm_eps", 1e-5, 0.0, 1.0, lo_open=True),
        num_kv_heads=kv_heads,
        rope_theta=_float(config, "rope_theta", 10000.0, 0.0, 1e9, lo_open=True),
    )


def validate_model_config(spec: Any) -> ModelConfig:
    """Check a JobSpec's model and data settings together (the master calls this at submit).

    Raises ConfigError naming the field (``model.config.<key>``, ``data.kind``, ...).
    """
    cfg = parse_model_config(spec.model.name, spec.model.config, spec.data.seq_len)
    if spec.data.kind == "text":
        need = 256 + (1 if cfg.objective == "mlm" else 0)
        if cfg.vocab_size < need:
            raise ConfigError(
                "model.config.vocab_size", f"must be >= {need} for byte-level text data, got {cfg.vocab_size}"
            )
    return cfg
