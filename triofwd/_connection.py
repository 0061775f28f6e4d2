"""One connection, from accept to its recorded end.

    accept ─► connection task (in the forwarder's connection nursery)
                tracked: in the table until the task leaves, then its end recorded once
                connection scope: kill() and the first cause cancel it; max_lifetime is its deadline
                  capacity ─ first bytes (PROXY header, ClientHello; initial_data_timeout)
                    per-client limits ─ route table ─ action: forward | bridge | reject | handler | offload
                      forward: dial (connect_timeout, retries) ─ relay: the pumps' nursery, whose
                               deadline is the inactivity or half-close deadline
              leaving: both sockets closed, counts released, reason counted, log line written

No cleanup is called by hand: each resource is a `with` block, and every path out of
`run_connection` — a normal end, a reset, a timeout, a kill, a shutdown, a bug — goes
through the same exits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Any

import trio

from ._actions import ACTIONS
from ._dial import format_address
from ._firstbytes import FirstBytes, read_client_hello, read_proxy_header
from ._reasons import ConnectionEnded, Reason, deadline_at, leaves, reason_of
from ._table import CompiledRoute, ListenKey

if TYPE_CHECKING:
    from ._server import Forwarder

__all__ = ["Connection", "run_connection"]

log = logging.getLogger("triofwd.connection")

@dataclasses.dataclass(eq=False, slots=True)
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
    local: tuple[str, int] = ("", 0)  # the address the client connected to
    path: str = ""  # how bytes move: "splice" (in the kernel) or "copy" (through Python)
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


async def run_connection(fwd: Forwarder, stream: trio.SocketStream, peer: tuple[Any, ...], listener: ListenKey) -> None:
    """The whole life of one accepted connection.

    The last line of defence: whatever happens inside — any exception, any nesting of
    exception groups — ends this connection alone, with one recorded reason, and never
    reaches the nursery of all connections. Only what is not the connection's to keep
    leaves it: a cancellation from outside (the forwarder stopping) and KeyboardInterrupt.
    """
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
            # Closed without an await (SocketStream.aclose ends with a checkpoint, whose
            # Cancelled, while the forwarder stops, would replace what is on its way out).
            with contextlib.closing(stream.socket):
                with conn.scope:  # kill(), the first cause, and max_lifetime (its deadline)
                    await _serve(fwd, conn, stream, listener)
                if conn.scope.cancelled_caught:
                    conn.settle(Reason.LIFETIME_EXCEEDED)  # kill() and end() record theirs before cancelling
        except BaseException as exc:  # noqa: BLE001 - the boundary of one connection: see the docstring
            escaping = _settle_from(conn, exc)
            if escaping is exc:
                raise
            if escaping is not None:
                raise escaping from None


def _settle_from(conn: Connection, exc: BaseException) -> BaseException | None:
    """Record the reason `exc` means for `conn`; return what must leave the connection, if anything.

    Cannot fail: an error while reading the reason is itself an internal_error.
    """
    try:
        reason = reason_of(exc)
        conn.settle(reason)
        if reason is Reason.INTERNAL_ERROR:
            log.error("connection %d: internal error", conn.id, exc_info=exc)
        found = list(leaves(exc))
        interrupt = next((leaf for leaf in found if isinstance(leaf, KeyboardInterrupt)), None)
        if interrupt is not None:
            return interrupt
        if all(isinstance(leaf, trio.Cancelled) for leaf in found):
            return exc  # from outside the connection's own scope: the forwarder is stopping
        return None
    except BaseException:  # noqa: BLE001 - see the docstring
        conn.settle(Reason.INTERNAL_ERROR)
        return None


async def _serve(fwd: Forwarder, conn: Connection, client: trio.SocketStream, listener: ListenKey) -> None:
    table = fwd._table  # the table at accept time; a reload does not move a live connection
    local = client.socket.getsockname()
    conn.local = (str(local[0]), int(local[1]))
    reads = table.reads_first_bytes(listener)
    found = None if reads else table.match(listener, conn.client_ip)
    if isinstance(found, CompiledRoute):
        conn.route = found.name  # known before any limit is checked: refusals are logged on their route
    first = FirstBytes()
    conn.scope.deadline = conn.opened + table.policy.max_lifetime
    first_bytes_due = conn.opened + table.first_bytes_timeout(listener)
    with fwd._gate.capacity():
        if table.accepts_proxy(listener):
            # Who the client is comes first: from a trusted proxy, its header says so.
            conn.state = "reading"
            with deadline_at(first_bytes_due, Reason.INITIAL_DATA_TIMEOUT):
                await read_proxy_header(client, first, required=table.is_trusted_proxy(conn.client_ip))
            _take_proxy_header(conn, first)
        with fwd._gate.client(conn.client_ip, trio.current_time()):
            if table.reads_client_hello(listener):
                conn.state = "reading"
                with deadline_at(first_bytes_due, Reason.INITIAL_DATA_TIMEOUT):
                    await read_client_hello(client, first)
            if reads:
                found = table.match(listener, conn.client_ip, first.hello.server_name if first.hello else None)
            if not isinstance(found, CompiledRoute):
                raise ConnectionEnded(found if found is not None else Reason.NO_ROUTE)
            route = found
            conn.route = route.name
            conn.scope.deadline = conn.opened + route.policy.max_lifetime
            with fwd._route_gate(route).admitted(conn.client_ip, trio.current_time()):
                await ACTIONS[route.action](fwd, conn, client, route, first)


def _take_proxy_header(conn: Connection, first: FirstBytes) -> None:
    """From here on the connection is the one the PROXY header describes."""
    header = first.proxy
    if header is not None and header.command == "PROXY" and header.source and header.destination:
        conn.client_ip, conn.client_port = header.source
        conn.client = format_address(header.source)
        conn.local = header.destination
