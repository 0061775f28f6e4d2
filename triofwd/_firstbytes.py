"""Reading a connection's first bytes: a PROXY header, a TLS ClientHello.

The parsing is pure (`_proxy_protocol`, `_clienthello`); this is the small I/O loop
around it. It runs inside the connection's initial-data scope, so a client that sends
nothing, or sends slowly, ends with `initial_data_timeout` and never hangs a task.
"""

from __future__ import annotations

import dataclasses
import socket
from typing import Protocol

import trio

from . import _rawsock as rawsock
from ._clienthello import ClientHello, ClientHelloError, parse_client_hello
from ._errors import ConnectionEnded
from ._proxy_protocol import V1_PREFIX, V2_SIGNATURE, ProxyHeader, ProxyHeaderError, parse_proxy_header
from ._reasons import Reason

__all__ = ["FirstBytes", "SocketReceiver", "read_client_hello", "read_proxy_header"]

# The parsers bound what they accept (a v2 header 4 KiB, a ClientHello 64 KiB); reads
# are this size so that a large hello needs only a few trips through the scheduler.
READ_SIZE = 16384


class Receiver(Protocol):
    """What the readers read from: a stream, or a raw socket (SocketReceiver)."""

    async def receive_some(self, max_bytes: int) -> bytes | bytearray: ...


class SocketReceiver:
    """A raw socket's bytes as the readers take them: tried first, waited for in trio."""

    __slots__ = ("sock",)

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    async def receive_some(self, max_bytes: int) -> bytes:
        return await rawsock.receive_some(self.sock, max_bytes)


@dataclasses.dataclass
class FirstBytes:
    """What was read before routing: bytes still owed to the target, and what they said."""

    data: bytes = b""
    proxy: ProxyHeader | None = None
    hello: ClientHello | None = None


async def _more(stream: Receiver, data: bytes) -> bytes:
    try:
        chunk = await stream.receive_some(READ_SIZE)
    except (trio.BrokenResourceError, OSError) as exc:
        raise ConnectionEnded(Reason.CLIENT_RESET, f"reset before its first bytes: {exc}") from exc
    if not chunk:
        # Gone before saying enough to be routed (HAProxy's "client aborted").
        raise ConnectionEnded(Reason.CLIENT_RESET, "closed before its first bytes were complete")
    return data + chunk


def _signature_state(data: bytes) -> str:
    """ "yes" if `data` starts with a PROXY signature, "maybe" if it is still a prefix of one, else "no"."""
    for signature in (V1_PREFIX, V2_SIGNATURE):
        if data.startswith(signature):
            return "yes"
    if any(signature.startswith(data) for signature in (V1_PREFIX, V2_SIGNATURE)):
        return "maybe"
    return "no"


async def read_proxy_header(stream: Receiver, first: FirstBytes, *, required: bool) -> None:
    """Read a PROXY header into `first.proxy`, leaving what follows it in `first.data`.

    required: the peer is a trusted proxy and must send one. Otherwise the peer is a
    direct client, and a header from it is refused: only trusted_proxies may say who
    the client is. (A direct client is read only until its bytes cannot be a header.)
    """
    data = first.data
    while True:
        if not required:
            state = _signature_state(data) if data else "maybe"
            if state == "yes":
                raise ConnectionEnded(Reason.REJECTED, "PROXY header from an address not in trusted_proxies")
            if state == "no":
                first.data = data
                return
        else:
            try:
                parsed = parse_proxy_header(data)
            except ProxyHeaderError as exc:
                raise ConnectionEnded(Reason.REJECTED, f"bad PROXY header from a trusted proxy: {exc}") from None
            if parsed is not None:
                first.proxy, used = parsed
                first.data = data[used:]
                return
        data = await _more(stream, data)


async def read_client_hello(stream: Receiver, first: FirstBytes) -> None:
    """Read until `first.data` holds a whole ClientHello (-> first.hello) or is not TLS at all.

    Bytes that are not a ClientHello (plain HTTP, garbage) leave `first.hello` None: the
    route table may still have a route without domains for them.
    """
    data = first.data
    while True:
        try:
            hello = parse_client_hello(data) if data else None
        except ClientHelloError:
            first.data = data
            return
        if hello is not None:
            first.data, first.hello = data, hello
            return
        data = await _more(stream, data)
