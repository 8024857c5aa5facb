"""The end-to-end tests' job and its single-process reference."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from oobleck.common.jobspec import CheckpointSpec, DataSpec, JobSpec, ModelSpec, OptimizerSpec
from oobleck.worker.reference import reference_run

STEPS = 30
CHECKPOINT_INTERVAL = 5


def base_spec(**changes) -> JobSpec:
    """Tiny GPT: 4 blocks (6 layers: embedding, blocks, head), hidden 32; 6 microbatches of 2."""
    spec = JobSpec(
        name="e2e",
        model=ModelSpec("gpt", {"num_layers": 4, "hidden_size": 32, "num_heads": 4, "vocab_size": 64, "dropout": 0.0}),
        data=DataSpec(seq_len=16, num_samples=512, seed=1),
        optimizer=OptimizerSpec(lr=1e-2, eps=1e-6, grad_clip_norm=1.0, warmup_steps=2, weight_decay=0.01),
        global_batch_size=12,
        microbatch_size=2,
        steps=STEPS,
        ft=1,
        min_nodes=2,
        seed=7,
    )
    return dataclasses.replace(spec, **changes)


def job_spec(ckpt_dir: Path, profile: str, *, ft: int) -> JobSpec:
    return base_spec(ft=ft, profile=profile, checkpoint=CheckpointSpec(str(ckpt_dir), CHECKPOINT_INTERVAL))


def reference(spec: JobSpec):
    """Losses and final per-layer parameters of an uninterrupted single-process run of ``spec``
    (what the cluster layout and fault tolerance settings do not change is all that counts)."""
    training = dataclasses.replace(spec, ft=0, min_nodes=None, checkpoint=None, profile=None)
    return reference_run(training.to_yaml(), spec.steps)


def assert_final_checkpoint_matches_reference(spec: JobSpec) -> None:
    from oobleck.worker import checkpoint as ckpt

    manifest, root = ckpt.read_manifest(Path(spec.checkpoint.dir))
    assert manifest["step"] == spec.steps
    _, ref_state = reference(spec)
    layers = ckpt.load_layers(root, manifest, range(len(ref_state)))
    for layer, ref_params in ref_state.items():
        params = {k.removeprefix("param."): v for k, v in layers[layer].items() if k.startswith("param.")}
        assert set(params) == set(ref_params), f"layer {layer}"
        for name, value in params.items():
            torch.testing.assert_close(value, ref_params[name], rtol=1e-4, atol=1e-5, msg=f"layer {layer} {name}")


def assert_checkpoints_intact(spec: JobSpec) -> list[int]:
    """Every complete checkpoint of the job matches its manifest and ``latest`` names the newest;
    returns their steps, newest first."""
    from oobleck.common import checkpoint as ck

    directory = Path(spec.checkpoint.dir)
    assert ck.audit(directory) == []
    return ck.complete_steps(directory)


def trained_steps(log_text: str) -> list[tuple[int, int, float]]:
    """``(generation, step, loss)`` of every step a node's worker committed, in order."""
    import re

    pattern = r"slot 0 rank \d+ gen (\d+): step (\d+)/\d+ loss ([0-9.]+)"
    return [(int(g), int(s), float(loss)) for g, s, loss in re.findall(pattern, log_text)]
