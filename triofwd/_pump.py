"""The copying relay, for streams the engine cannot move: TLS, and a handler's connection.

Two pump tasks copy through trio's streams (`receive_some`, `send_all`); the connection's
task waits for them under its IdleWatch, the same quiet limits (inactivity, half-close,
extended keepalive) the engine's relays keep. Bytes are counted and stamped as activity as
each chunk is delivered. Stream failures are translated into ConnectionEnded where each
read or write happens, so the reason names the side that failed. TLS cannot half-close: an
EOF from or toward a TLS stream ends the whole connection, normally, once what was read is
delivered. Plain TCP relays go through the data engine (`_engine`) instead.
"""

from __future__ import annotations

import socket

import trio

from ._endings import failure_means
from ._errors import ConnectionEnded
from ._idle import IdleWatch
from ._policy import Policy
from ._reasons import Reason
from ._record import Connection
from ._splice import COPY_CHUNK

__all__ = ["IN", "OUT", "ReplayStream", "Traffic", "TrafficStream", "relay"]

# The client->target pump's task name: a constant, not one f-string per connection.
PUMP_TASK = "triofwd pump client->target"

IN = "in"  # client -> target (bytes_in)
OUT = "out"  # target -> client (bytes_out)
_RESET = {IN: (Reason.CLIENT_RESET, Reason.TARGET_RESET), OUT: (Reason.TARGET_RESET, Reason.CLIENT_RESET)}


class Traffic:
    """What the pumps (or a handler's stream) tell the connection: bytes, EOFs, the end."""

    __slots__ = ("conn", "idle", "open_directions", "over", "sockets")

    def __init__(self, conn: Connection, policy: Policy, sockets: tuple[socket.socket, ...] = ()) -> None:
        self.conn = conn
        self.idle = IdleWatch(conn, policy)
        self.sockets = sockets  # the TCP sockets under the streams (see IdleWatch.passed)
        self.over = trio.Event()
        self.open_directions = 2
        conn.last_activity = trio.current_time()

    def moved(self, direction: str, n: int) -> None:
        """`n` bytes were delivered in `direction`."""
        conn = self.conn
        if direction == IN:
            conn.bytes_in += n
        else:
            conn.bytes_out += n
        conn.last_activity = trio.current_time()

    def closed(self, direction: str) -> None:
        """`direction` finished with EOF (a packet from a live peer: activity too). The first
        starts the half-close clock; the second ends the traffic."""
        now = self.conn.last_activity = trio.current_time()
        self.open_directions -= 1
        if self.open_directions:
            self.idle.half_closed(now)
        else:
            self.finish()

    def finish(self) -> None:
        """End the traffic normally now: both directions are done, a handler returned, or an
        EOF came from or went toward a stream that cannot half-close (TLS)."""
        self.conn.last_activity = trio.current_time()
        self.over.set()

    async def watch(self) -> Reason | None:
        """Until the traffic is over (None), or a quiet limit passes (its reason)."""
        return await self.idle.wait(self.over.wait, self.sockets)


async def pump(src: trio.abc.Stream, dst: trio.abc.Stream, traffic: Traffic, direction: str) -> None:
    """Copy src to dst until EOF, then pass the EOF on as a write shutdown (or, where TLS
    cannot take one, end the traffic)."""
    src_failed, dst_failed = _RESET[direction]
    while True:
        with failure_means(src_failed):
            data = await src.receive_some(COPY_CHUNK)
        if not data:
            break
        traffic.conn.last_activity = trio.current_time()
        try:
            with failure_means(dst_failed):
                await dst.send_all(data)
        except ConnectionEnded as ended:
            if _broken_before(ended):
                traffic.finish()  # the other direction's EOF (or its failure, raised there) ends it
                return
            raise
        traffic.moved(direction, len(data))
    if not (isinstance(src, trio.abc.HalfCloseableStream) and isinstance(dst, trio.abc.HalfCloseableStream)):
        # TLS cannot half-close (trio's SSLStream has no write shutdown, and one that read a
        # TCP EOF can no longer send): an EOF from or toward a TLS stream ends the whole
        # connection, normally, now that what was read is delivered.
        traffic.finish()
        return
    with failure_means(dst_failed):
        await dst.send_eof()
    traffic.closed(direction)


def _broken_before(ended: ConnectionEnded) -> bool:
    """The send failed on a TLS stream that was broken before it began: trio breaks an
    SSLStream when it reads a TCP EOF (no close_notify), and raises BrokenResourceError with
    no cause when it is used after that. That is the peer's end, seen by the other direction,
    not a new failure of this one."""
    error = ended.__cause__
    return isinstance(error, trio.BrokenResourceError) and error.__cause__ is None


async def relay(
    conn: Connection, client: trio.abc.Stream, target: trio.abc.Stream, policy: Policy, sockets: tuple[socket.socket, ...] = (), initial: bytes = b""
) -> None:
    """Bytes both ways until both directions are done, with `initial` sent to the target
    first; `sockets`: the TCP sockets under the streams (see IdleWatch)."""
    conn.path = "copy"
    traffic = Traffic(conn, policy, sockets)
    async with trio.open_nursery() as nursery:
        if initial:
            with failure_means(Reason.TARGET_RESET):
                await target.send_all(initial)
            traffic.moved(IN, len(initial))
        nursery.start_soon(pump, client, target, traffic, IN, name=PUMP_TASK)
        nursery.start_soon(pump, target, client, traffic, OUT)
        quiet = await traffic.watch()
        nursery.cancel_scope.cancel()  # over, or quiet too long: a pump that still waits stops
    if quiet is not None:
        raise ConnectionEnded(quiet)  # outside the nursery: no group around it


class ReplayStream(trio.abc.HalfCloseableStream):
    """A socket stream whose first reads return bytes already taken from it (a ClientHello)."""

    def __init__(self, stream: trio.SocketStream, initial: bytes = b"") -> None:
        self.stream = stream
        self._initial = initial

    @property
    def socket(self) -> trio.socket.SocketType:
        return self.stream.socket

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._initial:
            size = len(self._initial) if max_bytes is None else max_bytes
            data, self._initial = self._initial[:size], self._initial[size:]
            await trio.lowlevel.checkpoint()
            return data
        return await self.stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.stream.send_eof()

    async def aclose(self) -> None:
        await self.stream.aclose()


class TrafficStream(ReplayStream):
    """The client stream as a handler sees it: counted, timed, errors mapped to client_reset.

    Bytes already read from the client (a ClientHello, say) come out first.
    """

    def __init__(self, stream: trio.SocketStream, traffic: Traffic, initial: bytes = b"") -> None:
        super().__init__(stream, initial)
        self.traffic = traffic

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        with failure_means(Reason.CLIENT_RESET):
            data = await super().receive_some(max_bytes)
        if data:
            self.traffic.moved(IN, len(data))
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        with failure_means(Reason.CLIENT_RESET):
            await self.stream.send_all(data)
        self.traffic.moved(OUT, len(data))

    async def send_eof(self) -> None:
        with failure_means(Reason.CLIENT_RESET):
            await self.stream.send_eof()
