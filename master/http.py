"""The master's HTTP side (aiohttp): ``/metrics`` (Prometheus), ``/api/status`` (JSON), ``/healthz``."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from oobleck.common.tls import split_host_port

MAX_REQUEST_BYTES = 64 * 1024


def make_app(server: Any) -> web.Application:
    master = server.master

    async def metrics(request: web.Request) -> web.Response:
        body = master.metrics.render()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def status(request: web.Request) -> web.Response:
        return web.json_response(master.status_dict())

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    app = web.Application(client_max_size=MAX_REQUEST_BYTES)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/api/status", status)
    app.router.add_get("/healthz", healthz)
    return app


async def start_http(server: Any, listen: str) -> tuple[web.AppRunner, int]:
    """Serve on ``listen`` (port 0 allowed); returns the runner and the bound port."""
    host, port = split_host_port(listen)
    runner = web.AppRunner(make_app(server), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise OSError(f"http_listen {listen}: cannot bind ({exc.strerror or exc})") from None
    bound = runner.addresses[0][1]
    return runner, bound
