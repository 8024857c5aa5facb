"""Shared pieces of the command-line entry points."""

from __future__ import annotations

import argparse

from oobleck.common.version import version


def base_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """An ArgumentParser with the options every Oobleck command has (--version, --log-level)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    parser.add_argument(
        "--log-level",
        default=None,
        metavar="LEVEL",
        help="DEBUG, INFO, WARNING or ERROR (default: $OOBLECK_LOG_LEVEL or INFO)",
    )
    return parser
