"""The data engine: one task per forwarder moves the bytes of every plain TCP relay.

    connection task                         engine task (one per forwarder)
      dial, PROXY header, ...                 await wait_readable(epoll fd)
      with engine.attached(conn, c, t):       poll(0, BATCH): for each ready socket
          await relay.run(first_bytes)  ◄──     recv_into one buffer, send at once
      # left: detached, sockets closed          (splice through a pooled pipe for bulk)
                                                what cannot be sent is parked, reading stops
                                                EOF passed on as shutdown(SHUT_WR)
                                              relay over or failed: wake its task

Every relayed socket has a persistent, level-triggered registration in the engine's own
epoll (trio re-arms its one-shot ones on every wait; this one does not), and the engine
waits on that epoll's fd in trio like any task: cooperative, cancellable, visible. A woken
engine takes a bounded batch of events and moves bytes for each: the more connections are
busy, the more each wakeup does.

Each connection keeps its own task, nursery and scopes (lifetime, kill, limits): it sleeps
in `Relay.run` until the engine says its relay is over. Leaving the `attached` block, on
every path — the end, a kill, a deadline, a shutdown, a bug — unregisters both sockets
before their owners close them. Inactivity and half-close are kept lazily by the task's
IdleWatch from `conn.last_activity`, which the engine stamps as bytes move. Bytes are
counted where they are delivered (a partial send counts what went), live in the table.

Per direction at most one chunk is held: the shared buffer's bytes that the destination
could not take (copied out), or a pipe of spliced ones. Reading that direction stops until
they are delivered (back-pressure, nothing unbounded). An error on a socket ends that relay
with that socket's reset; an exception in the engine's own code ends that relay (a bug,
internal_error) and no other.

UDP routes' datagrams are moved beside the relays, in the engine's nursery, by a mover of
their own with its own epoll (`_datagrams`): a datagram is not a stream, and its sessions
need neither sides nor splicing.
"""

from __future__ import annotations

import errno
import heapq
import logging
import math
import os
import select
import socket
from collections.abc import Awaitable, Callable, Generator
from typing import Any

import outcome
import trio

from . import _rawsock as rawsock
from ._datagrams import Datagrams
from ._errors import ConnectionEnded
from ._idle import IdleWatch
from ._policy import Policy
from ._reasons import Reason
from ._record import Connection
from ._splice import CHUNK, COPY_CHUNK, POOL, SPLICE_AT, Pipe

__all__ = ["BATCH", "Engine", "Relay"]

log = logging.getLogger("triofwd.engine")

# splice(2) for bulk between the relayed sockets; False: every chunk is copied (tests
# compare the two).
SPLICE = True
# Events taken from the epoll per wakeup. Measured on the three hot paths: a batch of one
# costs the engine 57% of its keep-alive throughput (every event pays trio's re-arm of the
# epoll fd and a scheduler pass), 16 about what 256 costs; a full batch is followed by a
# checkpoint, so a flood cannot starve the rest of the program.
BATCH = 256
# Timer entries left behind by relays that have gone, tolerated before the timers are
# rebuilt without them (when they are also the majority): memory bounded, work amortized.
STALE_TIMERS = 1024

# An idle relay's task is parked in trio's one trap for waiting: the object trio's own
# wait_task_rescheduled yields to the task runner. Yielded by the relay itself (`Relay.run`),
# it spares every idle connection that function's two frames (about 500 bytes of 6 KiB).
# trio does not export it: where a trio release moves it, the public function is used (the
# same behaviour, more memory), and tests/test_engine.py says so.
_PARK: Callable[[Callable[[Any], trio.lowlevel.Abort]], object] | None
try:
    from trio._core._traps import WaitTaskRescheduled as _PARK
except ImportError:  # pragma: no cover - a trio without it
    _PARK = None

_IN, _OUT, _ERR, _HUP = select.EPOLLIN, select.EPOLLOUT, select.EPOLLERR, select.EPOLLHUP
# Per call, so a socket needs no fcntl to be non-blocking (splice needs O_NONBLOCK: set
# when a direction turns bulk).
_FLAGS = socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL
_SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK


class Side:
    """One socket of a relay, and the direction that reads from it (this side -> its peer)."""

    __slots__ = ("bulk", "done", "eof", "fd", "inbound", "interest", "left", "parked", "peer", "pipe", "reading", "registered", "relay", "sock")

    def __init__(self, sock: socket.socket, relay: Relay, inbound: bool) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.relay = relay
        self.inbound = inbound  # reading the client: what it moves is bytes_in
        self.peer: Side = self
        self.reading = True  # this direction still reads from sock
        self.eof = False  # EOF read from sock; passed on once what is parked is delivered
        self.done = False  # the EOF was passed on: the peer's write side is shut
        self.parked: memoryview | None = None  # bytes read from sock the peer could not take yet
        self.pipe: Pipe | None = None  # ... or spliced ones still in a pipe
        self.left = 0  # bytes in `pipe`
        self.bulk = False  # the last chunk was big: splice the next
        self.interest = 0  # registered in the engine's epoll now
        self.registered = False

    @property
    def holding(self) -> bool:
        return self.parked is not None or self.pipe is not None


class Timed:
    """What the engine's timers hold: `due`, when it is to be looked at next (inf: never).

    An entry is (due, it); entries due at the same moment are ordered by identity (no
    sequence number per entry: a timer is held by every idle relay)."""

    __slots__ = ("due",)
    due: float

    def __lt__(self, other: Timed) -> bool:
        return id(self) < id(other)


class Relay(Timed):
    """Two sockets relayed by the engine for one connection; `Engine.attached` makes one."""

    __slots__ = ("client", "conn", "engine", "idle", "nonblocking", "target", "task")

    def __init__(self, engine: Engine, conn: Connection, client: socket.socket, target: socket.socket, policy: Policy) -> None:
        self.engine = engine
        self.conn = conn
        self.client = client_side = Side(client, self, inbound=True)
        self.target = target_side = Side(target, self, inbound=False)
        client_side.peer, target_side.peer = target_side, client_side
        self.idle = IdleWatch(conn, policy)
        self.task: Any = None  # the connection's task, while it waits for the relay
        self.nonblocking = False
        self.due = math.inf  # when the engine's timers look at its quiet limits next

    def __enter__(self) -> Relay:
        self.engine._relays.add(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.engine._detach(self)

    def run(self, initial: bytes = b"") -> Awaitable[None]:
        """`await relay.run(initial)`: relay until both directions are done, `initial` (bytes
        already read from the client) sent to the target first. Raises ConnectionEnded with
        the failing side's reset, or the quiet limits' reason (inactivity, half-close).

        What it hands back is the relay itself, parking the task the way trio's
        wait_task_rescheduled does (see `_PARK`), not a coroutine of its own. The engine
        wakes the task with the relay's outcome."""
        # The engine's path: bulk spliced in the kernel, small chunks copied (splice-auto).
        self.conn.path = "splice" if SPLICE else "copy"
        if initial:
            self._send_initial(initial)
        engine = self.engine
        engine._register(self)
        engine._arm(self)
        # Until the engine ends the relay: both directions done, a failure, or a quiet limit
        # its timers found passed (they keep them for every relay, lazily: no scope or
        # deadline of the connection's own moves while bytes flow).
        self.task = trio.lowlevel.current_task()
        if _PARK is None:
            return trio.lowlevel.wait_task_rescheduled(self._abort)  # noqa: ASYNC105 - awaited by the caller
        return self

    # The awaitable `run` hands back: an iterator without a frame. Sent None, it yields the
    # request to park the task; sent the outcome the task is rescheduled with, it is done.
    def __await__(self) -> Generator[Any, Any, None]:
        return self  # type: ignore[return-value]

    def __next__(self) -> Any:
        return self.send(None)

    def send(self, value: Any) -> Any:
        if value is None:
            assert _PARK is not None
            return _PARK(self._abort)
        raise StopIteration(value.unwrap())

    def throw(self, exc: BaseException, *_: object) -> Any:
        raise exc

    def _send_initial(self, data: bytes) -> None:
        try:
            sent = self.target.sock.send(data, _FLAGS)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            raise ConnectionEnded(Reason.TARGET_RESET, str(exc)) from None
        self.conn.bytes_in += sent
        if sent < len(data):
            self.client.parked = memoryview(data)[sent:]

    def _abort(self, _: object) -> trio.lowlevel.Abort:
        self.task = None  # cancelled (a deadline, kill, shutdown): the engine must not wake it
        return trio.lowlevel.Abort.SUCCEEDED


class Connecting(Timed):
    """A connection task waiting in the engine for its non-blocking connect to complete."""

    __slots__ = ("fd", "task")

    def __init__(self, fd: int, task: Any) -> None:
        self.fd = fd
        self.task = task
        self.due = math.inf  # the connect timeout, on the engine's timers


class Engine:
    """One per forwarder: every plain relay's bytes, in one trio task (`run`)."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._sides: dict[int, Side] = {}  # registered fds
        self._relays: set[Relay] = set()  # attached
        self._connecting: dict[int, Connecting] = {}  # fd: a connect the engine waits for
        # fds the engine connected, left in its epoll disabled (EPOLLONESHOT, fired): the
        # relay that takes the socket re-enables it rather than adding it again. An fd that
        # went another way (TLS) is simply closed: the entry is stale, found out when used.
        self._disabled: set[int] = set()
        self._done: set[Relay] = set()  # attached, and over: waiting for their task to leave
        self._buffer = memoryview(bytearray(COPY_CHUNK))
        # The relays' quiet limits: (when, sequence, relay), earliest first. An entry that
        # no longer says when its relay is due (re-armed later, or the relay gone) is skipped.
        self._timers: list[tuple[float, Timed]] = []
        self._timer_scope: trio.CancelScope | None = None
        self._stale = 0  # entries left for relays that left, or were re-armed earlier
        self.batches = 0  # wakeups with events (tests and the profile read them)
        self.events = 0
        # UDP routes' datagrams: a mover of their own (datagrams are not streams), in the
        # engine's nursery, beside the relays' loop and timers.
        self.datagrams = Datagrams()

    def attached(self, conn: Connection, client: socket.socket, target: socket.socket, policy: Policy) -> Relay:
        """`with engine.attached(conn, client, target, policy) as relay: await relay.run(...)`:
        the two connected sockets relayed while the block runs. Leaving it detaches them; the
        caller closes them after."""
        return Relay(self, conn, client, target, policy)

    @property
    def registered(self) -> int:
        """Sockets in the engine's epoll now (0 when nothing is relayed)."""
        return len(self._sides)

    def close(self) -> None:
        self._epoll.close()
        self.datagrams.close()

    # -- the loop ---------------------------------------------------------------------

    async def run(self) -> None:
        """Move bytes, and keep the relays' quiet limits, until cancelled (after every
        connection has left)."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._keep_time, name="triofwd engine timers")
            nursery.start_soon(self.datagrams.run, name="triofwd datagrams")
            await self._move()

    async def _keep_time(self) -> None:
        """Sleep until the earliest relay is due (one scope for all of them), then look at
        what is due: a quiet limit passed ends its relay; traffic since moves it later."""
        while True:
            with trio.CancelScope(deadline=self._timers[0][0] if self._timers else math.inf) as scope:
                self._timer_scope = scope
                await trio.sleep_forever()
            self._timer_scope = None
            # Bytes that came while the timers slept count before any relay is judged quiet:
            # a busy or stalled process may wake this task before the engine's loop has seen
            # them. One batch, moved here (level-triggered: anything left, the loop sees).
            if events := self._epoll.poll(0, BATCH):
                self._batch(events)
            now = trio.current_time()
            timers = self._timers
            while timers and timers[0][0] <= now:
                due, relay = heapq.heappop(timers)
                if due != relay.due:
                    self._stale = max(0, self._stale - 1)
                    continue  # re-armed since, or gone
                relay.due = math.inf
                if not isinstance(relay, Relay):
                    assert isinstance(relay, Connecting)
                    self._connect_over(relay, outcome.Error(trio.TooSlowError()))
                    continue
                if relay not in self._relays or relay in self._done:
                    continue
                try:
                    reason = relay.idle.passed(now, (relay.client.sock, relay.target.sock))
                    if reason is None:
                        self._arm(relay)
                except Exception as exc:  # noqa: BLE001 - one relay's bug ends that relay
                    self._finish(relay, exc)
                    continue
                if reason is not None:
                    self._finish(relay, ConnectionEnded(reason))

    def _arm(self, relay: Relay) -> None:
        """Put the relay's next quiet limit on the timers (if earlier than the one it has)."""
        self._arm_at(relay, relay.idle.deadline())

    def _arm_at(self, relay: Timed, due: float) -> None:
        if due >= relay.due:
            return
        if relay.due != math.inf:
            self._stale += 1  # its later entry stays behind
        relay.due = due
        heapq.heappush(self._timers, (due, relay))
        scope = self._timer_scope
        if scope is not None and due < scope.deadline:
            scope.deadline = due

    # -- connecting -------------------------------------------------------------------

    async def connect(self, family: int, address: tuple[str, int], timeout: float) -> socket.socket:
        """A connected non-blocking socket (TCP_NODELAY set) to an IP address, within
        `timeout` (trio.TooSlowError past it); OSError with the connect's errno.

        `_rawsock.connect`, its wait done by the engine: the socket waits in
        its epoll (one-shot, left there disabled for the relay to re-enable: one epoll_ctl
        fewer than trio's registration and the relay's) and the timeout on its timers."""
        return await rawsock.connect(family, address, lambda sock: self._connected(sock.fileno(), timeout))

    async def _connected(self, fd: int, timeout: float) -> None:
        waiting = Connecting(fd, trio.lowlevel.current_task())
        await trio.lowlevel.checkpoint_if_cancelled()
        if fd in self._disabled:
            self._disabled.discard(fd)  # a closed socket's entry: that fd is new
        self._epoll.register(fd, _OUT | select.EPOLLONESHOT)
        self._disabled.add(fd)
        self._connecting[fd] = waiting
        self._arm_at(waiting, trio.current_time() + timeout)

        def abort(_: object) -> trio.lowlevel.Abort:
            self._connect_forget(waiting)  # its socket is closed next: out of the epoll too
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def _connect_over(self, waiting: Connecting, result: outcome.Outcome[None]) -> None:
        self._connect_forget(waiting)
        trio.lowlevel.reschedule(waiting.task, result)

    def _connect_forget(self, waiting: Connecting) -> None:
        if self._connecting.get(waiting.fd) is waiting:
            del self._connecting[waiting.fd]
        if waiting.due != math.inf:
            waiting.due = math.inf
            self._stale += 1

    def _batch(self, events: list[tuple[int, int]]) -> None:
        """Move the bytes of one batch of ready events (no await: a batch is never interleaved
        with another task's view of the relays)."""
        sides, event, connecting = self._sides, self._event, self._connecting
        buffer = view = self._buffer
        self.batches += 1
        self.events += len(events)
        now = trio.current_time()
        for fd, mask in events:
            side = sides.get(fd)
            if side is None:  # a connect done, or its relay ended earlier in this batch
                waiting = connecting.get(fd)
                if waiting is not None:
                    self._connect_over(waiting, outcome.Value(None))
                continue
            try:
                # The common case written out here, without a call: a small chunk to
                # read and a destination that takes it whole. Anything else: _event.
                if mask != _IN or side.bulk or side.parked is not None or side.pipe is not None or not side.reading:
                    event(side, mask, now)
                    continue
                try:
                    n = side.sock.recv_into(buffer, COPY_CHUNK, _FLAGS)
                except BlockingIOError:
                    continue
                except OSError:
                    event(side, mask, now)  # it reads again, and tells the failing side
                    continue
                if 0 < n < SPLICE_AT:
                    try:
                        sent = side.peer.sock.send(view[:n], _FLAGS)
                    except BlockingIOError:
                        sent = 0
                    except OSError:
                        sent = -1  # _copy sends again, and tells the failing side
                    if sent == n:
                        conn = side.relay.conn
                        conn.last_activity = now
                        if side.inbound:
                            conn.bytes_in += n
                        else:
                            conn.bytes_out += n
                        continue
                    event(side, mask, now, n, sent)
                    continue
                event(side, mask, now, n)
            except Exception as exc:  # noqa: BLE001 - one relay's bug ends that relay, never the engine
                self._finish(side.relay, exc)

    async def _move(self) -> None:
        epoll_fd = self._epoll.fileno()
        poll, batch = self._epoll.poll, self._batch
        wait_readable, checkpoint = trio.lowlevel.wait_readable, trio.lowlevel.checkpoint
        try:
            while True:
                await wait_readable(epoll_fd)
                # Batches until one finds nothing: after each, the rest of the program runs
                # (a checkpoint) and, while traffic keeps coming, the next batch is taken
                # without trio's wait and its re-arm of the epoll fd (fewer syscalls per event).
                while events := poll(0, BATCH):
                    batch(events)
                    await checkpoint()
        finally:
            # Stopping with relays still attached (a bug took the engine down): end them, so
            # that no connection waits for bytes that will never move.
            for relay in list(self._relays):
                self._finish(relay, RuntimeError("the data engine stopped"))
            for waiting in list(self._connecting.values()):
                self._connect_over(waiting, outcome.Error(RuntimeError("the data engine stopped")))

    def _event(self, side: Side, mask: int, now: float, read: int = -1, sent: int = -1) -> None:
        """One ready socket. From the run loop's fast path: `read` bytes already in the buffer
        (an EOF, a big chunk, or a small one the destination did not take whole: `sent` of
        them went), else -1; `sent` -1: not sent yet (or the send failed: it is tried again)."""
        relay = side.relay
        try:
            if read >= 0:
                self._copy(side, side.peer, now, read, sent)
                return
            if mask & _ERR:
                error = side.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) or errno.ECONNRESET
                self._failed(relay, side, OSError(error, os.strerror(error)))
                return
            acted = False
            peer = side.peer
            if mask & (_OUT | _HUP) and peer.holding:
                acted = True
                self._flush(peer, side, now)  # the other direction (peer -> side) waited for side
                if relay in self._done:
                    return
            if mask & (_IN | _HUP) and side.reading and not side.holding:
                acted = True
                if side.bulk:
                    self._splice(side, peer, now)
                else:
                    self._copy(side, peer, now)
            if not acted and mask & _HUP and side.registered:
                # Both halves of this socket are shut (its peer's FIN came, our SHUT_WR went)
                # while its own direction waits to deliver parked bytes elsewhere: EPOLLHUP is
                # reported whatever the interest, so level-triggered it would come back on
                # every poll. Stop watching it; _interest() registers it again for work.
                side.registered = False
                side.interest = 0
                self._epoll.unregister(side.fd)
        except Exception as exc:  # noqa: BLE001 - one relay's bug ends that relay, never the engine
            self._finish(relay, exc)

    # -- moving bytes -----------------------------------------------------------------

    def _copy(self, src: Side, dst: Side, now: float, read: int = -1, sent: int = -1) -> None:
        buffer = self._buffer
        if read >= 0:
            n = read  # already in the buffer
        else:
            try:
                n = src.sock.recv_into(buffer, COPY_CHUNK, _FLAGS)
            except BlockingIOError:
                return
            except OSError as exc:
                self._failed(src.relay, src, exc)
                return
        conn = src.relay.conn
        conn.last_activity = now
        if not n:
            self._eof(src, dst)
            return
        if sent < 0:  # not tried yet, or it failed: (again), for the failing side
            try:
                sent = dst.sock.send(buffer[:n], _FLAGS)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                self._failed(src.relay, dst, exc)
                return
        if src.inbound:
            conn.bytes_in += sent
        else:
            conn.bytes_out += sent
        if sent < n:
            src.parked = memoryview(buffer[sent:n].tobytes())
            self._interest(src)
            self._interest(dst)
        if n >= SPLICE_AT and SPLICE:
            self._go_bulk(src)

    def _go_bulk(self, src: Side) -> None:
        relay = src.relay
        if not relay.nonblocking:  # splice(2) honours the sockets' O_NONBLOCK, not MSG_DONTWAIT
            relay.client.sock.setblocking(False)
            relay.target.sock.setblocking(False)
            relay.nonblocking = True
        src.bulk = True

    def _splice(self, src: Side, dst: Side, now: float) -> None:
        pipe = POOL.take()
        if pipe is None:  # out of fds: this chunk is copied
            self._copy(src, dst, now)
            return
        try:
            n = os.splice(src.fd, pipe.w, CHUNK, flags=_SPLICE_FLAGS)
        except BlockingIOError:
            POOL.give(pipe)
            return
        except OSError as exc:
            POOL.give(pipe)  # nothing went in
            self._failed(src.relay, src, exc)
            return
        conn = src.relay.conn
        conn.last_activity = now
        if not n:
            POOL.give(pipe)
            self._eof(src, dst)
            return
        left = n
        try:
            while left:
                left -= os.splice(pipe.r, dst.fd, left, flags=_SPLICE_FLAGS)
        except BlockingIOError:
            pass
        except OSError as exc:
            pipe.close()  # it may hold bytes that belong to no one now
            self._count(src, n - left)
            self._failed(src.relay, dst, exc)
            return
        self._count(src, n - left)
        if left:
            src.pipe, src.left = pipe, left
            self._interest(src)
            self._interest(dst)
        else:
            POOL.give(pipe)
        src.bulk = n >= SPLICE_AT

    def _flush(self, src: Side, dst: Side, now: float) -> None:
        """Deliver what src's direction holds for dst; when all is out, read src again."""
        moved = 0
        try:
            if src.pipe is not None:
                try:
                    while src.left:
                        sent = os.splice(src.pipe.r, dst.fd, src.left, flags=_SPLICE_FLAGS)
                        src.left -= sent
                        moved += sent
                finally:
                    self._count(src, moved)
                POOL.give(src.pipe)
                src.pipe = None
            else:
                parked = src.parked
                assert parked is not None
                sent = dst.sock.send(parked, _FLAGS)
                self._count(src, sent)
                if sent < len(parked):
                    src.parked = parked[sent:]
                    src.relay.conn.last_activity = now
                    return
                src.parked = None
        except BlockingIOError:
            if moved:
                src.relay.conn.last_activity = now
            return
        except OSError as exc:
            self._failed(src.relay, dst, exc)
            return
        src.relay.conn.last_activity = now
        if src.eof:
            self._pass_eof(src, dst, now)
            if src.relay in self._done:
                return
        self._interest(src)
        self._interest(dst)

    @staticmethod
    def _count(src: Side, n: int) -> None:
        if src.inbound:
            src.relay.conn.bytes_in += n
        else:
            src.relay.conn.bytes_out += n

    def _eof(self, src: Side, dst: Side) -> None:
        src.reading = False
        src.eof = True
        self._pass_eof(src, dst, src.relay.conn.last_activity)  # nothing is held: we read only then
        if src.relay not in self._done:
            self._interest(src)

    def _pass_eof(self, src: Side, dst: Side, now: float) -> None:
        """src's direction is over: shut dst's write side. The first direction to end starts
        the half-close clock; the second ends the relay."""
        src.done = True
        if dst.done:
            # Both directions are over: closing dst, as its connection does next, sends its
            # FIN (everything was read from it), so a shutdown now would only repeat it.
            self._finish(src.relay, None)
            return
        try:
            dst.sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self._failed(src.relay, dst, exc)
            return
        relay = src.relay
        relay.idle.half_closed(now)
        self._arm(relay)  # the half-close limit may be due before the quiet one

    # -- registrations ----------------------------------------------------------------

    def _register(self, relay: Relay) -> None:
        disabled = self._disabled
        for side in (relay.client, relay.target):
            want = self._wanted(side)
            fd = side.fd
            if fd in disabled:  # connected by the engine: in the epoll already
                disabled.discard(fd)
                try:
                    self._epoll.modify(fd, want)
                except FileNotFoundError:  # that socket was closed; this is another with its number
                    self._epoll.register(fd, want)
            else:
                self._epoll.register(fd, want)
            side.interest, side.registered = want, True
            self._sides[fd] = side

    @staticmethod
    def _wanted(side: Side) -> int:
        """EPOLLIN while its own direction reads and holds nothing; EPOLLOUT while the other
        direction holds bytes for it. 0 stays registered: EPOLLERR and EPOLLHUP are still
        reported, so a reset of a side with nothing to move is seen at once."""
        want = _IN if side.reading and not side.holding else 0
        return want | _OUT if side.peer.holding else want

    def _interest(self, side: Side) -> None:
        want = self._wanted(side)
        if want == side.interest:
            return
        side.interest = want
        if side.registered:
            self._epoll.modify(side.fd, want)
        elif want and side.relay not in self._done:  # unregistered after a bare EPOLLHUP
            self._epoll.register(side.fd, want)
            side.registered = True

    def _unregister(self, relay: Relay) -> None:
        """Forget both fds before they are closed (a closed fd's number is reused at once).

        No EPOLL_CTL_DEL: closing a socket takes it out of the epoll (no relayed socket is
        ever dup()ed or inherited by a fork), and each relay's sockets are closed right after
        it is detached, with no await between; until then an event of theirs is dropped (their
        fds are no longer in the map). Two syscalls fewer per connection."""
        for side in (relay.client, relay.target):
            side.registered = False
            if self._sides.get(side.fd) is side:
                del self._sides[side.fd]

    # -- endings ----------------------------------------------------------------------

    def _failed(self, relay: Relay, side: Side, exc: OSError) -> None:
        reason = Reason.CLIENT_RESET if side is relay.client else Reason.TARGET_RESET
        self._finish(relay, ConnectionEnded(reason, str(exc)))

    def _finish(self, relay: Relay, ended: BaseException | None) -> None:
        """The relay is over (`ended` None: both directions done): stop watching its sockets
        and wake its task."""
        if relay in self._done or relay not in self._relays:
            return
        self._done.add(relay)
        self._unregister(relay)
        task, relay.task = relay.task, None
        if task is not None:
            trio.lowlevel.reschedule(task, outcome.Value(None) if ended is None else outcome.Error(ended))

    def _detach(self, relay: Relay) -> None:
        """The connection leaves the relay, on every path: nothing registered, nothing held."""
        if relay.due != math.inf:
            relay.due = math.inf
            self._stale += 1
            # A left relay's entry would hold it until its time came (an hour, by default):
            # once most entries are such, the timers are rebuilt without them.
            if self._stale > STALE_TIMERS and 2 * self._stale > len(self._timers):
                self._timers = [entry for entry in self._timers if entry[1].due == entry[0]]
                heapq.heapify(self._timers)
                self._stale = 0
        self._unregister(relay)
        self._relays.discard(relay)
        self._done.discard(relay)
        relay.task = None
        for side in (relay.client, relay.target):
            if side.pipe is not None:
                side.pipe.close()  # it may hold bytes that belong to no one now
                side.pipe = None
            side.parked = None
            # The sides and their relay point at each other: unlinked here, they are freed by
            # reference counting the moment the connection lets go, not by a later GC pass.
            del side.peer, side.relay
