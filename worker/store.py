"""A generation's view of the agent's rendezvous store (torch's TCPStore).

:func:`make_store` connects to the store a plan names and returns the generation's view of it:
under the plan's rendezvous secret a :class:`SecretKeyStore`, without one (a test, a FileStore)
a ``PrefixStore`` keyed by the generation, so one store can serve several generations.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch.distributed as dist

from oobleck.worker.failures import PeerGone, RendezvousAbandoned

if TYPE_CHECKING:
    from oobleck.worker.rendezvous import DistInit

STORE_CONNECT_ATTEMPT_S = 1.0


class RendezvousTampered(PeerGone):
    """A value in the rendezvous store does not carry the generation's tag: a client without the
    secret wrote or altered it. The rendezvous fails instead of using it (the generation cannot
    be joined; the worker waits for the next one, as after any failed rendezvous)."""


def _as_bytes(value: bytes | str) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)


class SecretKeyStore(dist.Store):
    """A generation's view of the agent's TCPStore under the plan's rendezvous secret.

    The store has no authentication and any client may list its keys, so a secret key prefix
    would show itself. Instead every key is stored as ``oobleck/gen<G>/<HMAC-SHA256(secret,
    key)>``: a listing shows digests from which no key of the generation can be derived, and keys
    cannot be written before the ranks write them. Every value carries an HMAC-SHA256 tag over
    its key and itself, checked when read: a value written or altered by a client without the
    secret raises :class:`RendezvousTampered` (the rendezvous fails, nothing connects to an
    address it planted). Values are not encrypted, and counters (``add``) cannot carry a tag:
    a client that reaches the port can still read values and delay or fail a rendezvous.

    torch calls this object from C++ (a pybind11 trampoline, which finds the Python methods only
    while the Python object lives): its owner keeps it as long as the process group, and clones
    are kept here. The trampoline looks up ``deleteKey`` and ``getNumKeys`` by their C++ names.
    """

    def __init__(self, store: Any, secret: str, generation: int) -> None:
        super().__init__()
        if not secret:
            raise ValueError("secret: required")
        self._store = store
        self._secret = secret.encode()
        self._generation = generation
        self._prefix = f"oobleck/gen{generation}/"
        self._clones: list[SecretKeyStore] = []

    def __repr__(self) -> str:
        return f"SecretKeyStore(generation={self._generation})"

    def _key(self, key: str) -> str:
        digest = hmac.new(self._secret, f"key:{self._prefix}{key}".encode(), hashlib.sha256).hexdigest()
        return self._prefix + digest

    def _tag(self, key: str, value: bytes) -> bytes:
        name = key.encode()
        message = b"value:" + len(name).to_bytes(4, "big") + name + value
        return hmac.new(self._secret, message, hashlib.sha256).digest()

    def _seal(self, key: str, value: bytes | str) -> bytes:
        value = _as_bytes(value)
        return value + self._tag(key, value)

    def _open(self, key: str, sealed: bytes) -> bytes:
        sealed = _as_bytes(sealed)
        size = hashlib.sha256().digest_size
        value, tag = sealed[:-size], sealed[-size:]
        if len(sealed) < size or not hmac.compare_digest(tag, self._tag(key, value)):
            raise RendezvousTampered(
                f"rendezvous store: a value of generation {self._generation} fails its integrity check "
                "(written by a client without the generation's secret)"
            )
        return value

    def set(self, key: str, value: bytes | str) -> None:
        self._store.set(self._key(key), self._seal(key, value))

    def get(self, key: str) -> bytes:
        return self._open(key, self._store.get(self._key(key)))

    def compare_set(self, key: str, expected: bytes | str, desired: bytes | str) -> bytes:
        # An empty ``expected`` means "only if absent" and stays empty; every stored value is sealed.
        expected = _as_bytes(expected)
        sealed = self._seal(key, expected) if expected else b""
        current = self._store.compare_set(self._key(key), sealed, self._seal(key, desired))
        return self._open(key, current) if current else b""

    def add(self, key: str, amount: int) -> int:
        return self._store.add(self._key(key), amount)

    def check(self, keys: list[str]) -> bool:
        return self._store.check([self._key(k) for k in keys])

    def wait(self, keys: list[str], timeout: datetime.timedelta | None = None) -> None:
        hashed = [self._key(k) for k in keys]
        if timeout is None:
            self._store.wait(hashed)
        else:
            self._store.wait(hashed, timeout)

    def deleteKey(self, key: str) -> bool:  # the C++ name the trampoline looks up
        return self._store.delete_key(self._key(key))

    def getNumKeys(self) -> int:  # the C++ name the trampoline looks up
        return self._store.num_keys()

    def clone(self) -> SecretKeyStore:
        copy = SecretKeyStore(self._store.clone(), self._secret.decode(), self._generation)
        self._clones.append(copy)
        return copy


def make_store(
    init: DistInit, world_size: int, generation: int, interrupt: Callable[[], str | None] | None = None
) -> Any:
    """The generation's store: under the plan's secret (:class:`SecretKeyStore`), or without one
    (a test, a FileStore) keys prefixed by the generation so one store can serve several.

    With ``interrupt``, connecting to a TCPStore is retried in short attempts, asking
    ``interrupt()`` in between: the agent hosting it may have died with its node, and the master
    then supersedes the generation (without this, the connection attempt lasts the whole timeout).
    """
    if init.store is not None:
        store = init.store
    elif init.file is not None:
        store = dist.FileStore(init.file, world_size)
    else:
        timeout = datetime.timedelta(seconds=init.timeout_s)
        if interrupt is None:
            store = dist.TCPStore(init.host, init.port, world_size, is_master=False, timeout=timeout)
        else:
            store = _connect(init, world_size, interrupt)
            store.set_timeout(timeout)
    if init.secret:
        return SecretKeyStore(store, init.secret, generation)
    return dist.PrefixStore(f"oobleck/gen{generation}/", store)


def _connect(init: DistInit, world_size: int, interrupt: Callable[[], str | None]) -> Any:
    deadline = time.monotonic() + init.timeout_s
    attempt = datetime.timedelta(seconds=STORE_CONNECT_ATTEMPT_S)
    while True:
        try:
            return dist.TCPStore(init.host, init.port, world_size, is_master=False, timeout=attempt)
        except (RuntimeError, TimeoutError) as exc:  # DistStoreError and its kinds are RuntimeErrors
            why = interrupt()
            if why:
                raise RendezvousAbandoned(f"store {init.host}:{init.port} unreachable ({exc}): {why}") from None
            if time.monotonic() >= deadline:
                raise
