"""Model configs and layer construction."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from oobleck.common.jobspec import DataSpec, JobSpec, ModelSpec
from oobleck.common.modelconfig import parse_model_config, validate_model_config
from oobleck.common.validate import ConfigError
from oobleck.worker.models import ModelDef, SequentialModel


def spec(name: str, config: dict, **data) -> JobSpec:
    return JobSpec(
        model=ModelSpec(name, config),
        data=DataSpec(seq_len=16, **data),
        global_batch_size=4,
        microbatch_size=2,
        steps=1,
    )


@pytest.mark.parametrize(
    ("name", "config", "field"),
    [
        ("gpt", {"hidden_size": 30, "num_heads": 4}, "model.config.num_heads"),
        ("gpt", {"num_layers": 0}, "model.config.num_layers"),
        ("gpt", {"hiden_size": 32}, "model.config.hiden_size"),
        ("gpt", {"max_seq_len": 8}, "model.config.max_seq_len"),
        ("gpt", {"dropout": 1.5}, "model.config.dropout"),
        ("gpt", {"tie_embeddings": "yes"}, "model.config.tie_embeddings"),
        ("gpt", {"num_kv_heads": 2}, "model.config.num_kv_heads"),  # llama only
        ("hf-llama", {"num_heads": 4, "num_kv_heads": 3}, "model.config.num_kv_heads"),
        ("gpt", {"vocab_size": 100.5}, "model.config.vocab_size"),
    ],
)
def test_bad_config_names_key(name: str, config: dict, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate_model_config(spec(name, config))
    assert info.value.field == field


def test_text_data_needs_byte_vocab() -> None:
    with pytest.raises(ConfigError, match=r"model\.config\.vocab_size"):
        validate_model_config(spec("hf-bert", {"vocab_size": 256}, kind="text", path="/x"))
    assert validate_model_config(spec("gpt", {"vocab_size": 256}, kind="text", path="/x")).vocab_size == 256


@pytest.mark.parametrize("name", ["gpt", "hf-gpt2", "hf-bert", "hf-llama"])
def test_layers_are_deterministic_and_chain(name: str) -> None:
    cfg = parse_model_config(name, {"num_layers": 2, "hidden_size": 32, "num_heads": 4, "vocab_size": 40}, 16)
    model = ModelDef(cfg, seed=7)
    assert model.num_layers == 4
    a, b = model.build_layer(1), model.build_layer(1)
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert na == nb and torch.equal(pa, pb)
    other = ModelDef(cfg, seed=8).build_layer(1)
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), other.parameters(), strict=True))
    full = SequentialModel(model)
    logits = full(torch.randint(0, 39, (3, 16)))
    assert logits.shape == (3, 16, 40)
    if model.tied is not None:
        emb = full.layers[0].get_parameter(model.tied[0])
        assert full.layers[-1].get_parameter(model.tied[1]) is emb
        # Built alone, the head starts from the embedding's initial weight.
        assert torch.equal(
            model.build_layer(3).get_parameter(model.tied[1]), model.build_layer(0).get_parameter(model.tied[0])
        )


def test_causal_models_ignore_the_future() -> None:
    cfg = parse_model_config("hf-llama", {"num_layers": 1, "hidden_size": 16, "num_heads": 2, "vocab_size": 20}, 8)
    full = SequentialModel(ModelDef(cfg, seed=0))
    ids = torch.randint(0, 20, (1, 8))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % 20
    torch.testing.assert_close(full(ids)[0, :-1], full(changed)[0, :-1])


def test_validation_imports_no_torch() -> None:
    """The master validates job specs at submit time without paying for a torch import."""
    code = (
        "import sys\n"
        "from oobleck.common.jobspec import DataSpec, JobSpec, ModelSpec\n"
        "from oobleck.common.modelconfig import validate_model_config\n"
        "spec = JobSpec(model=ModelSpec('hf-gpt2', {}), data=DataSpec(seq_len=8), global_batch_size=2,\n"
        "               microbatch_size=1, steps=1)\n"
        "assert validate_model_config(spec).tie_embeddings\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
