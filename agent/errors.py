"""The exceptions that steer the agent: those that end it on purpose, and a refused command."""

from __future__ import annotations


class AgentStop(Exception):
    """Ends the agent on purpose (its owner knows what it means): never wrapped as a task failure."""


class KillRequested(AgentStop):
    """The master's Kill drill: exit with status 1 without acking."""


class ShutdownRequested(AgentStop):
    """SIGTERM / SIGINT."""


class FatalError(AgentStop):
    """The agent cannot go on (e.g. the master refuses its token): exit with status 1."""


class TaskFailed(FatalError):
    """One of the agent's tasks raised: it cannot be trusted to go on, so the agent stops."""


class CommandError(Exception):
    """A command the agent refuses; the message (naming the field) becomes the nack's error."""


class SessionBroken(Exception):
    """The session stream ended; re-register."""
