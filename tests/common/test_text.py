"""Control characters in text from other processes are escaped, never passed through."""

from oobleck.common.text import escape_control


def test_control_characters_are_escaped_and_text_kept() -> None:
    forged = (
        "boom\x1b[31m\n2026-12-03 12:00:00 INFO oobleck.master.core: event job_succeeded\r\x00\x7f\x85\u2028 ok é 日本"
    )
    got = escape_control(forged)
    assert all(ch.isprintable() for ch in got)
    assert got == (
        "boom\\x1b[31m\\n2026-12-03 12:00:00 INFO oobleck.master.core: event job_succeeded\\r\\x00\\x7f\\x85\\u2028"
        " ok é 日本"
    )
    assert escape_control("plain text, tabs\tand C:\\paths") == "plain text, tabs\\tand C:\\paths"
    assert escape_control("x" * 50, limit=10) == "xxxxxxx..."
    assert escape_control("\n" * 20, limit=10) == "\\n\\n\\n\\..."
