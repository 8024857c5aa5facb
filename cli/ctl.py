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
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    from oobleck.cli.admin import add_admin_commands

    add_admin_commands(subparsers)
    from oobleck.cli.plan import add_plan_command

    add_plan_command(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if getattr(args, "func", None) is not None:
        return args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
