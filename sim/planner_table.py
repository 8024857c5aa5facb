"""Oobleck's throughput table from our own planner instead of the published measurements.

For every live node count ``n`` in ``1..max_nodes`` the planner instantiates pipelines from the
templates planned for the largest cluster; the table holds ``B * microbatch_size / iteration``.
Counts the planner cannot use (too few nodes, or no layout fits in memory) get throughput 0, which
the simulator treats as "cannot train here".
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from oobleck.sim.inputs import SimInputError, SystemInputs

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlannerTable:
    throughput_sps: dict[int, float]
    batch_samples: float
    min_nodes: int
    iteration_ms: dict[int, float]


def _planner() -> Any:
    try:
        import oobleck.planner as planner  # lazy: the simulator works without the native planner
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise SimInputError(f"planner: oobleck.planner is not available ({exc})") from exc
    return planner


def _cluster_class(planner: Any) -> Any:
    cluster = getattr(planner, "Cluster", None)
    if cluster is None:
        from oobleck.planner.types import Cluster as cluster
    return cluster


def planner_table(
    profile: Any,
    cluster: Any,
    *,
    microbatches: int,
    ft: int = 0,
    max_nodes: int = 30,
    min_nodes: int | None = None,
) -> PlannerTable:
    """Plan templates once for ``max_nodes`` nodes and instantiate them for every smaller count."""
    planner = _planner()
    if max_nodes < 1:
        raise SimInputError(f"max_nodes: must be >= 1, got {max_nodes}")
    base = cluster.to_dict() if hasattr(cluster, "to_dict") else dict(cluster)
    base["nodes"] = max_nodes
    full = _cluster_class(planner).from_dict(base)
    templates = planner.plan_templates(profile, full, ft=ft, microbatches=microbatches, min_nodes=min_nodes)
    batch_samples = float(microbatches * profile.microbatch_size)
    table: dict[int, float] = {}
    iteration: dict[int, float] = {}
    for n in range(1, max_nodes + 1):
        try:
            inst = planner.instantiate(templates, profile, full, list(range(n)), microbatches=microbatches)
        except planner.PlannerError as exc:
            logger.debug("no plan on %d nodes: %s", n, exc)
            table[n] = 0.0
            continue
        if inst.degraded or not inst.pipelines or inst.iteration_ms <= 0:
            table[n] = 0.0
            continue
        iteration[n] = float(inst.iteration_ms)
        table[n] = batch_samples / (inst.iteration_ms / 1000)
    usable = [n for n, v in table.items() if v > 0]
    if not usable:
        raise SimInputError(f"planner: no node count in 1..{max_nodes} has a feasible plan")
    return PlannerTable(table, batch_samples, min(usable), iteration)


def planner_system_inputs(
    profile_path: str | Path,
    cluster_path: str | Path,
    *,
    microbatches: int,
    ft: int = 0,
    max_nodes: int = 30,
    reconfiguration_s: float = 10.0,
    node_startup_s: float = 45.0,
) -> SystemInputs:
    """Oobleck inputs for the user's own model: throughput table from a profile and a cluster file."""
    planner = _planner()
    profile = planner.load_profile(profile_path)
    try:
        with open(cluster_path, encoding="utf-8") as f:
            cluster = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise SimInputError(f"cluster: cannot read {cluster_path} ({exc})") from exc
    table = planner_table(profile, cluster, microbatches=microbatches, ft=ft, max_nodes=max_nodes)
    return SystemInputs(
        system="oobleck",
        batch_samples=table.batch_samples,
        throughput_sps=table.throughput_sps,
        reconfiguration_s=reconfiguration_s,
        min_nodes=table.min_nodes,
        node_startup_s=node_startup_s,
        source=f"planner:{profile.model}",
    )
