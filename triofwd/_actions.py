"""What a route does with a connection, by the kind its table fixed: forward, bridge_to,
terminate, reencrypt, handler, reject, offload.

Each action runs inside the connection's scopes (lifetime, limits) and raises
ConnectionEnded for any end other than a normal one. Every kind that dials goes through
one sequence, `_dial_and_relay`: dial (connect_timeout, retries over the targets), the
PROXY header, the TLS handshakes where TLS ends here, established, relay.
"""

from __future__ import annotations

import math
import socket
from collections.abc import Awaitable, Callable

import trio

from ._context import ConnectionContext
from ._dial import dialed
from ._endings import deadline_means, failure_means
from ._errors import ConnectionEnded
from ._firstbytes import FirstBytes
from ._proxy_protocol import encode_v1, encode_v2
from ._pump import ReplayStream, TrafficStream, relay, traffic_nursery
from ._reasons import Reason
from ._record import Connection
from ._table import CompiledRoute
from ._tls import handshake

__all__ = ["ACTIONS", "HandlerInfo"]

Action = Callable[[ConnectionContext, Connection, trio.SocketStream, CompiledRoute, FirstBytes], Awaitable[None]]
# What the TLS to a target and back makes of the raw target: (the client side, the target side).
Upgrade = Callable[[trio.SocketStream], Awaitable[tuple[trio.abc.Stream, trio.abc.Stream]]]

# Kernel keep-alive (tcp_keepalive): probe every IDLE/KEEPALIVE_PROBE_DIVISOR seconds
# after IDLE seconds of silence, and give up after KEEPALIVE_PROBES unanswered probes.
KEEPALIVE_PROBE_DIVISOR = 4
KEEPALIVE_PROBES = 4
# How long a terminated TLS connection may take to say close_notify at a normal end.
CLOSE_NOTIFY_TIMEOUT = 1.0


class HandlerInfo:
    """What a handler route's callable learns about its connection."""

    __slots__ = ("client", "id", "local", "route")

    def __init__(self, id: int, route: str, client: tuple[str, int], local: tuple[str, int]) -> None:
        self.id = id
        self.route = route
        self.client = client  # the real client (from a PROXY header where one was accepted)
        self.local = local  # the address it connected to

    def __repr__(self) -> str:
        return f"HandlerInfo(id={self.id}, route={self.route!r}, client={self.client}, local={self.local})"


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


def _established(conn: Connection, route: CompiledRoute, *streams: trio.SocketStream) -> None:
    for stream in streams:
        set_tcp_keepalive(stream, route.policy.tcp_keepalive)
    conn.state = "established"


async def _send_proxy_header(version: str, conn: Connection, target: trio.abc.Stream) -> None:
    """The PROXY header (v1/v2) that tells the target who the real client is."""
    if not version:
        return
    source, destination = (conn.client_ip, conn.client_port), conn.local
    header = encode_v1(source, destination) if version == "v1" else encode_v2(source, destination)
    with failure_means(Reason.TARGET_RESET):
        await target.send_all(header)


async def _dial_and_relay(
    ctx: ConnectionContext,
    conn: Connection,
    route: CompiledRoute,
    client: trio.SocketStream,
    client_side: trio.abc.Stream,
    initial: bytes = b"",
    *,
    header: str | None = None,
    failure: Reason | None = None,
    upgrade: Upgrade | None = None,
) -> trio.abc.Stream:
    """The one sequence of every route that dials: dial, the PROXY header (`header`, else the
    route's), `upgrade` (TLS to the target, then to the client), established, relay (with
    `initial`, the bytes already read, sent first). Returns the client side it relayed."""
    async with dialed(conn, route, ctx.targets.for_route(route), failure=failure) as target:
        await _send_proxy_header(route.proxy_protocol if header is None else header, conn, target)
        target_side: trio.abc.Stream = target
        if upgrade is not None:
            client_side, target_side = await upgrade(target)
        _established(conn, route, client, target)
        await relay(conn, client_side, target_side, route.policy, initial)
    return client_side


async def forward(ctx: ConnectionContext, conn: Connection, client: trio.SocketStream, route: CompiledRoute, first: FirstBytes) -> None:
    """Bytes both ways between the client and a target; the first bytes already read go first."""
    await _dial_and_relay(ctx, conn, route, client, client, first.data)


async def bridge_to(ctx: ConnectionContext, conn: Connection, client: trio.SocketStream, route: CompiledRoute, first: FirstBytes) -> None:
    """The connection, ClientHello and all, to an external TLS terminator, told the real
    client by a PROXY v2 header on the hop; one that cannot be reached is bridge_error."""
    await _dial_and_relay(ctx, conn, route, client, client, first.data, header="v2", failure=Reason.BRIDGE_ERROR)


async def terminate(ctx: ConnectionContext, conn: Connection, client: trio.SocketStream, route: CompiledRoute, first: FirstBytes) -> None:
    """The built-in terminator, inside the connection's own scopes (no loopback hop, so
    nothing to leak): the client's handshake, bounded by initial_data_timeout (tls_error if
    it fails), then plaintext to a target."""
    assert route.tls is not None  # compile_table: a terminate route has its TLS
    secure = trio.SSLStream(ReplayStream(client, first.data), route.tls.server_context(), server_side=True, https_compatible=True)
    conn.state = "handshake"
    with deadline_means(route.policy.initial_data_timeout, Reason.INITIAL_DATA_TIMEOUT):
        await handshake(secure, peer_is_client=True)
    await _dial_and_relay(ctx, conn, route, client, secure)
    await _close_notify(secure)


async def reencrypt(ctx: ConnectionContext, conn: Connection, client: trio.SocketStream, route: CompiledRoute, first: FirstBytes) -> None:
    """The built-in terminator, re-encrypting: TLS to the target first (verified against
    target_ca for target_sni, else the client's SNI; within connect_timeout), with the
    client's ALPN offer, then the client's handshake answered with the target's choice."""
    tls = route.tls
    assert tls is not None  # compile_table: a reencrypt route has its TLS
    hello = first.hello
    conn.state = "handshake"

    async def upgrade(raw_target: trio.SocketStream) -> tuple[trio.abc.Stream, trio.abc.Stream]:
        with failure_means(Reason.TARGET_RESET):  # it reset since the dial (ENOTCONN)
            target_ip = str(raw_target.socket.getpeername()[0])
        name = tls.target_name(hello.server_name if hello else None, target_ip)
        target = trio.SSLStream(raw_target, tls.client_context(hello.alpn if hello else ()), server_hostname=name, https_compatible=True)
        with deadline_means(route.policy.connect_timeout, Reason.CONNECT_TIMEOUT):
            await handshake(target, peer_is_client=False)
        secure = trio.SSLStream(ReplayStream(client, first.data), tls.server_context(target.selected_alpn_protocol()), server_side=True, https_compatible=True)
        with deadline_means(route.policy.initial_data_timeout, Reason.INITIAL_DATA_TIMEOUT):
            await handshake(secure, peer_is_client=True)
        return secure, target

    await _close_notify(await _dial_and_relay(ctx, conn, route, client, client, upgrade=upgrade))


async def offloaded(ctx: ConnectionContext, conn: Connection, client: trio.SocketStream, route: CompiledRoute, first: FirstBytes) -> None:
    """The kernel should have taken this connection; one that reaches us is closed and counted."""
    raise ConnectionEnded(Reason.OFFLOADED)


async def reject(ctx: ConnectionContext, conn: Connection, client: trio.SocketStream, route: CompiledRoute, first: FirstBytes) -> None:
    raise ConnectionEnded(Reason.REJECTED)


async def handle(ctx: ConnectionContext, conn: Connection, client: trio.SocketStream, route: CompiledRoute, first: FirstBytes) -> None:
    """A handler callable owns the connection, inside the same scopes and counters."""
    assert route.handler is not None  # compile_table: a handler route has its callable
    handler = route.handler
    info = HandlerInfo(conn.id, route.name, (conn.client_ip, conn.client_port), conn.local)
    set_tcp_keepalive(client, route.policy.tcp_keepalive)
    conn.state = "handler"
    async with traffic_nursery(conn, route.policy) as (traffic, _):
        await handler(TrafficStream(client, traffic, first.data), info)
        traffic.finish()  # the handler is done, and so is the connection (its warning with it)


async def _close_notify(stream: trio.abc.Stream) -> None:
    """At a normal end, tell the TLS client so (close_notify), so it sees a clean EOF."""
    with trio.move_on_after(CLOSE_NOTIFY_TIMEOUT):
        try:
            await stream.aclose()
        except (trio.BrokenResourceError, OSError):
            pass  # the client is already gone: nothing left to tell it


ACTIONS: dict[str, Action] = {
    "forward": forward,
    "bridge_to": bridge_to,
    "terminate": terminate,
    "reencrypt": reencrypt,
    "handler": handle,
    "reject": reject,
    "offload": offloaded,
}
