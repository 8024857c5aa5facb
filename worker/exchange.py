"""The exchange plan of a new generation: from what every rank carries to what happens.

A pure function of the facts every rank gathers at the start of a generation (one all-gather
of :class:`RankFacts`, in rank order) and of the layers each rank holds under the new plan:

- whether the job is *fresh* (no rank carries training state: every process is new);
- the training position the generation resumes from (:func:`choose_position`);
- the *roll-forward* set: ranks that apply a step their peers committed while its vote failed
  on them (they kept the step's gradients);
- the ranks whose carried layers are dropped (carried at another position than the chosen one);
- the layer copies ``(layer, source rank, destination rank)``, in one global order.

Every rank computes the same plan from the same facts, so the copies need no further agreement
and cannot deadlock. Why the workers decide the copies rather than the master's planner: see
docs/worker.md, "Layer copies on reconfiguration". No torch here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


class LayersLost(RuntimeError):
    """No process carries some layer any more: restore from a checkpoint."""

    def __init__(self, layers: list[int]) -> None:
        super().__init__(f"no surviving copy of layers {layers}: restore from checkpoint")
        self.layers = layers


@dataclass(frozen=True)
class RankFacts:
    """What one rank brings into a generation (nothing, for a new process)."""

    layers: Mapping[int, int] = field(default_factory=dict)  # carried layer -> bytes (no gradients)
    position: dict | None = None  # the committed DataPosition (as a dict); None: carries nothing
    voted: dict | None = None  # a step whose vote failed here, gradients kept: {"step", "after"}
    commit: dict | None = None  # the last step committed here: {"step", "sq_total"}


@dataclass(frozen=True)
class RollForward:
    """A rank applies the step at ``step_index`` (0-based) with the global squared gradient norm
    ``sq_total`` its peers committed it with."""

    step_index: int
    sq_total: float


@dataclass(frozen=True)
class Copy:
    layer: int
    src: int  # rank
    dst: int  # rank


@dataclass(frozen=True)
class ExchangePlan:
    fresh: bool  # no rank carries training state: keep the initial layers
    position: dict | None = None  # the position to resume from
    rolled: Mapping[int, RollForward] = field(default_factory=dict)
    dropped: frozenset[int] = frozenset()  # ranks whose carried layers are discarded
    split: bool = False  # ranks carry different positions (a peer died while a step was committed)
    steps: tuple[int, ...] = ()  # the distinct steps carried
    copies: tuple[Copy, ...] = ()


def _key(position: dict) -> str:
    return json.dumps(position, sort_keys=True)


def choose_position(everyone: Sequence[RankFacts], num_layers: int) -> dict | None:
    """The training position a new generation resumes from, given what every rank carries.

    Normally every carrier is at the same position. A peer dying while the commit vote of a step
    completes can leave some ranks past that step and others not (the vote is one all-reduce);
    then the newest position at which every layer is still carried by some rank wins (the step is
    kept when a whole pipeline committed it, rolled back otherwise), and layers carried at other
    positions are discarded. None when no position has every layer.
    """
    by_key: dict[str, tuple[dict, set[int]]] = {}
    for e in everyone:
        if e.position:
            by_key.setdefault(_key(e.position), (e.position, set()))[1].update(int(i) for i in e.layers)
    ordered = sorted(by_key.values(), key=lambda pl: (pl[0]["step"], pl[0].get("samples", 0)), reverse=True)
    if len(ordered) == 1:
        return ordered[0][0]
    for position, layers in ordered:
        if layers >= set(range(num_layers)):
            return position
    return None


def plan_exchange(everyone: Sequence[RankFacts], needs: Sequence[Sequence[int]], num_layers: int) -> ExchangePlan:
    """The plan for facts ``everyone`` and ``needs[r]``, the layers rank ``r`` holds under the new
    plan. Raises :class:`LayersLost` when some needed layer has no usable copy."""
    if not any(e.position for e in everyone):
        return ExchangePlan(fresh=True)
    # A step some ranks committed while others lost the end of its vote: those with their
    # gradients kept apply it now, and carry the position after it.
    committed = {e.commit["step"]: e.commit["sq_total"] for e in everyone if e.commit}
    rolled: dict[int, RollForward] = {}
    facts = list(everyone)
    for r, e in enumerate(facts):
        v = e.voted
        if v and e.position and v["step"] in committed and e.position["step"] == v["step"] - 1:
            rolled[r] = RollForward(step_index=e.position["step"], sq_total=committed[v["step"]])
            facts[r] = RankFacts(layers=e.layers, position=v["after"])
    chosen = choose_position(facts, num_layers)
    if chosen is None:  # a split commit and no position with every layer: restore from a checkpoint
        newest = max((e for e in facts if e.position), key=lambda e: e.position["step"]).position
        held = {int(i) for e in facts if e.position == newest for i in e.layers}
        raise LayersLost(sorted(set(range(num_layers)) - held))
    steps = tuple(sorted({e.position["step"] for e in facts if e.position}))
    split = len({_key(e.position) for e in facts if e.position}) > 1
    dropped = frozenset(r for r, e in enumerate(facts) if split and e.position and e.position != chosen)
    carried = [{} if r in dropped else {int(i): b for i, b in e.layers.items()} for r, e in enumerate(facts)]
    return ExchangePlan(
        fresh=False,
        position=chosen,
        rolled=rolled,
        dropped=dropped,
        split=split,
        steps=steps,
        copies=plan_copies(carried, needs),
    )


def plan_copies(carried: Sequence[Mapping[int, int]], needs: Sequence[Sequence[int]]) -> tuple[Copy, ...]:
    """Copies that give every rank the layers it needs: for each rank in order, each missing
    layer in order, from the rank that carries it and has sent the fewest bytes so far (ties:
    the lowest rank). Raises :class:`LayersLost` naming every layer no rank carries."""
    sent: dict[int, int] = {}
    copies: list[Copy] = []
    missing: set[int] = set()
    for dst, layers in enumerate(needs):
        for layer in layers:
            if layer in carried[dst]:
                continue
            sources = [r for r, held in enumerate(carried) if layer in held]
            if not sources:
                missing.add(layer)
                continue
            src = min(sources, key=lambda r: (sent.get(r, 0), r))
            sent[src] = sent.get(src, 0) + carried[src][layer]
            copies.append(Copy(layer, src, dst))
    if missing:
        raise LayersLost(sorted(missing))
    return tuple(copies)
