"""Routes whose client names its destination: the SOCKS5 (RFC 1928, RFC 1929) and HTTP
CONNECT handshakes, and the checks between the name asked for and the dial.

    read_socks5 / read_http_connect   the handshake, within initial_data_timeout:
                                      authentication (the route's users), the request
    resolve(...)                      the allow-list, the name resolved (connect_timeout),
                                      every address checked again -> the addresses to dial
    with request.answering():         a failure before the answer is told to the client in
                                      its protocol's words (a SOCKS REP code, an HTTP status)
    request.accept(target)            the answer once the target is connected; from here on
                                      the connection is the forward path's

The codecs (`_socks5`, `_httpconnect`) and the allow-list (`_destinations`) are pure; this
module is their I/O, on the client's raw socket.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

import trio

from . import _rawsock as rawsock
from ._addresses import format_address
from ._connect import literal_family
from ._endings import deadline_at, deadline_means, failure_means, leaves
from ._errors import ConnectionEnded
from ._httpconnect import ESTABLISHED, ConnectReader, HttpConnectError, response, status_for_reason
from ._reasons import Reason
from ._socks5 import (
    METHOD_NO_ACCEPTABLE,
    NEED_DATA,
    REP_COMMAND_NOT_SUPPORTED,
    REP_SUCCEEDED,
    ConnectRequest,
    Greeting,
    Socks5Error,
    Socks5Server,
    UnsupportedCommand,
    UsernamePassword,
    choose_method,
    encode_reply,
    reply_for_errno,
    reply_for_reason,
)
from ._targets import RouteTargets

if TYPE_CHECKING:
    from ._credentials import Users
    from ._destinations import Destinations
    from ._firstbytes import FirstBytes
    from ._record import Connection
    from ._table import CompiledRoute

__all__ = ["Request", "read_http_connect", "read_socks5", "resolve"]

# A handshake message is a few hundred bytes at most (the codecs bound what they keep).
READ_SIZE = 4096
_COMMANDS = {0x02: "BIND", 0x03: "UDP ASSOCIATE"}


class Request:
    """A client's request for a destination, read; answered once, by `accept` or, for a
    failure before that, by `answering`."""

    __slots__ = ("answered", "client", "host", "leftover", "port", "protocol")

    def __init__(self, protocol: str, client: socket.socket, host: str, port: int, leftover: bytes) -> None:
        self.protocol = protocol  # "socks5" or "http_connect"
        self.client = client
        self.host = host  # a name (lower case) or an IP address, as the codecs give it
        self.port = port
        self.leftover = leftover  # what the client sent after its request: the tunnel's first bytes
        self.answered = False

    async def accept(self, target: socket.socket) -> None:
        """Tell the client its tunnel is open (SOCKS: with the address we connected from)."""
        self.answered = True
        if self.protocol == "socks5":
            answer = encode_reply(REP_SUCCEEDED, _bound(target))
        else:
            answer = ESTABLISHED
        await _send(self.client, answer)

    def answering(self) -> _Answering:
        """A block whose failure (a ConnectionEnded) the client is told of, if nothing was
        answered yet: denied, unresolvable, refused, timed out."""
        return _Answering(self)

    def refusal(self, ended: ConnectionEnded) -> bytes:
        """The bytes that tell the client why its request failed."""
        if self.protocol != "socks5":
            return response(status_for_reason(ended.reason))
        cause = ended.__cause__
        if ended.reason is Reason.TARGET_UNREACHABLE and isinstance(cause, OSError):
            return encode_reply(reply_for_errno(cause.errno))  # network or host unreachable
        return encode_reply(reply_for_reason(ended.reason))


class _Answering:
    __slots__ = ("request",)

    def __init__(self, request: Request) -> None:
        self.request = request

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if exc is None or self.request.answered:
            return
        ended = next((leaf for leaf in leaves(exc) if isinstance(leaf, ConnectionEnded)), None)
        if ended is None:
            return  # cancelled (a kill, a shutdown) or a bug: nothing to tell the client
        self.request.answered = True
        # Without an await (this is an exit on the way out): a reply is far smaller than an
        # empty socket's send buffer, and a client that cannot take it is gone anyway.
        try:
            self.request.client.send(self.request.refusal(ended), rawsock.FLAGS)
        except OSError:
            pass


def _bound(target: socket.socket) -> tuple[str, int]:
    with failure_means(Reason.TARGET_RESET):
        local = target.getsockname()
    return str(local[0]), int(local[1])


async def _send(client: socket.socket, data: bytes) -> None:
    with failure_means(Reason.CLIENT_RESET):
        await rawsock.send_all(client, data)


async def _receive(client: socket.socket) -> bytes:
    with failure_means(Reason.CLIENT_RESET):
        data = await rawsock.receive_some(client, READ_SIZE)
    if not data:
        raise ConnectionEnded(Reason.CLIENT_RESET, "closed during the handshake")
    return data


async def _verify(users: Users, name: bytes, password: bytes) -> bool:
    # A hashed password costs a tenth of a second of CPU by design: not on the event loop.
    return await trio.to_thread.run_sync(users.verify, name, password)


def _handshake_deadline(conn: Connection, route: CompiledRoute) -> float:
    return conn.opened + route.policy.initial_data_timeout


async def read_socks5(conn: Connection, client: socket.socket, route: CompiledRoute, first: FirstBytes) -> Request:
    """The SOCKS5 handshake up to the CONNECT request: the method (username/password when
    the route has users), the credentials, the request. BIND and UDP ASSOCIATE are refused
    (command not supported)."""
    users = route.users
    server = Socks5Server()
    data = first.data  # after a PROXY header: the handshake's first bytes
    conn.state = "handshake"
    with deadline_at(_handshake_deadline(conn, route), Reason.INITIAL_DATA_TIMEOUT):
        while True:
            if data:
                server.receive_data(data)
                data = b""
            try:
                event = server.next_event()
            except Socks5Error as exc:
                if exc.reply is not None:
                    await _send(client, encode_reply(exc.reply))
                raise ConnectionEnded(Reason.REJECTED, f"SOCKS5: {exc}") from None
            if event is NEED_DATA:
                data = await _receive(client)
            elif isinstance(event, Greeting):
                method = choose_method(event.methods, auth_required=bool(users))
                await _send(client, server.select_method(method))
                if method == METHOD_NO_ACCEPTABLE:
                    wanted = "username/password" if users else "no authentication"
                    raise ConnectionEnded(Reason.AUTH_FAILED, f"SOCKS5: the client does not offer {wanted}")
            elif isinstance(event, UsernamePassword):
                assert users is not None  # only asked for when the route has users
                ok = await _verify(users, event.username, event.password)
                await _send(client, server.auth_result(ok))
                if not ok:
                    raise ConnectionEnded(Reason.AUTH_FAILED, f"SOCKS5: user {event.username.decode('utf-8', 'replace')!r}")
            elif isinstance(event, UnsupportedCommand):
                await _send(client, encode_reply(REP_COMMAND_NOT_SUPPORTED))
                command = _COMMANDS.get(event.command, f"0x{event.command:02x}")
                raise ConnectionEnded(Reason.REJECTED, f"SOCKS5: command {command} is not supported (only CONNECT)")
            else:
                assert isinstance(event, ConnectRequest)
                return Request("socks5", client, event.host, event.port, server.leftover)


async def read_http_connect(conn: Connection, client: socket.socket, route: CompiledRoute, first: FirstBytes) -> Request:
    """The request head of an HTTP CONNECT (parsed by h11), and its Proxy-Authorization
    when the route has users (407 without a valid one)."""
    users = route.users
    reader = ConnectReader()
    conn.state = "handshake"
    with deadline_at(_handshake_deadline(conn, route), Reason.INITIAL_DATA_TIMEOUT):
        try:
            request = reader.feed(first.data) if first.data else None
            while request is None:
                request = reader.feed(await _receive(client))
        except HttpConnectError as exc:
            await _send(client, response(exc.status))
            raise ConnectionEnded(Reason.REJECTED, f"HTTP CONNECT: {exc}") from None
        if users:
            ok = request.credentials is not None and await _verify(users, *request.credentials)
            if not ok:
                await _send(client, response(407))
                who = "no credentials" if request.credentials is None else f"user {request.credentials[0].decode('utf-8', 'replace')!r}"
                raise ConnectionEnded(Reason.AUTH_FAILED, f"HTTP CONNECT: {who}")
    return Request("http_connect", client, request.host, request.port, request.leftover)


async def resolve(conn: Connection, client: socket.socket, route: CompiledRoute, request: Request) -> RouteTargets:
    """The addresses to dial for `request`: a name is checked against the allow-list,
    resolved (within connect_timeout), and each of its addresses checked again, so that
    only what was checked is dialled (no DNS rebinding around the list); an address the
    client gave is checked as it is."""
    destinations = route.destinations
    assert destinations is not None  # compile_table: a socks5 / http_connect route has its list
    if conn.listener[1] == 0:
        # This listener's port was not in the route file: the client must not be sent back to it.
        destinations = destinations.with_own([client.getsockname()[:2]])
    host, port = request.host, request.port
    conn.destination = format_address((host, port))
    if literal_family(host) is not None:
        addresses, via = [host], None
    elif not destinations.allows_name(host, port):
        raise ConnectionEnded(Reason.DESTINATION_DENIED, f"{conn.destination} is not in the allowed destinations")
    else:
        addresses, via = await _addresses(host, port, route.policy.connect_timeout), host
    return RouteTargets(route, resolved=_allowed(destinations, addresses, port, via))


async def _addresses(host: str, port: int, timeout: float) -> list[str]:
    """The addresses of `host`, in the resolver's order, each once."""
    with deadline_means(timeout, Reason.CONNECT_TIMEOUT):
        try:
            found = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:  # socket.gaierror, and the resolver's other failures
            raise ConnectionEnded(Reason.DNS_ERROR, f"{host}: {exc.strerror or exc}") from None
    return list(dict.fromkeys(str(info[4][0]) for info in found))


def _allowed(destinations: Destinations, addresses: list[str], port: int, via: str | None) -> list[tuple[str, int]]:
    allowed, why = [], None
    for address in addresses:
        denied = destinations.why_denied(address, port, via_name=via)
        if denied is None:
            allowed.append((address, port))
        else:
            why = why or denied
    if not allowed:
        raise ConnectionEnded(Reason.DESTINATION_DENIED, why or "no address")
    return allowed
