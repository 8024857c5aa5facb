"""Models as ordered lists of layers.

A model is ``num_layers`` layers ``[embeddings] [block 0] ... [block n-1] [final norm + head]``.
Every layer is an ``nn.Module`` whose ``forward`` takes one tensor and returns one tensor: token
ids (``[n, seq]`` int64) into layer 0, hidden states ``[n, seq, hidden]`` between layers, logits
``[n, seq, vocab]`` out of the last one. What a layer needs beyond that (positions, the causal
mask, rotary tables) it derives from the shape of its input, so layers can be placed anywhere.

Initialisation is deterministic per layer: layer ``i`` is built under ``torch.manual_seed(seed
* 1_000_003 + i)``, so every plan gets the same initial parameters as a single-process model.

Tied input/output embeddings: the embedding layer's and the head's weights are one tensor. Both
the first and the last layer hold it (under the names in :attr:`ModelDef.tied`); when one process
holds both, :func:`tie_layers` makes them the same ``nn.Parameter``. Across processes the engine
sums the two gradients before the optimizer step, so both copies receive the same update.

Accepted ``model.config`` keys: see :mod:`oobleck.common.modelconfig`.

Hugging Face models are built from a config written here (never downloaded), with random
initialisation from the same per-layer seeds (normal(0, init_std) for linear and embedding
weights, zero biases, unit norms), using SDPA attention with no padding mask (all sequences are
full length). BERT's masked-LM objective uses token ``vocab_size - 1`` as the mask token.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from oobleck.common.modelconfig import ModelConfig

# ---------------------------------------------------------------------------------------------
# Initialisation


def layer_seed(seed: int, index: int) -> int:
    return (seed * 1_000_003 + index) % (1 << 63)


def init_module(module: nn.Module, std: float) -> None:
    """Deterministic init under the current RNG state: normal weights, zero biases, unit norms."""
    for sub in module.modules():
        if isinstance(sub, (nn.LayerNorm,)) or type(sub).__name__.endswith("RMSNorm"):
            if getattr(sub, "weight", None) is not None:
                nn.init.ones_(sub.weight)
            if getattr(sub, "bias", None) is not None:
                nn.init.zeros_(sub.bias)
            continue
        for pname, param in sub.named_parameters(recurse=False):
            if pname == "weight" or param.dim() >= 2:
                nn.init.normal_(param, 0.0, std)
            else:
                nn.init.zeros_(param)


# ---------------------------------------------------------------------------------------------
# Built-in GPT


class GptEmbedding(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.pos = nn.Embedding(cfg.max_seq_len, cfg.hidden_size)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        return self.drop(self.tok(ids) + self.pos(positions))


class GptBlock(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.dropout = cfg.dropout
        self.ln1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.ln2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.ffn_hidden_size)
        self.fc2 = nn.Linear(cfg.ffn_hidden_size, cfg.hidden_size)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, h = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(h, dim=2)
        shape = (n, t, self.num_heads, h // self.num_heads)
        q, k, v = (z.view(shape).transpose(1, 2) for z in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.proj(att.transpose(1, 2).reshape(n, t, h)))
        return x + self.drop(self.fc2(F.gelu(self.fc1(self.ln2(x)))))


class GptHead(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.out = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.ln(x))


# ---------------------------------------------------------------------------------------------
# Hugging Face models (imported lazily: transformers is only needed for hf-* models)


def _hf_config(cfg: ModelConfig) -> Any:
    import transformers

    if cfg.name == "hf-gpt2":
        return transformers.GPT2Config(
            vocab_size=cfg.vocab_size,
            n_positions=cfg.max_seq_len,
            n_embd=cfg.hidden_size,
            n_layer=cfg.num_blocks,
            n_head=cfg.num_heads,
            n_inner=cfg.ffn_hidden_size,
            resid_pdrop=cfg.dropout,
            embd_pdrop=cfg.dropout,
            attn_pdrop=cfg.dropout,
            layer_norm_epsilon=cfg.layer_norm_eps,
            initializer_range=cfg.init_std,
            tie_word_embeddings=cfg.tie_embeddings,
            bos_token_id=None,
            eos_token_id=None,
            attn_implementation="sdpa",
        )
    if cfg.name == "hf-bert":
        return transformers.BertConfig(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            num_hidden_layers=cfg.num_blocks,
            num_attention_heads=cfg.num_heads,
            intermediate_size=cfg.ffn_hidden_size,
            hidden_dropout_prob=cfg.dropout,
            attention_probs_dropout_prob=cfg.dropout,
            max_position_embeddings=cfg.max_seq_len,
            layer_norm_eps=cfg.layer_norm_eps,
            initializer_range=cfg.init_std,
            tie_word_embeddings=cfg.tie_embeddings,
            pad_token_id=0,
            attn_implementation="sdpa",
        )
    return transformers.LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_blocks,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.layer_norm_eps,
        rope_theta=cfg.rope_theta,
        attention_dropout=cfg.dropout,
        initializer_range=cfg.init_std,
        tie_word_embeddings=cfg.tie_embeddings,
        attn_implementation="sdpa",
    )


class HfGpt2Embedding(nn.Module):
    def __init__(self, hf: Any) -> None:
        super().__init__()
        self.wte = nn.Embedding(hf.vocab_size, hf.n_embd)
        self.wpe = nn.Embedding(hf.n_positions, hf.n_embd)
        self.drop = nn.Dropout(hf.embd_pdrop)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        return self.drop(self.wte(ids) + self.wpe(positions))


class HfBlock(nn.Module):
    """One Hugging Face transformer block; ``rotary`` is set for Llama (it needs cos/sin tables)."""

    def __init__(self, block: nn.Module, rotary: nn.Module | None = None) -> None:
        super().__init__()
        self.block = block
        self.rotary = rotary

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rotary is None:
            out = self.block(x)
        else:
            positions = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
            out = self.block(x, position_ids=positions, position_embeddings=self.rotary(x, positions))
        return out[0] if isinstance(out, tuple) else out


class HfHead(nn.Module):
    def __init__(self, norm: nn.Module | None, head: nn.Module) -> None:
        super().__init__()
        self.norm = norm
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm is not None:
            x = self.norm(x)
        return self.head(x)


class HfEmbedding(nn.Module):
    def __init__(self, emb: nn.Module) -> None:
        super().__init__()
        self.emb = emb

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.emb(ids)


def _hf_layer(cfg: ModelConfig, index: int) -> nn.Module:
    hf = _hf_config(cfg)
    last = cfg.num_layers - 1
    if cfg.name == "hf-gpt2":
        from transformers.models.gpt2.modeling_gpt2 import GPT2Block

        if index == 0:
            return HfGpt2Embedding(hf)
        if index == last:
            return HfHead(
                nn.LayerNorm(hf.n_embd, eps=hf.layer_norm_epsilon), nn.Linear(hf.n_embd, hf.vocab_size, bias=False)
            )
        return HfBlock(GPT2Block(hf, layer_idx=index - 1))
    if cfg.name == "hf-bert":
        from transformers.models.bert import modeling_bert as mb

        if index == 0:
            return HfEmbedding(mb.BertEmbeddings(hf))
        if index == last:
            head = mb.BertOnlyMLMHead(hf)
            head.predictions.decoder.bias = head.predictions.bias
            return HfHead(None, head)
        return HfBlock(mb.BertLayer(hf, layer_idx=index - 1))
    from transformers.models.llama import modeling_llama as ml

    if index == 0:
        return HfEmbedding(nn.Embedding(hf.vocab_size, hf.hidden_size))
    if index == last:
        return HfHead(
            ml.LlamaRMSNorm(hf.hidden_size, eps=hf.rms_norm_eps), nn.Linear(hf.hidden_size, hf.vocab_size, bias=False)
        )
    return HfBlock(ml.LlamaDecoderLayer(hf, layer_idx=index - 1), ml.LlamaRotaryEmbedding(config=hf))


# ---------------------------------------------------------------------------------------------
# Model definition: names, construction, ties


_TIED_NAMES = {
    "gpt": ("tok.weight", "out.weight"),
    "hf-gpt2": ("wte.weight", "head.weight"),
    "hf-bert": ("emb.word_embeddings.weight", "head.predictions.decoder.weight"),
    "hf-llama": ("emb.weight", "head.weight"),
}


@dataclass(frozen=True)
class ModelDef:
    """Everything needed to build any layer of a model on its own."""

    config: ModelConfig
    seed: int

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    @property
    def tied(self) -> tuple[str, str] | None:
        """(name in layer 0, name in the last layer) of the tied embedding weight, or None."""
        return _TIED_NAMES[self.config.name] if self.config.tie_embeddings else None

    def layer_name(self, index: int) -> str:
        if index == 0:
            return "embed"
        if index == self.num_layers - 1:
            return "head"
        return f"block{index - 1}"

    def _construct(self, index: int) -> nn.Module:
        cfg = self.config
        if cfg.name == "gpt":
            if index == 0:
                return GptEmbedding(cfg)
            if index == self.num_layers - 1:
                return GptHead(cfg)
            return GptBlock(cfg)
        return _hf_layer(cfg, index)

    def build_layer(
        self, index: int, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
    ) -> nn.Module:
        """Build layer ``index`` with its deterministic initial parameters (initialised in fp32, then
        cast to ``dtype`` when given, so every precision starts from the same values)."""
        if not 0 <= index < self.num_layers:
            raise IndexError(f"layer {index} out of range [0, {self.num_layers})")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(layer_seed(self.seed, index))
            module = self._construct(index)
            init_module(module, self.config.init_std)
        if self.tied is not None and index == self.num_layers - 1:
            # The tied weight starts as the embedding's initial weight.
            emb = self.build_layer(0)
            with torch.no_grad():
                get_param(module, self.tied[1]).copy_(get_param(emb, self.tied[0]))
        return module.to(device=device, dtype=dtype)

    def build_layers(
        self, indices: Iterable[int], device: torch.device | str = "cpu", dtype: torch.dtype | None = None
    ) -> dict[int, nn.Module]:
        layers = {i: self.build_layer(i, device, dtype) for i in indices}
        tie_layers(self, layers)
        return layers


def get_param(module: nn.Module, name: str) -> nn.Parameter:
    return module.get_parameter(name)


def set_param(module: nn.Module, name: str, param: nn.Parameter) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    setattr(owner, attr, param)


def tie_layers(model: ModelDef, layers: Mapping[int, nn.Module]) -> None:
    """Make the head share the embedding's Parameter when one process holds both."""
    last = model.num_layers - 1
    if model.tied is not None and 0 in layers and last in layers:
        set_param(layers[last], model.tied[1], get_param(layers[0], model.tied[0]))


class SequentialModel(nn.Module):
    """All layers in one module: the single-process reference (and the profiler's subject)."""

    def __init__(self, model: ModelDef, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> None:
        super().__init__()
        built = model.build_layers(range(model.num_layers), device, dtype)
        self.layers = nn.ModuleList([built[i] for i in range(model.num_layers)])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = ids
        for layer in self.layers:
            x = layer(x)
        return x


def param_dtype(precision: str) -> torch.dtype:
    """Parameter (and activation transfer) dtype of a job's ``precision``: float64 for ``fp64``
    (CPU verification runs: summation order no longer shows over long runs), else float32 (bf16
    is autocast over fp32 parameters)."""
    return torch.float64 if precision == "fp64" else torch.float32


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy over each sample's labelled positions (label -100 = ignored): ``[n]``.

    The training loss is the mean of this over the global batch, so it splits exactly over
    microbatches, pipelines and data-parallel lanes whatever the plan.
    """
    n, t, v = logits.shape
    if logits.dtype in (torch.float16, torch.bfloat16):  # the loss of low-precision logits in fp32
        logits = logits.float()
    tok = F.cross_entropy(logits.reshape(n * t, v), labels.reshape(n * t), ignore_index=-100, reduction="none")
    tok = tok.view(n, t)
    count = (labels != -100).sum(dim=1).clamp(min=1)
    return tok.sum(dim=1) / count
