"""One connection, from accept to its recorded end.

    accept ─► connection task (in the forwarder's connection nursery)
                tracked: in the table until the task leaves, then its end recorded once
                connection scope: kill() and the first cause cancel it
                  lifetime scope (max_lifetime)
                    limits ─ route table ─ action: forward | reject | handler
                      forward: dial (connect_timeout, retries) ─ relay (inactivity, half-close)
              leaving: both sockets closed, counts released, reason counted, log line written

No cleanup is called by hand: each resource is a `with` block, and every path out of
`run_connection` — a normal end, a reset, a timeout, a kill, a shutdown, a bug — goes
through the same exits.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import socket
import time
from typing import TYPE_CHECKING, Any

import trio

from ._dial import dialed, format_address
from ._pump import TrafficStream, relay, run_watched, traffic_scopes
from ._reasons import ConnectionEnded, Reason
from ._table import CompiledRoute, ListenKey

if TYPE_CHECKING:
    from ._server import Forwarder

__all__ = ["Connection", "HandlerInfo", "run_connection"]

log = logging.getLogger("triofwd.connection")

# Kernel keep-alive (tcp_keepalive): probe every IDLE/KEEPALIVE_PROBE_DIVISOR seconds
# after IDLE seconds of silence, and give up after KEEPALIVE_PROBES unanswered probes.
KEEPALIVE_PROBE_DIVISOR = 4
KEEPALIVE_PROBES = 4


@dataclasses.dataclass(eq=False)
class Connection:
    """One live connection, as the table, the inspector and the access log see it."""

    id: int
    client: str  # "ip:port"
    client_ip: str
    client_port: int
    listener: ListenKey
    started: float  # wall clock (time.time()), for logs
    opened: float  # trio clock, for ages and deadlines
    route: str | None = None
    target: str | None = None
    state: str = "accepted"
    bytes_in: int = 0  # client -> target
    bytes_out: int = 0  # target -> client
    last_activity: float = 0.0
    connect_time: float | None = None  # seconds the successful connect to the target took
    reason: Reason | None = None
    scope: trio.CancelScope = dataclasses.field(default_factory=trio.CancelScope, repr=False)

    def settle(self, reason: Reason) -> Reason:
        """Record why the connection ended, unless a cause came first; return the recorded one."""
        if self.reason is None:
            self.reason = reason
        return self.reason

    def end(self, reason: Reason) -> None:
        """End the connection now with `reason` (if it is the first cause)."""
        self.settle(reason)
        self.scope.cancel(reason.value)

    def kill(self) -> None:
        """End the connection with reason `killed`; both sockets close at once."""
        self.end(Reason.KILLED)

    def age(self, now: float | None = None) -> float:
        return (trio.current_time() if now is None else now) - self.opened

    def idle(self, now: float | None = None) -> float:
        return (trio.current_time() if now is None else now) - self.last_activity

    def describe(self, now: float | None = None) -> dict[str, Any]:
        """The row the inspector and the watch stream show."""
        now = trio.current_time() if now is None else now
        return {
            "id": self.id,
            "route": self.route,
            "client": self.client,
            "target": self.target,
            "state": self.state,
            "age_s": round(self.age(now), 3),
            "idle_s": round(self.idle(now), 3),
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "reason": None if self.reason is None else self.reason.value,
        }


@dataclasses.dataclass(frozen=True)
class HandlerInfo:
    """What a handler route's callable learns about its connection."""

    id: int
    route: str
    client: tuple[str, int]
    local: tuple[str, int]


def set_tcp_keepalive(stream: trio.SocketStream, idle: float) -> None:
    """Turn on kernel keep-alive probes, so a peer that vanished is noticed without traffic."""
    if idle == math.inf:
        return
    sock = stream.socket
    seconds = max(1, int(idle))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, seconds)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, seconds // KEEPALIVE_PROBE_DIVISOR))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_PROBES)


async def run_connection(fwd: Forwarder, stream: trio.SocketStream, peer: tuple[Any, ...], listener: ListenKey) -> None:
    """The whole life of one accepted connection. Never raises but Cancelled."""
    now = trio.current_time()
    conn = Connection(
        id=fwd._next_id(),
        client=format_address(peer),
        client_ip=str(peer[0]),
        client_port=int(peer[1]),
        listener=listener,
        started=time.time(),
        opened=now,
        last_activity=now,
    )
    with fwd._tracked(conn):
        try:
            async with stream:
                with conn.scope:
                    await _serve(fwd, conn, stream, listener)
        except* trio.Cancelled:
            # Cancelled from outside the connection's own scope: the forwarder is stopping.
            conn.settle(Reason.SHUTDOWN)
            raise
        except* ConnectionEnded as group:
            conn.settle(group.exceptions[0].reason)  # type: ignore[attr-defined]
        except* Exception as group:
            conn.settle(Reason.INTERNAL_ERROR)
            log.error("connection %d: internal error", conn.id, exc_info=group)


async def _serve(fwd: Forwarder, conn: Connection, client: trio.SocketStream, listener: ListenKey) -> None:
    table = fwd._table  # the table at accept time; a reload does not move a live connection
    needs_first_bytes = table.needs_initial_data(listener)
    found = None if needs_first_bytes else table.match(listener, conn.client_ip)
    if isinstance(found, CompiledRoute):
        conn.route = found.name
    with trio.CancelScope(deadline=conn.opened + table.policy.max_lifetime) as lifetime:
        with fwd._gate.admitted(conn.client_ip, conn.opened):
            initial = b""
            if needs_first_bytes:
                raise ConnectionEnded(Reason.NO_ROUTE, "reading first bytes is not supported yet")
            if not isinstance(found, CompiledRoute):
                raise ConnectionEnded(found or Reason.NO_ROUTE)
            route = found
            lifetime.deadline = conn.opened + route.policy.max_lifetime
            with fwd._route_gate(route).admitted(conn.client_ip, conn.opened):
                await ACTIONS[route.action](fwd, conn, client, route, initial)
    if lifetime.cancelled_caught:
        raise ConnectionEnded(Reason.LIFETIME_EXCEEDED)


async def _forward(fwd: Forwarder, conn: Connection, client: trio.SocketStream, route: CompiledRoute, initial: bytes) -> None:
    async with dialed(conn, route, fwd._balancer(route)) as target:
        set_tcp_keepalive(client, route.policy.tcp_keepalive)
        set_tcp_keepalive(target, route.policy.tcp_keepalive)
        conn.state = "established"
        await relay(conn, client, target, route.policy, initial)


async def _reject(fwd: Forwarder, conn: Connection, client: trio.SocketStream, route: CompiledRoute, initial: bytes) -> None:
    raise ConnectionEnded(Reason.REJECTED)


async def _handle(fwd: Forwarder, conn: Connection, client: trio.SocketStream, route: CompiledRoute, initial: bytes) -> None:
    assert route.handler is not None  # compile_table guarantees it for action = "handler"
    handler = route.handler
    local = client.socket.getsockname()
    info = HandlerInfo(conn.id, route.name, (conn.client_ip, conn.client_port), (str(local[0]), local[1]))
    set_tcp_keepalive(client, route.policy.tcp_keepalive)
    conn.state = "handler"
    with traffic_scopes(conn, route.policy) as traffic:
        stream = TrafficStream(client, traffic, initial)
        await run_watched(traffic, lambda: handler(stream, info))


ACTIONS: dict[str, Any] = {"forward": _forward, "reject": _reject, "handler": _handle}
