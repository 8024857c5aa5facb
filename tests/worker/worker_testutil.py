"""Shared helpers for the worker tests (tiny job specs, the cached single-process reference)."""

from __future__ import annotations

import pytest
import torch

from oobleck.common.jobspec import DataSpec, JobSpec, ModelSpec, OptimizerSpec
from oobleck.worker.reference import reference_run

STEPS = 3


def tiny_spec(model: str = "gpt", **overrides) -> JobSpec:
    config = {"num_layers": 2, "hidden_size": 32, "num_heads": 4, "vocab_size": 64, "tie_embeddings": True}
    config.update(overrides.pop("config", {}))
    kwargs = {
        "model": ModelSpec(model, config),
        "data": DataSpec(seq_len=16, num_samples=256, seed=3),
        # eps=1e-6: some gradients are exactly zero in theory (GPT-2's key bias) and pure rounding
        # noise in practice; Adam with a tiny eps would turn that noise into lr-sized updates.
        "optimizer": OptimizerSpec(lr=1e-2, eps=1e-6, grad_clip_norm=0.5, warmup_steps=2, weight_decay=0.01),
        "global_batch_size": 16,
        "microbatch_size": 2,
        "steps": STEPS,
        "seed": 5,
    }
    kwargs.update(overrides)
    return JobSpec(**kwargs)


def reference(spec: JobSpec, steps: int = STEPS):
    """Losses and per-layer parameters of the single-process loop (cached per spec)."""
    return reference_run(spec.to_yaml(), steps)


def assert_matches_reference(spec: JobSpec, results: list[dict], steps: int = STEPS, first_step: int = 0) -> None:
    """Every rank's losses (of steps ``first_step..steps-1``) and held parameters (after ``steps``
    steps) equal the reference's; together the ranks hold every layer."""
    ref_losses, _ = reference(spec, steps)
    for res in results:
        assert res["losses"] == pytest.approx(ref_losses[first_step:], rel=1e-5)
    assert_params_match(spec, results, steps)


def assert_params_match(spec: JobSpec, results: list[dict], steps: int = STEPS) -> None:
    """Every held layer's parameters equal the reference's after ``steps`` steps, and the ranks
    together hold every layer."""
    _, ref_state = reference(spec, steps)
    seen_layers = set()
    for res in results:
        for layer, params in res["params"].items():
            seen_layers.add(layer)
            assert set(params) == set(ref_state[layer])
            for name, value in params.items():
                torch.testing.assert_close(value, ref_state[layer][name], rtol=1e-4, atol=1e-5)
    assert seen_layers == set(ref_state)
