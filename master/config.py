"""The master's configuration: one validated dataclass, a YAML file, environment and flags.

Precedence (lowest first): field defaults, the YAML ``--config`` file, ``OOBLECK_*`` environment
variables (see :data:`ENV_OVERRIDES`), command-line flags. Every field has a flag named after it
(``heartbeat_timeout_s`` -> ``--heartbeat-timeout-s``).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from oobleck.common import configsrc
from oobleck.common import validate as v
from oobleck.common.tls import split_host_port
from oobleck.common.validate import ConfigError

ENV_STATE_FILE = "OOBLECK_MASTER_STATE_FILE"
ENV_TOKEN_FILE = "OOBLECK_TOKEN_FILE"
ENV_ADMIN_TOKEN_FILE = "OOBLECK_ADMIN_TOKEN_FILE"
ENV_LISTEN = "OOBLECK_MASTER_LISTEN"
ENV_HTTP_LISTEN = "OOBLECK_MASTER_HTTP_LISTEN"
#: Environment variable -> config field.
ENV_OVERRIDES = {
    ENV_STATE_FILE: "state_file",
    ENV_TOKEN_FILE: "token_file",
    ENV_ADMIN_TOKEN_FILE: "admin_token_file",
    ENV_LISTEN: "listen",
    ENV_HTTP_LISTEN: "http_listen",
}

GIB = 1024**3


@dataclass(frozen=True)
class MasterConfig:
    """Everything the master daemon needs. Validated on construction; errors name the field."""

    token_file: str
    admin_token_file: str
    state_file: str = "oobleck-master.db"
    listen: str = "127.0.0.1:0"
    http_listen: str = "127.0.0.1:0"  # empty: no HTTP server
    heartbeat_interval_s: float = 0.5
    heartbeat_timeout_s: float = 2.0
    # Heartbeats per second the master budgets for: beyond heartbeat_budget_per_s *
    # heartbeat_interval_s nodes, new registrations get a longer interval and timeout (the
    # timeout at most 5 s); see membership.heartbeat_terms.
    heartbeat_budget_per_s: float = 5000.0
    session_grace_s: float = 1.0
    coalesce_window_s: float = 0.2
    restart_grace_s: float = 10.0  # after a master restart: time for agents to re-attach
    # After a node registers: time for its agent's session to attach (its heartbeats flow only
    # then). Longer than the heartbeat timeout: a master busy accepting thousands of sessions
    # must not declare nodes dead whose session is still queued.
    attach_timeout_s: float = 10.0
    state_retry_s: float = 1.0  # while the state file cannot be written: how often the write is retried
    token_rotation_grace_s: float = 600.0  # after SIGHUP re-reads new tokens, the old ones stay valid this long
    detect_tick_s: float = 0.05
    start_ack_timeout_s: float = 120.0
    reconfigure_ack_timeout_s: float = 60.0
    # Scale up: spares that have been registered for scale_up_delay_s (so that several nodes
    # coming back together give one reconfiguration) are added to a running plan when the
    # planner's mix for the larger node count uses more nodes. --no-scale-up keeps them spare.
    profile_timeout_s: float = 600.0  # a job spec without `profile:`: the agent's profiling run
    profile_dir: str = ""  # where a job spec's `profile:` may be (default: the state file's directory)
    scale_up: bool = True
    scale_up_delay_s: float = 2.0
    shutdown_grace_s: float = 5.0
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_client_ca_file: str | None = None
    allow_insecure: bool = False
    max_message_bytes: int = 16 * 1024 * 1024
    max_nodes: int = 4096  # live nodes (dead ones do not count)
    dead_node_retention_s: float = 600.0  # dead nodes are listed this long, then purged (events keep them)
    register_rate_per_s: float = 5.0  # registrations per second per peer address, after a burst of
    register_burst: int = 100  # ... this many (a host running many agents, or agents re-registering)
    # Cluster description handed to the planner (per node / per link).
    cpu_memory_bytes_per_slot: int = 8 * GIB
    intra_node_bytes_per_s: float = 100e9
    inter_node_bytes_per_s: float = 10e9
    optimizer_state_factor: float = 4.0
    reserved_bytes: int = 0
    ready_file: str | None = None

    def __post_init__(self) -> None:
        v.string(self.token_file, "token_file")
        v.string(self.admin_token_file, "admin_token_file")
        v.string(self.state_file, "state_file")
        for name in ("listen", "http_listen"):
            value = v.string(getattr(self, name), name, allow_empty=(name == "http_listen"))
            if value:
                try:
                    split_host_port(value)
                except ValueError as exc:
                    raise ConfigError(name, str(exc)) from None
        v.number(self.heartbeat_interval_s, "heartbeat_interval_s", min_value=0.01, max_value=3600)
        v.number(self.heartbeat_timeout_s, "heartbeat_timeout_s", min_value=0.0, exclusive_min=True, max_value=86400)
        if self.heartbeat_timeout_s <= self.heartbeat_interval_s:
            raise ConfigError(
                "heartbeat_timeout_s",
                f"must be greater than heartbeat_interval_s ({self.heartbeat_interval_s:g}), "
                f"got {self.heartbeat_timeout_s:g}",
            )
        v.number(self.heartbeat_budget_per_s, "heartbeat_budget_per_s", min_value=1.0, max_value=1e7)
        v.number(self.session_grace_s, "session_grace_s", min_value=0.0, max_value=3600)
        v.number(self.coalesce_window_s, "coalesce_window_s", min_value=0.0, max_value=60)
        v.number(self.restart_grace_s, "restart_grace_s", min_value=0.0, max_value=3600)
        v.number(self.attach_timeout_s, "attach_timeout_s", min_value=0.0, max_value=3600)
        v.number(self.state_retry_s, "state_retry_s", min_value=0.01, max_value=3600)
        v.number(self.token_rotation_grace_s, "token_rotation_grace_s", min_value=0.0, max_value=7 * 24 * 3600)
        v.number(self.detect_tick_s, "detect_tick_s", min_value=0.001, max_value=10)
        v.number(self.start_ack_timeout_s, "start_ack_timeout_s", min_value=0.0, exclusive_min=True)
        v.number(self.reconfigure_ack_timeout_s, "reconfigure_ack_timeout_s", min_value=0.0, exclusive_min=True)
        v.number(self.profile_timeout_s, "profile_timeout_s", min_value=0.0, exclusive_min=True)
        v.boolean(self.scale_up, "scale_up")
        v.number(self.scale_up_delay_s, "scale_up_delay_s", min_value=0.0, max_value=3600)
        v.number(self.shutdown_grace_s, "shutdown_grace_s", min_value=0.0, max_value=600)
        for name in ("tls_cert_file", "tls_key_file", "tls_client_ca_file", "ready_file"):
            if getattr(self, name) is not None:
                v.string(getattr(self, name), name)
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ConfigError("tls_key_file", "tls_cert_file and tls_key_file must be given together")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ConfigError("tls_client_ca_file", "mTLS needs tls_cert_file and tls_key_file too")
        v.boolean(self.allow_insecure, "allow_insecure")
        v.integer(self.max_message_bytes, "max_message_bytes", min_value=4096, max_value=1 << 30)
        v.integer(self.max_nodes, "max_nodes", min_value=1, max_value=1_000_000)
        v.number(self.dead_node_retention_s, "dead_node_retention_s", min_value=0.0, max_value=365 * 86400)
        v.number(self.register_rate_per_s, "register_rate_per_s", min_value=0.0, exclusive_min=True, max_value=1e6)
        v.integer(self.register_burst, "register_burst", min_value=1, max_value=1_000_000)
        v.integer(self.cpu_memory_bytes_per_slot, "cpu_memory_bytes_per_slot", min_value=1)
        v.number(self.intra_node_bytes_per_s, "intra_node_bytes_per_s", min_value=0.0, exclusive_min=True)
        v.number(self.inter_node_bytes_per_s, "inter_node_bytes_per_s", min_value=0.0, exclusive_min=True)
        v.number(self.optimizer_state_factor, "optimizer_state_factor", min_value=0.0, exclusive_min=True)
        v.integer(self.reserved_bytes, "reserved_bytes", min_value=0)

    @property
    def tls_enabled(self) -> bool:
        return bool(self.tls_cert_file)


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """``--config`` plus one flag per MasterConfig field (default None: 'not given')."""
    configsrc.add_flags(parser, MasterConfig)


def config_from_sources(
    args: argparse.Namespace | None = None,
    *,
    environ: dict[str, str] | None = None,
    file_data: dict[str, Any] | None = None,
) -> MasterConfig:
    """Merge defaults < YAML < environment < flags into a validated :class:`MasterConfig`."""
    return configsrc.from_sources(
        MasterConfig,
        args,
        file_data=file_data,
        environ=environ,
        env_overrides=ENV_OVERRIDES,
        required=("token_file", "admin_token_file"),
    )
