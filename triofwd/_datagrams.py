"""UDP routes' data path: one task per forwarder moves the datagrams of every session.

    mover task (one per forwarder)                  session task (one per client flow)
      await wait_readable(its epoll fd)               run_session: route, limits, a
      poll(0, BATCH): for each ready socket             connected socket to a target
        a listener: recvfrom a batch of datagrams;      (datagrams.attach), then parked
          the flow's session: sent on its socket        in flow.wait() until the mover
          at once (a handler's: queued for it); a       ends the flow (`responses`
          new flow: its session task starts (what       replies, an ICMP error) or a
          comes meanwhile waits, a few, bounded);       quiet limit, kill, lifetime or
          a refused flow: dropped                       shutdown ends the task
        a session's socket: its replies sent from       leaving: datagrams.forget(flow)
          the listener to the client; the Nth ends it

Each session owns a socket *connected* to its target: the kernel delivers to it only what
that address sends, so a datagram from anyone else never reaches the client, and an ICMP
port unreachable comes back as ECONNREFUSED on it (the session ends with connect_refused).

Every socket has a persistent, level-triggered registration in the mover's own epoll, and
the mover waits on that epoll's fd in trio like any task. Datagrams go through one shared
64 KiB buffer: no session task is woken per datagram (only to start, to end, and once per
idle window for its quiet limit, kept lazily by its IdleWatch from `last_activity`, which
the mover stamps), and no session holds a buffer while idle. A datagram that cannot be sent
at once (a full socket buffer) is dropped and counted, as a router would: UDP has no
back-pressure to pass on.

A flow that was refused before it had a socket (capacity, ip_limit, rate_limited, no_route,
ip_blocked, rejected, a target it could not reach) is remembered for REFUSAL_HOLD seconds:
its datagrams meanwhile are dropped and counted under that reason, without a session (and
an access-log line) each. A listener that stops (reload, drain, shutdown) takes no new flow;
its socket stays open for the replies of the sessions it still has, and closes with the last.
A reload that listens on its address again takes that socket back (`held`, `add`): a second
socket could not be bound to the port while the first is open.

A handler route's session has no target socket: the mover queues its client's datagrams in
the flow's Inbox (at most INBOX_MAX datagrams, INBOX_BYTES in all; more are dropped and
counted) for the handler's `DatagramSession.receive()`, and `send()` answers from the
listener as a target's replies are answered.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import select
import socket
from collections.abc import Callable, Collection, Iterator
from typing import TYPE_CHECKING, Any

import outcome
import trio

from ._addresses import ListenKey, format_address
from ._connect import connect_failure
from ._errors import ConnectionEnded
from ._reasons import Reason

if TYPE_CHECKING:
    from ._record import Session
    from ._table import CompiledRoute
    from ._targets import RouteTargets

__all__ = ["BUFFER", "DatagramSession", "Datagrams", "Flow", "UdpListener", "bind_datagrams", "dial_datagrams"]

log = logging.getLogger("triofwd.datagrams")

# Events taken from the epoll per wakeup, and datagrams read from one ready socket per event
# (level-triggered: a socket with more left is reported again in the next batch, so one busy
# flow cannot starve the others).
BATCH = 256
READ_BATCH = 64
# The largest UDP payload (65,507 bytes over IPv4, 65,527 over IPv6) fits whole.
BUFFER = 65536
# A listening socket's receive buffer asked for: a burst of new flows (DNS clients) waits
# there until the mover reads it; the kernel caps it at net.core.rmem_max.
LISTENER_RCVBUF = 4 << 20
# Datagrams of a new flow kept while its session connects its socket; more are dropped.
PENDING_MAX = 16
# A handler session's datagrams waiting for its handler to receive them; more are dropped.
# One mover wakeup reads at most READ_BATCH datagrams from a listener, so a handler that
# receives whenever it runs loses none of a burst of that size; the bytes bound keeps a
# handler that stops receiving to 4 of the largest datagrams, not 64 (4 MiB).
INBOX_MAX = READ_BATCH
INBOX_BYTES = 4 * BUFFER
# How long a flow refused before it had a socket stays refused, its datagrams dropped and
# counted without a session each; and how many such flows a listener remembers at most.
REFUSAL_HOLD = 10.0
REFUSED_MAX = 65536
# Drop reasons besides the refusal reasons of the contract's vocabulary.
BUSY = "busy"  # a socket buffer was full, or a session's queue: PENDING_MAX while it connects, its handler's Inbox
CLOSED = "closed"  # a new flow on a listener that has stopped (reload, drain, shutdown)
TOO_BIG = "too_big"  # larger than the path to the target allows (EMSGSIZE)

_FLAGS = socket.MSG_DONTWAIT
_IN = select.EPOLLIN
# A listener bound to a wildcard (0.0.0.0, ::) learns with each datagram the address it was
# sent to (IP_PKTINFO, IPV6_RECVPKTINFO) and answers from that address (ip(7), ipv6(7)):
# otherwise the kernel picks the reply's source by its routes, and on a host with several
# addresses a client (a DNS resolver, a connected socket) drops a reply from another.
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)  # Linux's value; Python has the name from 3.12
_PKTINFO_SPACE = socket.CMSG_SPACE(20)  # struct in6_pktinfo, the larger of the two

Address = tuple[Any, ...]


class UdpListener:
    """One UDP listening socket, its live flows by client address, and the refused ones."""

    __slots__ = ("accepting", "address", "fd", "flows", "held", "key", "refused", "sock", "wildcard")

    def __init__(self, key: ListenKey, sock: socket.socket) -> None:
        self.key = key
        self.sock = sock
        self.fd = sock.fileno()
        local = sock.getsockname()
        self.address = format_address(local)
        self.flows: dict[Address, Flow] = {}
        self.refused: dict[Address, tuple[str, str, float]] = {}  # client -> (route, reason, until)
        self.accepting = True
        self.held = False  # a reload in progress may take it back: open while it decides
        self.wildcard = local[0] in ("0.0.0.0", "::")  # replies name their source (IP_PKTINFO)
        if self.wildcard:
            if sock.family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)

    def receive(self, buffer: bytearray) -> tuple[int, Address, list[tuple[int, int, bytes]]]:
        """One datagram into `buffer`: its size, its client, and (a wildcard listener) its
        ancillary data, which `reply_source` reads when the datagram starts a flow."""
        if not self.wildcard:
            n, client = self.sock.recvfrom_into(buffer, BUFFER, _FLAGS)
            return n, client, []
        n, ancillary, _, client = self.sock.recvmsg_into([buffer], _PKTINFO_SPACE, _FLAGS)
        return n, client, ancillary

    @staticmethod
    def reply_source(ancillary: list[tuple[int, int, bytes]]) -> list[tuple[int, int, bytes]]:
        """From a datagram's ancillary data, what makes a reply come from the address it was
        sent to (empty: the listener's own address); read once per flow, not per datagram."""
        for level, kind, data in ancillary:
            if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= 12:
                # struct in_pktinfo {ifindex, spec_dst, addr}: the reply's source is addr
                return [(level, kind, bytes(4) + data[8:12] + bytes(4))]
            if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO and len(data) >= 20:
                # struct in6_pktinfo {addr, ifindex}: the same address, any interface
                return [(level, kind, data[:16] + bytes(4))]
        return []


class Flow:
    """One session's place in the data path: its client, its connected socket once it has
    one, and how its task learns that the data path ended it."""

    __slots__ = ("client", "conn", "error", "fd", "inbox", "listener", "over", "pending", "replies_left", "sock", "source", "task")

    def __init__(self, listener: UdpListener, client: Address, first: bytes, source: list[tuple[int, int, bytes]] | None = None) -> None:
        self.listener = listener
        self.client = client
        self.source = source or None  # a wildcard listener's: the address replies are sent from
        self.conn: Session | None = None  # the session's record, from its task's first step
        self.sock: socket.socket | None = None
        self.fd = -1
        self.pending: list[bytes] | None = [first]  # until the socket is connected (or a handler takes the flow)
        self.inbox: Inbox | None = None  # a handler's session: its client's datagrams, queued
        self.replies_left = 0  # responses = N: replies still to come; 0: no limit
        self.over = False  # the data path ended it
        self.error: BaseException | None = None  # ... with this (None: normally)
        self.task: Any = None  # the session's task while it waits in wait()

    @property
    def route(self) -> str:
        conn = self.conn
        return (conn.route if conn is not None else None) or "-"

    @property
    def local(self) -> tuple[str, int]:
        """The address the client sent to: a wildcard listener's from the datagram's
        IP_PKTINFO (the address replies come from), else the listener's own."""
        ip, port = self.listener.sock.getsockname()[:2]
        for level, _, data in self.source or ():
            ip = socket.inet_ntop(socket.AF_INET, data[4:8]) if level == socket.IPPROTO_IP else socket.inet_ntop(socket.AF_INET6, data[:16])
        return str(ip), int(port)

    async def wait(self) -> None:
        """Until the data path ends the flow: returns at a normal end (its replies are in),
        raises ConnectionEnded otherwise. Cancellable (a quiet limit, kill, shutdown)."""
        if not self.over:
            self.task = trio.lowlevel.current_task()
            await trio.lowlevel.wait_task_rescheduled(self._abort)
            return
        if self.error is not None:
            raise self.error

    def _abort(self, _: object) -> trio.lowlevel.Abort:
        self.task = None
        return trio.lowlevel.Abort.SUCCEEDED


class Inbox:
    """A handler session's datagrams from its client, in the order they came, until the
    handler receives them: at most INBOX_MAX of them, INBOX_BYTES in all."""

    __slots__ = ("datagrams", "reader", "size")

    def __init__(self) -> None:
        self.datagrams: collections.deque[bytes] = collections.deque()
        self.size = 0
        self.reader: trio.lowlevel.Task | None = None  # the handler's task, waiting in get()

    def put(self, data: bytes) -> bool:
        """Queue a datagram (the mover, without waiting); False: the inbox is full."""
        if len(self.datagrams) >= INBOX_MAX or self.size + len(data) > INBOX_BYTES:
            return False
        self.datagrams.append(data)
        self.size += len(data)
        reader, self.reader = self.reader, None
        if reader is not None:
            trio.lowlevel.reschedule(reader)
        return True

    async def get(self) -> bytes:
        """The oldest datagram, waiting for one if none is queued."""
        await trio.lowlevel.checkpoint_if_cancelled()
        if self.datagrams:
            await trio.lowlevel.cancel_shielded_checkpoint()
        while not self.datagrams:
            if self.reader is not None:
                raise trio.BusyResourceError("another task is already receiving on this session")
            self.reader = trio.lowlevel.current_task()
            await trio.lowlevel.wait_task_rescheduled(self._abort)
        data = self.datagrams.popleft()
        self.size -= len(data)
        return data

    def _abort(self, _: object) -> trio.lowlevel.Abort:
        self.reader = None
        return trio.lowlevel.Abort.SUCCEEDED


class DatagramSession:
    """What a UDP handler route's callable gets for its one client flow: `await receive()`
    for the client's next datagram (the first is the one that started the session), `await
    send(data)` to answer it, `client` ("ip", port). It lives as long as the session: the
    handler's return ends it (`normal`); so do its quiet limits, `responses`, kill, shutdown."""

    __slots__ = ("_datagrams", "_flow", "client")

    def __init__(self, datagrams: Datagrams, flow: Flow) -> None:
        self._datagrams = datagrams
        self._flow = flow
        self.client = (str(flow.client[0]), int(flow.client[1]))

    async def receive(self) -> bytes:
        """The client's next datagram; it waits for one. Up to INBOX_MAX (64) datagrams,
        INBOX_BYTES (256 KiB) in all, wait here for the handler; more are dropped and counted
        (`busy`)."""
        inbox = self._flow.inbox
        assert inbox is not None, "the handler's session has its inbox"
        return await inbox.get()

    async def send(self, data: bytes | bytearray | memoryview) -> None:
        """A reply to the client, from the address it sent to, as a target's reply is sent.
        UDP has no back-pressure: a reply the socket cannot take at once is dropped and
        counted (`busy`; `too_big` past the path's size), as a forwarded one is."""
        await trio.lowlevel.checkpoint_if_cancelled()
        flow = self._flow
        if not flow.over:  # after the `responses`-th reply the session is ending: no more
            self._datagrams.reply(flow, data, len(data), trio.current_time())
        await trio.lowlevel.cancel_shielded_checkpoint()

    def __repr__(self) -> str:
        return f"DatagramSession(client={self.client})"


class Datagrams:
    """One per forwarder: every UDP listener's and session's datagrams, in one trio task (`run`)."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._listeners: dict[int, UdpListener] = {}
        self._flows: dict[int, Flow] = {}  # by the fd of the session's socket
        self._buffer = bytearray(BUFFER)
        self._view = memoryview(self._buffer)
        # Called with each new flow to start its session task (the forwarder's connection nursery).
        self.on_flow: Callable[[Flow], object] | None = None
        # Called with each listening socket just before it closes (a worker tells its supervisor).
        self.on_closed: Callable[[socket.socket], object] | None = None
        self.drops: collections.Counter[tuple[str, str]] = collections.Counter()  # (route, reason) -> datagrams
        self.batches = 0  # wakeups with events
        self.events = 0

    @property
    def sessions(self) -> int:
        """Sessions with a connected socket in the mover now."""
        return len(self._flows)

    def close(self) -> None:
        """The forwarder has stopped: every listening socket closes (no session is left)."""
        for listener in list(self._listeners.values()):
            self._close_listener(listener)
        self._epoll.close()

    # -- listeners --------------------------------------------------------------------

    def add(self, key: ListenKey, sock: socket.socket) -> UdpListener:
        """Receive datagrams on a bound UDP socket (the mover owns it from now on). A stopped
        listener's socket, given back from `held`, takes new flows again; the sessions it
        still has go on as they were, on their own routes."""
        listener = self._listeners.get(sock.fileno())
        if listener is not None and listener.sock is sock:
            listener.accepting = True
            return listener
        sock.setblocking(False)
        listener = UdpListener(key, sock)
        self._listeners[listener.fd] = listener
        self._epoll.register(listener.fd, _IN)
        return listener

    def listening_sockets(self) -> list[socket.socket]:
        """Every listener's socket still open: taking new flows, or replying for old ones."""
        return [listener.sock for listener in self._listeners.values()]

    def stop(self, listener: UdpListener) -> None:
        """No new flow on this listener; its socket closes once its last session has left."""
        listener.accepting = False
        listener.refused.clear()
        self._close_if_unused(listener)

    @contextlib.contextmanager
    def held(self, keys: Collection[ListenKey]) -> Iterator[dict[ListenKey, socket.socket]]:
        """The sockets of stopped listeners of `keys` that their sessions still keep open (a
        reload removed their route while they lived), kept open while the block runs. A reload
        that listens on such an address again gives the socket back to `add` instead of
        binding a second one, which the open first one would refuse (EADDRINUSE); one not
        taken back closes with its last session, as before."""
        found = {listener.key: listener for listener in self._listeners.values() if not listener.accepting and listener.key in keys}
        for listener in found.values():
            listener.held = True
        try:
            yield {key: listener.sock for key, listener in found.items()}
        finally:
            for listener in found.values():
                listener.held = False
                self._close_if_unused(listener)

    def release(self) -> None:
        """Every listening socket is another process's to read now (a new generation took them
        over, SIGUSR2): none takes a new flow, and none is read any more, or this process would
        take, and drop, datagrams that are the other's. Each stays open for the replies of its
        sessions. Registered for no event, not unregistered, so that closing it stays one path
        (an unconnected UDP socket without IP_RECVERR reports neither EPOLLERR nor EPOLLHUP)."""
        for listener in list(self._listeners.values()):
            self._epoll.modify(listener.fd, 0)
            self.stop(listener)

    def _close_if_unused(self, listener: UdpListener) -> None:
        """A stopped listener closes once no session replies through it and no reload may take it back."""
        if not (listener.accepting or listener.flows or listener.held):
            self._close_listener(listener)

    def _close_listener(self, listener: UdpListener) -> None:
        if self._listeners.get(listener.fd) is listener:
            del self._listeners[listener.fd]
            self._epoll.unregister(listener.fd)
            if self.on_closed is not None:
                self.on_closed(listener.sock)
            listener.sock.close()

    # -- sessions ---------------------------------------------------------------------

    def attach(self, flow: Flow, sock: socket.socket, responses: int) -> None:
        """The session's socket is connected to its target: the datagrams that waited for it
        go now, and from here on the mover moves the flow's datagrams both ways."""
        flow.sock, flow.fd, flow.replies_left = sock, sock.fileno(), responses
        self._flows[flow.fd] = flow
        self._epoll.register(flow.fd, _IN)
        pending, flow.pending = flow.pending, None
        now = trio.current_time()
        for data in pending or ():
            if flow.over:
                break
            self._to_target(flow, data, len(data), now)

    def open_session(self, flow: Flow, responses: int) -> DatagramSession:
        """A handler takes the flow: from here its client's datagrams queue in its inbox (those
        that waited first), and its replies are the handler's (`responses` of them end it)."""
        flow.inbox, flow.replies_left = Inbox(), responses
        pending, flow.pending = flow.pending, None
        now = trio.current_time()
        for data in pending or ():
            self._to_handler(flow, data, now)
        return DatagramSession(self, flow)

    def end(self, flow: Flow) -> None:
        """The flow ends normally now (its handler returned): its task wakes from `wait`."""
        self._finish(flow, None)

    def forget(self, flow: Flow) -> None:
        """The session has ended (its task is leaving, on every path): its socket closes, and a
        flow refused before it had one is remembered for REFUSAL_HOLD, with its datagrams."""
        self._detach(flow)
        listener = flow.listener
        if flow.sock is not None:
            flow.sock.close()
        elif flow.inbox is None:  # refused before its action took it
            conn = flow.conn
            reason = conn.reason if conn is not None else None
            if reason is not None and reason not in (Reason.SHUTDOWN, Reason.KILLED) and listener.accepting:
                refused = listener.refused
                if len(refused) >= REFUSED_MAX:
                    del refused[next(iter(refused))]  # the oldest
                refused[flow.client] = (flow.route, reason.value, trio.current_time() + REFUSAL_HOLD)
            for _ in flow.pending or ():
                self.drops[flow.route, reason.value if reason is not None else CLOSED] += 1
        flow.pending = None
        self._close_if_unused(listener)

    def _detach(self, flow: Flow) -> None:
        """The mover lets go of the flow: no more events of its socket, and its client's next
        datagram is a new flow. Once only; again, nothing."""
        if flow.fd >= 0 and self._flows.get(flow.fd) is flow:
            del self._flows[flow.fd]
            self._epoll.unregister(flow.fd)
        if flow.listener.flows.get(flow.client) is flow:
            del flow.listener.flows[flow.client]

    def _finish(self, flow: Flow, error: BaseException | None) -> None:
        """The data path ends the flow (`error` None: its replies are in): its socket is no
        longer read, its client's next datagram starts a new session, its task wakes."""
        if flow.over:
            return
        flow.over, flow.error = True, error
        self._detach(flow)
        task, flow.task = flow.task, None
        if task is not None:
            trio.lowlevel.reschedule(task, outcome.Value(None) if error is None else outcome.Error(error))

    def _failed(self, flow: Flow, exc: OSError) -> None:
        self._finish(flow, ConnectionEnded(connect_failure(exc), str(exc)))

    # -- the loop ---------------------------------------------------------------------

    async def run(self) -> None:
        """Move datagrams until cancelled (after every session has left)."""
        epoll_fd = self._epoll.fileno()
        poll, listeners, flows = self._epoll.poll, self._listeners, self._flows
        try:
            while True:
                await trio.lowlevel.wait_readable(epoll_fd)
                while events := poll(0, BATCH):
                    self.batches += 1
                    self.events += len(events)
                    now = trio.current_time()
                    for fd, _ in events:
                        listener = listeners.get(fd)
                        if listener is not None:
                            try:
                                self._from_clients(listener, now)
                            except Exception:  # a bug must not stop every UDP route (logged)
                                log.exception("datagrams on %s", listener.address)
                            continue
                        flow = flows.get(fd)
                        if flow is not None:
                            try:
                                self._from_target(flow, now)
                            except Exception as exc:  # noqa: BLE001 - one session's bug ends that session
                                self._finish(flow, exc)
                    await trio.lowlevel.checkpoint()
        finally:
            for flow in list(flows.values()):
                self._finish(flow, RuntimeError("the datagram mover stopped"))

    def _from_clients(self, listener: UdpListener, now: float) -> None:
        buffer, view, flows = self._buffer, self._view, listener.flows
        for _ in range(READ_BATCH):
            try:
                n, client, ancillary = listener.receive(buffer)
            except BlockingIOError:
                return
            except OSError as exc:  # not expected on an unconnected socket: read again next time
                log.warning("receiving on %s: %s", listener.address, exc)
                return
            flow = flows.get(client)
            if flow is not None:
                if flow.sock is not None:
                    self._to_target(flow, view[:n], n, now)
                elif flow.inbox is not None:
                    self._to_handler(flow, bytes(view[:n]), now)
                elif flow.pending is not None and len(flow.pending) < PENDING_MAX:
                    flow.pending.append(bytes(view[:n]))
                else:
                    self.drops[flow.route, BUSY] += 1
                continue
            if not listener.accepting:
                self.drops["-", CLOSED] += 1
                continue
            refused = listener.refused.get(client)
            if refused is not None:
                route, reason, until = refused
                if now < until:
                    self.drops[route, reason] += 1
                    continue
                del listener.refused[client]
            flow = flows[client] = Flow(listener, client, bytes(view[:n]), listener.reply_source(ancillary))
            try:
                assert self.on_flow is not None, "the forwarder starts sessions"
                self.on_flow(flow)
            except BaseException:
                del flows[client]  # no session will ever forget it
                self.drops["-", CLOSED] += 1
                raise

    def _to_target(self, flow: Flow, data: memoryview | bytes, n: int, now: float) -> None:
        sock, conn = flow.sock, flow.conn
        assert sock is not None and conn is not None
        try:
            sock.send(data, _FLAGS)
        except BlockingIOError:
            self.drops[flow.route, BUSY] += 1
            return
        except OSError as exc:
            if exc.errno == errno.EMSGSIZE:
                self.drops[flow.route, TOO_BIG] += 1
                return
            self._failed(flow, exc)  # an ICMP error the target's address sent earlier
            return
        conn.bytes_in += n
        conn.datagrams_in += 1
        conn.last_activity = now

    def _to_handler(self, flow: Flow, data: bytes, now: float) -> None:
        inbox, conn = flow.inbox, flow.conn
        assert inbox is not None and conn is not None
        if not inbox.put(data):
            self.drops[flow.route, BUSY] += 1
            return
        conn.bytes_in += len(data)
        conn.datagrams_in += 1
        conn.last_activity = now

    def _from_target(self, flow: Flow, now: float) -> None:
        sock = flow.sock
        assert sock is not None
        buffer, view = self._buffer, self._view
        for _ in range(READ_BATCH):
            try:
                n = sock.recv_into(buffer, BUFFER, _FLAGS)
            except BlockingIOError:
                return
            except OSError as exc:  # ECONNREFUSED: the target's port is closed (ICMP)
                self._failed(flow, exc)
                return
            self.reply(flow, view[:n], n, now)
            if flow.over:
                return

    def reply(self, flow: Flow, data: memoryview | bytes | bytearray, n: int, now: float) -> None:
        """`data` (n bytes) to the flow's client, from its listener and the address the client
        sent to; counted, and the `responses`-th reply ends the flow. A reply the socket cannot
        take at once is dropped and counted."""
        conn = flow.conn
        assert conn is not None
        try:
            if flow.source is None:
                flow.listener.sock.sendto(data, _FLAGS, flow.client)
            else:
                flow.listener.sock.sendmsg([data], flow.source, _FLAGS, flow.client)
        except BlockingIOError:
            self.drops[flow.route, BUSY] += 1
            return
        except OSError as exc:
            self.drops[flow.route, TOO_BIG if exc.errno == errno.EMSGSIZE else BUSY] += 1
            return
        conn.bytes_out += n
        conn.datagrams_out += 1
        conn.last_activity = now
        if flow.replies_left:
            flow.replies_left -= 1
            if not flow.replies_left:
                self._finish(flow, None)  # responses = N: the Nth reply ends it


# -- sockets --------------------------------------------------------------------------


def bind_datagrams(bind: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A UDP socket bound to (bind, port); OSError when it cannot be. An IPv6 address gets an
    IPv6-only socket, as trio's TCP listeners do: "::" and "0.0.0.0" are two listeners.
    `reuse_port`: it joins the SO_REUSEPORT group of the address (workers' sockets, _reuseport)."""
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, LISTENER_RCVBUF)
        sock.bind((bind, port))
    except BaseException:
        sock.close()
        raise
    return sock


async def dial_datagrams(conn: Session, route: CompiledRoute, targets: RouteTargets) -> tuple[socket.socket, int]:
    """A UDP socket connected to one of the route's targets (balanced; a name resolved within
    connect_timeout; up to 1 + connect_retries tried) and the target's index; or
    ConnectionEnded with the last attempt's reason (dns_error, target_unreachable...)."""
    conn.state = "connecting"
    reason, detail = Reason.TARGET_UNREACHABLE, "no target is up"
    error: OSError | None = None
    for index in targets.order(1 + route.connect_retries, trio.current_time()):
        target = targets.targets[index]
        conn.target = target.name
        began = trio.current_time()
        try:
            sock = await _connected(target.address, target.literal, route.policy.connect_timeout)
        except (trio.TooSlowError, OSError) as exc:
            reason = connect_failure(exc)
            error = OSError(exc.errno, exc.strerror) if isinstance(exc, OSError) and exc.errno else None
            detail = f"{target.name} failed ({reason})"
            log.info("session %d: %s", conn.id, detail)
            continue
        conn.connect_time = trio.current_time() - began
        conn.target = format_address(sock.getpeername())
        return sock, index
    raise ConnectionEnded(reason, detail) from error


async def _connected(address: tuple[str, int], family: int | None, timeout: float) -> socket.socket:
    """A non-blocking UDP socket connected to `address` (a name is resolved first)."""
    target: tuple[Any, ...] = address
    if family is None:
        with trio.fail_after(timeout):
            found = await trio.socket.getaddrinfo(address[0], address[1], type=socket.SOCK_DGRAM)
        family, _, _, _, target = found[0]
    sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        sock.connect(target)  # no packet: the kernel only fixes the peer (and the source address)
    except BaseException:
        sock.close()
        raise
    return sock
