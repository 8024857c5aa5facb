"""Text that came from another process (a node's failure reason, a worker's error, an event
message), made safe to store, log and print: control characters cannot forge a log line or drive
a terminal."""

from __future__ import annotations

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape_control(text: str, limit: int | None = None) -> str:
    """``text`` with every non-printable character (C0 and C1 controls, DEL, ANSI escapes, line
    and paragraph separators, ...) written as ``\\n``, ``\\t``, ``\\xNN`` or ``\\uNNNN``, and
    backslashes kept as they are; cut to ``limit`` characters (with "...") when longer."""
    out = []
    for ch in text:
        if ch.isprintable():
            out.append(ch)
        elif ch in _NAMED:
            out.append(_NAMED[ch])
        elif ord(ch) < 0x100:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(f"\\u{ord(ch):04x}" if ord(ch) < 0x10000 else f"\\U{ord(ch):08x}")
    escaped = "".join(out)
    if limit is not None and len(escaped) > limit:
        escaped = escaped[: max(0, limit - 3)] + "..."
    return escaped
