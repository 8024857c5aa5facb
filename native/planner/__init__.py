"""Typed Python interface to the C planner (``native/``).

Everything here is plain dataclasses and exceptions; cffi types never leave this package.
The raw extension ``oobleck.planner._native`` is private.
"""

from oobleck.planner.errors import (
    InfeasibleError,
    InvalidInputError,
    PlannerError,
)
from oobleck.planner.native import native_version
from oobleck.planner.profile import (
    PROFILE_FORMAT,
    LayerProfile,
    Profile,
    load_profile,
    parse_profile,
    validate_profile,
)

__all__ = [
    "PROFILE_FORMAT",
    "InfeasibleError",
    "InvalidInputError",
    "LayerProfile",
    "PlannerError",
    "Profile",
    "load_profile",
    "native_version",
    "parse_profile",
    "validate_profile",
]
