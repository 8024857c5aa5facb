#!/usr/bin/env python3
"""Planner speed benchmark (docs/planner.md "Limits and speed"); run on one core.

    .venv/bin/python scripts/bench/planner.py [--repeat N]

Cases: all templates for 96 layers x 64 nodes x 8 GPUs with f = 2 (target < 1 s) and for
32 layers x 32 nodes x 1 GPU (< 50 ms); instantiation on 1,024 nodes with B = 8,192 (< 100 ms);
reconfiguration with the layer-copy plan on 1,024 nodes (< 10 ms). Prints a table, then as its
last line one JSON object with the median seconds of each case.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from oobleck.planner import instantiate, reconfigure
from oobleck.planner.profile import LayerProfile, Profile
from oobleck.planner.templates import plan_templates
from oobleck.planner.types import Cluster

TARGETS_S = {
    "templates_96x64x8_s": 1.0,
    "templates_32x32x1_s": 0.05,
    "instantiate_1024_s": 0.1,
    "reconfigure_1024_s": 0.01,
}


def gpt_profile(num_layers: int, hidden: int, seq: int, microbatch: int) -> Profile:
    """A GPT-like profile: embedding, identical transformer blocks, head (fp16 weights)."""
    block_params = 12 * hidden * hidden * 2
    act = 34 * seq * hidden * microbatch  # activation bytes kept for backward, per block
    out = seq * hidden * microbatch * 2
    flops_ms = 2 * 12 * hidden * hidden * seq * microbatch / 1.5e11  # ~150 TFLOP/s per GPU
    layers = [LayerProfile("embed", 0.3, 0.6, 50257 * hidden * 2, out, out)]
    for i in range(num_layers - 2):
        f = flops_ms * (1.0 + 0.01 * (i % 5))
        layers.append(LayerProfile(f"block{i}", f, 2 * f, block_params, act, out))
    layers.append(LayerProfile("head", 0.4, 0.8, 50257 * hidden * 2, out, out))
    return Profile(model=f"gpt-{num_layers}x{hidden}", microbatch_size=microbatch, layers=tuple(layers))


def cluster(nodes: int, gpus: int) -> Cluster:
    return Cluster(
        nodes=nodes,
        gpus_per_node=gpus,
        gpu_memory_bytes=80 * 2**30,
        intra_node_bytes_per_s=3e11,
        inter_node_bytes_per_s=2.5e10,
        optimizer_state_factor=4,
        reserved_bytes=4 * 2**30,
    )


def timed(fn: Callable[[], Any], repeat: int) -> tuple[float, float, Any]:
    """Median wall-clock and CPU seconds over ``repeat`` runs, and the last result.

    CPU time is shown too because the benchmark host may be shared; both are one core.
    """
    wall, cpu, result = [], [], None
    for _ in range(repeat):
        c0, t0 = time.process_time(), time.perf_counter()
        result = fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu), result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs per case; the median is reported")
    args = parser.parse_args(argv)
    results: dict[str, float] = {}
    cpu: dict[str, float] = {}
    notes: dict[str, str] = {}

    big = gpt_profile(96, 12288, 2048, 1)
    c64 = cluster(64, 8)
    results["templates_96x64x8_s"], cpu["templates_96x64x8_s"], ts = timed(
        lambda: plan_templates(big, c64, ft=2, microbatches=512), max(1, min(args.repeat, 3))
    )
    notes["templates_96x64x8_s"] = f"sizes {ts.node_spec.min_nodes}-{ts.node_spec.max_nodes}"

    small = gpt_profile(32, 4096, 2048, 1)
    c32 = cluster(32, 1)
    results["templates_32x32x1_s"], cpu["templates_32x32x1_s"], ts32 = timed(
        lambda: plan_templates(small, c32, ft=1, microbatches=256), args.repeat
    )
    notes["templates_32x32x1_s"] = f"sizes {ts32.node_spec.min_nodes}-{ts32.node_spec.max_nodes}"

    # 1,024 nodes: the 96x8 templates planned for that cluster (not timed here).
    c1024 = cluster(1024, 8)
    ts1024 = plan_templates(big, c1024, ft=2, microbatches=8192)
    nodes = list(range(1024))
    results["instantiate_1024_s"], cpu["instantiate_1024_s"], inst = timed(
        lambda: instantiate(ts1024, big, c1024, nodes, microbatches=8192), args.repeat
    )
    notes["instantiate_1024_s"] = (
        f"{len(inst.pipelines)} pipelines of sizes {sorted({p.template_nodes for p in inst.pipelines})}, "
        f"{len(ts1024.templates)} templates"
    )

    pipelines = [list(p.nodes) for p in inst.pipelines]
    # Two failures in different pipelines, one of them in the largest.
    lost = [pipelines[0][0], pipelines[-1][len(pipelines[-1]) // 2]]
    results["reconfigure_1024_s"], cpu["reconfigure_1024_s"], rec = timed(
        lambda: reconfigure(pipelines, lost, templates=ts1024, profile=big, cluster=c1024, microbatches=8192),
        args.repeat,
    )
    notes["reconfigure_1024_s"] = f"{len(rec.copies)} copies, copy {rec.copy_ms:.0f} ms, lost {lost}"

    print(f"{'case':<22} {'median':>10} {'cpu':>10} {'target':>8}  ok  notes")
    for key, value in results.items():
        ok = "yes" if value < TARGETS_S[key] else "NO"
        print(
            f"{key:<22} {value * 1000:>8.2f}ms {cpu[key] * 1000:>8.2f}ms {TARGETS_S[key] * 1000:>6.0f}ms  {ok:<3} "
            f"{notes[key]}"
        )
    print(json.dumps({k: round(v, 6) for k, v in results.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
