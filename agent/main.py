"""``oobleck-agent``: the per-node agent daemon."""

from __future__ import annotations

import asyncio
import logging
import sys

from oobleck.common.auth import TokenFileError, read_token_file
from oobleck.common.cli import base_parser
from oobleck.common.logs import setup_logging
from oobleck.common.validate import ConfigError

log = logging.getLogger(__name__)

DESCRIPTION = """\
The Oobleck agent: one per node; registers with the master, spawns and supervises one worker
per GPU (or CPU slot) and relays the master's reconfigurations to them.

Every field of the YAML --config file can be overridden by the flag of the same name.
Workers get $OOBLECK_AGENT_SOCKET, $OOBLECK_NODE_ID, $OOBLECK_SLOT and $OOBLECK_WORK_DIR and
talk to the agent through oobleck.worker.agent_link. SIGTERM stops the workers and exits 0.
"""


def build_parser():
    from oobleck.agent.config import add_config_arguments

    parser = base_parser("oobleck-agent", DESCRIPTION)
    add_config_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    from oobleck.agent.config import CONFIG_FIELDS, config_from_sources

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        setup_logging(args.log_level)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        config = config_from_sources(args.config, {name: getattr(args, name) for name in CONFIG_FIELDS})
        token = read_token_file(config.token_file)
    except (ConfigError, TokenFileError) as exc:
        print(f"oobleck-agent: {exc}", file=sys.stderr)
        return 2

    from oobleck.agent.daemon import Agent  # imports grpc and the protos: after argument checks

    agent = Agent(config, token)
    try:
        return asyncio.run(agent.run())
    except BaseException:
        agent.emergency_cleanup()
        raise


if __name__ == "__main__":
    sys.exit(main())
