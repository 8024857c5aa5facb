"""The master's HTTP side (aiohttp): ``/metrics`` (Prometheus), ``/api/status`` (JSON), ``/healthz``.

The same transport rule as gRPC: plaintext only on loopback (or with ``allow_insecure``), TLS
with the master's certificate otherwise. Off loopback ``/api/status`` (node names, addresses,
the job) needs the admin token (``Authorization: Bearer <token>``); ``/metrics`` and
``/healthz`` stay open for scrapers and probes.
"""

from __future__ import annotations

import ssl
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from oobleck.common.auth import BEARER_PREFIX
from oobleck.common.tls import check_plaintext_allowed, check_server_files, is_loopback_host, split_host_port

MAX_REQUEST_BYTES = 64 * 1024


def make_app(server: Any, *, admin_only_status: bool = False) -> web.Application:
    master = server.master

    async def metrics(request: web.Request) -> web.Response:
        body = master.metrics.render()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def status(request: web.Request) -> web.Response:
        if admin_only_status:
            header = request.headers.get("Authorization", "")
            given = header[len(BEARER_PREFIX) :] if header.startswith(BEARER_PREFIX) else None
            if not server.admin_token_accepts(given):
                master.metrics.auth_failures.inc()
                return web.json_response(
                    {"error": "the admin token is required (Authorization: Bearer <token>)"}, status=401
                )
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
    cfg = server.config
    host, port = split_host_port(listen)
    context = None
    if cfg.tls_enabled:
        check_server_files(cfg.tls_cert_file, cfg.tls_key_file)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cfg.tls_cert_file, cfg.tls_key_file)
    else:
        check_plaintext_allowed(listen, cfg.allow_insecure, what="http_listen")
    app = make_app(server, admin_only_status=not is_loopback_host(host))
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=context)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise OSError(f"http_listen {listen}: cannot bind ({exc.strerror or exc})") from None
    bound = runner.addresses[0][1]
    return runner, bound
