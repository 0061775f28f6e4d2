"""Connection limits: concurrent connections (total and per client IP) and new-connection rate.

Pure code: the caller passes the clock. A `Gate` holds a place for a connection for as long
as a `with` block runs, so a count can never drift from the connections that exist.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable

from ._errors import ConnectionEnded
from ._reasons import Reason

__all__ = ["Gate", "Held", "Limits", "RateLimiter"]

# Rate buckets that are full again carry no information; they are swept once the map
# holds this many, so a flood of distinct addresses cannot grow memory without bound.
SWEEP_AT = 4096


@dataclasses.dataclass(frozen=True, slots=True)
class Limits:
    """Connection limits; 0 / None mean off."""

    max_connections: int = 0
    max_connections_per_ip: int = 0
    connection_rate_per_ip: tuple[int, float] | None = None

    @property
    def any(self) -> bool:
        return bool(self.max_connections or self.max_connections_per_ip or self.connection_rate_per_ip)


class RateLimiter:
    """A token bucket per key: `count` new connections per `period` seconds, bursts up to `count`."""

    def __init__(self, count: int, period: float) -> None:
        self.capacity = float(count)
        self.per_second = count / period
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)
        self._sweep_at = SWEEP_AT

    def allow(self, key: str, now: float) -> bool:
        tokens, at = self._buckets.get(key, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - at) * self.per_second)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return False
        self._buckets[key] = (tokens - 1.0, now)
        if len(self._buckets) >= self._sweep_at:
            self._sweep(now)
            # In a flood of new addresses nothing is full yet: wait for the map to double
            # before sweeping again, so the sweeping costs O(1) per connection, amortized.
            self._sweep_at = max(SWEEP_AT, 2 * len(self._buckets))
        return True

    def _sweep(self, now: float) -> None:
        full = [k for k, (t, at) in self._buckets.items() if t + (now - at) * self.per_second >= self.capacity]
        for key in full:
            del self._buckets[key]

    def __len__(self) -> int:
        return len(self._buckets)


class Gate:
    """One set of limits (process-wide, or one route's own) and the counts it keeps."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.active = 0
        self.per_ip: collections.Counter[str] = collections.Counter()
        rate = limits.connection_rate_per_ip
        self.rate = RateLimiter(*rate) if rate else None

    def update(self, limits: Limits) -> None:
        """New limits (a reload); the counts of connections already open carry over."""
        if limits.connection_rate_per_ip != self.limits.connection_rate_per_ip:
            rate = limits.connection_rate_per_ip
            self.rate = RateLimiter(*rate) if rate else None
        self.limits = limits

    def admitted(self, ip: str, now: float) -> Held:
        """Hold a place for one connection from `ip` while the block runs: both holds below.

        One Held for both (not the two nested, nor a closure): it lives as long as the connection.
        """
        self.capacity()
        try:
            self.client(ip, now)
        except BaseException:
            self._release_capacity()
            raise
        return Held(self._release_both, ip)

    def capacity(self) -> Held:
        """Hold one of `max_connections` places, or raise ConnectionEnded(capacity).

        Taken at accept, before any byte is read, so that connections still sending their
        first bytes (a slow ClientHello, a PROXY header) count against the limit too.
        """
        if self.limits.max_connections and self.active >= self.limits.max_connections:
            raise ConnectionEnded(Reason.CAPACITY)
        self.active += 1
        return Held(self._release_capacity)

    def client(self, ip: str, now: float) -> Held:
        """Hold a place for one connection from `ip`: the per-IP count, then the rate.

        Taken once the client's address is known (after a PROXY header, where one is
        expected). A connection refused by the count does not use up a rate token.
        """
        limits = self.limits
        if limits.max_connections_per_ip and self.per_ip[ip] >= limits.max_connections_per_ip:
            raise ConnectionEnded(Reason.IP_LIMIT)
        if self.rate is not None and not self.rate.allow(ip, now):
            raise ConnectionEnded(Reason.RATE_LIMITED)
        self.per_ip[ip] += 1
        return Held(self._release_client, ip)

    def _release_capacity(self) -> None:
        self.active -= 1

    def _release_both(self, ip: str) -> None:
        self._release_client(ip)
        self._release_capacity()

    def _release_client(self, ip: str) -> None:
        self.per_ip[ip] -= 1
        if not self.per_ip[ip]:
            del self.per_ip[ip]


class Held:
    """A place taken when it was made; leaving its `with` block gives it back.

    A small object rather than a generator-based context manager: one lives for the whole
    of every connection, and a generator frame costs several times its size.
    """

    __slots__ = ("_args", "_release")

    def __init__(self, release: Callable[..., object], *args: object) -> None:
        self._release = release
        self._args = args

    def __enter__(self) -> Held:
        return self

    def __exit__(self, *exc: object) -> None:
        self._release(*self._args)
