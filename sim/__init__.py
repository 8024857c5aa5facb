"""``oobleck.sim``: a discrete-event simulator comparing fault-tolerance policies under node traces."""

from oobleck.sim.engine import (
    COMPAT_PRESETS,
    INTENT,
    RESEARCH,
    RESEARCH_FIFO,
    Breakdown,
    Compat,
    Result,
    compat_preset,
    simulate,
)
from oobleck.sim.inputs import (
    SYSTEMS,
    SimInputError,
    SystemInputs,
    Trace,
    TraceEvent,
    load_trace,
    model_names,
    parse_trace,
    system_inputs,
)

__all__ = [
    "COMPAT_PRESETS",
    "INTENT",
    "RESEARCH",
    "RESEARCH_FIFO",
    "SYSTEMS",
    "Breakdown",
    "Compat",
    "Result",
    "SimInputError",
    "SystemInputs",
    "Trace",
    "TraceEvent",
    "compat_preset",
    "load_trace",
    "model_names",
    "parse_trace",
    "simulate",
    "system_inputs",
]
