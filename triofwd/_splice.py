"""Moving bulk between two sockets inside the kernel: splice(2) through pooled pipes.

A chunk of SPLICE_AT bytes or more means a bulk transfer: the engine then moves that
direction socket -> pipe -> socket inside the kernel, never entering Python, through a pipe
borrowed from the pool for the chunk (HAProxy's `splice-auto`). Small chunks (a request, a
reply) are copied through one buffer instead: on loopback and LANs that is cheaper than two
splice calls, which pay per call and per page for what fits in a few hundred bytes. A pipe
that may still hold bytes (an error, a cancellation mid-chunk) is closed, never returned.
"""

from __future__ import annotations

import errno
import fcntl
import os

__all__ = ["CHUNK", "COPY_CHUNK", "POOL", "POOL_LIMIT", "SPLICE_AT", "Pipe", "PipePool"]

# Bytes asked of one splice call; also the pipe's capacity (1 MiB is the default
# fs.pipe-max-size, allowed without privilege). Against 256 KiB it moved about 25% more
# bytes per CPU-second on one loopback stream (docs/profile.md); the kernel only uses
# pages for bytes actually in the pipe.
CHUNK = 1024 * 1024
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
# Idle pipes kept for reuse; beyond that they are closed (two fds each). A pipe is held only
# while a chunk waits for a slow destination, so a few cover many busy connections.
POOL_LIMIT = 16
# The copy buffer: the largest chunk one recv() of a loopback or LAN socket usually returns.
COPY_CHUNK = 65536
# A chunk at least this big means a bulk transfer: the next one is spliced. Smaller ones are copied.
SPLICE_AT = 16384


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
