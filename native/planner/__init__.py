"""Typed Python interface to the C planner (``native/``).

Everything here is plain dataclasses and exceptions; cffi types never leave this package.
The raw extension ``oobleck.planner._native`` is private.
"""

from oobleck.planner.errors import (
    InfeasibleError,
    InvalidInputError,
    PlannerError,
)
from oobleck.planner.instantiate import distribute_batch, instantiate
from oobleck.planner.native import native_version
from oobleck.planner.profile import (
    PROFILE_FORMAT,
    LayerProfile,
    Profile,
    load_profile,
    parse_profile,
    validate_profile,
)
from oobleck.planner.reconfigure import reconfigure, reconfigure_pipelines, scale_up
from oobleck.planner.templates import plan_templates

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
    "plan_templates",
    "validate_profile",
    "distribute_batch",
    "instantiate",
    "reconfigure",
    "reconfigure_pipelines",
    "scale_up",
]
