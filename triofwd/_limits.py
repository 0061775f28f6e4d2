"""Connection limits: concurrent connections (total and per client IP) and new-connection rate.

Pure code: the caller passes the clock. A `Gate` holds a place for a connection for as long
as a `with` block runs, so a count can never drift from the connections that exist.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable
from typing import Any

from ._errors import ConnectionEnded
from ._reasons import Reason

__all__ = ["Gate", "Held", "Limits", "Places", "RateLimiter"]

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
        """Hold a place for one connection from `ip` while the block runs: both holds below."""
        self.take_both(ip, now)
        return Held(Gate.give_back_both, self, ip)

    def capacity(self) -> Held:
        """Hold one of `max_connections` places while the block runs (see `take_capacity`)."""
        self.take_capacity()
        return Held(Gate.give_back_capacity, self)

    def client(self, ip: str, now: float) -> Held:
        """Hold a place for one connection from `ip` while the block runs (see `take_client`)."""
        self.take_client(ip, now)
        return Held(Gate.give_back_client, self, ip)

    def take_capacity(self) -> None:
        """Take one of `max_connections` places, or raise ConnectionEnded(capacity).

        Taken at accept, before any byte is read, so that connections still sending their
        first bytes (a slow ClientHello, a PROXY header) count against the limit too.
        """
        if self.limits.max_connections and self.active >= self.limits.max_connections:
            raise ConnectionEnded(Reason.CAPACITY)
        self.active += 1

    def take_client(self, ip: str, now: float) -> None:
        """Take a place for one connection from `ip`: the per-IP count, then the rate.

        Taken once the client's address is known (after a PROXY header, where one is
        expected). A connection refused by the count does not use up a rate token.
        """
        limits = self.limits
        if limits.max_connections_per_ip and self.per_ip[ip] >= limits.max_connections_per_ip:
            raise ConnectionEnded(Reason.IP_LIMIT)
        if self.rate is not None and not self.rate.allow(ip, now):
            raise ConnectionEnded(Reason.RATE_LIMITED)
        self.per_ip[ip] += 1

    def take_both(self, ip: str, now: float) -> None:
        self.take_capacity()
        try:
            self.take_client(ip, now)
        except BaseException:
            self.give_back_capacity()
            raise

    def give_back_capacity(self, _: object = None) -> None:
        self.active -= 1

    def give_back_client(self, ip: str) -> None:
        self.per_ip[ip] -= 1
        if not self.per_ip[ip]:
            del self.per_ip[ip]

    def give_back_both(self, ip: str) -> None:
        self.give_back_client(ip)
        self.give_back_capacity()


class Places:
    """One connection's places in the limits, taken as what it is becomes known — one of
    `max_connections` at accept (`Places(gate)`), its client's once its address is known
    (`client`), its route's once it is routed (`route`) — and all given back when the
    `with` block ends, whatever was taken by then.

    One object for the three rather than a `with` each: one lives for the whole of every
    connection, and each `with` holds an exit of its own on the frame.
    """

    __slots__ = ("_gate", "_ip", "_route")

    def __init__(self, gate: Gate) -> None:
        gate.take_capacity()
        self._gate = gate
        self._ip: str | None = None
        self._route: Gate | None = None

    def client(self, ip: str, now: float) -> None:
        self._gate.take_client(ip, now)
        self._ip = ip

    def route(self, gate: Gate, now: float) -> None:
        """The route's own limits, for the client already taken."""
        assert self._ip is not None, "the client's place comes first"
        gate.take_both(self._ip, now)
        self._route = gate

    def __enter__(self) -> Places:
        return self

    def __exit__(self, *exc: object) -> None:
        ip, route = self._ip, self._route
        if ip is not None:
            if route is not None:
                route.give_back_both(ip)
            self._gate.give_back_client(ip)
        self._gate.give_back_capacity()


class Held:
    """A place taken when it was made; leaving its `with` block gives it back:
    `release(owner, key)`, a plain function (the class's, not a bound method).

    A small object rather than a generator-based context manager or a closure: several live
    for the whole of every connection, and a generator frame costs several times its size,
    a bound method and its argument tuple twice it.
    """

    __slots__ = ("_key", "_owner", "_release")

    def __init__(self, release: Callable[[Any, Any], object], owner: object, key: object = None) -> None:
        self._release = release
        self._owner = owner
        self._key = key

    def __enter__(self) -> Held:
        return self

    def __exit__(self, *exc: object) -> None:
        self._release(self._owner, self._key)
