"""What a route does with a connection, by the kind its table fixed: forward, bridge_to,
terminate, reencrypt, socks5, http_connect, handler, reject, offload.

Each action runs inside the connection's scopes (lifetime, limits) and raises
ConnectionEnded for any end other than a normal one. Every kind that dials goes through
one sequence, `_dial_and_relay`: dial (connect_timeout, retries over the targets), the
PROXY header, the TLS handshakes where TLS ends here, established, relay.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable

import trio

from . import _rawsock as rawsock
from ._context import ConnectionContext
from ._datagrams import Flow, dial_datagrams
from ._dial import dial
from ._dynamic import read_http_connect, read_socks5, resolve
from ._endings import deadline_means, failure_means
from ._errors import ConnectionEnded
from ._firstbytes import FirstBytes
from ._idle import IdleWatch
from ._proxy_protocol import encode_v1, encode_v2
from ._pump import ReplayStream, Traffic, TrafficStream, relay
from ._reasons import Reason
from ._record import Connection, Session
from ._table import CompiledRoute
from ._targets import RouteTargets
from ._tls import handshake

__all__ = ["ACTIONS", "UDP_ACTIONS", "HandlerInfo"]

Action = Callable[[ConnectionContext, Connection, socket.socket, CompiledRoute, FirstBytes], Awaitable[None]]
# What a UDP route does with a session (its flow in the datagram mover).
SessionAction = Callable[[ConnectionContext, Session, Flow, CompiledRoute], Awaitable[None]]
# The TLS this end speaks, made of the dialed target: (the client side, the target side).
Secure = Callable[[socket.socket], Awaitable[tuple[trio.abc.Stream, trio.abc.Stream]]]
# What the client is told once its target is connected (socks5, http_connect).
Answer = Callable[[socket.socket], Awaitable[None]]
# How long a terminated TLS connection may take to say close_notify at a normal end.
CLOSE_NOTIFY_TIMEOUT = 1.0


class HandlerInfo:
    """What a handler route's callable learns about its connection (or UDP session)."""

    __slots__ = ("client", "id", "local", "route")

    def __init__(self, id: int, route: str, client: tuple[str, int], local: tuple[str, int]) -> None:
        self.id = id
        self.route = route
        self.client = client  # the real client (from a PROXY header where one was accepted)
        self.local = local  # the address it connected (UDP: sent) to

    def __repr__(self) -> str:
        return f"HandlerInfo(id={self.id}, route={self.route!r}, client={self.client}, local={self.local})"


def local_address(conn: Connection, sock: socket.socket) -> tuple[str, int]:
    """The address the client connected to (the PROXY header's, where one was accepted),
    read from the socket the first time something needs it."""
    if conn.local is None:
        local = sock.getsockname()
        conn.local = (str(local[0]), int(local[1]))
    return conn.local


def _established(ctx: ConnectionContext, conn: Connection, route: CompiledRoute, client: socket.socket, target: socket.socket) -> None:
    """Kernel keep-alive on both sockets: the client's inherited it from its listener unless
    its route asks for other than the listener's routes share."""
    idle = route.policy.tcp_keepalive
    if ctx.table.listener_keepalive(conn.listener) != idle:
        rawsock.set_tcp_keepalive(client, idle)
    rawsock.set_tcp_keepalive(target, idle)
    conn.state = "established"


async def _send_proxy_header(version: str, conn: Connection, client: socket.socket, target: socket.socket) -> None:
    """The PROXY header (v1/v2) that tells the target who the real client is."""
    if not version:
        return
    source, destination = (conn.client_ip, conn.client_port), local_address(conn, client)
    header = encode_v1(source, destination) if version == "v1" else encode_v2(source, destination)
    with failure_means(Reason.TARGET_RESET):
        await rawsock.send_all(target, header)


async def _dial_and_relay(
    ctx: ConnectionContext,
    conn: Connection,
    route: CompiledRoute,
    client: socket.socket,
    initial: bytes = b"",
    *,
    header: str | None = None,
    failure: Reason | None = None,
    tls: Secure | None = None,
    targets: RouteTargets | None = None,
    answer: Answer | None = None,
) -> None:
    """The one sequence of every route that dials: dial (the route's targets, or `targets`),
    the PROXY header (`header`, else the route's), `answer` (what the client is told of the
    connected target), `tls` (the TLS this end speaks: to the client, the target or both),
    established, relay (with `initial`, the bytes already read, sent first). Plain sockets
    both ways are the data engine's; a TLS stream on either side is copied by the relay's
    pump tasks."""
    if targets is None:
        targets = ctx.targets.for_route(route)
    with await dial(conn, route, targets, ctx.engine, failure=failure) as target:
        await _send_proxy_header(route.proxy_protocol if header is None else header, conn, client, target)
        if answer is not None:
            await answer(target)
        if tls is None:
            _established(ctx, conn, route, client, target)
            with ctx.engine.attached(conn, client, target, route.policy) as relayed:
                await relayed.run(initial)
            return
        client_side, target_side = await tls(target)
        _established(ctx, conn, route, client, target)
        await relay(conn, client_side, target_side, route.policy, (client, target))
    await _close_notify(client_side)


def stream_of(sock: socket.socket) -> trio.SocketStream:
    """A trio stream over a raw socket, for the paths that need one (TLS, handlers)."""
    return trio.SocketStream(trio.socket.from_stdlib_socket(sock))


# forward and bridge_to hand back _dial_and_relay's coroutine rather than await it: one
# coroutine frame fewer held by every idle connection.


def forward(ctx: ConnectionContext, conn: Connection, client: socket.socket, route: CompiledRoute, first: FirstBytes) -> Awaitable[None]:
    """Bytes both ways between the client and a target; the first bytes already read go first."""
    return _dial_and_relay(ctx, conn, route, client, first.data)


def bridge_to(ctx: ConnectionContext, conn: Connection, client: socket.socket, route: CompiledRoute, first: FirstBytes) -> Awaitable[None]:
    """The connection, ClientHello and all, to an external TLS terminator, told the real
    client by a PROXY v2 header on the hop; one that cannot be reached is bridge_error."""
    return _dial_and_relay(ctx, conn, route, client, first.data, header="v2", failure=Reason.BRIDGE_ERROR)


async def terminate(ctx: ConnectionContext, conn: Connection, client: socket.socket, route: CompiledRoute, first: FirstBytes) -> None:
    """The built-in terminator, inside the connection's own scopes (no loopback hop, so
    nothing to leak): the client's handshake, bounded by initial_data_timeout (tls_error if
    it fails), then plaintext to a target."""
    assert route.tls is not None  # compile_table: a terminate route has its TLS
    secure = trio.SSLStream(ReplayStream(stream_of(client), first.data), route.tls.server_context(), server_side=True, https_compatible=True)
    conn.state = "handshake"
    with deadline_means(route.policy.initial_data_timeout, Reason.INITIAL_DATA_TIMEOUT):
        await handshake(secure, peer_is_client=True)

    async def plaintext_target(target: socket.socket) -> tuple[trio.abc.Stream, trio.abc.Stream]:
        return secure, stream_of(target)

    await _dial_and_relay(ctx, conn, route, client, tls=plaintext_target)


async def reencrypt(ctx: ConnectionContext, conn: Connection, client: socket.socket, route: CompiledRoute, first: FirstBytes) -> None:
    """The built-in terminator, re-encrypting: TLS to the target first (verified against
    target_ca for target_sni, else the client's SNI; within connect_timeout), with the
    client's ALPN offer, then the client's handshake answered with the target's choice."""
    tls = route.tls
    assert tls is not None  # compile_table: a reencrypt route has its TLS
    hello = first.hello
    conn.state = "handshake"

    async def both_ways(raw_target: socket.socket) -> tuple[trio.abc.Stream, trio.abc.Stream]:
        with failure_means(Reason.TARGET_RESET):  # it reset since the dial (ENOTCONN)
            target_ip = str(raw_target.getpeername()[0])
        name = tls.target_name(hello.server_name if hello else None, target_ip)
        target = trio.SSLStream(stream_of(raw_target), tls.client_context(hello.alpn if hello else ()), server_hostname=name, https_compatible=True)
        with deadline_means(route.policy.connect_timeout, Reason.CONNECT_TIMEOUT):
            await handshake(target, peer_is_client=False)
        secure = trio.SSLStream(
            ReplayStream(stream_of(client), first.data), tls.server_context(target.selected_alpn_protocol()), server_side=True, https_compatible=True
        )
        with deadline_means(route.policy.initial_data_timeout, Reason.INITIAL_DATA_TIMEOUT):
            await handshake(secure, peer_is_client=True)
        return secure, target

    await _dial_and_relay(ctx, conn, route, client, tls=both_ways)


async def dynamic(ctx: ConnectionContext, conn: Connection, client: socket.socket, route: CompiledRoute, first: FirstBytes) -> None:
    """socks5 and http_connect: the client's handshake names the destination (within
    initial_data_timeout); it is checked against the route's destinations, resolved,
    dialled and answered, then relayed as forward relays. A failure before the answer is
    told to the client in its protocol's words."""
    read = read_socks5 if route.kind == "socks5" else read_http_connect
    request = await read(conn, client, route, first)
    with request.answering():
        targets = await resolve(conn, client, route, request)
        await _dial_and_relay(ctx, conn, route, client, request.leftover, targets=targets, answer=request.accept)


async def offloaded(ctx: ConnectionContext, conn: Connection, client: socket.socket, route: CompiledRoute, first: FirstBytes) -> None:
    """The kernel should have taken this connection; one that reaches us is closed and counted."""
    raise ConnectionEnded(Reason.OFFLOADED)


async def reject(ctx: ConnectionContext, conn: Connection, client: socket.socket, route: CompiledRoute, first: FirstBytes) -> None:
    raise ConnectionEnded(Reason.REJECTED)


async def handle(ctx: ConnectionContext, conn: Connection, client: socket.socket, route: CompiledRoute, first: FirstBytes) -> None:
    """A handler callable owns the connection, inside the same scopes, counters and quiet limits."""
    assert route.handler is not None  # compile_table: a handler route has its callable
    handler = route.handler
    info = HandlerInfo(conn.id, route.name, (conn.client_ip, conn.client_port), local_address(conn, client))
    if ctx.table.listener_keepalive(conn.listener) != route.policy.tcp_keepalive:
        rawsock.set_tcp_keepalive(client, route.policy.tcp_keepalive)
    conn.state = "handler"
    traffic = Traffic(conn, route.policy)
    stream = TrafficStream(stream_of(client), traffic, first.data)

    async def run() -> None:
        await handler(stream, info)
        traffic.finish()  # the handler is done, and so is the connection

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        quiet = await traffic.watch()
        nursery.cancel_scope.cancel()  # quiet too long: the handler stops
    if quiet is not None:
        raise ConnectionEnded(quiet)


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
    "socks5": dynamic,
    "http_connect": dynamic,
    "handler": handle,
    "reject": reject,
    "offload": offloaded,
}


async def forward_datagrams(ctx: ConnectionContext, conn: Session, flow: Flow, route: CompiledRoute) -> None:
    """A UDP session: a socket connected to a target (balanced, held in the balancer while the
    session lasts), handed to the datagram mover, which moves the flow's datagrams both ways
    and ends it (responses, an ICMP error); the task meanwhile keeps the quiet limits."""
    targets = ctx.targets.for_route(route)
    sock, index = await dial_datagrams(conn, route, targets)
    with targets.balancer.hold(index):
        ctx.engine.datagrams.attach(flow, sock, route.responses)  # from here the flow owns sock
        conn.state = "established"
        quiet = await IdleWatch(conn, route.policy).wait(flow.wait)
    if quiet is not None:
        raise ConnectionEnded(quiet)


async def handle_datagrams(ctx: ConnectionContext, conn: Session, flow: Flow, route: CompiledRoute) -> None:
    """A handler callable owns the session, as a TCP handler owns its connection: it gets
    the flow's datagrams and answers them through a DatagramSession, inside the session's
    scopes (lifetime, kill, shutdown) and quiet limits. Its return ends the session
    normally, and so does its `responses`-th reply."""
    assert route.handler is not None  # compile_table: a handler route has its callable
    handler = route.handler
    datagrams = ctx.engine.datagrams
    session = datagrams.open_session(flow, route.responses)  # from here the flow's datagrams queue for it
    info = HandlerInfo(conn.id, route.name, (conn.client_ip, conn.client_port), flow.local)
    conn.state = "handler"

    async def run() -> None:
        await handler(session, info)
        datagrams.end(flow)  # the handler is done, and so is the session

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        quiet = await IdleWatch(conn, route.policy).wait(flow.wait)
        nursery.cancel_scope.cancel()  # over (responses), or quiet too long: the handler stops
    if quiet is not None:
        raise ConnectionEnded(quiet)


async def reject_datagrams(ctx: ConnectionContext, conn: Session, flow: Flow, route: CompiledRoute) -> None:
    raise ConnectionEnded(Reason.REJECTED)


async def offloaded_datagrams(ctx: ConnectionContext, conn: Session, flow: Flow, route: CompiledRoute) -> None:
    """The kernel should have taken this flow; one that reaches us ends at once, and its
    datagrams are dropped and counted for a while (the refusal is remembered)."""
    raise ConnectionEnded(Reason.OFFLOADED)


UDP_ACTIONS: dict[str, SessionAction] = {
    "forward": forward_datagrams,
    "reject": reject_datagrams,
    "offload": offloaded_datagrams,
    "handler": handle_datagrams,
}
