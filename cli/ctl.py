"""``oobleckctl``: the operators' admin client."""

from __future__ import annotations

import sys

from oobleck.common.cli import base_parser
from oobleck.common.logs import setup_logging

DESCRIPTION = """\
Administer an Oobleck job cluster.
"""


def build_parser():
    parser = base_parser("oobleckctl", DESCRIPTION)
    parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
