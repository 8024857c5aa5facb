"""``oobleck-master``: the job cluster's master daemon."""

from __future__ import annotations

import sys

from oobleck.common.cli import base_parser
from oobleck.common.logs import setup_logging

DESCRIPTION = """\
The Oobleck master: tracks agents by heartbeat, plans pipelines from templates, keeps the job's
state durable in SQLite and pushes reconfigurations when nodes fail.

The daemon's gRPC and HTTP services are not part of this build yet; this command currently only
reports its version.
"""


def main(argv: list[str] | None = None) -> int:
    parser = base_parser("oobleck-master", DESCRIPTION)
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    print("oobleck-master: the daemon is not available in this build yet", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
