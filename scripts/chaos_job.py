"""The chaos drill's job, and the check of its final checkpoint against the single-process reference."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from chaos_schedule import CHECKPOINT_INTERVAL

from oobleck.common.jobspec import CheckpointSpec, DataSpec, JobSpec, ModelSpec, OptimizerSpec

RTOL, ATOL = 1e-4, 1e-5


def job_spec(steps: int, ft: int, checkpoint_dir: Path) -> JobSpec:
    """The drill's job: a 6-layer GPT (4 blocks, hidden 32), 6 microbatches of 2, dropout 0, in
    fp64 and at a learning rate where training is not chaotic. Both matter for the check: in
    fp32 the summation order (which follows the plan) alone moves parameters past ``rtol=1e-4``
    within a few dozen steps, and at a learning rate of 3e-3 even fp64 rounding noise grows about
    tenfold per step after step ~50 (the single-process loop run with two microbatch sizes ends
    0.09 apart after 150 steps); at 1e-3 the two end 2e-10 apart."""
    return JobSpec(
        name="chaos",
        model=ModelSpec("gpt", {"num_layers": 4, "hidden_size": 32, "num_heads": 4, "vocab_size": 64, "dropout": 0.0}),
        data=DataSpec(seq_len=16, num_samples=512, seed=1),
        optimizer=OptimizerSpec(lr=1e-3, eps=1e-6, grad_clip_norm=1.0, warmup_steps=2, weight_decay=0.01),
        global_batch_size=12,
        microbatch_size=2,
        steps=steps,
        ft=ft,
        min_nodes=2,
        seed=7,
        checkpoint=CheckpointSpec(str(checkpoint_dir), CHECKPOINT_INTERVAL),
        precision="fp64",
    )


def compare_with_reference(spec: JobSpec) -> tuple[bool, float, str]:
    """(all close, max |a-b|, first mismatch) between the final checkpoint and the reference."""
    from oobleck.worker import checkpoint as ckpt
    from oobleck.worker.reference import reference_run

    manifest, root = ckpt.read_manifest(Path(spec.checkpoint.dir))
    if manifest["step"] != spec.steps:
        return False, float("inf"), f"the latest checkpoint is of step {manifest['step']}, not {spec.steps}"
    reference = dataclasses.replace(spec, ft=0, min_nodes=None, checkpoint=None, profile=None)
    _, ref_state = reference_run(reference.to_yaml(), spec.steps)
    layers = ckpt.load_layers(root, manifest, range(len(ref_state)))
    worst, problem = 0.0, ""
    for layer, ref_params in ref_state.items():
        got = {k.removeprefix("param."): v for k, v in layers[layer].items() if k.startswith("param.")}
        if set(got) != set(ref_params):
            return False, float("inf"), f"layer {layer}: parameters {sorted(got)} != {sorted(ref_params)}"
        for name, value in got.items():
            want = ref_params[name]
            worst = max(worst, float((value - want).abs().max()))
            if not problem and not torch.allclose(value, want, rtol=RTOL, atol=ATOL):
                problem = f"layer {layer} {name}: max |diff| {float((value - want).abs().max()):.3g}"
    return not problem, worst, problem


__all__ = ["ATOL", "RTOL", "compare_with_reference", "job_spec"]
