"""Bearer-token authentication for the control plane's gRPC services.

Every RPC carries ``authorization: Bearer <token>`` metadata. The server side is one
:class:`TokenAuthInterceptor` for a ``grpc.aio`` server: it maps each method (by its service
prefix) to the token it needs, compares in constant time and aborts with ``UNAUTHENTICATED``
(logged) when the token is missing or wrong. Methods under ``open_prefixes`` (health,
reflection) need no token.

Client side: :func:`aio_client_interceptors` for ``grpc.aio`` channels, :func:`sync_client_interceptors`
for blocking channels (``grpc.intercept_channel``), or :func:`bearer_metadata` per call. Interceptors
work on plaintext channels as well as TLS ones (call credentials would not on plaintext).
"""

from __future__ import annotations

import hmac
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import grpc

from oobleck.common.files import NotRegularFile, open_regular, read_bounded

log = logging.getLogger(__name__)

AUTH_METADATA_KEY = "authorization"
BEARER_PREFIX = "Bearer "
MAX_TOKEN_BYTES = 4096
MIN_TOKEN_CHARS = 16

#: Services every client may call without a token.
HEALTH_PREFIX = "/grpc.health.v1.Health/"
REFLECTION_PREFIXES = (
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
OPEN_PREFIXES: tuple[str, ...] = (HEALTH_PREFIX, *REFLECTION_PREFIXES)


class TokenFileError(ValueError):
    """A token file is missing, empty or not a single token."""


def read_token_file(path: str | Path) -> str:
    """Read one token from ``path`` (surrounding whitespace stripped). Raises :class:`TokenFileError`
    naming the file for anything but a private regular file holding one token of at least
    ``MIN_TOKEN_CHARS`` characters. The file is opened non-blocking and read up to a bound (a FIFO
    or ``/dev/zero`` named by mistake cannot block or exhaust the reader)."""
    p = Path(path)
    try:
        fd, info = open_regular(p)
    except NotRegularFile:
        raise TokenFileError(f"token file {str(p)!r}: not a regular file") from None
    except OSError as exc:
        raise TokenFileError(f"token file {str(p)!r}: cannot read: {exc.strerror or exc}") from exc
    try:
        if info.st_mode & 0o077:
            raise TokenFileError(
                f"token file {str(p)!r}: readable by others (mode {info.st_mode & 0o777:o}); chmod 600 {str(p)!r}"
            )
        raw = read_bounded(fd, MAX_TOKEN_BYTES)
    except OSError as exc:
        raise TokenFileError(f"token file {str(p)!r}: cannot read: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)
    if len(raw) > MAX_TOKEN_BYTES:
        raise TokenFileError(f"token file {str(p)!r}: larger than {MAX_TOKEN_BYTES} bytes")
    try:
        token = raw.decode("ascii").strip()
    except UnicodeDecodeError as exc:
        raise TokenFileError(f"token file {str(p)!r}: token must be ASCII") from exc
    if not token:
        raise TokenFileError(f"token file {str(p)!r}: empty")
    if any(ch.isspace() for ch in token):
        raise TokenFileError(f"token file {str(p)!r}: must hold one token without inner whitespace")
    if len(token) < MIN_TOKEN_CHARS:
        raise TokenFileError(
            f"token file {str(p)!r}: the token has {len(token)} characters, fewer than {MIN_TOKEN_CHARS} "
            "(use a long random one, e.g. `openssl rand -hex 32`)"
        )
    return token


class RotatingToken:
    """A token file that can be re-read (on SIGHUP): the new token is accepted at once and the
    previous one for ``grace_s`` more, so that clients can move to the new one without a restart."""

    def __init__(self, path: str | Path, grace_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = str(path)
        self.grace_s = grace_s
        self.clock = clock
        self.current = read_token_file(path)
        self.previous: str | None = None
        self._previous_until = 0.0

    def peek(self) -> str:
        """The token in the file now (raises TokenFileError); changes nothing."""
        return read_token_file(self.path)

    def use(self, token: str) -> bool:
        """Make ``token`` (read by :meth:`peek`) current; False when it already was."""
        if token == self.current:
            return False
        self.previous, self._previous_until = self.current, self.clock() + self.grace_s
        self.current = token
        return True

    def accepts(self, given: str | None) -> bool:
        if tokens_equal(given, self.current):
            return True
        return self.previous is not None and self.clock() < self._previous_until and tokens_equal(given, self.previous)


def tokens_equal(given: str | bytes | None, expected: str | bytes) -> bool:
    """Constant-time comparison (``hmac.compare_digest``); ``None`` never matches."""
    if given is None:
        return False
    a = given.encode("utf-8", "replace") if isinstance(given, str) else bytes(given)
    b = expected.encode("utf-8") if isinstance(expected, str) else bytes(expected)
    return hmac.compare_digest(a, b)


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """Per-call metadata carrying ``token``."""
    return ((AUTH_METADATA_KEY, BEARER_PREFIX + token),)


def token_from_metadata(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    """The bearer token in invocation metadata, or None when absent or malformed."""
    for key, value in metadata or ():
        if key.lower() != AUTH_METADATA_KEY:
            continue
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        if isinstance(value, str) and value.startswith(BEARER_PREFIX):
            return value[len(BEARER_PREFIX) :].strip()
        return None
    return None


def _abort_handler(handler: grpc.RpcMethodHandler, method: str, why: str) -> grpc.RpcMethodHandler:
    """A handler of the same arity as ``handler`` that logs the refusal with the peer's address
    and aborts with UNAUTHENTICATED. The request is never parsed (raw bytes): a garbage body from
    a caller without a token is refused as unauthenticated, not as a parse error."""
    message = f"{why} (send metadata 'authorization: Bearer <token>')"

    async def abort_unary(request_or_iterator, context):
        log.warning("rejected %s from %s: %s", method, context.peer(), why)
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def abort_stream(request_or_iterator, context):
        log.warning("rejected %s from %s: %s", method, context.peer(), why)
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator

    kwargs = {"request_deserializer": None, "response_serializer": handler.response_serializer}
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(abort_unary, **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(abort_stream, **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(abort_unary, **kwargs)
    return grpc.stream_stream_rpc_method_handler(abort_stream, **kwargs)


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Requires a bearer token per service.

    ``tokens`` maps a method prefix (``"/oobleck.v1.AdminService/"``) to the token it needs, to a
    zero-argument callable returning it, or to a :class:`RotatingToken`. Methods matching
    ``open_prefixes`` pass without a token; any other method is refused (closed by default).
    ``on_reject(method, peer_hint)`` is called for each refusal (e.g. to count it).
    """

    def __init__(
        self,
        tokens: Mapping[str, str | Callable[[], str]],
        *,
        open_prefixes: Iterable[str] = OPEN_PREFIXES,
        on_reject: Callable[[str, str], None] | None = None,
    ) -> None:
        if not tokens:
            raise ValueError("tokens: at least one service prefix is required")
        self._tokens = dict(tokens)
        self._open = tuple(open_prefixes)
        self._on_reject = on_reject

    def _checker(self, method: str):
        for prefix, tok in self._tokens.items():
            if method.startswith(prefix):
                return tok
        return None

    @staticmethod
    def _accepts(checker, given: str | None) -> bool:
        if isinstance(checker, RotatingToken):
            return checker.accepts(given)
        return tokens_equal(given, checker() if callable(checker) else checker)

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method or ""
        if method.startswith(self._open):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: let gRPC answer UNIMPLEMENTED
            return None
        expected = self._checker(method)
        given = token_from_metadata(handler_call_details.invocation_metadata)
        if expected is not None and self._accepts(expected, given):
            return handler
        why = "missing bearer token" if given is None else "wrong bearer token"
        if expected is None:
            why = "method not open to any token"
        if self._on_reject is not None:
            self._on_reject(method, why)
        return _abort_handler(handler, method, why)


class _AioBearerBase:
    def __init__(self, token: str) -> None:
        self._md = bearer_metadata(token)

    def _details(self, d):
        md = list(d.metadata or ()) + list(self._md)
        return grpc.aio.ClientCallDetails(d.method, d.timeout, md, d.credentials, d.wait_for_ready)


# grpc.aio files each interceptor object under the first kind it matches, so one class per kind.
class _AioBearerUU(_AioBearerBase, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


class _AioBearerUS(_AioBearerBase, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


class _AioBearerSU(_AioBearerBase, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return await continuation(self._details(client_call_details), request_iterator)


class _AioBearerSS(_AioBearerBase, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return await continuation(self._details(client_call_details), request_iterator)


def aio_client_interceptors(token: str) -> list[grpc.aio.ClientInterceptor]:
    """Interceptors for ``grpc.aio.*_channel(..., interceptors=...)`` adding the bearer token."""
    return [cls(token) for cls in (_AioBearerUU, _AioBearerUS, _AioBearerSU, _AioBearerSS)]


class _SyncDetails(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression):
        self.method = method
        self.timeout = timeout
        self.metadata = metadata
        self.credentials = credentials
        self.wait_for_ready = wait_for_ready
        self.compression = compression


class _SyncBearer(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    def __init__(self, token: str) -> None:
        self._md = bearer_metadata(token)

    def _details(self, d):
        md = list(d.metadata or ()) + list(self._md)
        return _SyncDetails(
            d.method, d.timeout, md, d.credentials, getattr(d, "wait_for_ready", None), getattr(d, "compression", None)
        )

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)


def sync_client_interceptors(token: str) -> list[Any]:
    """Interceptors for ``grpc.intercept_channel(channel, *interceptors)`` adding the bearer token."""
    return [_SyncBearer(token)]
