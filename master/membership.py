"""Membership bookkeeping that must not grow with history: which dead nodes to forget, and how
often one peer may register.

Dead nodes are kept (in memory and in the state file) for ``dead_node_retention_s`` so that
``oobleckctl nodes`` shows what died and why; after that they are purged (the event log keeps
their history). A node the master still needs -- part of the current plan, lost and not yet
replanned, or holding an unacknowledged command -- is never purged.

Registration is rate-limited per peer address with a token bucket (``register_burst``
registrations at once, then ``register_rate_per_s``): a flood of registrations from one host
cannot fill the node table and shut real agents out. Both are pure: the caller passes the clock.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass


def purgeable(now_s: float, dead_since_s: dict[int, float], keep: set[int], retention_s: float) -> list[int]:
    """Dead nodes (id -> when declared dead) older than ``retention_s`` and not in ``keep``,
    in id order."""
    return sorted(n for n, since in dead_since_s.items() if now_s - since >= retention_s and n not in keep)


@dataclass
class _Bucket:
    tokens: float
    updated_s: float


class RateLimiter:
    """A token bucket per key (a peer's address), holding at most ``max_keys`` buckets (the
    least recently used full one is forgotten first: forgetting a full bucket changes nothing)."""

    def __init__(self, rate_per_s: float, burst: int, max_keys: int = 65536) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def allow(self, key: str, now_s: float) -> tuple[bool, float]:
        """Take one token for ``key``: (allowed, seconds until the next token when refused)."""
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = _Bucket(float(self.burst), now_s)
            self._buckets[key] = bucket
            self._evict()
        else:
            self._buckets.move_to_end(key)
            bucket.tokens = min(float(self.burst), bucket.tokens + (now_s - bucket.updated_s) * self.rate_per_s)
            bucket.updated_s = now_s
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return True, 0.0
        return False, (1.0 - bucket.tokens) / self.rate_per_s if self.rate_per_s > 0 else float("inf")

    def _evict(self) -> None:
        # The least recently used bucket gives way: it has refilled the most (usually it is full,
        # and forgetting it changes nothing); a flood of distinct peers cannot grow the table.
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)

    def __len__(self) -> int:
        return len(self._buckets)


MAX_SCALED_TIMEOUT_S = 5.0  # scaling never makes the heartbeat timeout longer than this


def heartbeat_terms(live_nodes: int, interval_s: float, timeout_s: float, budget_per_s: float) -> tuple[float, float]:
    """(interval, timeout) for a node registering when ``live_nodes`` (itself included) are live: the configured
    ones while the heartbeats of all nodes fit in ``budget_per_s``; beyond that the interval
    grows so that they fit, and the timeout with it (keeping the configured ratio), but the
    timeout never beyond :data:`MAX_SCALED_TIMEOUT_S` (or the configured timeout if longer) and
    never fewer than two heartbeats per timeout."""
    interval = max(interval_s, live_nodes / budget_per_s)
    if interval == interval_s:
        return interval_s, timeout_s
    timeout = max(timeout_s, min(interval * timeout_s / interval_s, MAX_SCALED_TIMEOUT_S))
    return min(interval, timeout / 2), timeout


def peer_host(peer: str) -> str:
    """The host part of a gRPC peer string (``ipv4:1.2.3.4:567``, ``ipv6:[::1]:567``,
    ``unix:/path``): what registrations are counted by."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0] or rest
    if kind == "ipv6":
        host = rest.rpartition(":")[0] or rest
        return host.strip("[]")
    return peer


def page(items: Iterable, after: int, limit: int, key=lambda x: x) -> tuple[list, int]:
    """Items (sorted by ``key``, an int) after ``after``, at most ``limit``; returns (page, the
    last key of the page when more remain, else 0)."""
    out = []
    for item in items:
        if key(item) <= after:
            continue
        if len(out) == limit:
            return out, key(out[-1])
        out.append(item)
    return out, 0
