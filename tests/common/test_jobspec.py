"""Job spec parsing: the example jobs parse, and every kind of error names its field."""

from pathlib import Path

import pytest
import yaml

from oobleck.common.jobspec import JobSpec, load_job_spec, parse_job_spec
from oobleck.common.validate import ConfigError

ROOT = Path(__file__).resolve().parents[2]
MINIMAL = {
    "model": {"name": "gpt"},
    "global_batch_size": 16,
    "microbatch_size": 4,
    "steps": 10,
}


def spec_with(**changes):
    data = yaml.safe_load(yaml.safe_dump(MINIMAL))
    for dotted, value in changes.items():
        target = data
        *parents, last = dotted.split("__")
        for key in parents:
            target = target.setdefault(key, {})
        if value is _DELETE:
            del target[last]
        else:
            target[last] = value
    return yaml.safe_dump(data)


_DELETE = object()


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_examples_parse(path):
    spec = load_job_spec(path)
    assert isinstance(spec, JobSpec)
    assert spec.num_microbatches * spec.microbatch_size == spec.global_batch_size


def test_minimal_spec_gets_documented_defaults_and_round_trips():
    spec = parse_job_spec(spec_with())
    assert spec.num_microbatches == 4
    assert spec.ft == 1
    assert spec.optimizer.name == "adamw"
    assert spec.optimizer.betas == (0.9, 0.999)
    assert spec.data.kind == "synthetic"
    assert spec.checkpoint is None
    assert parse_job_spec(spec.to_yaml()) == spec


def test_full_spec_round_trips():
    text = spec_with(
        checkpoint={"dir": "/tmp/ck", "interval_steps": 5},
        data={"kind": "text", "path": "/data/corpus.txt", "seq_len": 16},
        min_nodes=2,
        profile="/tmp/p.json",
        optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.9, "grad_clip_norm": 1.0},
    )
    spec = parse_job_spec(text)
    assert spec.checkpoint.interval_steps == 5
    assert spec.data.path == "/data/corpus.txt"
    assert parse_job_spec(spec.to_yaml()) == spec


@pytest.mark.parametrize(
    ("changes", "field", "fragment"),
    [
        ({"model": _DELETE}, "model", "required"),
        ({"model__name": "gpt5"}, "model.name", "must be one of gpt, hf-gpt2"),
        ({"model__name": _DELETE}, "model.name", "required"),
        ({"model__config": [1]}, "model.config", "expected a mapping"),
        ({"model__config": {"layers": {"a": 1}}}, "model.config.layers", "expected a scalar or list"),
        ({"global_batch_size": 18}, "global_batch_size", "multiple of microbatch_size (4), got 18"),
        ({"global_batch_size": "16"}, "global_batch_size", "expected an integer, got a string"),
        ({"microbatch_size": 0}, "microbatch_size", "must be >= 1, got 0"),
        ({"steps": -3}, "steps", "must be >= 1, got -3"),
        ({"steps": True}, "steps", "expected an integer, got a boolean"),
        ({"ft": -1}, "ft", "must be >= 0"),
        ({"min_nodes": 0}, "min_nodes", "must be >= 1"),
        ({"optimizer__lr": -0.1}, "optimizer.lr", "must be > 0, got -0.1"),
        ({"optimizer__lr": float("nan")}, "optimizer.lr", "must be finite"),
        ({"optimizer__betas": [0.9]}, "optimizer.betas", "two numbers"),
        ({"optimizer__betas": [0.9, 2]}, "optimizer.betas[1]", "must be <= 1"),
        ({"optimizer__name": "lamb"}, "optimizer.name", "must be one of adamw, adam, sgd"),
        ({"optimizer__lr_typo": 1}, "optimizer.lr_typo", "unknown field"),
        ({"data__kind": "text"}, "data.path", "required when data.kind is 'text'"),
        ({"data__path": "/x"}, "data.path", "only allowed when data.kind is 'text'"),
        ({"data__seq_len": 1}, "data.seq_len", "must be >= 2"),
        ({"checkpoint": {"interval_steps": 3}}, "checkpoint.dir", "required"),
        ({"checkpoint": {"dir": "/c", "interval_steps": 0}}, "checkpoint.interval_steps", "must be >= 1"),
        ({"schedule": "zb"}, "schedule", "must be one of 1f1b, gpipe"),
        ({"precision": "fp8"}, "precision", "must be one of fp32, bf16, fp64"),
        ({"stepz": 3}, "stepz", "unknown field"),
        ({"name": ""}, "name", "must not be empty"),
    ],
)
def test_errors_name_the_field(changes, field, fragment):
    with pytest.raises(ConfigError) as info:
        parse_job_spec(spec_with(**changes))
    assert info.value.field == field
    assert fragment in str(info.value)
    assert str(info.value).startswith(f"{field}: ")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("model: [unclosed", "malformed YAML at line 1"),
        ("", "empty job spec"),
        ("- a\n- b\n", "expected a mapping, got a list"),
        (b"\xff\xfe", "not UTF-8"),
        ("x" * (1 << 21), "more than"),
    ],
)
def test_malformed_documents(text, fragment):
    with pytest.raises(ConfigError, match=r"^document: ") as info:
        parse_job_spec(text)
    assert fragment in str(info.value)


def test_load_job_spec_names_the_file(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(spec_with(steps=0))
    with pytest.raises(ConfigError, match=r"^steps: must be >= 1, got 0 \(in .*job\.yaml\)"):
        load_job_spec(path)
    with pytest.raises(ConfigError, match="cannot read"):
        load_job_spec(tmp_path / "nope.yaml")


SPEC_HEAD = "model: {name: gpt}\nglobal_batch_size: 8\nmicrobatch_size: 1\n"
BILLION_LAUGHS = "\n".join(
    [f"l0: &l0 [{', '.join(['lol'] * 9)}]"]
    + [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9)]
    + ["model: {name: gpt}", "global_batch_size: 8", "microbatch_size: 1", "steps: 5"]
)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (BILLION_LAUGHS, "aliases (*name) are not allowed"),
        ("model: " + "[" * 100 + "]" * 100, "nested more than 32 levels deep"),
        ("steps: 1" + "0" * 5000, "unusable YAML"),
        (SPEC_HEAD + "steps: " + "9" * 30, "steps: must be <="),
        (SPEC_HEAD + "steps: 5\nseed: " + "9" * 20, "seed: must be <="),
    ],
)
def test_hostile_yaml_is_refused_quickly_naming_the_problem(text, message) -> None:
    import time

    t0 = time.monotonic()
    with pytest.raises(ConfigError) as err:
        parse_job_spec(text)
    assert message in str(err.value) and len(str(err.value)) < 400, str(err.value)
    assert time.monotonic() - t0 < 1.0
