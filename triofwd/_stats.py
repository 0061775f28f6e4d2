"""Counters of ended connections, per route and reason; live counts are derived, not counted.

Active connections are read off the connection table itself, so "active" can never
drift from what is open: there is no counter to forget to decrement.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import itertools
from collections.abc import Iterable, Mapping
from typing import Any

from ._record import Connection, Session

__all__ = ["CONNECT_BUCKETS", "Stats", "UNROUTED"]

# The stats key of connections that ended before a route was chosen (no_route, capacity...).
UNROUTED = "-"

# Upper bounds (seconds) of the connect-time histogram buckets, Prometheus style.
CONNECT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclasses.dataclass
class _Ended:
    connections: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    reasons: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    # connect_buckets[i]: connects that took <= CONNECT_BUCKETS[i] (not cumulative; the last is +Inf)
    connect_buckets: list[int] = dataclasses.field(default_factory=lambda: [0] * (len(CONNECT_BUCKETS) + 1))
    connect_count: int = 0
    connect_sum: float = 0.0
    sessions: int = 0  # of them UDP sessions, with their datagrams
    datagrams_in: int = 0
    datagrams_out: int = 0


class Stats:
    """What the forwarder has done since it started."""

    def __init__(self) -> None:
        self.accepted = 0
        self.accept_errors = 0
        self._ended: dict[str, _Ended] = collections.defaultdict(_Ended)

    def record(self, conn: Connection) -> None:
        """Count one ended connection (called once, by the connection's scope exit)."""
        ended = self._ended[conn.route or UNROUTED]
        ended.connections += 1
        ended.bytes_in += conn.bytes_in
        ended.bytes_out += conn.bytes_out
        ended.reasons[str(conn.reason)] += 1
        if conn.connect_time is not None:
            ended.connect_buckets[bisect.bisect_left(CONNECT_BUCKETS, conn.connect_time)] += 1
            ended.connect_count += 1
            ended.connect_sum += conn.connect_time
        if isinstance(conn, Session):
            ended.sessions += 1
            ended.datagrams_in += conn.datagrams_in
            ended.datagrams_out += conn.datagrams_out

    def snapshot(
        self, live: Iterable[Connection], offload: Mapping[str, tuple[int, int]] | None = None, drops: Mapping[tuple[str, str], int] | None = None
    ) -> dict[str, Any]:
        """Totals and per-route figures; `live` is the connection table, `offload` the
        kernel's (packets, bytes) per offload route as last read, `drops` the datagrams of
        UDP routes dropped, by (route, reason). A route with UDP sessions (or drops) has
        `udp`: its datagrams each way and its drops by reason."""
        offload = offload or {}
        drops = drops or {}
        udp: dict[str, dict[str, Any]] = {}
        for (name, why), count in drops.items():
            _udp_of(udp, name)["drops"][why] = count
        active: collections.Counter[str] = collections.Counter()
        live_in: collections.Counter[str] = collections.Counter()
        live_out: collections.Counter[str] = collections.Counter()
        for conn in live:
            key = conn.route or UNROUTED
            active[key] += 1
            live_in[key] += conn.bytes_in
            live_out[key] += conn.bytes_out
            if isinstance(conn, Session):
                moved = _udp_of(udp, key)
                moved["datagrams_in"] += conn.datagrams_in
                moved["datagrams_out"] += conn.datagrams_out
        routes: dict[str, Any] = {}
        for name, ended in self._ended.items():
            if ended.sessions:
                moved = _udp_of(udp, name)
                moved["datagrams_in"] += ended.datagrams_in
                moved["datagrams_out"] += ended.datagrams_out
        for name in sorted(set(self._ended) | set(active) | set(offload) | set(udp)):
            ended = self._ended.get(name, _Ended())
            routes[name] = {
                "active": active[name],
                "total": ended.connections + active[name],
                "bytes_in": ended.bytes_in + live_in[name],
                "bytes_out": ended.bytes_out + live_out[name],
                "terminations": dict(sorted(ended.reasons.items())),
                "connect_time": {
                    "buckets": list(zip((*CONNECT_BUCKETS, float("inf")), itertools.accumulate(ended.connect_buckets))),
                    "count": ended.connect_count,
                    "sum": ended.connect_sum,
                },
            }
            if name in offload:
                packets, nbytes = offload[name]
                routes[name]["offload"] = {"packets": packets, "bytes": nbytes}
            if name in udp:
                routes[name]["udp"] = {**udp[name], "drops": dict(sorted(udp[name]["drops"].items()))}
        terminations: collections.Counter[str] = collections.Counter()
        for ended in self._ended.values():
            terminations.update(ended.reasons)
        return {
            "active": sum(active.values()),
            "total": self.accepted,
            "accept_errors": self.accept_errors,
            "bytes_in": sum(r["bytes_in"] for r in routes.values()),
            "bytes_out": sum(r["bytes_out"] for r in routes.values()),
            "terminations": dict(sorted(terminations.items())),
            "routes": routes,
        }


def _udp_of(udp: dict[str, dict[str, Any]], name: str) -> dict[str, Any]:
    found = udp.get(name)
    if found is None:
        found = udp[name] = {"datagrams_in": 0, "datagrams_out": 0, "drops": {}}
    return found
