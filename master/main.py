"""``oobleck-master``: the job cluster's master daemon."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from oobleck.common.auth import TokenFileError
from oobleck.common.cli import base_parser
from oobleck.common.logs import setup_logging
from oobleck.common.tls import InsecureTransportError, TlsConfigError
from oobleck.common.validate import ConfigError
from oobleck.master.config import ENV_OVERRIDES, add_config_flags, config_from_sources
from oobleck.master.store import StoreError

log = logging.getLogger(__name__)

DESCRIPTION = """\
The Oobleck master: tracks agents by heartbeat, plans pipelines from templates, keeps the job's
state durable in SQLite and pushes reconfigurations when nodes fail.

gRPC (AgentService, AdminService, grpc.health.v1, reflection) on --listen; HTTP (/metrics,
/api/status, /healthz) on --http-listen. Every flag overrides the field of the same name in the
--config YAML file. Environment: """ + ", ".join(f"{k} ({v})" for k, v in ENV_OVERRIDES.items())


def build_parser():
    parser = base_parser("oobleck-master", DESCRIPTION)
    add_config_flags(parser)
    return parser


async def _serve(config, planner=None) -> None:
    from oobleck.master.service import MasterServer

    server = MasterServer(config, planner=planner)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.request_stop)
    loop.add_signal_handler(signal.SIGHUP, server.request_token_reload)
    await server.run()


def main(argv: list[str] | None = None, *, planner=None) -> int:
    """Entry point; ``planner`` replaces ``oobleck.planner`` (tests only)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    try:
        config = config_from_sources(args)
    except ConfigError as exc:
        print(f"oobleck-master: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(_serve(config, planner))
    except (TokenFileError, TlsConfigError, InsecureTransportError, OSError, StoreError) as exc:
        print(f"oobleck-master: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
