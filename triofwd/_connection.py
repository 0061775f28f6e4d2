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

import logging
import socket
import time
from collections.abc import Awaitable
from typing import Any

import trio

from ._actions import ACTIONS, UDP_ACTIONS
from ._addresses import ListenKey
from ._context import ConnectionContext
from ._datagrams import Flow
from ._endings import deadline_at, leaves, reason_of
from ._errors import ConnectionEnded
from ._firstbytes import FirstBytes, SocketReceiver, read_client_hello, read_proxy_header
from ._limits import Places
from ._reasons import Reason
from ._record import Connection, Session
from ._table import CompiledRoute, RouteTable

__all__ = ["Connection", "run_connection", "run_session"]

log = logging.getLogger("triofwd.connection")


async def run_connection(ctx: ConnectionContext, sock: socket.socket, peer: tuple[Any, ...], listener: ListenKey) -> None:
    """The whole life of one accepted connection.

    The last line of defence: whatever happens inside — any exception, any nesting of
    exception groups — ends this connection alone, with one recorded reason, and never
    reaches the nursery of all connections. Only what is not the connection's to keep
    leaves it: a cancellation from outside (the forwarder stopping) and KeyboardInterrupt.
    """
    now = trio.current_time()
    conn = Connection(
        id=ctx.next_id(),
        client_ip=str(peer[0]),
        client_port=int(peer[1]),
        listener=listener,
        started=time.time(),
        opened=now,
        last_activity=now,
    )
    del peer  # in the record now: an idle connection's frame holds nothing it does not need
    ctx.opened(conn)
    try:
        table = ctx.table  # the table at accept time; a reload does not move a live connection
        # Where no first bytes pick the route, it is known now: before any limit is checked
        # (refusals are logged on their route), and its max_lifetime is the scope's from the
        # start (a deadline given to a new scope costs less than one moved later).
        found = None if table.reads_first_bytes(listener) else table.match(listener, conn.client_ip)
        if isinstance(found, CompiledRoute):
            conn.route = found.name
        conn.scope = trio.CancelScope(deadline=now + (found if isinstance(found, CompiledRoute) else table).policy.max_lifetime)
        with conn.scope, Places(ctx.gate) as places:  # the scope: kill(), the first cause, and max_lifetime (its deadline)
            # What to do is decided by a coroutine that has returned when it is done (its
            # frame is not held by the connection while its bytes are relayed).
            action = await _route(ctx, table, conn, sock, found, places)
            await action
        if conn.scope.cancelled_caught:
            conn.settle(Reason.LIFETIME_EXCEEDED)  # kill() and end() record theirs before cancelling
    except BaseException as exc:  # noqa: BLE001 - _leave raises again what must leave
        _leave(conn, exc)
    finally:
        sock.close()  # without an await: nothing on its way out is replaced
        ctx.closed(conn)


async def run_session(ctx: ConnectionContext, flow: Flow) -> None:
    """The whole life of one UDP session (a client flow's first datagram has come), with
    the same scopes and the same one-reason ending as a connection: route, limits, then
    the route's action; leaving, the session's socket closes and its end is recorded."""
    now = trio.current_time()
    conn = flow.conn = Session(
        id=ctx.next_id(),
        client_ip=str(flow.client[0]),
        client_port=int(flow.client[1]),
        listener=flow.listener.key,
        started=time.time(),
        opened=now,
        last_activity=now,
    )
    ctx.opened(conn)
    try:
        table = ctx.table  # the table at its first datagram; a reload does not move a live session
        found = table.match(conn.listener, conn.client_ip)
        route = found if isinstance(found, CompiledRoute) else None
        if route is not None:
            conn.route = route.name
        conn.scope = trio.CancelScope(deadline=now + (route or table).policy.max_lifetime)
        with conn.scope, Places(ctx.gate) as places:
            places.client(conn.client_ip, now)
            if route is None:
                raise ConnectionEnded(found if isinstance(found, Reason) else Reason.NO_ROUTE)
            places.route(ctx.route_gate(route), now)
            await UDP_ACTIONS[route.kind](ctx, conn, flow, route)
        if conn.scope.cancelled_caught:
            conn.settle(Reason.LIFETIME_EXCEEDED)
    except BaseException as exc:  # noqa: BLE001 - _leave raises again what must leave
        _leave(conn, exc)
    finally:
        ctx.engine.datagrams.forget(flow)  # its socket closes; a refused flow is remembered
        ctx.closed(conn)


def _leave(conn: Connection | Session, exc: BaseException) -> None:
    """Record what `exc` means for `conn`; raise again only what must leave it (see
    `_settle_from`), so that nothing else reaches the nursery of all connections."""
    escaping = _settle_from(conn, exc)
    if escaping is exc:
        raise exc
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


async def _route(
    ctx: ConnectionContext, table: RouteTable, conn: Connection, client: socket.socket, found: CompiledRoute | Reason | None, places: Places
) -> Awaitable[None]:
    """The connection's route, from its first bytes where they pick it, with its places
    in the limits taken: the route's action, ready to be awaited."""
    listener = conn.listener
    reads = table.reads_first_bytes(listener)
    first = FirstBytes()
    first_bytes_due = conn.opened + table.first_bytes_timeout(listener)
    if table.accepts_proxy(listener):
        # Who the client is comes first: from a trusted proxy, its header says so.
        conn.state = "reading"
        with deadline_at(first_bytes_due, Reason.INITIAL_DATA_TIMEOUT):
            await read_proxy_header(SocketReceiver(client), first, required=table.is_trusted_proxy(conn.client_ip))
        _take_proxy_header(conn, first)
    places.client(conn.client_ip, trio.current_time())
    if table.reads_client_hello(listener):
        conn.state = "reading"
        with deadline_at(first_bytes_due, Reason.INITIAL_DATA_TIMEOUT):
            await read_client_hello(SocketReceiver(client), first)
    if reads:
        found = table.match(listener, conn.client_ip, first.hello.server_name if first.hello else None)
    if not isinstance(found, CompiledRoute):
        raise ConnectionEnded(found if found is not None else Reason.NO_ROUTE)
    route = found
    if reads:  # routed only now: the route's own lifetime from here on
        conn.route = route.name
        conn.scope.deadline = conn.opened + route.policy.max_lifetime
    places.route(ctx.route_gate(route), trio.current_time())
    return ACTIONS[route.kind](ctx, conn, client, route, first)


def _take_proxy_header(conn: Connection, first: FirstBytes) -> None:
    """From here on the connection is the one the PROXY header describes."""
    header = first.proxy
    if header is not None and header.command == "PROXY" and header.source and header.destination:
        conn.client_ip, conn.client_port = header.source
        conn.local = header.destination
