"""Discrete-event simulation of a training cluster under a node add/remove trace: :func:`simulate`.

One :class:`Simulator` subclass per fault-tolerance policy (Oobleck, Varuna, Bamboo). Time is integer
milliseconds. Events are ordered by ``(time, kind)`` with kinds in :class:`Kind` order; see
``sim/README.md`` for the model and the ``--compat`` presets.

The pieces: ``events`` (event kinds and the queue), ``compat`` (the research accidents),
``simulator`` (the shared trace replay: nodes, rendezvous, steps), ``policy_oobleck``,
``policy_varuna`` and ``policy_bamboo`` (each system's policy) and ``results`` (the result and its
time breakdown). This module picks the policy for a run and re-exports the public names.
"""

from __future__ import annotations

import logging

from oobleck.sim.compat import COMPAT_PRESETS, INTENT, RESEARCH, RESEARCH_FIFO, Compat, compat_preset
from oobleck.sim.events import EventQueue, Kind
from oobleck.sim.inputs import SystemInputs, Trace
from oobleck.sim.policy_bamboo import BambooSimulator
from oobleck.sim.policy_oobleck import OobleckSimulator
from oobleck.sim.policy_varuna import VarunaSimulator
from oobleck.sim.results import Breakdown, Result
from oobleck.sim.simulator import Simulator

logger = logging.getLogger(__name__)

SIMULATORS: dict[str, type[Simulator]] = {
    "oobleck": OobleckSimulator,
    "varuna": VarunaSimulator,
    "bamboo": BambooSimulator,
}


def simulate(inputs: SystemInputs, trace: Trace, compat: Compat | str = INTENT) -> Result:
    """Run one system on one trace; deterministic."""
    if isinstance(compat, str):
        compat = compat_preset(compat)
    return SIMULATORS[inputs.system](inputs, trace, compat).run()


__all__ = [
    "COMPAT_PRESETS",
    "INTENT",
    "RESEARCH",
    "RESEARCH_FIFO",
    "SIMULATORS",
    "Breakdown",
    "Compat",
    "EventQueue",
    "Kind",
    "Result",
    "Simulator",
    "compat_preset",
    "simulate",
]
