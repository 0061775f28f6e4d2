"""Plain non-blocking sockets in trio: the syscall tried first, trio waited on only when it
would block (what the data path does for accept, connect, first bytes and headers).

trio keeps the standard-library socket under its own as a private attribute: `raw_socket`
is the one place that reaches for it, and tests/test_rawsock.py fails if trio changes that.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Awaitable, Callable

import trio

__all__ = ["closing", "connect", "raw_socket", "receive_some", "send_all", "data_ago", "set_tcp_keepalive"]

# Per call, so a socket needs no fcntl to be non-blocking (accepted sockets stay as accept
# made them until something needs O_NONBLOCK).
FLAGS = socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL
# Kernel keep-alive (tcp_keepalive): probe every IDLE/KEEPALIVE_PROBE_DIVISOR seconds
# after IDLE seconds of silence, and give up after KEEPALIVE_PROBES unanswered probes.
KEEPALIVE_PROBE_DIVISOR = 4
KEEPALIVE_PROBES = 4
# struct tcp_info (linux/tcp.h): eight u8 fields, then u32s; tcpi_last_data_sent is the
# tenth u32 and tcpi_last_data_recv the twelfth (milliseconds since the kernel last sent,
# and last received, a segment with data).
_TCP_INFO_LAST_DATA = struct.Struct("=44xI4xI")  # 8 bytes of u8s and 9 u32s skipped; last_ack_sent skipped


def raw_socket(sock: trio.socket.SocketType) -> socket.socket:
    """The non-blocking stdlib socket a trio socket wraps (same fd, same object every time)."""
    raw = sock._sock  # type: ignore[attr-defined]  # noqa: SLF001 - see the module docstring
    if not isinstance(raw, socket.socket):
        raise TypeError(f"trio socket {sock!r} no longer wraps a socket.socket")
    return raw


class closing:
    """Close a socket when the block ends, without an await: a Cancelled from a checkpoint in
    the close would replace what is on its way out. (No trio task waits on a socket its
    owner closes, so trio need not be told: its one-shot registration goes with the fd.)"""

    __slots__ = ("sock",)

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def __enter__(self) -> socket.socket:
        return self.sock

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


async def connect(family: int, address: tuple[str, int], wait: Callable[[socket.socket], Awaitable[object]] = trio.lowlevel.wait_writable) -> socket.socket:
    """A connected non-blocking socket (TCP_NODELAY set): one non-blocking connect, then
    `wait` for it to complete (trio's wait_writable; the data engine passes its own). Raises
    OSError with the connect's errno."""
    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        error = sock.connect_ex(address)
        if error == errno.EINPROGRESS:
            await wait(sock)
            error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            raise OSError(error, os.strerror(error))
    except BaseException:
        sock.close()
        raise
    return sock


async def receive_some(sock: socket.socket, max_bytes: int) -> bytes:
    """The bytes `sock` has (b"" at EOF), waiting in trio until there are some."""
    while True:
        try:
            return sock.recv(max_bytes, FLAGS)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)


async def send_all(sock: socket.socket, data: bytes) -> None:
    """All of `data`, waiting in trio while the kernel's buffer is full."""
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view, FLAGS) :]
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)


def data_ago(sock: socket.socket) -> float:
    """Seconds since the kernel last sent or received data on `sock` (inf when it cannot
    tell): bytes handed over earlier still going out as a slow reader opens its window, and
    bytes that came in and wait to be read, are traffic the program has not seen yet."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LAST_DATA.size)
        sent, received = _TCP_INFO_LAST_DATA.unpack_from(info)
    except (OSError, struct.error):
        return float("inf")
    return float(min(sent, received)) / 1000


def set_tcp_keepalive(sock: socket.socket, idle: float) -> None:
    """Kernel keep-alive probes after `idle` seconds of silence, so a peer that vanished is
    noticed without traffic (inf: left as it is)."""
    if idle == float("inf"):
        return
    seconds = max(1, int(idle))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, seconds)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, seconds // KEEPALIVE_PROBE_DIVISOR))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_PROBES)
