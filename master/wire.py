"""Validation at the gRPC edge: every field of a request is checked (bounds, sizes, no control
characters in names) before the master sees it, and every refusal becomes one status with a
message naming the field (never a traceback)."""

from __future__ import annotations

import logging
import math

import grpc

from oobleck.common.auth import TokenFileError
from oobleck.common.text import escape_control
from oobleck.master.records import MasterError

log = logging.getLogger(__name__)

MAX_NAME_CHARS = 253
MAX_TEXT_CHARS = 1024


class Invalid(Exception):
    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")


def check_distinct_tokens(agent_token: str, admin_token: str) -> None:
    if agent_token == admin_token:
        raise TokenFileError(
            "token_file and admin_token_file hold the same token: every agent could act as an operator; "
            "give each role its own token"
        )


def text_field(value: str, field: str, *, max_chars: int = MAX_NAME_CHARS, allow_empty: bool = False) -> str:
    if not value and not allow_empty:
        raise Invalid(field, "must not be empty")
    if len(value) > max_chars:
        raise Invalid(field, f"at most {max_chars} characters, got {len(value)}")
    if any(not ch.isprintable() for ch in value):
        raise Invalid(field, "must not contain control characters")
    return value


def free_text(value: str, max_chars: int = MAX_TEXT_CHARS) -> str:
    """Free text a node sends (a reason, an error, a detail): control characters escaped (a
    worker's traceback has line breaks; an attacker's may have terminal escapes), cut to size."""
    return escape_control(value, max_chars)


def json_field(value: str, field: str, max_chars: int) -> str:
    """A JSON document (line breaks allowed; parsed where it is used)."""
    if len(value) > max_chars:
        raise Invalid(field, f"at most {max_chars} characters, got {len(value)}")
    return value


def int_field(value: int, field: str, lo: int, hi: int) -> int:
    if not lo <= value <= hi:
        raise Invalid(field, f"must be in {lo}..{hi}, got {value}")
    return value


def finite_field(value: float, field: str, lo: float = -math.inf) -> float:
    if math.isnan(value) and field.endswith("loss"):
        return value  # a diverging loss is a fact to report, not a bad request
    if not math.isfinite(value) or value < lo:
        raise Invalid(field, f"must be a finite number >= {lo:g}, got {value!r}")
    return value


def status_details(message: str) -> str:
    # Status details travel as UTF-8: escape what cannot be encoded (lone surrogates from input
    # echoed in an error message) rather than failing to send the status at all.
    return message.encode("utf-8", "backslashreplace").decode("utf-8")[:4096]


async def abort_with(context: grpc.aio.ServicerContext, exc: Exception) -> None:
    if isinstance(exc, Invalid):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, status_details(str(exc)))
    if isinstance(exc, MasterError):
        await context.abort(getattr(grpc.StatusCode, exc.code), status_details(exc.message))
    log.exception("internal error", exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}")


def peer_identity(context) -> str:
    """The verified client certificate's identity under mTLS (its subject alternative names, or
    its common name); "" without a client certificate. A node is bound to it at registration."""
    try:
        auth = context.auth_context() or {}
    except Exception:
        return ""
    sans = sorted(v.decode("utf-8", "backslashreplace") for v in auth.get("x509_subject_alternative_name", []))
    if sans:
        return "SAN:" + ",".join(sans)
    cns = [v.decode("utf-8", "backslashreplace") for v in auth.get("x509_common_name", [])]
    return "CN:" + cns[0] if cns else ""
