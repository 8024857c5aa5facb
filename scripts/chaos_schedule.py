"""The chaos drill's seeded choices (pure): when each fault event happens and whom it hits.

Everything here draws from the drill's ``random.Random(--seed)`` only, so a seed names one schedule
(``tests/e2e/test_chaos.py`` checks these without a cluster).
"""

from __future__ import annotations

import random

from oobleck.protos.v1 import admin_pb2

CHECKPOINT_INTERVAL = 5  # the drill's job checkpoints every this many steps
FAULT_KINDS = ("kill", "overkill", "master", "freeze")


def choose_victims(rng: random.Random, pipelines: list[list[int]], ft: int) -> list[int]:
    """1..ft plan nodes whose loss the job absorbs in place: some pipeline keeps all its nodes
    and at least two plan nodes survive. Empty when no node can go."""
    nodes = sorted(n for p in pipelines for n in p)
    for count in range(rng.randint(1, max(1, ft)), 0, -1):
        for _ in range(50):
            victims = sorted(rng.sample(nodes, count)) if count <= len(nodes) else []
            if not victims:
                break
            intact = any(not set(p) & set(victims) for p in pipelines)
            if intact and len(nodes) - count >= 2:
                return victims
    return []


def choose_during_reconfiguration(
    rng: random.Random, old: list[list[int]], new: list[list[int]], dead: list[int]
) -> int | None:
    """One more node to kill while the master installs ``new`` (after ``dead`` died out of
    ``old``), or None: survivors may still carry the old generation's layers or the new one's,
    so a pipeline of each must stay intact, and two plan nodes must remain."""
    nodes = sorted(n for p in new for n in p)
    rng.shuffle(nodes)
    for n in nodes:
        gone = {*dead, n}
        if (
            any(not set(p) & gone for p in old)
            and any(n not in p for p in new)
            and len([m for p in new for m in p if m not in gone]) >= 2
        ):
            return n
    return None


def kill_steps(rng: random.Random, steps: int, kills: int) -> list[int]:
    """``kills`` distinct steps in [2, steps - 4], in order (fewer when the job is too short)."""
    candidates = list(range(2, max(2, steps - 4)))
    return sorted(rng.sample(candidates, min(kills, len(candidates))))


def fault_schedule(rng: random.Random, steps: int, count: int, kinds: list[str]) -> list[tuple[int, str]]:
    """``count`` (step, kind) events at distinct steps in order, each of ``kinds`` at least once;
    with ``master`` among them, half the schedules end with the master killed on one of the last
    steps (the job may finish while it is down). Empty when ``count`` is 0."""
    if count == 0:
        return []
    if count < len(kinds):
        raise ValueError(f"--kills {count} is fewer than the {len(kinds)} fault kinds of --faults")
    at = kill_steps(rng, steps, count)
    if len(at) < count:
        raise ValueError(f"--steps {steps} leaves room for {len(at)} fault events, not {count}")
    chosen = list(kinds) + [rng.choice(kinds) for _ in range(count - len(kinds))]
    rng.shuffle(chosen)
    pinned = None  # an event that must stay where it is
    if "master" in kinds and rng.random() < 0.5:  # the master goes down on one of the last steps
        i = chosen.index("master")
        chosen[i], chosen[-1] = chosen[-1], chosen[i]
        at[-1] = max(at[-2] + 1 if count > 1 else 2, steps - rng.randint(1, 3))
        pinned = count - 1
    # An overkill restores the latest checkpoint: place it after the first one where possible.
    for i, kind in enumerate(chosen):
        if kind == "overkill" and at[i] <= CHECKPOINT_INTERVAL:
            later = [
                j
                for j in range(i + 1, count)
                if j != pinned and at[j] > CHECKPOINT_INTERVAL and chosen[j] != "overkill"
            ]
            if later:
                chosen[i], chosen[later[0]] = chosen[later[0]], chosen[i]
    return list(zip(at, chosen, strict=True))


def layer_holders(plan: admin_pb2.Plan | None, pipelines: list[list[int]]) -> dict[int, set[int]]:
    """Layer -> the plan nodes holding it, from the plan's templates (stage ranges by node index)."""
    by_size = {t.num_nodes: t for t in plan.templates}
    out: dict[int, set[int]] = {}
    for nodes in pipelines:
        for stage in by_size[len(nodes)].stages:
            for layer in range(stage.layer_start, stage.layer_end):
                out.setdefault(layer, set()).add(nodes[stage.node_index])
    return out


def choose_overkill(rng: random.Random, plan, pipelines: list[list[int]], ft: int) -> list[int]:
    """More than ``ft`` plan nodes: every holder of one random layer (so that layer loses every
    copy and the job must restore its checkpoint), topped up with random others, at least one
    node left. Empty when the plan cannot lose that many."""
    nodes = sorted(n for p in pipelines for n in p)
    holders = layer_holders(plan, pipelines)
    victims = set(holders[rng.choice(sorted(holders))])
    others = [n for n in nodes if n not in victims]
    rng.shuffle(others)
    while len(victims) <= ft and others:
        victims.add(others.pop())
    if len(victims) <= ft or len(victims) >= len(nodes):
        return []
    return sorted(victims)


__all__ = [
    "CHECKPOINT_INTERVAL",
    "FAULT_KINDS",
    "choose_during_reconfiguration",
    "choose_overkill",
    "choose_victims",
    "fault_schedule",
    "kill_steps",
    "layer_holders",
]
