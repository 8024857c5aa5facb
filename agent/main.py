"""``oobleck-agent``: the per-node agent daemon."""

from __future__ import annotations

import sys

from oobleck.common.cli import base_parser
from oobleck.common.logs import setup_logging

DESCRIPTION = """\
The Oobleck agent: one per node; registers with the master, spawns and supervises one worker
per GPU (or CPU slot) and relays the master's reconfigurations to them.

The agent daemon is not part of this build yet; this command currently only
reports its version.
"""


def main(argv: list[str] | None = None) -> int:
    parser = base_parser("oobleck-agent", DESCRIPTION)
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    print("oobleck-agent: the daemon is not available in this build yet", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
