"""TLS / mTLS credentials from files, the loopback-only plaintext rule, and channel factories.

Server: :func:`server_credentials` (mTLS when a client CA is given) and :func:`add_port`, which
binds TLS or, only on loopback or with ``allow_insecure``, plaintext, and returns the bound port.
Client: :func:`aio_channel` / :func:`sync_channel` build a channel with the bearer-token
interceptor, explicit message-size limits and retries on ``UNAVAILABLE`` (service config).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from oobleck.common.auth import aio_client_interceptors, sync_client_interceptors

log = logging.getLogger(__name__)

#: Default gRPC message size limit (both directions), set explicitly on servers and channels.
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024


class InsecureTransportError(ValueError):
    """Plaintext requested on a non-loopback address without allow_insecure."""


class TlsConfigError(ValueError):
    """A TLS file is missing or the combination of files is incomplete."""


def split_host_port(address: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` -> (host, port). Raises ValueError naming the problem."""
    address = address.strip()
    if address.startswith("["):
        host, sep, rest = address[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"address {address!r}: expected [IPv6]:PORT")
        port_text = rest[1:]
    else:
        host, sep, port_text = address.rpartition(":")
        if not sep:
            raise ValueError(f"address {address!r}: expected HOST:PORT")
    if not host:
        raise ValueError(f"address {address!r}: empty host")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"address {address!r}: port {port_text!r} is not an integer") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"address {address!r}: port must be in 0..65535, got {port}")
    return host, port


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_loopback_host(host: str) -> bool:
    """True for ``localhost``, 127.0.0.0/8 and ::1 (names other than localhost are not resolved)."""
    host = host.strip("[]")
    if host.lower() in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_plaintext_allowed(address: str, allow_insecure: bool, *, what: str = "listen address") -> None:
    """Raise :class:`InsecureTransportError` unless plaintext on ``address`` is allowed."""
    host, _ = split_host_port(address)
    if allow_insecure or is_loopback_host(host):
        return
    raise InsecureTransportError(
        f"{what} {address!r}: plaintext is allowed only on loopback; configure TLS "
        "(certificate and key files) or pass allow_insecure explicitly"
    )


def _read(path: str | Path, field: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise TlsConfigError(f"{field}: cannot read {str(path)!r}: {exc.strerror or exc}") from exc


@dataclass(frozen=True)
class ServerTls:
    """Server TLS files; ``client_ca_file`` turns on mTLS (client certificates required)."""

    cert_file: str
    key_file: str
    client_ca_file: str | None = None


_warned_validity: set[tuple[str, float]] = set()


def check_server_files(cert_file: str, key_file: str, client_ca_file: str | None = None) -> None:
    """Load the server's certificate chain and key (and the client CA) the way a TLS server
    would: a file that is not PEM, a key that does not match the certificate, ... raise
    TlsConfigError naming the file. An expired certificate (or one not valid yet) is logged."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert_file, key_file)
    except (ssl.SSLError, OSError) as exc:
        raise TlsConfigError(f"tls_cert_file {cert_file} / tls_key_file {key_file}: not a usable pair: {exc}") from None
    if client_ca_file:
        try:
            context.load_verify_locations(client_ca_file)
        except (ssl.SSLError, OSError) as exc:
            raise TlsConfigError(f"tls_client_ca_file {client_ca_file}: not usable: {exc}") from None
    try:
        decoded = ssl._ssl._test_decode_cert(cert_file)  # the stdlib's own PEM decoder
        not_after = ssl.cert_time_to_seconds(decoded["notAfter"])
        not_before = ssl.cert_time_to_seconds(decoded["notBefore"])
    except (AttributeError, KeyError, ValueError, ssl.SSLError, OSError):
        return
    if (cert_file, not_after) in _warned_validity:  # once per certificate (gRPC and HTTPS load it)
        return
    now = time.time()
    if not not_before <= now <= not_after:
        _warned_validity.add((cert_file, not_after))
    if now > not_after:
        log.warning("tls_cert_file %s expired on %s: clients will refuse it", cert_file, decoded["notAfter"])
    elif now < not_before:
        log.warning("tls_cert_file %s is not valid before %s", cert_file, decoded["notBefore"])


def server_credentials(cert_file: str, key_file: str, client_ca_file: str | None = None) -> grpc.ServerCredentials:
    check_server_files(cert_file, key_file, client_ca_file)
    cert = _read(cert_file, "tls_cert_file")
    key = _read(key_file, "tls_key_file")
    if client_ca_file:
        ca = _read(client_ca_file, "tls_client_ca_file")
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)
    return grpc.ssl_server_credentials([(key, cert)])


def channel_credentials(
    ca_file: str | None = None, cert_file: str | None = None, key_file: str | None = None
) -> grpc.ChannelCredentials:
    """Client TLS: ``ca_file`` verifies the server (system roots when None); cert+key for mTLS."""
    if bool(cert_file) != bool(key_file):
        raise TlsConfigError("tls_cert_file and tls_key_file must be given together")
    ca = _read(ca_file, "tls_ca_file") if ca_file else None
    cert = _read(cert_file, "tls_cert_file") if cert_file else None
    key = _read(key_file, "tls_key_file") if key_file else None
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def add_port(server, address: str, *, tls: ServerTls | None, allow_insecure: bool) -> int:
    """Bind ``address`` on a grpc(.aio) server with TLS or (checked) plaintext; return the port.
    Raises OSError naming the address (in use, not local) or TlsConfigError naming a TLS file."""
    try:
        if tls is not None:
            creds = server_credentials(tls.cert_file, tls.key_file, tls.client_ca_file)
            port = server.add_secure_port(address, creds)
        else:
            check_plaintext_allowed(address, allow_insecure)
            port = server.add_insecure_port(address)
    except RuntimeError:  # grpc: "Failed to bind to address ..."
        port = 0
    if port == 0:
        raise OSError(f"listen address {address}: cannot bind (in use, or not an address of this host)")
    return port


#: Client reconnection backoff (see :func:`channel_options`).
RECONNECT_INITIAL_BACKOFF_MS = 100
RECONNECT_MAX_BACKOFF_MS = 1000


def server_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]


def _service_config(services: tuple[str, ...]) -> str:
    # "Service" or "Service/Method". Long-lived streams (the agent Session) are left out: a retried
    # stream would silently replay its buffered messages.
    names = [dict(zip(("service", "method"), s.split("/", 1), strict=False)) for s in services]
    return json.dumps(
        {
            "methodConfig": [
                {
                    "name": names,
                    "retryPolicy": {
                        "maxAttempts": 5,
                        "initialBackoff": "0.1s",
                        "maxBackoff": "2s",
                        "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE"],
                    },
                }
            ]
        }
    )


def channel_options(
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    *,
    retry_services: tuple[str, ...] = ("oobleck.v1.AdminService", "oobleck.v1.AgentService/Register"),
    server_name_override: str | None = None,
) -> list[tuple[str, object]]:
    opts: list[tuple[str, object]] = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.enable_retries", 1),
        ("grpc.service_config", _service_config(retry_services)),
        # gRPC's own reconnection backoff grows to 120 s by default: after a 30 s master outage
        # a channel would stay in TRANSIENT_FAILURE (every call failing at once) for up to
        # another 10-20 s after the master is back, past the master's re-attach grace.
        # Capped, a client reconnects within about a second of the master's return.
        ("grpc.initial_reconnect_backoff_ms", RECONNECT_INITIAL_BACKOFF_MS),
        ("grpc.min_reconnect_backoff_ms", RECONNECT_INITIAL_BACKOFF_MS),
        ("grpc.max_reconnect_backoff_ms", RECONNECT_MAX_BACKOFF_MS),
    ]
    if server_name_override:
        opts.append(("grpc.ssl_target_name_override", server_name_override))
    return opts


@dataclass(frozen=True)
class ClientTls:
    """Client TLS files: CA to verify the server (None: system roots); cert+key for mTLS."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    server_name_override: str | None = None


def _check_target(target: str, tls: ClientTls | None, allow_insecure: bool) -> None:
    if tls is None:
        check_plaintext_allowed(target, allow_insecure, what="master address")


def aio_channel(
    target: str,
    *,
    token: str | None,
    tls: ClientTls | None = None,
    allow_insecure: bool = False,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> grpc.aio.Channel:
    """A ``grpc.aio`` channel to ``target`` with token, TLS (or checked plaintext) and limits."""
    _check_target(target, tls, allow_insecure)
    interceptors = aio_client_interceptors(token) if token else None
    opts = channel_options(max_message_bytes, server_name_override=tls.server_name_override if tls else None)
    if tls is not None:
        creds = channel_credentials(tls.ca_file, tls.cert_file, tls.key_file)
        return grpc.aio.secure_channel(target, creds, options=opts, interceptors=interceptors)
    return grpc.aio.insecure_channel(target, options=opts, interceptors=interceptors)


def sync_channel(
    target: str,
    *,
    token: str | None,
    tls: ClientTls | None = None,
    allow_insecure: bool = False,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> grpc.Channel:
    """A blocking channel, same rules as :func:`aio_channel`."""
    _check_target(target, tls, allow_insecure)
    opts = channel_options(max_message_bytes, server_name_override=tls.server_name_override if tls else None)
    if tls is not None:
        creds = channel_credentials(tls.ca_file, tls.cert_file, tls.key_file)
        channel = grpc.secure_channel(target, creds, options=opts)
    else:
        channel = grpc.insecure_channel(target, options=opts)
    if token:
        channel = grpc.intercept_channel(channel, *sync_client_interceptors(token))
    return channel
