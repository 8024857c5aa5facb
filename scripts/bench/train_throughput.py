"""Training throughput on CPU: our engine vs torch.distributed.pipelining vs one process.

Same model (built-in GPT, untied, so torch's pipelining needs no tying), same global batch and
microbatches, same number of processes (one pipeline of 4 stages, gloo, one thread each), the
same data and optimizer (AdamW, no clipping). Also reports our heterogeneous 2 + 3 plan (two
pipelines on 5 processes; torch.distributed.pipelining has no equivalent). Samples per second
over the timed steps, after warm-up steps. Not a test.

Usage: python scripts/bench/train_throughput.py [--steps 10] [--warmup 3] [--hidden 128]

The last line printed is one JSON object:
{"ours_sps", "torch_pipelining_sps", "single_process_sps", "ratio_vs_torch", ...} (best of
``--repeats`` alternated runs; CPU seconds per step summed over ranks are reported too, as a
load-independent comparison of the two engines' overheads).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.distributed as dist
from torch import nn

from oobleck.common.jobspec import DataSpec, JobSpec, ModelSpec, OptimizerSpec
from oobleck.common.modelconfig import validate_model_config
from oobleck.worker import optim
from oobleck.worker.data import DataPosition, GlobalOrder, make_dataset, make_example
from oobleck.worker.layout import simple_plan
from oobleck.worker.local import run_ranks, train_ranks
from oobleck.worker.models import ModelDef, per_sample_loss
from oobleck.worker.reference import ReferenceTrainer


def make_spec(hidden: int, blocks: int, seq_len: int, global_batch: int, microbatch: int) -> JobSpec:
    return JobSpec(
        model=ModelSpec("gpt", {"num_layers": blocks, "hidden_size": hidden, "num_heads": 4, "vocab_size": 256}),
        data=DataSpec(seq_len=seq_len, num_samples=4096, seed=0),
        optimizer=OptimizerSpec(name="adamw", lr=1e-3),
        global_batch_size=global_batch,
        microbatch_size=microbatch,
        steps=1,
    )


def torch_pipelining_rank(rank: int, init, spec: JobSpec, stage_counts: list[int], warmup: int, steps: int) -> dict:
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B

    world = len(stage_counts)
    dist.init_process_group("gloo", store=dist.FileStore(init.file, world), rank=rank, world_size=world)
    try:
        cfg = validate_model_config(spec)
        model = ModelDef(cfg, spec.seed)
        start = sum(stage_counts[:rank])
        layers = model.build_layers(range(start, start + stage_counts[rank]))
        module = nn.Sequential(*[layers[i] for i in sorted(layers)])
        stage = PipelineStage(module, rank, world, torch.device("cpu"))
        schedule = Schedule1F1B(
            stage, spec.num_microbatches, loss_fn=lambda out, target: per_sample_loss(out, target).mean()
        )
        opt = optim.make_optimizer(spec.optimizer, module.parameters())
        dataset = make_dataset(spec.data, cfg.vocab_size, cfg.objective)
        order = GlobalOrder(dataset.num_samples, spec.global_batch_size, spec.microbatch_size, spec.data.seed)
        pos = DataPosition()
        elapsed = cpu = 0.0
        for i in range(warmup + steps):
            c0 = time.process_time()
            t0 = time.perf_counter()
            batch, pos = order.batch(pos)
            # Only the first and last stage need data (inputs / labels), as in our engine; the
            # middle ranks used to build the whole batch too, a cost counted against torch only.
            if rank in (0, world - 1):
                inputs, labels = make_example(dataset.tokens(batch), batch, cfg.objective, cfg.vocab_size - 1, 0, 0)
            if rank == 0:
                schedule.step(inputs)
            elif rank == world - 1:
                schedule.step(target=labels, losses=[])
            else:
                schedule.step()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i >= warmup:
                elapsed += time.perf_counter() - t0
                cpu += time.process_time() - c0
        return {"elapsed_s": elapsed, "cpu_s": cpu}
    finally:
        dist.destroy_process_group()


def single_process(spec: JobSpec, warmup: int, steps: int) -> float:
    torch.set_num_threads(1)
    ref = ReferenceTrainer(spec)
    for _ in range(warmup):
        ref.step()
    t0 = time.perf_counter()
    for _ in range(steps):
        ref.step()
    return steps * spec.global_batch_size / (time.perf_counter() - t0)


def ours(
    spec: JobSpec, pipelines: list[list[int]], microbatches: list[int], warmup: int, steps: int
) -> tuple[float, float]:
    """(samples/s, CPU seconds per step summed over ranks)."""
    plan = simple_plan(pipelines, microbatches)
    results = run_ranks(
        plan.world_size, train_ranks, (spec, plan, steps, {"warmup": warmup, "export": False}), timeout_s=1800
    )
    sps = steps * spec.global_batch_size / max(r["elapsed_s"] for r in results)
    return sps, sum(r["cpu_s"] for r in results) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--global-batch", type=int, default=32)
    parser.add_argument("--microbatch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="alternate ours/torch runs, keep the best of each")
    args = parser.parse_args()
    spec = make_spec(args.hidden, args.blocks, args.seq_len, args.global_batch, args.microbatch)
    layers = args.blocks + 2
    stage_counts = [layers // 4 + (1 if i < layers % 4 else 0) for i in range(4)]
    b = spec.num_microbatches

    # The machine may be shared: alternate the two, keep the best wall-clock run of each, and
    # also report CPU seconds per step (summed over ranks), which load barely affects.
    ours_sps = torch_sps = 0.0
    ours_cpu = torch_cpu = float("inf")
    for _ in range(args.repeats):
        sps, cpu = ours(spec, [stage_counts], [b], args.warmup, args.steps)
        ours_sps, ours_cpu = max(ours_sps, sps), min(ours_cpu, cpu)
        print(f"ours, 1 pipeline x 4 stages {stage_counts}: {sps:.1f} samples/s, {cpu:.3f} CPU s/step", flush=True)
        results = run_ranks(4, torch_pipelining_rank, (spec, stage_counts, args.warmup, args.steps), timeout_s=1800)
        sps = args.steps * spec.global_batch_size / max(r["elapsed_s"] for r in results)
        cpu = sum(r["cpu_s"] for r in results) / args.steps
        torch_sps, torch_cpu = max(torch_sps, sps), min(torch_cpu, cpu)
        print(f"torch.distributed.pipelining Schedule1F1B: {sps:.1f} samples/s, {cpu:.3f} CPU s/step", flush=True)
    single = single_process(spec, args.warmup, args.steps)
    print(f"single process: {single:.1f} samples/s", flush=True)
    two = [layers // 2 + (1 if i < layers % 2 else 0) for i in range(2)]
    three = [layers // 3 + (1 if i < layers % 3 else 0) for i in range(3)]
    hetero, _ = ours(spec, [two, three], [b - b * 2 // 5, b * 2 // 5], args.warmup, args.steps)
    print(f"ours, heterogeneous 2 + 3 stages {two} + {three} (5 processes): {hetero:.1f} samples/s", flush=True)
    print(
        json.dumps(
            {
                "ours_sps": round(ours_sps, 2),
                "torch_pipelining_sps": round(torch_sps, 2),
                "single_process_sps": round(single, 2),
                "ratio_vs_torch": round(ours_sps / torch_sps, 3),
                "ours_hetero_2_3_sps": round(hetero, 2),
                "ours_cpu_s_per_step": round(ours_cpu, 4),
                "torch_pipelining_cpu_s_per_step": round(torch_cpu, 4),
            }
        )
    )


if __name__ == "__main__":
    main()
