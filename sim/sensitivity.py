"""How much each reproduced accident of the published simulators moves the results."""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable, Iterable

from oobleck.sim.engine import INTENT, RESEARCH, Compat, simulate
from oobleck.sim.inputs import CLOUD_TRACES, FREQUENCY_TRACES, SYSTEMS, load_trace, model_names, system_inputs

FLAGS = ("heap_ties", "array_checkpoint_check", "second_rendezvous_stops", "legacy_bookkeeping")


@dataclasses.dataclass(frozen=True)
class Change:
    system: str
    variant: str  # a flag turned off in the research preset, or "intent" (all off)
    median_abs: float  # relative change, as a fraction (cases where both are 0 are left out)
    largest: float  # signed relative change of largest magnitude (inf: 0 became > 0)
    where: str  # model and trace of the largest change


def variants() -> dict[str, Compat]:
    out = {flag: dataclasses.replace(RESEARCH, name=f"research-without-{flag}", **{flag: False}) for flag in FLAGS}
    out["intent"] = INTENT
    return out


def sensitivity(
    progress: Callable[[Iterable], Iterable] | None = None,
    *,
    models: Iterable[str] | None = None,
    traces: Iterable[str] | None = None,
) -> list[Change]:
    traces = list(traces) if traces is not None else [*FREQUENCY_TRACES, *CLOUD_TRACES.values()]
    models = list(models) if models is not None else model_names()
    loaded = {t: load_trace(t) for t in traces}
    cases = [(s, m, t) for s in SYSTEMS for m in models for t in traces]
    moved: dict[tuple[str, str], list[tuple[float, str]]] = {}
    for system, model, trace in progress(cases) if progress else cases:
        inputs = system_inputs(model, system)
        ref = simulate(inputs, loaded[trace], RESEARCH).throughput_sps
        for name, compat in variants().items():
            new = simulate(inputs, loaded[trace], compat).throughput_sps
            if ref > 0:
                moved.setdefault((system, name), []).append(((new - ref) / ref, f"{model} {trace}"))
            elif new > 0:
                moved.setdefault((system, name), []).append((float("inf"), f"{model} {trace}"))
            # both 0 (a model the system cannot train): not counted
    changes = []
    for (system, name), values in moved.items():
        largest = max(values, key=lambda v: abs(v[0]))
        median = statistics.median(abs(v) for v, _ in values)
        changes.append(Change(system, name, median, largest[0], largest[1]))
    return changes


def format_changes(changes: list[Change]) -> str:
    lines = [f"{'system':<8} {'research without':<26} {'median':>8} {'largest':>9}  where"]
    for c in changes:
        largest = "+inf" if c.largest == float("inf") else f"{100 * c.largest:+.1f}%"
        lines.append(f"{c.system:<8} {c.variant:<26} {100 * c.median_abs:7.1f}% {largest:>9}  {c.where}")
    return "\n".join(lines)
