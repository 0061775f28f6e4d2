"""Moving bytes between two plain TCP sockets: splice(2) for bulk, one shared buffer for the rest.

Both moves are synchronous, non-blocking attempts ("try the syscall first, wait only on
EAGAIN"); the pump decides when to wait. Nothing is held per connection while it is idle:

- A small chunk (a request, a reply) is copied through one buffer per thread: recv_into,
  then send at once. On loopback and LANs that is cheaper than two splice calls, which
  pay per call and per page for what fits in a few hundred bytes. Only when the destination
  cannot take the whole chunk at once are the unsent bytes copied out of the shared buffer
  for the wait.
- Bulk (a chunk of SPLICE_AT bytes or more came in) moves socket -> pipe -> socket inside
  the kernel, never entering Python, through a pipe borrowed from a pool for the chunk. A
  pipe that may still hold bytes (an error or a cancellation mid-drain) is closed, never
  returned. This is HAProxy's `splice-auto`.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import threading

import trio

from ._rawsock import raw_socket

__all__ = ["POOL", "Pipe", "PipePool", "SpliceError", "copy_once", "drain_pipe", "lift_send_lowat", "send_rest", "shared_buffer", "splice_once"]

# Bytes asked of one splice call; also the pipe's capacity (1 MiB is the default
# fs.pipe-max-size, allowed without privilege). Against 256 KiB it moved about 25% more
# bytes per CPU-second on one loopback stream (docs/profile.md); the kernel only uses
# pages for bytes actually in the pipe.
CHUNK = 1024 * 1024
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
# Idle pipes kept for reuse; beyond that they are closed (two fds each). A pipe is held only
# while a chunk waits for a slow destination, so a few cover many busy connections.
POOL_LIMIT = 16
# The shared copy buffer: the largest chunk one recv() of a loopback or LAN socket usually returns.
COPY_CHUNK = 65536
# A chunk at least this big means a bulk transfer: the next one is spliced. Smaller ones are copied.
SPLICE_AT = 16384
_SEND_FLAGS = getattr(socket, "MSG_NOSIGNAL", 0)
_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)

_THREAD = threading.local()


class SpliceError(Exception):
    """A move failed on one side: `side` is "src" or "dst"; the OSError is the cause."""

    def __init__(self, side: str, error: OSError) -> None:
        super().__init__(f"{side}: {error}")
        self.side = side
        self.error = error


class Pipe:
    __slots__ = ("r", "w")

    def __init__(self) -> None:
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(self.w, F_SETPIPE_SZ, CHUNK)
        except OSError:  # pipe-max-size may be lower: keep the default
            pass

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


class PipePool:
    """Empty pipes ready for reuse (one per process is shared by every connection)."""

    def __init__(self, limit: int = POOL_LIMIT) -> None:
        self.limit = limit
        self._free: list[Pipe] = []
        self.borrowed = 0  # pipes asked for so far (tests read it: the splice path was taken)

    def take(self) -> Pipe | None:
        """An empty pipe; None when none can be made (out of fds): the chunk is copied instead."""
        self.borrowed += 1
        try:
            return self._free.pop()  # one step: another thread's trio run may share the pool
        except IndexError:
            pass
        try:
            return Pipe()
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):
                raise
            return None

    def give(self, pipe: Pipe) -> None:
        """Return an empty pipe."""
        if len(self._free) < self.limit:
            self._free.append(pipe)
        else:
            pipe.close()

    def __len__(self) -> int:
        return len(self._free)


POOL = PipePool()


def lift_send_lowat(sock: socket.socket) -> None:
    """Let a bulk destination queue as much as the kernel allows (the system's tcp_notsent_lowat).

    trio.SocketStream sets TCP_NOTSENT_LOWAT to 16 KiB, which suits request/response; for bulk
    it makes every splice stop at 16 KiB unsent and wait to be woken: on one loopback stream,
    lifting it moved 2.4-3.4 GB per CPU-second instead of 1.9-2.0 (docs/profile.md).
    """
    try:
        sock.setsockopt(socket.IPPROTO_TCP, _NOTSENT_LOWAT, 0)  # 0: the sysctl's value
    except OSError:
        pass


def shared_buffer() -> memoryview:
    """The copy buffer every pump of this thread shares (one per thread: recv_into releases
    the GIL, so two trio runs in two threads must not read into the same bytes)."""
    try:
        return _THREAD.buffer  # type: ignore[no-any-return]
    except AttributeError:
        _THREAD.buffer = memoryview(bytearray(COPY_CHUNK))
        return _THREAD.buffer  # type: ignore[no-any-return]


def copy_once(src: socket.socket, dst: socket.socket, buffer: memoryview) -> tuple[int | None, bytes]:
    """Copy what src has ready (up to COPY_CHUNK) to dst through the shared `buffer`.

    Returns (n, rest): n is None when src has nothing yet, 0 at EOF, else the bytes read;
    rest is what dst could not take at once (send it with send_rest). Raises SpliceError.
    Nothing awaits in between, so the buffer is free again when it returns.
    """
    try:
        n = src.recv_into(buffer)
    except BlockingIOError:
        return None, b""
    except OSError as exc:
        raise SpliceError("src", exc) from exc
    if not n:
        return 0, b""
    try:
        sent = dst.send(buffer[:n], _SEND_FLAGS)
    except BlockingIOError:
        sent = 0
    except OSError as exc:
        raise SpliceError("dst", exc) from exc
    return n, (buffer[sent:n].tobytes() if sent < n else b"")


async def send_rest(dst: trio.socket.SocketType, rest: bytes) -> None:
    """Send what copy_once could not, waiting for dst to drain."""
    view = memoryview(rest)
    raw = raw_socket(dst)
    while view:
        await trio.lowlevel.wait_writable(dst)
        try:
            view = view[raw.send(view, _SEND_FLAGS) :]
        except BlockingIOError:
            pass
        except OSError as exc:
            raise SpliceError("dst", exc) from exc


def splice_once(pipe: Pipe, src: int, dst: int) -> tuple[int | None, int]:
    """Splice what fd src has ready (up to CHUNK) toward fd dst through `pipe`, taken from POOL.

    Returns (n, left): n is None when src has nothing yet, 0 at EOF, else the bytes read.
    The pipe goes back to the pool empty, unless dst could not take all of them: then it
    still holds `left` bytes (drain_pipe moves them and returns it). Raises SpliceError.
    """
    try:
        n = os.splice(src, pipe.w, CHUNK, flags=_FLAGS)
    except BlockingIOError:
        POOL.give(pipe)
        return None, 0
    except OSError as exc:
        POOL.give(pipe)  # nothing went in
        raise SpliceError("src", exc) from exc
    left = n
    try:
        while left:
            left -= os.splice(pipe.r, dst, left, flags=_FLAGS)
    except BlockingIOError:
        return n, left
    except OSError as exc:
        pipe.close()
        raise SpliceError("dst", exc) from exc
    POOL.give(pipe)
    return n, 0


async def drain_pipe(pipe: Pipe, dst: trio.socket.SocketType, left: int) -> None:
    """Move the `left` bytes still in `pipe` to dst, waiting for it to drain; the pipe goes back empty."""
    fd = dst.fileno()
    try:
        while left:
            await trio.lowlevel.wait_writable(dst)
            try:
                left -= os.splice(pipe.r, fd, left, flags=_FLAGS)
            except BlockingIOError:
                pass
            except OSError as exc:
                raise SpliceError("dst", exc) from exc
    except BaseException:
        pipe.close()  # it may hold bytes that belong to no one now
        raise
    POOL.give(pipe)
