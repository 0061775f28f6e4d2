"""Zero-copy moves between two TCP sockets with Linux splice(2), and the pipe pool it uses.

splice moves bytes socket -> pipe -> socket inside the kernel, without copying them into
Python. A pipe is borrowed from the pool only while bytes are in flight, so an idle
connection holds no pipe and no buffer. A pipe that may still hold bytes (an error or a
cancellation mid-drain) is closed, never returned.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator

import trio

__all__ = ["POOL", "Pipe", "PipePool", "SpliceError", "splice_chunk"]

# Bytes asked of one splice call; also the pipe's capacity. Larger pipes mean fewer
# trips for bulk transfers; the kernel only uses pages for bytes actually in the pipe.
CHUNK = 256 * 1024
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
# Idle pipes kept for reuse; beyond that they are closed (two fds each).
POOL_LIMIT = 64
# Chunk size of the copying fallback (no pipe could be had).
COPY_CHUNK = 65536


class SpliceError(Exception):
    """splice failed on one side: `side` is "src" or "dst"; the OSError is the cause."""

    def __init__(self, side: str, error: OSError) -> None:
        super().__init__(f"{side}: {error}")
        self.side = side
        self.error = error


class Pipe:
    __slots__ = ("r", "w")

    def __init__(self) -> None:
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        with contextlib.suppress(OSError):  # pipe-max-size may be lower: keep the default
            fcntl.fcntl(self.w, F_SETPIPE_SZ, CHUNK)

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


class PipePool:
    """Empty pipes ready for reuse (one per process is shared by every connection)."""

    def __init__(self, limit: int = POOL_LIMIT) -> None:
        self.limit = limit
        self._free: list[Pipe] = []

    @contextlib.contextmanager
    def borrowed(self) -> Iterator[Pipe | None]:
        """A pipe for one chunk; None when none can be made (out of fds): copy that chunk instead."""
        try:
            pipe = self._free.pop() if self._free else Pipe()
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):
                raise
            yield None
            return
        try:
            yield pipe
        except BaseException:
            pipe.close()  # it may hold bytes that belong to no one now
            raise
        if len(self._free) < self.limit:
            self._free.append(pipe)
        else:
            pipe.close()

    def __len__(self) -> int:
        return len(self._free)


POOL = PipePool()


async def splice_chunk(src: trio.socket.SocketType, dst: trio.socket.SocketType, pipe: Pipe | None) -> tuple[int | None, bool]:
    """Move what src has ready (up to CHUNK) into dst through `pipe` (copied, if pipe is None).

    Returns (n, waited): n is None when src has nothing yet (the pipe is still empty), 0 at
    EOF, else the bytes delivered; waited says whether a trip through the scheduler
    already happened (a wait for dst to drain). Raises SpliceError naming the failed side.
    """
    if pipe is None:
        return await _copy_chunk(src, dst)
    try:
        n = os.splice(src.fileno(), pipe.w, CHUNK, flags=_FLAGS)
    except BlockingIOError:
        return None, False
    except OSError as exc:
        raise SpliceError("src", exc) from exc
    waited = False
    left = n
    while left:
        try:
            left -= os.splice(pipe.r, dst.fileno(), left, flags=_FLAGS)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(dst)
            waited = True
        except OSError as exc:
            if exc.errno == errno.EINTR:
                continue
            raise SpliceError("dst", exc) from exc
    return n, waited


async def _copy_chunk(src: trio.socket.SocketType, dst: trio.socket.SocketType) -> tuple[int | None, bool]:
    """The same move through Python, for when no pipe can be had (file descriptors run out)."""
    try:
        data = src._sock.recv(COPY_CHUNK)  # noqa: SLF001 - a non-blocking try, as splice does
    except BlockingIOError:
        return None, False
    except OSError as exc:
        raise SpliceError("src", exc) from exc
    try:
        view = memoryview(data)
        while view:
            view = view[await dst.send(view):]
    except OSError as exc:
        raise SpliceError("dst", exc) from exc
    return len(data), True
