"""Installing a generation, as a pure function: which nodes change state and which get a command.

Every way a plan comes into force -- the first plan of a job, a reconfiguration after deaths or
drains, a scale-up onto spares, the restore of a paused job -- is one call of :func:`install`
with the nodes' states, the plan in force (none for a first plan or a restore) and the new one:
- nodes of the new plan that were not in the old one join: ``alive``, and get ``start``;
- nodes of the old plan that stay (not ``left`` behind: dead or drained) get ``reconfigure``,
  also those the new plan leaves out (their agents stop their workers; they become spares);
- nodes being drained become ``draining`` and get ``drain``;
- for a job's first plan, the other live nodes are its spares (``spares_reason``).
Ending or pausing a job is :func:`release`. The caller persists the result and the commands in
one transaction before anything is sent (``Master._install``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from oobleck.master.states import NodeState

LEFT_OUT = "left out of the new plan"
NOT_IN_PLAN = "not in the plan"
DRAINED_BY_OPERATOR = "drained by operator"


@dataclass(frozen=True)
class Install:
    moves: tuple[tuple[int, NodeState, str], ...]  # (node, new state, reason), in a fixed order
    commands: tuple[tuple[int, str], ...]  # (node, "start" | "reconfigure" | "drain")

    def nodes(self, kind: str) -> list[int]:
        return [n for n, k in self.commands if k == kind]


def install(
    states: Mapping[int, str],
    old_plan: Sequence[int],
    new_plan: Sequence[int],
    *,
    left: Iterable[int] = (),
    drain: Iterable[int] = (),
    spares_reason: str | None = None,
) -> Install:
    """The transition that puts ``new_plan`` (node ids, in plan order) in force where
    ``old_plan`` was; ``states`` holds every known node's state (id order). With
    ``spares_reason``, every other live node becomes a spare for that reason."""
    old, new, left = list(old_plan), set(new_plan), set(left)
    moves: list[tuple[int, NodeState, str]] = []
    draining = sorted(n for n in drain if states.get(n) not in (None, NodeState.DEAD))
    for n in draining:
        moves.append((n, NodeState.DRAINING, DRAINED_BY_OPERATOR))
    staying = [n for n in old if n not in left]
    for n in staying:
        if n not in new and states.get(n) == NodeState.ALIVE:
            moves.append((n, NodeState.SPARE, LEFT_OUT))
    joining = [n for n in new_plan if n not in set(old)]
    for n in joining:
        moves.append((n, NodeState.ALIVE, ""))
    if spares_reason is not None:
        for n, state in states.items():
            if n not in new and state in (NodeState.ALIVE, NodeState.SPARE):
                moves.append((n, NodeState.SPARE, spares_reason))
    commands = [(n, "reconfigure") for n in staying if states.get(n) != NodeState.DEAD]
    commands += [(n, "start") for n in joining]
    commands += [(n, "drain") for n in draining]
    return Install(tuple(moves), tuple(commands))


def release(
    states: Mapping[int, str], plan: Sequence[int], reason: str, released: Iterable[NodeState] = (NodeState.ALIVE,)
) -> Install:
    """The job ends or pauses: the plan's nodes in a ``released`` state become spares and get
    ``stop``."""
    released = set(released)
    nodes = [n for n in plan if states.get(n) in released]
    return Install(tuple((n, NodeState.SPARE, reason) for n in nodes), tuple((n, "stop") for n in nodes))
