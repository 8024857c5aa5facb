"""The one place that calls into the C extension and turns status codes into exceptions."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from oobleck.planner._native import ffi, lib
from oobleck.planner.errors import (
    InfeasibleError,
    InvalidInputError,
    PlannerError,
    PlannerInternalError,
    PlannerMemoryError,
)

_ERRORS: dict[int, type[PlannerError]] = {
    lib.OBK_EINVAL: InvalidInputError,
    lib.OBK_EINFEASIBLE: InfeasibleError,
    lib.OBK_ENOMEM: PlannerMemoryError,
}


def call(fn: Callable[..., int], *args: Any) -> None:
    """Call ``fn(*args, err, err_len)``; raise the mapped exception with the C message on failure.

    cffi releases the GIL for the duration of the call, so several threads may plan at once.
    """
    err = ffi.new("char[]", lib.OBK_ERR_LEN)
    status = fn(*args, err, lib.OBK_ERR_LEN)
    if status == lib.OBK_OK:
        return
    message = ffi.string(err).decode("utf-8", errors="replace") or f"planner status {status}"
    raise _ERRORS.get(status, PlannerInternalError)(message, code=status)


def native_version() -> str:
    """Version string compiled into the C library."""
    return ffi.string(lib.obk_version()).decode()


def new(ctype: str, init: Any = None) -> Any:
    return ffi.new(ctype, init)
