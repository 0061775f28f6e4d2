"""The control client: one connection to a daemon's control socket.

async with triofwd.open_control(path) as client:
    rows = await client.request("connections", route="web")
    async for event in client.watch(): ...
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import os
import socket
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

import msgspec
import trio
import trio_websocket

from .._endings import leaves
from .._errors import ControlConnectionError, ControlError
from .messages import Reply, Request, encode

__all__ = ["ControlClient", "open_control"]

# Replies can be large (every connection of a busy daemon): the client accepts more.
CLIENT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
HANDSHAKE_TIMEOUT = 5.0
CLOSE_TIMEOUT = 1.0
ABNORMAL_CLOSURE = 1006  # RFC 6455 7.4.1: the connection ended without a close frame


class ControlClient:
    """One connection to a control socket; see `open_control`."""

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self._ws = ws
        self._ids = itertools.count(1)
        # Messages that arrived while request() waited for its reply (watch events,
        # replies to requests sent with send()): receive() hands them out first.
        self._pending: collections.deque[dict[str, Any]] = collections.deque()
        # Tasks that share a client take turns: a reply read by one task while another
        # waits for its own would otherwise leave that one waiting for good.
        self._turn = trio.Lock()

    async def request(self, cmd: str, **args: Any) -> Any:
        """Run one command; its result, or ControlError with the daemon's error text.

        Safe to call from several tasks at once: they take turns."""
        async with self._turn:
            request_id = await self.send(cmd, args)
            while True:
                message = await self._receive()
                if "event" not in message and message.get("id") == request_id:
                    break
                self._pending.append(message)
        return _result(message)

    async def watch(self) -> AsyncIterator[dict[str, Any]]:
        """The open/close events from now on; ControlError if the daemon drops the watch."""
        request_id = await self.send("watch", {})
        while True:
            message = await self.receive()
            if "event" in message:
                yield message
            elif message.get("id") == request_id:
                _result(message)  # the ok reply that starts the stream, or the error that ends it

    async def send(self, cmd: str, args: Mapping[str, Any] | None = None) -> int:
        """Send a request without waiting; returns its id."""
        request_id = next(self._ids)
        await self.send_raw(encode(Request(cmd, id=request_id, args=msgspec.Raw(msgspec.json.encode(dict(args or {}))))))
        return request_id

    async def send_raw(self, data: str | bytes) -> None:
        """Send one message as is, whatever it holds: str as a text frame, bytes as binary."""
        with _mapped_client_errors():
            await self._ws.send_message(data)

    async def receive(self) -> dict[str, Any]:
        """The next message from the daemon: a reply or a watch event."""
        if self._pending:
            return self._pending.popleft()
        return await self._receive()

    async def _receive(self) -> dict[str, Any]:
        with _mapped_client_errors():
            message = await self._ws.get_message()
        decoded: dict[str, Any] = msgspec.json.decode(message)
        return decoded

    @property
    def closed(self) -> trio_websocket.CloseReason | None:
        """Why the daemon closed the connection (None while it is open)."""
        return self._ws.closed


def _result(message: Mapping[str, Any]) -> Any:
    """A reply's result, or ControlError with its error text."""
    reply = msgspec.convert(message, Reply)
    if reply.ok:
        return reply.result
    raise ControlError(reply.error or "error")


@contextlib.contextmanager
def _mapped_client_errors() -> Iterator[None]:
    try:
        yield
    except trio_websocket.ConnectionClosed as exc:
        reason = exc.reason
        if reason is None or reason.code == ABNORMAL_CLOSURE:
            # No close frame: the daemon stopped (or cut off a client that did not read).
            raise ControlConnectionError("control connection lost: the daemon stopped or dropped it") from None
        raise ControlConnectionError(f"control connection closed: {reason.code} {reason.reason or reason.name}") from None


@contextlib.asynccontextmanager
async def open_control(path: str | os.PathLike[str]) -> AsyncIterator[ControlClient]:
    """Connect to a control socket: `async with open_control(path) as client: ...`.

    Raises OSError (FileNotFoundError, PermissionError, ConnectionRefusedError) when the
    socket cannot be reached, ControlConnectionError when the daemon refuses the client
    or does not answer the handshake.
    """
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.connect(os.fspath(path))
    except BaseException:
        sock.close()
        raise
    stream = trio.SocketStream(sock)
    try:
        async with trio.open_nursery() as nursery:
            ws = await _client_handshake(nursery, stream)
            try:
                yield ControlClient(ws)
            finally:
                with trio.move_on_after(CLOSE_TIMEOUT, shield=True):
                    await ws.aclose()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The nursery wraps what the body or the reader task raised; give the one
        # exception back, as a caller of a plain function would expect.
        raise _sole(group) from None
    finally:
        await stream.aclose()


async def _client_handshake(nursery: trio.Nursery, stream: trio.SocketStream) -> trio_websocket.WebSocketConnection:
    # trio-websocket waits forever if the server closes before answering; bound it.
    with trio.move_on_after(HANDSHAKE_TIMEOUT):
        return await trio_websocket.wrap_client_stream(nursery, stream, "triofwd", "/", max_message_size=CLIENT_MAX_MESSAGE_BYTES)
    raise ControlConnectionError(f"no WebSocket handshake from the control socket within {HANDSHAKE_TIMEOUT:.0f}s (refused?)")


def _sole(group: BaseExceptionGroup[BaseException]) -> BaseException:
    found = list(leaves(group))
    # Ctrl-C lands in whichever task runs (often the WebSocket reader); what the other
    # tasks raise then is its consequence, so it is the one to report.
    interrupts = [exc for exc in found if isinstance(exc, KeyboardInterrupt)]
    if interrupts:
        return interrupts[0]
    found = [exc for exc in found if not isinstance(exc, trio.Cancelled)] or found
    if len(found) != 1:
        return group
    exc = found[0]
    if isinstance(exc, trio_websocket.ConnectionRejected):
        return ControlConnectionError(f"the control socket refused this client (HTTP {exc.status_code})")
    if isinstance(exc, trio_websocket.HandshakeError):
        return ControlConnectionError(f"WebSocket handshake failed: {exc!r}")
    return exc
