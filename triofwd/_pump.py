"""The data path: one pump, the relay that runs two of them, and the traffic scope.

Inactivity and half-close share one cancel scope around the pumps; every byte moves the
inactivity deadline, the first EOF starts the half-close deadline. When the scope fires,
leaving it raises ConnectionEnded with the reason of the deadline that passed. Socket errors
are translated into ConnectionEnded where each read or write happens (SpliceError on the
raw path, trio's stream errors on the copying one), so the reason names the side that failed.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, cast

import trio

from ._endings import failure_means
from ._errors import ConnectionEnded
from ._rawsock import raw_socket
from ._reasons import Reason
from ._splice import CHUNK, COPY_CHUNK, POOL, SPLICE_AT, SpliceError, copy_once, drain_pipe, lift_send_lowat, send_rest, shared_buffer, splice_once

if TYPE_CHECKING:
    from ._policy import Policy
    from ._record import Connection

__all__ = ["IN", "OUT", "ReplayStream", "Traffic", "TrafficStream", "relay", "traffic_nursery"]

log = logging.getLogger("triofwd.connection")

# splice(2) between plain TCP sockets; False forces the copying path (tests compare the two).
SPLICE = True

# The client->target pump's task name: a constant, not one f-string per connection.
PUMP_TASK = "triofwd pump client->target"

IN = "in"  # client -> target (bytes_in)
OUT = "out"  # target -> client (bytes_out)
_RESET = {IN: (Reason.CLIENT_RESET, Reason.TARGET_RESET), OUT: (Reason.TARGET_RESET, Reason.CLIENT_RESET)}


class Traffic:
    """One connection's activity clock: bytes, and one scope for inactivity and half-close.

    The scope's deadline is the earlier of "last byte + inactivity_timeout" and "first EOF +
    half_close_timeout"; one scope instead of two keeps an idle connection small. With
    keepalive "extended" the idle limit is kept by `watch_extended` instead, a task beside
    the work, so that the warning always comes first and the grace period after it is whole.
    """

    __slots__ = ("conn", "finished", "grace", "half_deadline", "half_window", "open_directions", "scope", "warn_after", "window")

    def __init__(self, conn: Connection, scope: trio.CancelScope, policy: Policy) -> None:
        self.conn = conn
        self.scope = scope
        self.warn_after = policy.idle_warning_after
        self.grace = policy.idle_window - self.warn_after
        # The idle window the scope's deadline keeps: none for "immortal", and none for
        # "extended", whose watcher keeps it.
        self.window = policy.idle_window if self.warn_after == math.inf else math.inf
        self.half_window = policy.half_close_timeout
        self.half_deadline = math.inf
        self.open_directions = 2
        self.finished = False

    def seen(self) -> None:
        """A byte moved: push the inactivity deadline."""
        now = trio.current_time()
        self.conn.last_activity = now
        if self.window != math.inf:
            self.scope.deadline = min(now + self.window, self.half_deadline)

    def moved(self, direction: str, n: int) -> None:
        """`n` bytes were delivered in `direction`."""
        if direction == IN:
            self.conn.bytes_in += n
        else:
            self.conn.bytes_out += n
        self.seen()

    def closed(self, direction: str) -> None:
        """`direction` finished with EOF. The first one starts the half-close clock; the
        second ends the traffic.

        An EOF is a packet from a live peer, so it counts as activity too.
        """
        self.open_directions -= 1
        if self.open_directions == 1 and self.half_window != math.inf:
            self.half_deadline = trio.current_time() + self.half_window
            self.scope.deadline = min(self.scope.deadline, self.half_deadline)
        self.seen()
        if not self.open_directions:
            self.finish()

    def finish(self) -> None:
        """End the traffic normally now: both directions are done, a handler returned, or an
        EOF came from or went toward a stream that cannot half-close (TLS)."""
        self.seen()
        self.finished = True
        self.scope.cancel()

    def expired(self) -> Reason | None:
        """Why the scope ended the traffic, if a deadline did."""
        if not self.scope.cancelled_caught or self.finished:
            return None
        return Reason.HALF_CLOSE_TIMEOUT if trio.current_time() >= self.half_deadline else Reason.INACTIVITY_TIMEOUT

    async def watch_extended(self) -> None:
        """keepalive = "extended": idle for `warn_after`, one warning is logged and a grace
        period of the plain inactivity_timeout starts; traffic in it starts the watch over,
        none ends the connection (inactivity_timeout). Times are taken when the task runs,
        so a busy loop can delay the end but never skip the warning or shorten the grace."""
        while True:
            due = self.conn.last_activity + self.warn_after
            if due > trio.current_time():
                await trio.sleep_until(due)
                continue
            warned = trio.current_time()
            log.warning(
                "connection %d idle for %.0fs (keepalive extended): closing after a grace period of %.0fs unless traffic resumes",
                self.conn.id, self.warn_after, self.grace,
            )  # fmt: skip
            await trio.sleep_until(warned + self.grace)
            if self.conn.last_activity <= warned:
                self.scope.cancel()  # expired(): inactivity_timeout
                return


@contextlib.asynccontextmanager
async def traffic_nursery(conn: Connection, policy: Policy) -> AsyncIterator[tuple[Traffic, trio.Nursery]]:
    """The one nursery of a connection's traffic: the relay's two pumps, or a handler.

    Its cancel scope is the traffic scope, whose deadline is the inactivity (or half-close)
    deadline, so an idle connection carries no extra scope. With keepalive "extended" its
    watcher runs in it as a sibling task, cancelled when the traffic is over. Leaving it by
    a deadline ends the connection (inactivity or half-close). The work ends the traffic
    with `Traffic.finish()` (the relay does when both directions are closed).
    """
    async with trio.open_nursery() as nursery:
        traffic = Traffic(conn, nursery.cancel_scope, policy)
        traffic.seen()
        if traffic.warn_after != math.inf:
            nursery.start_soon(traffic.watch_extended)
        yield traffic, nursery
    reason = traffic.expired()
    if reason is not None:
        raise ConnectionEnded(reason)


def _spliceable(a: trio.abc.Stream, b: trio.abc.Stream) -> bool:
    """splice(2) needs two plain sockets: not TLS, not a handler's wrapped stream."""
    return SPLICE and type(a) is trio.SocketStream and type(b) is trio.SocketStream


async def pump(src: trio.abc.Stream, dst: trio.abc.Stream, traffic: Traffic, direction: str) -> None:
    """Move src to dst until EOF, then pass the EOF on as a write shutdown.

    Between two plain TCP sockets the bytes move by non-blocking syscalls on the raw
    sockets, trying each first and waiting only when it would block; small chunks are
    copied through one shared buffer and bulk is spliced (see _splice). Otherwise (TLS, a
    handler's stream) they are copied through the streams. Either way they are counted
    and timed the same. TLS cannot half-close: an EOF from or toward a TLS stream ends the
    whole connection, normally, once what was read is delivered.

    On the raw path each chunk takes one trip through the scheduler, never more: a chunk
    that drained src (shorter than asked) is followed by the wait for src's next bytes,
    which is that trip; a full one by a checkpoint, so cancellation stays prompt and a
    busy connection cannot starve the others. The loop is written out here rather than
    in a helper: every idle connection keeps this frame alive, and each extra frame is
    memory per connection.
    """
    src_failed, dst_failed = _RESET[direction]
    if _spliceable(src, dst):
        src_sock, dst_sock = cast(trio.SocketStream, src).socket, cast(trio.SocketStream, dst).socket
        raw_src, raw_dst = raw_socket(src_sock), raw_socket(dst_sock)
        src_fd, dst_fd = src_sock.fileno(), dst_sock.fileno()
        buffer = shared_buffer()
        bulk = lifted = False
        try:
            while True:
                waited = False
                if bulk and (pipe := POOL.take()) is not None:
                    n, left = splice_once(pipe, src_fd, dst_fd)
                    if left:
                        traffic.seen()
                        await drain_pipe(pipe, dst_sock, left)
                        waited = True
                    asked = CHUNK
                else:  # a small chunk, or no pipe to be had (out of fds): copy it
                    n, rest = copy_once(raw_src, raw_dst, buffer)
                    if rest:
                        traffic.seen()
                        await send_rest(dst_sock, rest)
                        waited = True
                    asked = COPY_CHUNK
                if n is None:
                    await trio.lowlevel.wait_readable(src_fd)
                    continue
                if n == 0:
                    break
                traffic.moved(direction, n)
                if n >= SPLICE_AT and not lifted:
                    lift_send_lowat(raw_dst)  # it stays lifted: once per direction
                    lifted = True
                bulk = n >= SPLICE_AT
                if n < asked:
                    await trio.lowlevel.wait_readable(src_fd)  # src is drained: this wait is the chunk's trip
                elif not waited:
                    await trio.lowlevel.checkpoint()
        except SpliceError as exc:
            raise ConnectionEnded(src_failed if exc.side == "src" else dst_failed, str(exc.error)) from exc
    else:
        await _move_copied(src, dst, traffic, direction)
    if not (isinstance(src, trio.abc.HalfCloseableStream) and isinstance(dst, trio.abc.HalfCloseableStream)):
        # TLS cannot half-close (trio's SSLStream has no write shutdown, and one that read a
        # TCP EOF can no longer send): an EOF from or toward a TLS stream ends the whole
        # connection, normally, now that what was read is delivered.
        traffic.finish()
        return
    with failure_means(dst_failed):
        await dst.send_eof()
    traffic.closed(direction)


async def _move_copied(src: trio.abc.Stream, dst: trio.abc.Stream, traffic: Traffic, direction: str) -> None:
    src_failed, dst_failed = _RESET[direction]
    while True:
        with failure_means(src_failed):
            data = await src.receive_some(COPY_CHUNK)
        if not data:
            return
        traffic.seen()
        try:
            with failure_means(dst_failed):
                await dst.send_all(data)
        except ConnectionEnded as ended:
            if _broken_before(ended):
                traffic.finish()  # the other direction's EOF (or its failure, raised there) ends it
                return
            raise
        traffic.moved(direction, len(data))


def _broken_before(ended: ConnectionEnded) -> bool:
    """The send failed on a TLS stream that was broken before it began: trio breaks an
    SSLStream when it reads a TCP EOF (no close_notify), and raises BrokenResourceError with
    no cause when it is used after that. That is the peer's end, seen by the other direction,
    not a new failure of this one."""
    error = ended.__cause__
    return isinstance(error, trio.BrokenResourceError) and error.__cause__ is None


async def relay(conn: Connection, client: trio.abc.Stream, target: trio.abc.Stream, policy: Policy, initial: bytes = b"") -> None:
    """Bytes both ways until both directions are done, with `initial` sent to the target first."""
    conn.path = "splice" if _spliceable(client, target) else "copy"
    async with traffic_nursery(conn, policy) as (traffic, nursery):
        if initial:
            with failure_means(Reason.TARGET_RESET):
                await target.send_all(initial)
            traffic.moved(IN, len(initial))
        nursery.start_soon(pump, client, target, traffic, IN, name=PUMP_TASK)
        await pump(target, client, traffic, OUT)  # in this task: one task fewer per connection


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
