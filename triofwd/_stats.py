"""Counters of ended connections, per route and reason; live counts are derived, not counted.

Active connections are read off the connection table itself, so "active" can never
drift from what is open: there is no counter to forget to decrement.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._connection import Connection

__all__ = ["Stats", "UNROUTED"]

# The stats key of connections that ended before a route was chosen (no_route, capacity...).
UNROUTED = "-"


@dataclasses.dataclass
class _Ended:
    connections: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    reasons: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)


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

    def snapshot(self, live: Iterable[Connection]) -> dict[str, Any]:
        """Totals and per-route figures; `live` is the connection table."""
        active: collections.Counter[str] = collections.Counter()
        live_in: collections.Counter[str] = collections.Counter()
        live_out: collections.Counter[str] = collections.Counter()
        for conn in live:
            key = conn.route or UNROUTED
            active[key] += 1
            live_in[key] += conn.bytes_in
            live_out[key] += conn.bytes_out
        routes: dict[str, Any] = {}
        for name in sorted(set(self._ended) | set(active)):
            ended = self._ended.get(name, _Ended())
            routes[name] = {
                "active": active[name],
                "total": ended.connections + active[name],
                "bytes_in": ended.bytes_in + live_in[name],
                "bytes_out": ended.bytes_out + live_out[name],
                "terminations": dict(sorted(ended.reasons.items())),
            }
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
