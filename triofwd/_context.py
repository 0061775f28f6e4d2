"""What a connection may use of its forwarder, and nothing more.

    ConnectionContext
      table          the route table in force (a reload swaps it; a live connection keeps
                     the one it was accepted under)
      gate           the process-wide limits; route_gate(route) a route's own
      targets        each dialing route's targets: balancing, health, warm sockets
      engine         the data engine that moves the bytes of plain relays
      next_id()      the connection's number
      opened(conn)   the connection is in the table from now on
      closed(conn)   it has ended: the one place where an ending is recorded

The forwarder (`_server`) owns one and changes it on reload; the connection code
(`_connection`, `_actions`) sees only this.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import trio

from ._accesslog import AccessLog
from ._engine import Engine
from ._limits import Gate
from ._reasons import Reason
from ._record import Connection
from ._stats import Stats
from ._table import CompiledRoute, RouteTable
from ._targets import TargetRegistry

__all__ = ["ConnectionContext"]

log = logging.getLogger("triofwd")


class ConnectionContext:
    """The table, limits and targets a connection is served with, and the record of its end."""

    def __init__(
        self, table: RouteTable, access_log: AccessLog | None, engine: Engine, first_id: int = 1, verdicts: Mapping[str, Iterable[str]] | None = None
    ) -> None:
        self.table = table
        self.engine = engine
        self.gate = Gate(table.limits)
        self.targets = TargetRegistry(verdicts=verdicts)
        self.live: dict[int, Connection] = {}
        self.stats = Stats()
        self.watchers: set[trio.MemorySendChannel[dict[str, Any]]] = set()
        self._route_gates: dict[str, Gate] = {}
        self._access_log = access_log
        self._ids = itertools.count(first_id)

    def next_id(self) -> int:
        return next(self._ids)

    def route_gate(self, route: CompiledRoute) -> Gate:
        gate = self._route_gates.get(route.name)
        if gate is None:
            gate = self._route_gates[route.name] = Gate(route.limits)
        return gate

    def update(self, table: RouteTable) -> None:
        """A reload: the new table and limits; counts of open connections carry over, and a
        removed route's gate goes (its open connections keep their own holds)."""
        self.table = table
        self.gate.update(table.limits)
        names = {route.name: route for route in table.routes}
        for name in [n for n in self._route_gates if n not in names]:
            del self._route_gates[name]
        for name, gate in self._route_gates.items():
            gate.update(names[name].limits)

    def opened(self, conn: Connection) -> None:
        """The connection is in the table from now on, until `closed`."""
        self.stats.accepted += 1
        self.live[conn.id] = conn
        if self.watchers:
            self.emit("open", conn)

    def closed(self, conn: Connection) -> None:
        """The connection has ended: the one place where an end is recorded (reason, stats,
        watchers, access log), called on every path out of the connection task."""
        del self.live[conn.id]
        conn.settle(Reason.NORMAL)
        conn.state = "closed"
        # Each record of the end on its own: one that fails must neither end the others
        # (the daemon) nor keep the rest from being written.
        _recorded(self.stats.record, conn)
        if self.watchers:
            _recorded(self.emit, "close", conn)
        if self._access_log is not None:
            _recorded(self._access_log.write, conn, conn.age())

    def emit(self, event: str, conn: Connection) -> None:
        """Tell the watchers (the control socket's `watch`); one too slow, or gone, is dropped."""
        if not self.watchers:
            return
        message = {"event": event, **conn.describe()}
        for send in list(self.watchers):
            try:
                send.send_nowait(message)
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                self.watchers.discard(send)  # too slow, or gone: drop it, never wait for it
                send.close()


def _recorded(record: Callable[..., object], *args: Any) -> None:
    try:
        record(*args)
    except Exception:
        log.exception("recording the end of a connection failed (%s)", getattr(record, "__qualname__", record))
