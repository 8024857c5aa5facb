"""Versions: the package version, and the agent<->master protocol version with its skew rule.

The protocol version changes only when a message changes incompatibly. The rule: **upgrade the
master first, then the agents.** A master accepts agents that speak its protocol version or up
to ``OLDEST_AGENT_PROTOCOL`` (one version behind once there is a second one); an agent newer
than its master is refused with a message naming both versions, and keeps retrying its
registration (with backoff) until the master is upgraded. Package versions are exchanged too:
a difference is logged and shown (``oobleckctl nodes``), never refused.
"""

from __future__ import annotations

from importlib import metadata

PROTOCOL_VERSION = 1  # the agent<->master protocol this package speaks
OLDEST_AGENT_PROTOCOL = 1  # the oldest agent protocol a master of this package accepts


def version() -> str:
    try:
        return metadata.version("oobleck")
    except metadata.PackageNotFoundError:  # running from a source tree without install
        return "0+unknown"


def agent_protocol_problem(agent_protocol: int, agent_version: str = "") -> str | None:
    """Why this master cannot serve an agent speaking ``agent_protocol`` (0: an agent from before
    versions were exchanged, i.e. protocol 1), or None when it can."""
    protocol = agent_protocol or 1
    who = f"agent {agent_version or '(version unknown)'} speaks protocol {protocol}"
    if protocol > PROTOCOL_VERSION:
        return f"{who}, this master ({version()}) speaks {PROTOCOL_VERSION}: upgrade the master first, then the agents"
    if protocol < OLDEST_AGENT_PROTOCOL:
        accepted = f"{OLDEST_AGENT_PROTOCOL}..{PROTOCOL_VERSION}"
        return f"{who}, this master ({version()}) accepts protocols {accepted}: upgrade the agent"
    return None
