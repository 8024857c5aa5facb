"""``oobleck-launch``: submit a job, or run a whole local cluster on this machine."""

from __future__ import annotations

import sys

from oobleck.common.cli import base_parser
from oobleck.common.logs import setup_logging

DESCRIPTION = """\
Launch an Oobleck training job.

Running jobs is not part of this build yet; this command currently only reports its version.
"""


def main(argv: list[str] | None = None) -> int:
    parser = base_parser("oobleck-launch", DESCRIPTION)
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    print("oobleck-launch: launching jobs is not available in this build yet", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
