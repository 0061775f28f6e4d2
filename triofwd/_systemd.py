"""systemd without libsystemd: notifications, socket activation, the watchdog.

Outside systemd (no NOTIFY_SOCKET, LISTEN_PID or WATCHDOG_USEC) every function here does
nothing, so callers never ask "are we under systemd?".

    notify(*fields)           sd_notify(3): notify("READY=1", "STATUS=12 connections"); never raises
    reloading()               with reloading(): await reload()  -- RELOADING=1, then READY=1 even if it failed
    listen_fds()              sd_listen_fds_with_names(3): [(name, socket)], LISTEN_* removed from the environment
    PassedSockets(passed)     hands each passed socket to the listener bound where it is bound:
      .claim(wants)             {(bind, port, protocol): socket} for those of `wants` it serves
      .give_back(socket)        a claimed socket returned, open (its listener closed), or False
      .unclaimed                [(name, socket)] no listener took yet
    watchdog_interval()       seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None
    watchdog(interval)        a trio task: WATCHDOG=1 from the event loop every `interval`

How `triofwd serve` uses it:

- First thing, before anything can spawn a process: `passed = PassedSockets(listen_fds())`
  (ValueError: LISTEN_* malformed, which systemd never does; exit 2 with its message).
- Binding: claim every listener key at once, `found = passed.claim((bind, port, "tcp") for
  bind, port, _ in keys)`, and wrap a found socket with `trio.SocketListener(
  trio.socket.from_stdlib_socket(sock))` instead of binding the port. At once, not one by
  one: a dual-stack [::] socket serves a "0.0.0.0" listener only if no "::" listener wants
  it. After a reload, claim the new keys the same way.
- Once bound: warn about each of `passed.unclaimed` (its name, its address), then
  `notify("READY=1", "STATUS=...")` and, with `watchdog_interval()` not None,
  `nursery.start_soon(watchdog, interval)` in a nursery that lives through the drain.
- SIGHUP: `with reloading(): await reload()`. SIGTERM: `notify("STOPPING=1")` first.
  STATUS= with the live connection count whenever it is convenient (e.g. every few seconds).

A passed socket is shared with systemd, which keeps it open while triofwd restarts (that
is the point: connections wait in its backlog instead of being refused). Never shutdown()
it: that would stop the listening socket for systemd too. A listener that stops (a reload
dropped its route, a drain) gives its passed socket back, open, rather than closing it: the
port cannot be bound again while systemd holds it, so a reload that adds it back claims it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import logging
import os
import socket
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import NoReturn

import trio

from ._addresses import IPAddress

__all__ = [
    "PassedSockets",
    "listen_fds",
    "notify",
    "parse_listen_fds",
    "reloading",
    "watchdog",
    "watchdog_interval",
]

log = logging.getLogger("triofwd.systemd")

# sd_listen_fds(3): passed file descriptors start here, after stdin, stdout and stderr.
SD_LISTEN_FDS_START = 3
LISTEN_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
# systemd asks for a ping at half of WATCHDOG_USEC (sd_watchdog_enabled(3)).
WATCHDOG_FRACTION = 0.5
# A notification is one local datagram; should PID 1 not drain its queue, the event loop
# waits this long at most (libsystemd would block).
NOTIFY_TIMEOUT = 1.0

Want = tuple[str, int, str]  # (bind address, port, protocol "tcp" | "udp"): what a listener needs
_WILDCARD_V4 = ipaddress.IPv4Address("0.0.0.0")
_WILDCARD_V6 = ipaddress.IPv6Address("::")


def notify(*fields: str) -> None:
    """Send "FIELD=value" lines to systemd in one datagram (sd_notify(3)), e.g. "READY=1".

    $NOTIFY_SOCKET is a path or, starting with '@', an abstract socket name. Unset: nothing
    happens. A failure is logged, never raised: systemd's bookkeeping must not stop us.
    """
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    address = "\0" + path[1:] if path.startswith("@") else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.settimeout(NOTIFY_TIMEOUT)
            sock.sendto("\n".join(fields).encode(), address)
    except OSError as exc:
        log.warning("cannot notify systemd at %s: %s", path, exc.strerror or exc)


@contextlib.contextmanager
def reloading() -> Iterator[None]:
    """RELOADING=1 on entry, READY=1 on exit, also when the reload failed (the old
    configuration stays in force, so the service is ready again either way)."""
    # MONOTONIC_USEC: what Type=notify-reload (systemd 253) wants with RELOADING=1.
    notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")
    try:
        yield
    finally:
        notify("READY=1")


def parse_listen_fds(environ: Mapping[str, str], pid: int) -> list[tuple[int, str]]:
    """The (fd, name) pairs LISTEN_PID, LISTEN_FDS and LISTEN_FDNAMES describe for process `pid`.

    Empty when they are not set or meant for another process (LISTEN_PID differs: we
    inherited them). Names default to "unknown", as in sd_listen_fds_with_names(3).
    ValueError when they are malformed.
    """
    if "LISTEN_PID" not in environ or _number(environ, "LISTEN_PID") != pid or "LISTEN_FDS" not in environ:
        return []
    count = _number(environ, "LISTEN_FDS")
    names = environ["LISTEN_FDNAMES"].split(":") if "LISTEN_FDNAMES" in environ else ["unknown"] * count
    if len(names) != count:
        raise ValueError(f"LISTEN_FDNAMES names {len(names)} sockets, LISTEN_FDS={count}")
    return [(SD_LISTEN_FDS_START + i, name) for i, name in enumerate(names)]


def listen_fds() -> list[tuple[str, socket.socket]]:
    """The sockets systemd passed this process, with their FileDescriptorName=.

    LISTEN_* are removed from the environment (children must not take them for their own)
    and the sockets are made close-on-exec. A passed fd that is not a socket is skipped with
    a warning. ValueError when LISTEN_* are malformed.
    """
    try:
        fds = parse_listen_fds(os.environ, os.getpid())
    finally:
        for name in LISTEN_VARIABLES:
            os.environ.pop(name, None)
    passed = []
    for fd, name in fds:
        try:
            os.set_inheritable(fd, False)
            sock = socket.socket(fileno=fd)  # family, type and protocol read from the fd
        except OSError as exc:
            log.warning("systemd passed fd %d (%s), which is not a socket: %s", fd, name, exc.strerror or exc)
            continue
        passed.append((name, sock))
    return passed


@dataclasses.dataclass(frozen=True)
class Bound:
    """Where a passed socket listens, as far as matching needs it."""

    protocol: str  # "tcp" (a listening stream socket), "udp", or "" (never matched: unix, connected, raw)
    ip: IPAddress | None
    port: int
    dual_stack: bool  # IPv6 with IPV6_V6ONLY off: it takes IPv4 clients too

    @classmethod
    def of(cls, sock: socket.socket) -> Bound:
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return cls("", None, 0, False)
        if sock.type == socket.SOCK_STREAM:
            # Accept=yes passes connected sockets: not listeners.
            protocol = "tcp" if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) else ""
        else:
            protocol = "udp" if sock.type == socket.SOCK_DGRAM else ""
        host, port = sock.getsockname()[:2]
        ip = ipaddress.ip_address(host)
        dual_stack = sock.family == socket.AF_INET6 and not sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip, dual_stack = ip.ipv4_mapped, False  # [::ffff:a.b.c.d] is an IPv4 socket in all but name
        return cls(protocol, ip, port, dual_stack)


def fit(bound: Bound, ip: IPAddress | None, port: int, protocol: str) -> int:
    """How well a socket bound at `bound` serves a listener for ip:port: 2 exactly, 1 as a
    dual-stack [::] serving 0.0.0.0 (it takes every IPv4 client too), 0 not at all."""
    if ip is None or bound.ip is None or (bound.protocol, bound.port) != (protocol, port):
        return 0
    if bound.ip == ip:
        return 2
    return 1 if bound.dual_stack and bound.ip == _WILDCARD_V6 and ip == _WILDCARD_V4 else 0


class PassedSockets:
    """The sockets systemd passed, each handed to at most one listener: the one bound where it is."""

    # Whether a UDP listener claims a socket from these. Not systemd's: a UDP listener that
    # stops closes its socket (with its last session, in the datagram mover), and a socket
    # systemd holds must go back open, as a TCP one does. A worker's handed sockets may close.
    claims_udp = False

    def __init__(self, passed: Iterable[tuple[str, socket.socket]]) -> None:
        self._free = [(name, sock, Bound.of(sock)) for name, sock in passed]
        self._taken: dict[socket.socket, tuple[str, socket.socket, Bound]] = {}

    def claim(self, wants: Iterable[Want]) -> dict[Want, socket.socket]:
        """For each (bind, port, protocol) a passed socket serves, that socket, now taken.

        Exact addresses first, so a dual-stack [::] goes to a "::" listener before a
        "0.0.0.0" one whatever order they come in. A bind that is not an IP address
        (a hostname) and port 0 are never served.
        """
        wanted = {want: _ip(want[0]) for want in wants}
        found: dict[Want, socket.socket] = {}
        for rank in (2, 1):
            for want, ip in wanted.items():
                if want in found:
                    continue
                for i, (_, sock, bound) in enumerate(self._free):
                    if fit(bound, ip, want[1], want[2]) == rank:
                        found[want] = sock
                        self._taken[sock] = self._free.pop(i)
                        break
        return found

    def give_back(self, sock: socket.socket) -> bool:
        """Take back a claimed socket, open, for a later claim (its listener closed, or the
        bind it was claimed for failed). False: `sock` is not one of ours (close it yourself)."""
        entry = self._taken.pop(sock, None)
        if entry is None:
            return False
        self._free.append(entry)
        return True

    @property
    def unclaimed(self) -> list[tuple[str, socket.socket]]:
        """The passed sockets no listener has taken: the caller warns about them."""
        return [(name, sock) for name, sock, _ in self._free]


def watchdog_interval(environ: Mapping[str, str] = os.environ, pid: int | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings: half of WATCHDOG_USEC, or None without a watchdog
    (unset, 0, or WATCHDOG_PID naming another process). ValueError when malformed."""
    if not environ.get("WATCHDOG_USEC"):
        return None
    if "WATCHDOG_PID" in environ and _number(environ, "WATCHDOG_PID") != (os.getpid() if pid is None else pid):
        return None
    usec = _number(environ, "WATCHDOG_USEC")
    return usec / 1e6 * WATCHDOG_FRACTION if usec else None


async def watchdog(interval: float) -> NoReturn:
    """Ping systemd's watchdog every `interval` seconds, from the event loop itself: a loop
    that stops turning stops the pings, and systemd restarts the service (WatchdogSec=)."""
    while True:
        notify("WATCHDOG=1")
        await trio.sleep(interval)


def _number(environ: Mapping[str, str], name: str) -> int:
    text = environ[name]
    if not (text.isascii() and text.isdigit()):  # int() would take "+1", " 1" and "1_0"; systemd writes digits
        raise ValueError(f"{name}={text!r} from the environment is not a number")
    return int(text)


def _ip(bind: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(bind)
    except ValueError:
        return None
