"""``--compat``: which accidents of the published (research) simulators a run reproduces.

:data:`INTENT` (the default) follows the documented behaviour; :data:`RESEARCH` reproduces every
accident and :data:`RESEARCH_FIFO` all but the heap tie order. See ``sim/README.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

from oobleck.sim.inputs import SimInputError


@dataclass(frozen=True)
class Compat:
    """Which accidents of the published (research) simulators to reproduce.

    - ``heap_ties``: events with equal ``(time, kind)`` come out in binary-heap array order instead of
      the order they were scheduled in (FIFO).
    - ``array_checkpoint_check`` (Varuna, research bookkeeping only): a checkpoint fails when any
      pending removal precedes the checkpoint's completion event in the heap *array*, whatever their
      times; otherwise it fails when a removal is due before that event.
    - ``second_rendezvous_stops``: every failure pushes its own rendezvous completion and every
      completion re-packs the participant list and empties it, so a second completion still pending (a
      second failure inside the window) finds nobody and stops training although enough nodes are
      alive; a participant lost before completion restarts the rendezvous for a full timeout from the
      completion time. Intent: one rendezvous, re-armed from the latest failure.
    - ``legacy_bookkeeping``: the research simulators' accounting. Steps keep completing at the old
      rate until a rendezvous or restart completes (the step in flight then is lost); a node removed
      while still booting triggers a reconfiguration / restart (Bamboo: a slowdown); the average runs
      to the last step completion instead of the end of the trace and credits each non-zeroed step's
      segment. Varuna checkpoints after every step that follows a removal (during the restart window,
      on the old configuration), its checkpoint completion event is ``2 * checkpoint_s`` after the
      step, a failed checkpoint zeroes the latest ``k`` steps, and a rollback zeroes the steps whose
      segment starts at or after the last checkpoint. Bamboo never decrements its count of waiting
      nodes and slows down even when an idle node is lost. An out-of-memory Oobleck configuration runs
      an endless step instead of stopping.
    """

    name: str
    heap_ties: bool = False
    array_checkpoint_check: bool = False
    second_rendezvous_stops: bool = False
    legacy_bookkeeping: bool = False


INTENT = Compat("intent")
RESEARCH = Compat("research", True, True, True, True)
# The research simulators with FIFO tie-breaking only: the variant the published README quotes
# (GPT-3-6_7b Varuna on 10m: 0.255 -> 1.02 samples/s).
RESEARCH_FIFO = Compat("research-fifo", False, True, True, True)
COMPAT_PRESETS = {c.name: c for c in (INTENT, RESEARCH, RESEARCH_FIFO)}


def compat_preset(name: str) -> Compat:
    try:
        return COMPAT_PRESETS[name]
    except KeyError:
        raise SimInputError(f"compat: must be one of {', '.join(COMPAT_PRESETS)}, got {name!r}") from None


__all__ = ["COMPAT_PRESETS", "INTENT", "RESEARCH", "RESEARCH_FIFO", "Compat", "compat_preset"]
