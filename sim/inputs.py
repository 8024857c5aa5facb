"""Simulator inputs: per-model, per-system measurements and node add/remove traces.

The bundled files in ``data/`` come from the SOSP'23 Oobleck artifact (see ``data/NOTICE.md``).
Times here are integer milliseconds (``*_ms``) unless a name says seconds (``*_s``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DATA_DIR = Path(__file__).resolve().parent / "data"
PAPER_INPUTS = DATA_DIR / "paper-inputs.json"
TRACE_DIR = DATA_DIR / "traces"

SYSTEMS = ("oobleck", "varuna", "bamboo")
# The failure-frequency traces of the published throughput-vs-frequency figure, least to most frequent.
FREQUENCY_TRACES = ("6h", "3h", "1h", "30m", "10m")
# The real spot-instance traces (scaled to 30 nodes) of the GCP / EC2 comparison.
CLOUD_TRACES = {"GCP": "scale_gcp-trace", "EC2": "scale_p3-trace"}


class SimInputError(ValueError):
    """A bad model, trace or system input; the message names the field or file."""


@dataclass(frozen=True)
class SystemInputs:
    """What one system needs to simulate one model.

    ``throughput_sps`` maps a live node count to samples/s; counts beyond the table's range use the
    nearest end (as the published simulators do). A throughput of 0 means the model does not fit in
    memory at that node count: the system cannot train there.
    """

    system: str
    batch_samples: float
    throughput_sps: dict[int, float]
    reconfiguration_s: float = 0.0  # oobleck: reconfiguration; bamboo: local rendezvous
    restart_s: float = 0.0  # bamboo: global rendezvous; varuna: restart before any table lookup
    restart_s_by_nodes: dict[int, float] | None = None  # varuna: restart by node count (BERT-large)
    global_rendezvous_s: float = 0.0  # start-up rendezvous (oobleck, varuna)
    checkpoint_s: float = 0.0  # varuna
    checkpoint_interval_steps: int = 0  # varuna
    slowdown_factor: float = 1.0  # bamboo failover slowdown
    redundancy_overhead_fraction: float = 1.0  # bamboo: share of step time that is not redundant work
    no_rollback: bool = False  # varuna with the GCP/EC2 script's `no_small_model_fallback` (research only)
    min_nodes: int = 12
    stages_per_pipeline: int = 12
    node_startup_s: float = 45.0
    source: str = "paper"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.system not in SYSTEMS:
            raise SimInputError(f"system: must be one of {', '.join(SYSTEMS)}, got {self.system!r}")
        if not self.batch_samples > 0:
            raise SimInputError(f"batch_samples: must be > 0, got {self.batch_samples!r}")
        if not self.throughput_sps:
            raise SimInputError("throughput_sps: empty table")
        for n, v in self.throughput_sps.items():
            if not isinstance(n, int) or n < 1:
                raise SimInputError(f"throughput_sps: node counts must be integers >= 1, got {n!r}")
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise SimInputError(f"throughput_sps[{n}]: must be a finite number >= 0, got {v!r}")
        for name in ("reconfiguration_s", "restart_s", "global_rendezvous_s", "checkpoint_s", "node_startup_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise SimInputError(f"{name}: must be a finite number >= 0, got {value!r}")
        if self.system == "varuna" and self.checkpoint_interval_steps < 1:
            raise SimInputError(f"checkpoint_interval_steps: must be >= 1, got {self.checkpoint_interval_steps}")
        if self.min_nodes < 1 or self.stages_per_pipeline < 1:
            raise SimInputError(
                f"min_nodes / stages_per_pipeline: must be >= 1, got {self.min_nodes} / {self.stages_per_pipeline}"
            )
        if self.slowdown_factor < 1:
            raise SimInputError(f"slowdown_factor: must be >= 1, got {self.slowdown_factor}")

    def _clamped(self, table: dict[int, Any], nodes: int) -> Any:
        n = min(max(nodes, min(table)), max(table))
        return table[n] if n in table else table[_nearest(table, n)]

    def throughput_at(self, nodes: int) -> float:
        return float(self._clamped(self.throughput_sps, nodes))

    def step_ms(self, nodes: int) -> int | None:
        """Step time on ``nodes`` live nodes, truncated to whole ms; None when out of memory."""
        tput = self.throughput_at(nodes)
        if tput <= 0:
            return None
        return int(self.batch_samples / tput * 1000)

    def restart_s_at(self, nodes: int | None) -> float:
        if self.restart_s_by_nodes is None or nodes is None:
            return self.restart_s
        return float(self._clamped(self.restart_s_by_nodes, nodes))


def _nearest(table: dict[int, Any], nodes: int) -> int:
    return min(table, key=lambda k: (abs(k - nodes), k))


def _table(raw: dict[str, Any], where: str) -> dict[int, float]:
    try:
        return {int(k): float(v) for k, v in raw.items()}
    except (TypeError, ValueError) as exc:
        raise SimInputError(f"{where}: expected a table of node count -> number ({exc})") from exc


def load_paper_inputs(path: str | Path = PAPER_INPUTS) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise SimInputError(f"{path}: cannot read simulator inputs ({exc})") from exc


def model_names(data: dict[str, Any] | None = None) -> list[str]:
    data = load_paper_inputs() if data is None else data
    return list(data["models"])


def system_inputs(model: str, system: str, data: dict[str, Any] | None = None) -> SystemInputs:
    """The published measurements of ``system`` on ``model`` (a key of ``models``)."""
    data = load_paper_inputs() if data is None else data
    models = data.get("models", {})
    if model not in models:
        raise SimInputError(f"model: unknown model {model!r} (known: {', '.join(models)})")
    if system not in SYSTEMS:
        raise SimInputError(f"system: must be one of {', '.join(SYSTEMS)}, got {system!r}")
    m = models[model][system]
    where = f"models.{model}.{system}"
    common = {
        "system": system,
        "batch_samples": float(m["global_batch_size_samples"]),
        "throughput_sps": _table(m["throughput_samples_per_s_by_active_nodes"], f"{where}.throughput"),
        "min_nodes": int(m.get("min_nodes_to_train", 12)),
        "node_startup_s": float(m.get("node_startup_delay_s", 45.0)),
        "source": f"paper:{model}",
    }
    if system == "oobleck":
        return SystemInputs(
            **common,
            reconfiguration_s=float(m["reconfiguration_s"]),
            global_rendezvous_s=float(m["reconfiguration_components_s"]["global_rendezvous_timeout_s"]),
            stages_per_pipeline=int(m.get("stages_per_pipeline_for_node_assignment", 12)),
        )
    if system == "bamboo":
        return SystemInputs(
            **common,
            reconfiguration_s=float(m["reconfiguration_s"]),
            restart_s=float(m["restart_s"]),
            global_rendezvous_s=float(m["restart_s"]),
            slowdown_factor=float(m["fallback_slowdown_factor"]),
            redundancy_overhead_fraction=float(m["redundancy_overhead_fraction"]),
            stages_per_pipeline=int(m.get("stages_per_pipeline", 12)),
        )
    by_nodes = m.get("restart_s_by_active_nodes")
    return SystemInputs(
        **common,
        restart_s=float(m["restart_s_before_first_rendezvous"]),
        restart_s_by_nodes=_table(by_nodes, f"{where}.restart_s_by_active_nodes") if by_nodes else None,
        checkpoint_s=float(m["checkpoint_s"]),
        checkpoint_interval_steps=int(m["checkpoint_interval_iterations"]),
        extra={
            "rollback_disabled_when_no_small_model_fallback": bool(
                m["rollback_disabled_when_no_small_model_fallback_flag"]
            )
        },
    )


@dataclass(frozen=True)
class TraceEvent:
    time_ms: int
    action: str  # "add" | "remove"
    node: str


@dataclass(frozen=True)
class Trace:
    name: str
    events: tuple[TraceEvent, ...]

    @property
    def end_ms(self) -> int:
        """The hard stop: the run ends at the first event at or after the last row's time."""
        return self.events[-1].time_ms


def trace_names() -> list[str]:
    return sorted(p.stem for p in TRACE_DIR.glob("*.csv"))


def parse_trace(text: str, name: str) -> Trace:
    events = []
    last = -1
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 3:
            raise SimInputError(f"{name}:{lineno}: expected 'time_ms,add|remove,node', got {line!r}")
        try:
            t = int(float(parts[0]))
        except ValueError:
            raise SimInputError(f"{name}:{lineno}: time_ms: not a number: {parts[0]!r}") from None
        if t < 0:
            raise SimInputError(f"{name}:{lineno}: time_ms: must be >= 0, got {t}")
        if t < last:
            raise SimInputError(f"{name}:{lineno}: time_ms: rows must be sorted by time ({t} after {last})")
        if parts[1] not in ("add", "remove"):
            raise SimInputError(f"{name}:{lineno}: action: must be 'add' or 'remove', got {parts[1]!r}")
        last = t
        events.append(TraceEvent(t, parts[1], parts[2]))
    if not events:
        raise SimInputError(f"{name}: trace has no events")
    return Trace(name, tuple(events))


def load_trace(name_or_path: str | Path) -> Trace:
    """A bundled trace by name (``10m``, ``scale_gcp-trace``, ``gcp``, ``ec2``) or a CSV file path."""
    key = str(name_or_path)
    aliases = {k.lower(): v for k, v in CLOUD_TRACES.items()}
    key = aliases.get(key.lower(), key)
    bundled = TRACE_DIR / f"{key}.csv"
    path = bundled if bundled.is_file() else Path(name_or_path)
    if not path.is_file():
        raise SimInputError(
            f"trace: {name_or_path!r} is neither a file nor a bundled trace (bundled: {', '.join(trace_names())})"
        )
    return parse_trace(path.read_text(encoding="utf-8"), path.stem)
