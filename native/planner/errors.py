"""Exceptions raised by the planner wrapper.

C status codes map to exception classes; the message is the C side's own error text.
"""

from __future__ import annotations


class PlannerError(Exception):
    """Base class of every planner failure. ``code`` is the C status (0 for Python-side errors)."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class InvalidInputError(PlannerError, ValueError):
    """An input (profile, cluster, argument) is malformed or out of range."""


class InfeasibleError(PlannerError):
    """The inputs are valid but no plan satisfies the constraints."""


class PlannerMemoryError(PlannerError, MemoryError):
    """The C planner could not allocate memory."""


class PlannerInternalError(PlannerError, RuntimeError):
    """An unexpected status from the C planner (a bug)."""
