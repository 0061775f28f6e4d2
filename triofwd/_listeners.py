"""The forwarder's listening sockets: binding them all or none, and one accept task each.

Each accept task takes connections straight from the backlog with a raw accept() while
there are any, and waits in trio only when it is empty; every accepted socket (a plain
stdlib socket: no trio wrapper, no setsockopt) is handed to `on_accept`, which starts its
connection task. Accepted sockets inherit TCP_NODELAY and the kernel keep-alive settings
from their listening socket, set there once (`configure`) instead of on every connection.
accept(2) errors of the pending connection are skipped; running out of fds or memory backs
off, with one warning a burst. A listening socket systemd passed in (socket activation) is
used for the key bound where it is, instead of a bind, and given back open when its
listener stops (systemd still listens on it).

A UDP listener (a `protocol = "udp"` route's) has no accept loop: its bound socket goes to
the engine's datagram mover (`_datagrams`), and a task here only holds it while it listens;
when that task ends the listener takes no new flow (its socket closes with its last session).
A reload that listens on the address again while those sessions live takes the open socket
back (`adopting`) rather than binding a second one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import math
import socket
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import Any

import trio

from . import _rawsock as rawsock
from ._addresses import ListenKey, format_address, is_udp
from ._datagrams import Datagrams, UdpListener, bind_datagrams
from ._errors import listen_error
from ._rawsock import raw_socket
from ._systemd import PassedSockets
from ._table import RouteTable

__all__ = ["Listeners", "bind_all", "close_all", "offload_only"]

log = logging.getLogger("triofwd")

# After an accept() error that is not the pending connection's own (out of fds or memory,
# or anything unexpected), wait this long: the listener stays readable, so retrying at once
# would spin.
ACCEPT_BACKOFF = 0.1
ACCEPT_WARN_INTERVAL = 10.0
# Connections taken from the backlog per wakeup of an accept loop before it yields anyway.
ACCEPT_BATCH = 32

# accept() errors that concern only the connection being accepted: accept(2), "Error
# handling": Linux passes already-pending network errors of the new socket on as accept's
# own error, to be treated like EAGAIN and retried (EPERM: a firewall rule refused it).
# The list is trio's (_ignorable_accept_errno_names in trio/_highlevel_socket.py); names a
# platform lacks are skipped.
ACCEPT_IGNORED_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "EPERM", "ECONNABORTED", "EPROTO", "ENETDOWN", "ENOPROTOOPT", "EHOSTDOWN", "ENONET", "EHOSTUNREACH",
        "EOPNOTSUPP", "ENETUNREACH", "ENOSR", "ESOCKTNOSUPPORT", "EPROTONOSUPPORT", "ETIMEDOUT", "ECONNRESET",
    )
    if hasattr(errno, name)
)  # fmt: skip


class BoundDatagrams:
    """A bound UDP socket, as bind_all hands a UDP listener's over (`.socket`, as a trio
    SocketListener has one)."""

    __slots__ = ("socket",)

    def __init__(self, sock: socket.socket) -> None:
        self.socket = sock


Opened = dict[ListenKey, list[trio.SocketListener | BoundDatagrams]]
OnAccept = Callable[[socket.socket, Any, ListenKey], None]


@dataclasses.dataclass(eq=False)
class Listener:
    key: ListenKey
    address: str
    scope: trio.CancelScope
    raw: socket.socket
    udp: UdpListener | None = None  # a UDP listener's, in the datagram mover, while this entry listens on it


class Listeners:
    """The listening sockets by listener key, each with its accept task in `nursery`."""

    def __init__(self, nursery: trio.Nursery, on_accept: OnAccept, on_error: Callable[[], None], passed: PassedSockets | None = None) -> None:
        self._nursery = nursery
        self._on_accept = on_accept
        self._on_error = on_error  # an accept() failure the listener backed off from (counted)
        self._passed = passed  # sockets systemd passed: given back, not closed, when their listener stops
        self.by_key: dict[ListenKey, list[Listener]] = {}
        self.datagrams: Datagrams | None = None  # where UDP listeners' sockets go (the engine's mover)

    def listen(self, opened: Opened) -> None:
        """Hand each bound socket to an accept task; registered at once, so `addresses` is true on return."""
        for key, sockets in opened.items():
            for sock in sockets:
                if isinstance(sock, BoundDatagrams):
                    assert self.datagrams is not None, "UDP listeners need the datagram mover"
                    entry = Listener(key, format_address(sock.socket.getsockname()), trio.CancelScope(), sock.socket, self.datagrams.add(key, sock.socket))
                    self.by_key.setdefault(key, []).append(entry)
                    self._nursery.start_soon(self._receive, entry)
                    continue
                entry = Listener(key, format_address(sock.socket.getsockname()), trio.CancelScope(), raw_socket(sock.socket))
                self.by_key.setdefault(key, []).append(entry)
                self._nursery.start_soon(self._accept_loop, entry, sock)

    def configure(self, table: RouteTable) -> None:
        """Set on each listening socket what its accepted sockets inherit: TCP_NODELAY, and the
        kernel keep-alive its routes share (at start, and again after a reload)."""
        for key, listeners in self.by_key.items():
            if is_udp(key):
                continue
            idle = table.listener_keepalive(key)
            for entry in listeners:
                entry.raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if idle is not None:
                    rawsock.set_tcp_keepalive(entry.raw, idle)

    def addresses(self, table: RouteTable) -> dict[str, list[str]]:
        """Route name -> the "ip:port" addresses it is listening on now."""
        out: dict[str, list[str]] = {}
        for key, listeners in self.by_key.items():
            for route in table.by_listener.get(key, ()):
                out.setdefault(route.name, []).extend(entry.address for entry in listeners)
        return out

    def close(self, keys: Iterable[ListenKey] | None = None) -> None:
        """Stop accepting on `keys` (all when None) and release their ports."""
        for key in list(self.by_key if keys is None else keys):
            for entry in self.by_key.pop(key, ()):
                entry.scope.cancel()
                self._stop_receiving(entry)  # now, not when its task next runs: a reload may adopt it at once

    @contextlib.contextmanager
    def adopting(self, keys: Iterable[ListenKey]) -> Iterator[Opened]:
        """The UDP listeners of `keys` that stopped while sessions still reply through them:
        their open sockets, held open while the block runs, for `listen` to take back (the
        new table's routes get new flows; the sessions stay on theirs). Binding the address
        again instead would fail while the first socket is open."""
        assert self.datagrams is not None, "UDP listeners need the datagram mover"
        with self.datagrams.held({key for key in keys if is_udp(key)}) as held:
            yield {key: [BoundDatagrams(sock)] for key, sock in held.items()}

    async def _accept_loop(self, entry: Listener, listener: trio.SocketListener) -> None:
        failures = 0  # in the current burst
        warned_at = -math.inf  # when this listener last warned
        warned = False  # the current burst was warned about
        raw = entry.raw
        family = int(raw.family)
        try:
            with entry.scope:
                async with self._held(listener, raw):
                    batch = 0
                    while True:
                        try:
                            # The raw accept() gives the peer's address with the socket: a client
                            # that resets before its task runs cannot make getpeername() fail later.
                            # Taken straight from the backlog while there are any; a trip
                            # through the scheduler only to wait, or after ACCEPT_BATCH of them.
                            if batch >= ACCEPT_BATCH or entry.scope.cancel_called:
                                batch = 0
                                await trio.lowlevel.checkpoint()  # and where close() cancelled us, stop here
                            while (ready := _accept_ready(raw, family)) is None:
                                batch = 0
                                await trio.lowlevel.wait_readable(listener.socket)
                            batch += 1
                            sock, peer = ready
                        except OSError as exc:
                            if exc.errno in ACCEPT_IGNORED_ERRNOS:
                                batch += 1
                                continue  # that one client is gone; nothing wrong with the listener
                            # Out of fds or memory: the pending connection stays queued and the
                            # socket stays readable, so back off. Bursts come in waves when fds
                            # flap, so warn at most once per ACCEPT_WARN_INTERVAL.
                            self._on_error()
                            failures += 1
                            now = trio.current_time()
                            if not warned and now - warned_at >= ACCEPT_WARN_INTERVAL:
                                log.warning("accept on %s failed: %s; backing off", entry.address, exc.strerror or exc)
                                warned, warned_at = True, now
                            await trio.sleep(ACCEPT_BACKOFF)
                            continue
                        if warned:
                            log.warning("accept on %s works again after %d failures", entry.address, failures)
                        failures, warned = 0, False
                        self._on_accept(sock, peer, entry.key)
        finally:
            self._forget(entry)

    async def _receive(self, entry: Listener) -> None:
        """A UDP listener: its socket is the datagram mover's; this task holds it as listening
        until its scope is cancelled (reload, drain, shutdown), then it takes no new flow."""
        try:
            with entry.scope:
                await trio.sleep_forever()
        finally:
            self._stop_receiving(entry)
            self._forget(entry)

    def _stop_receiving(self, entry: Listener) -> None:
        """The entry no longer listens: its UDP listener takes no new flow. Taken from the
        entry, so that the entry's task, ending later, cannot stop the listener a reload has
        adopted meanwhile under a new entry."""
        udp, entry.udp = entry.udp, None
        if udp is not None and self.datagrams is not None:
            self.datagrams.stop(udp)

    def _forget(self, entry: Listener) -> None:
        entries = self.by_key.get(entry.key, [])
        if entry in entries:
            entries.remove(entry)
            if not entries:
                del self.by_key[entry.key]

    @contextlib.asynccontextmanager
    async def _held(self, listener: trio.SocketListener, raw: socket.socket) -> AsyncIterator[None]:
        """The listening socket while its accept task runs; then closed, or, if systemd passed
        it, given back open: systemd listens on it still, and a reload may claim it again."""
        try:
            yield
        finally:
            if self._passed is None or not self._passed.give_back(raw):
                await listener.aclose()


def _accept_ready(listener: socket.socket, family: int) -> tuple[socket.socket, Any] | None:
    """A connection waiting in the backlog, or None: accept() without trio's checkpoints around
    it, and without socket.accept()'s conversions of the family and type to enums."""
    try:
        fd, peer = listener._accept()  # type: ignore[attr-defined]  # noqa: SLF001 - socket.accept() less its wrapping
    except BlockingIOError:
        return None
    return socket.socket(family, socket.SOCK_STREAM, 0, fd), peer


def offload_only(table: RouteTable) -> set[ListenKey]:
    """Listeners only offload routes use: the kernel serves those ports, binding them is a courtesy."""
    return {k for k, routes in table.by_listener.items() if all(r.kind == "offload" for r in routes)}


def close_all(opened: Opened, keep: Iterable[socket.socket] = ()) -> None:
    """Close every socket of `opened` but those whose stdlib socket is in `keep` (passed ones, given back)."""
    kept = {sock.fileno() for sock in keep}
    for sockets in opened.values():
        for sock in sockets:
            if sock.socket.fileno() not in kept:
                sock.socket.close()


async def bind_all(keys: Iterable[ListenKey], optional: set[ListenKey] | None = None, passed: PassedSockets | None = None) -> Opened:
    """Bind every key or none: on the first failure, close what was opened and raise ListenError.

    A key in `optional` that cannot be bound is skipped with a warning instead. A key that
    one of the sockets systemd `passed` is bound to gets that socket instead of a bind of
    its own (socket activation); on failure those go back to `passed`, open.
    """
    keys = list(keys)
    # Claimed all at once: a dual-stack [::] socket goes to a "::" key before a "0.0.0.0" one.
    wants = {key: (key[0], key[1], "udp" if is_udp(key) else "tcp") for key in keys}
    if passed is not None and not passed.claims_udp:
        wants = {key: want for key, want in wants.items() if want[2] == "tcp"}
    found = passed.claim(wants.values()) if passed is not None else {}
    opened: Opened = {}
    try:
        for key in keys:
            bind, port, _ = key
            udp = is_udp(key)
            sock = found.get(wants[key]) if key in wants else None
            if sock is not None:
                opened[key] = [BoundDatagrams(sock) if udp else trio.SocketListener(trio.socket.from_stdlib_socket(sock))]
                continue
            try:
                if udp:
                    opened[key] = [BoundDatagrams(bind_datagrams(bind, port))]
                else:
                    opened[key] = [*await trio.open_tcp_listeners(port, host=bind)]
            except OSError as exc:
                error = listen_error(exc, f"listen on {format_address((bind, port))}{' (udp)' if udp else ''}")
                if optional and key in optional:
                    log.warning("%s (an offload port: the kernel forwards it anyway)", error)
                    continue
                raise error from None
    except BaseException:
        for sock in found.values():
            if passed is not None:
                passed.give_back(sock)
        close_all(opened, keep=found.values())
        raise
    return opened
