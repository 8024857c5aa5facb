"""The rendezvous store the agent hosts: a torch TCPStore for the generations whose plan starts
on this node, bound to the node's ``address`` where it can be (:func:`create_store`).
"""

from __future__ import annotations

import datetime
import errno
import ipaddress
import logging
import socket
from collections.abc import Callable

log = logging.getLogger(__name__)

STORE_TIMEOUT_S = 300.0


def _resolve(host: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The distinct IP addresses ``host`` resolves to here, in resolver order."""
    found: list = []
    for *_, sockaddr in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM):
        ip = ipaddress.ip_address(sockaddr[0])
        if ip not in found:
            found.append(ip)
    return found


def store_listen_host(
    address: str, *, master_on_loopback: bool, resolve: Callable[[str], list] = _resolve
) -> tuple[str | None, str]:
    """Where the rendezvous store listens, and why: ``address`` (the host other nodes are told to
    connect to) when it is an IP address, or the one address it resolves to; ``None`` (every
    interface) when that cannot be decided here. Pure but for ``resolve``.

    A name resolving to loopback while the master is elsewhere (``127.0.1.1`` in ``/etc/hosts``)
    is not bound: other nodes resolve it to the node's real address.
    """
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        pass
    else:
        return str(ip), f"address {address} is an IP address"
    try:
        found = resolve(address)
    except (OSError, UnicodeError) as exc:
        return None, f"address {address!r} does not resolve here ({exc})"
    if len(found) != 1:
        shown = ", ".join(str(ip) for ip in found[:4])
        return None, f"address {address!r} resolves to {len(found)} addresses ({shown})"
    ip = found[0]
    if ip.is_loopback and not master_on_loopback:
        return None, f"address {address!r} resolves here to {ip}, a loopback address other nodes cannot reach"
    return str(ip), f"address {address!r} resolves to {ip}"


def _bound_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (an IP address), not yet listening."""
    family, kind, proto, _, sockaddr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a fixed port survives a restart
        sock.bind(sockaddr)
    except BaseException:
        sock.close()
        raise
    return sock


def create_store(address: str, port: int, *, master_on_loopback: bool) -> tuple[object, int, str]:
    """The rendezvous TCPStore server: (store, its port, where it listens). torch is imported here,
    off the event loop.

    torch's store has no authentication, and its server listens on every interface unless it is
    handed a socket already bound (``master_listen_fd``, libuv server): the agent binds one to
    ``address`` (see :func:`store_listen_host`), so the store is not reachable on the node's
    other addresses. When no single address can be chosen, or ``address`` is not one of this
    host's (behind NAT), it listens everywhere as before, with a warning naming the reason.
    What still reaches it is covered by the generation's secret (see ``Endpoint.secret``)."""
    from torch.distributed import TCPStore

    timeout = datetime.timedelta(seconds=STORE_TIMEOUT_S)
    host, why = store_listen_host(address, master_on_loopback=master_on_loopback)
    sock = None
    if host is not None:
        try:
            sock = _bound_socket(host, port)
        except OSError as exc:
            if exc.errno != errno.EADDRNOTAVAIL:
                raise
            host, why = None, f"address {address!r} is not an address of this host ({exc.strerror})"
    if sock is None:
        log.warning(
            "rendezvous store: listening on all interfaces because %s; set address to this node's cluster IP "
            "to listen only there",
            why,
        )
        store = TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False, timeout=timeout)
        return store, int(store.port), "all interfaces"
    try:
        store = TCPStore(
            host,
            sock.getsockname()[1],
            is_master=True,
            wait_for_workers=False,
            timeout=timeout,
            master_listen_fd=sock.fileno(),
            use_libuv=True,
        )
    except BaseException:
        sock.close()
        raise
    sock.detach()  # the store's server owns the descriptor now and closes it with the store
    return store, int(store.port), host
