"""Prometheus metrics of one master, in its own registry (never the process-global one)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from oobleck.master.progress import REASONS

PHASES = ("detect", "plan", "notify", "regroup", "copy", "resume")
NODE_STATES = ("alive", "spare", "draining", "drained", "dead")


class MasterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.nodes = Gauge("oobleck_nodes", "Registered nodes by state", ["state"], registry=r)
        self.nodes_alive = Gauge("oobleck_nodes_alive", "Nodes alive (in the plan or spare)", registry=r)
        self.generation = Gauge("oobleck_generation", "Current plan generation", registry=r)
        self.step = Gauge("oobleck_step", "Last training step reported", registry=r)
        self.samples_per_s = Gauge("oobleck_samples_per_second", "Training throughput (samples/s)", registry=r)
        self.loss = Gauge("oobleck_loss", "Last reported training loss", registry=r)
        self.reconfigurations = Counter(
            "oobleck_reconfigurations", "Reconfigurations started (new plan generations)", registry=r
        )
        self.phase_seconds = Histogram(
            "oobleck_reconfiguration_phase_seconds",
            "Duration of each reconfiguration phase",
            ["phase"],
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120),
            registry=r,
        )
        self.auth_failures = Counter("oobleck_auth_failures", "RPCs refused for a missing or wrong token", registry=r)
        self.state_store_ok = Gauge(
            "oobleck_state_store_ok",
            "1 while the master can write its state file; 0 while writes fail (state changes are refused)",
            registry=r,
        )
        self.state_write_failures = Counter(
            "oobleck_state_write_failures",
            "Writes of the state file that failed (disk full, read-only, I/O)",
            registry=r,
        )
        self.state_store_ok.set(1)
        self.degraded = Gauge(
            "oobleck_degraded",
            "1 while the running job has fewer than ft+1 pipelines or leaves live nodes idle (see the degraded event)",
            registry=r,
        )
        self.reports_ignored = Counter(
            "oobleck_step_reports_ignored",
            "Step reports that did not count (stale generation, a node outside the plan, a step beyond the "
            "job's steps or not after the generation's start)",
            ["reason"],
            registry=r,
        )
        self.loop_lag = Gauge(
            "oobleck_master_loop_lag_seconds",
            "How late the master's detector ran recently (event loop backlog); heartbeat silence is judged "
            "only beyond the timeout plus this",
            registry=r,
        )
        self.nodes_purged = Counter(
            "oobleck_nodes_purged", "Dead nodes forgotten after dead_node_retention_s", registry=r
        )
        self.registrations_refused = Counter(
            "oobleck_registrations_refused",
            "Registrations refused because their peer exceeded the per-peer rate limit",
            registry=r,
        )
        for reason in REASONS:
            self.reports_ignored.labels(reason=reason)
        for state in NODE_STATES:
            self.nodes.labels(state=state).set(0)
        for phase in PHASES:
            self.phase_seconds.labels(phase=phase)

    def set_node_counts(self, counts: dict[str, int]) -> None:
        for state in NODE_STATES:
            self.nodes.labels(state=state).set(counts.get(state, 0))
        self.nodes_alive.set(sum(counts.get(state, 0) for state in ("alive", "spare", "draining", "drained")))

    def observe_phases(self, durations_s: dict[str, float]) -> None:
        for phase, seconds in durations_s.items():
            if phase in PHASES and seconds >= 0:
                self.phase_seconds.labels(phase=phase).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
