"""The agent's configuration: one YAML file (``--config``) whose every field a flag overrides.

Field names are the YAML keys; flags are the same names with dashes (``liveness_timeout_s`` ->
``--liveness-timeout-s``). Every error is a :class:`~oobleck.common.validate.ConfigError` naming
the field.
"""

from __future__ import annotations

import argparse
import shlex
import socket
import sys
from dataclasses import dataclass, field, fields
from typing import Any

from oobleck.common import configsrc
from oobleck.common import validate as v
from oobleck.common.tls import is_loopback_host, split_host_port
from oobleck.common.validate import ConfigError

#: Longest path a Unix socket address may have on Linux (sun_path is 108 bytes, NUL included).
MAX_UNIX_SOCKET_PATH = 107


@dataclass
class AgentConfig:
    """Validated agent settings. Times are in seconds (``_s``)."""

    master: str
    token_file: str
    node_name: str = ""  # default: this host's name
    slots: int = 1
    address: str = ""  # host other nodes use to reach this node; default: 127.0.0.1 for a loopback master
    store_port: int = 0  # the rendezvous store's port (bound on ``address``); 0: an ephemeral port
    work_dir: str = ""  # default: a fresh private temporary directory
    worker_command: str = ""  # default: "<this python> -m oobleck.worker"
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    allow_insecure: bool = False
    liveness_timeout_s: float = 5.0
    startup_timeout_s: float = 120.0  # a new worker may take this long to be ready (import, join, restore)
    leave_timeout_s: float = 30.0  # SIGTERM: how long to wait for the master to drain this node
    stop_timeout_s: float = 10.0  # SIGTERM -> this deadline -> SIGKILL
    stop_grace_s: float = 2.0  # a Stop command: time for workers to exit on their own before SIGTERM
    profile_timeout_s: float = 600.0  # the master's Profile command: longest profiling run
    probe_interval_s: float = 0.1  # how often workers are probed
    reconnect_max_backoff_s: float = 2.0
    rpc_timeout_s: float = 5.0  # deadline of unary calls to the master
    ready_file: str | None = None
    worker_argv: tuple[str, ...] = field(init=False, default=())

    def __post_init__(self) -> None:
        v.string(self.master, "master")
        try:
            host, port = split_host_port(self.master)
        except ValueError as exc:
            raise ConfigError("master", str(exc)) from None
        if port == 0:
            raise ConfigError("master", f"port must be 1..65535, got 0 in {self.master!r}")
        v.string(self.token_file, "token_file")
        if self.node_name == "":
            self.node_name = socket.gethostname()
        v.string(self.node_name, "node_name")
        if len(self.node_name) > 253 or any(ch.isspace() for ch in self.node_name):
            raise ConfigError("node_name", f"must be at most 253 characters without spaces, got {self.node_name!r}")
        v.integer(self.slots, "slots", min_value=1, max_value=64)
        if self.address == "":
            self.address = "127.0.0.1" if is_loopback_host(host) else socket.getfqdn()
        v.string(self.address, "address")
        v.integer(self.store_port, "store_port", min_value=0, max_value=65535)
        v.string(self.work_dir, "work_dir", allow_empty=True)
        v.string(self.worker_command, "worker_command", allow_empty=True)
        if self.worker_command.strip():
            try:
                argv = tuple(shlex.split(self.worker_command))
            except ValueError as exc:
                raise ConfigError("worker_command", f"cannot split {self.worker_command!r}: {exc}") from None
        else:
            argv = (sys.executable, "-m", "oobleck.worker")
        self.worker_argv = argv
        for name in ("tls_ca_file", "tls_cert_file", "tls_key_file", "ready_file"):
            value = getattr(self, name)
            if value is not None:
                v.string(value, name)
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ConfigError(
                "tls_cert_file",
                f"tls_cert_file and tls_key_file go together, got {self.tls_cert_file!r} and {self.tls_key_file!r}",
            )
        v.boolean(self.allow_insecure, "allow_insecure")
        if not self.tls and not self.allow_insecure and not is_loopback_host(host):
            raise ConfigError(
                "master",
                f"plaintext to {self.master!r} is allowed only on loopback; set tls_ca_file or allow_insecure",
            )
        v.number(self.liveness_timeout_s, "liveness_timeout_s", min_value=0.05, max_value=3600)
        v.number(self.startup_timeout_s, "startup_timeout_s", min_value=0.05, max_value=24 * 3600)
        v.number(self.stop_timeout_s, "stop_timeout_s", min_value=0.0, max_value=3600)
        v.number(self.stop_grace_s, "stop_grace_s", min_value=0.0, max_value=3600)
        v.number(self.leave_timeout_s, "leave_timeout_s", min_value=0.0, max_value=24 * 3600)
        v.number(self.profile_timeout_s, "profile_timeout_s", min_value=0.0, exclusive_min=True)
        v.number(self.probe_interval_s, "probe_interval_s", min_value=0.01, max_value=60)
        if self.probe_interval_s > self.liveness_timeout_s:
            raise ConfigError(
                "probe_interval_s",
                f"must be <= liveness_timeout_s ({self.liveness_timeout_s:g}), got {self.probe_interval_s:g}",
            )
        v.number(self.reconnect_max_backoff_s, "reconnect_max_backoff_s", min_value=0.01, max_value=600)
        v.number(self.rpc_timeout_s, "rpc_timeout_s", min_value=0.1, exclusive_min=False, max_value=600)

    @property
    def tls(self) -> bool:
        """TLS to the master is on when any TLS file is configured."""
        return bool(self.tls_ca_file or self.tls_cert_file)

    @property
    def worker_heartbeat_interval_s(self) -> float:
        """What workers are told to use: a few heartbeats fit in one liveness timeout."""
        return max(0.02, min(1.0, self.liveness_timeout_s / 5))


#: Fields a user may set (YAML key or flag); ``worker_argv`` is derived.
CONFIG_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(AgentConfig) if f.init)
_HELP = {
    "master": "master's AgentService address HOST:PORT",
    "token_file": "file holding the agent bearer token",
    "node_name": "this node's name (default: the host name)",
    "slots": "workers on this node: GPUs, or CPU slots (default 1)",
    "address": "host other nodes use to reach this node's rendezvous store; the store listens only there "
    "when it is one address of this host (default: 127.0.0.1 for a loopback master, else the FQDN)",
    "store_port": "port of this node's rendezvous store, to open in a firewall (default 0: an ephemeral port)",
    "work_dir": "directory for the worker socket and worker files (default: a private temp dir)",
    "worker_command": 'command line of one worker (default: "python -m oobleck.worker")',
    "tls_ca_file": "CA bundle that verifies the master's certificate (turns TLS on)",
    "tls_cert_file": "client certificate for mTLS (with --tls-key-file)",
    "tls_key_file": "client key for mTLS",
    "allow_insecure": "allow plaintext to a non-loopback master",
    "liveness_timeout_s": "a worker whose heartbeat is silent this long is hung (default 5)",
    "startup_timeout_s": "time a new worker has to get ready (start, join, restore) before its heartbeat "
    "counts (default 120)",
    "leave_timeout_s": "on SIGTERM (a pre-emption notice), how long to wait for the master to drain this node "
    "before stopping its workers anyway; 0 stops at once (default 30)",
    "stop_timeout_s": "SIGTERM to SIGKILL deadline when stopping workers (default 10)",
    "stop_grace_s": "on a Stop command, time for workers to exit on their own before SIGTERM (default 2)",
    "profile_timeout_s": "longest profiling run for the master's Profile command (default 600)",
    "probe_interval_s": "worker probe period (default 0.1)",
    "reconnect_max_backoff_s": "longest wait between reconnection attempts (default 2)",
    "rpc_timeout_s": "deadline of Register calls (default 5)",
    "ready_file": 'write JSON {"pid", "node_id", "store_port"} here once registered',
}


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config`` plus one flag per field; flags default to "not given"."""
    configsrc.add_flags(parser, AgentConfig, _HELP)


def config_from_sources(config_file: str | None, overrides: dict[str, Any]) -> AgentConfig:
    """Merge the YAML file (if any) with flag values (``None`` = not given) and validate."""
    args = argparse.Namespace(**{k: val for k, val in overrides.items() if k in CONFIG_FIELDS})
    return configsrc.from_sources(AgentConfig, args, config_file=config_file, required=("master", "token_file"))
