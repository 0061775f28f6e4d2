"""What a route does with a connection: forward, bridge, reject, handler.

Each action runs inside the connection's scopes (lifetime, limits) and raises
ConnectionEnded for any end other than a normal one.
"""

from __future__ import annotations

import math
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import trio

from ._dial import dialed
from ._firstbytes import FirstBytes
from ._proxy_protocol import encode_v1, encode_v2
from ._pump import ReplayStream, TrafficStream, relay, traffic_nursery
from ._reasons import ConnectionEnded, Reason, deadline_means, failure_means
from ._tls import handshake

if TYPE_CHECKING:
    from ._connection import Connection
    from ._server import Forwarder
    from ._table import CompiledRoute

__all__ = ["ACTIONS", "HandlerInfo"]

Action = Callable[["Forwarder", "Connection", trio.SocketStream, "CompiledRoute", FirstBytes], Awaitable[None]]

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


async def _send_proxy_header(version: str, conn: Connection, target: trio.SocketStream) -> None:
    """The PROXY header (v1/v2) that tells the target who the real client is."""
    if not version:
        return
    source, destination = (conn.client_ip, conn.client_port), conn.local
    header = encode_v1(source, destination) if version == "v1" else encode_v2(source, destination)
    with failure_means(Reason.TARGET_RESET):
        await target.send_all(header)


async def forward(fwd: Forwarder, conn: Connection, client: trio.SocketStream, route: CompiledRoute, first: FirstBytes) -> None:
    """Bytes both ways between the client and a target; the first bytes already read go first."""
    async with dialed(conn, route, fwd._targets_for(route)) as target:
        _established(conn, route, client, target)
        await _send_proxy_header(route.proxy_protocol, conn, target)
        await relay(conn, client, target, route.policy, first.data)


async def offloaded(fwd: Forwarder, conn: Connection, client: trio.SocketStream, route: CompiledRoute, first: FirstBytes) -> None:
    """The kernel should have taken this connection; one that reaches us is closed and counted."""
    raise ConnectionEnded(Reason.OFFLOADED)


async def reject(fwd: Forwarder, conn: Connection, client: trio.SocketStream, route: CompiledRoute, first: FirstBytes) -> None:
    raise ConnectionEnded(Reason.REJECTED)


async def handle(fwd: Forwarder, conn: Connection, client: trio.SocketStream, route: CompiledRoute, first: FirstBytes) -> None:
    """A handler callable owns the connection, inside the same scopes and counters."""
    assert route.handler is not None  # compile_table guarantees it for action = "handler"
    handler = route.handler
    info = HandlerInfo(conn.id, route.name, (conn.client_ip, conn.client_port), conn.local)
    set_tcp_keepalive(client, route.policy.tcp_keepalive)
    conn.state = "handler"
    async with traffic_nursery(conn, route.policy) as (traffic, _):
        await handler(TrafficStream(client, traffic, first.data), info)
        traffic.finish()  # the handler is done, and so is the connection (its warning with it)


async def bridge(fwd: Forwarder, conn: Connection, client: trio.SocketStream, route: CompiledRoute, first: FirstBytes) -> None:
    """Hand the connection, ClientHello and all, to a TLS terminator.

    bridge_to = "host:port": an external terminator, told the real client by a PROXY v2
    header on the hop; it cannot be reached: bridge_error. The built-in terminator runs
    here, inside the connection's own scopes (no loopback hop, so nothing to leak): the
    handshake is bounded by initial_data_timeout and a failed one is tls_error.
    """
    if route.bridge_to is not None:
        async with dialed(conn, route, fwd._targets_for(route), failure=Reason.BRIDGE_ERROR) as hop:
            _established(conn, route, client, hop)
            await _send_proxy_header("v2", conn, hop)
            await relay(conn, client, hop, route.policy, first.data)
        return
    tls = route.tls
    assert tls is not None  # compile_table guarantees it for the built-in terminator
    hello = first.hello
    from_client = ReplayStream(client, first.data)
    conn.state = "handshake"
    if tls.mode == "terminate":
        secure = trio.SSLStream(from_client, tls.server_context(), server_side=True, https_compatible=True)
        with deadline_means(route.policy.initial_data_timeout, Reason.INITIAL_DATA_TIMEOUT):
            await handshake(secure, peer_is_client=True)
        async with dialed(conn, route, fwd._targets_for(route)) as target:
            _established(conn, route, client, target)
            await _send_proxy_header(route.proxy_protocol, conn, target)
            await relay(conn, secure, target, route.policy)
            await _close_notify(secure)
        return
    async with dialed(conn, route, fwd._targets_for(route)) as raw_target:
        await _send_proxy_header(route.proxy_protocol, conn, raw_target)
        sni = hello.server_name if hello else None
        with failure_means(Reason.TARGET_RESET):  # it reset since the dial (ENOTCONN)
            target_ip = str(raw_target.socket.getpeername()[0])
        name = tls.target_name(sni, target_ip)
        target = trio.SSLStream(raw_target, tls.client_context(hello.alpn if hello else ()), server_hostname=name, https_compatible=True)
        with deadline_means(route.policy.connect_timeout, Reason.CONNECT_TIMEOUT):
            await handshake(target, peer_is_client=False)
        secure = trio.SSLStream(from_client, tls.server_context(target.selected_alpn_protocol()), server_side=True, https_compatible=True)
        with deadline_means(route.policy.initial_data_timeout, Reason.INITIAL_DATA_TIMEOUT):
            await handshake(secure, peer_is_client=True)
        _established(conn, route, client, raw_target)
        await relay(conn, secure, target, route.policy)
        await _close_notify(secure)


async def _close_notify(stream: trio.SSLStream) -> None:
    """At a normal end, tell the TLS client so (close_notify), so it sees a clean EOF."""
    with trio.move_on_after(CLOSE_NOTIFY_TIMEOUT):
        try:
            await stream.aclose()
        except (trio.BrokenResourceError, OSError):
            pass  # the client is already gone: nothing left to tell it


ACTIONS: dict[str, Action] = {"forward": forward, "reject": reject, "handler": handle, "bridge": bridge, "offload": offloaded}
