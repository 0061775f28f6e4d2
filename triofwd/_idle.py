"""A connection's quiet limits, kept lazily: inactivity, half-close, and extended keepalive.

Whoever moves the bytes stamps `conn.last_activity` (a float store, per chunk); nothing
moves a deadline per chunk. The connection's task waits for its traffic to end under one
cancel scope whose deadline is the earliest limit that could pass; when it does, the limit
is checked against the last activity, and the wait is re-armed if there was traffic since.
An idle connection wakes once per idle window, a busy one never.

    standard   last activity + inactivity_timeout
    immortal   no inactivity limit (max_lifetime still holds: it is the connection's scope)
    extended   idle for inactivity_timeout x keepalive_multiplier: one warning is logged, then
               a grace period of inactivity_timeout from the warning (or from data the kernel
               moved since, if later); the program's own traffic starts the watch over
    half-close the first EOF + half_close_timeout, whatever the traffic

Bytes are activity when they are handed to the kernel; but a reader slower than the
forwarder has megabytes of them queued in the kernel, going out as it reads, long after the
last send, and bytes that came in may wait to be read by a busy process. So when a quiet
limit seems passed, the kernel is asked (TCP_INFO) when it last sent or received data on
either socket, and that counts as activity too: a download read slowly is never cut, a
reader that stopped (no data can go out to it) is, and a limit judged late never cuts a
connection whose bytes came in time.
"""

from __future__ import annotations

import logging
import math
import socket
from collections.abc import Awaitable, Callable, Iterable

import trio

from ._policy import Policy
from ._rawsock import data_ago
from ._reasons import Reason
from ._record import Connection

__all__ = ["IdleWatch"]

log = logging.getLogger("triofwd.connection")


class IdleWatch:
    """The quiet limits of one connection's traffic, and the wait that keeps them."""

    __slots__ = ("conn", "grace", "half_deadline", "half_window", "kernel_last", "scope", "warn_after", "warned_at", "window")

    def __init__(self, conn: Connection, policy: Policy) -> None:
        self.conn = conn
        self.warn_after = policy.idle_warning_after  # extended keepalive: the warning; else inf
        self.grace = policy.inactivity_timeout  # after the warning
        self.window = policy.idle_window  # standard: inactivity_timeout; immortal: inf
        self.half_window = policy.half_close_timeout
        self.half_deadline = math.inf
        self.warned_at: float | None = None
        # When the kernel last moved data on the connection's sockets, as last asked (see
        # `_passed`): it delays a quiet limit, but only the program's own traffic
        # (conn.last_activity) starts an extended keepalive's watch over.
        self.kernel_last = -math.inf
        self.scope: trio.CancelScope | None = None

    def half_closed(self, now: float) -> None:
        """The first direction ended: the other may run for half_close_timeout from now."""
        if self.half_window == math.inf or self.half_deadline != math.inf:
            return
        self.half_deadline = now + self.half_window
        if self.scope is not None:
            self.scope.deadline = min(self.scope.deadline, self.half_deadline)

    def deadline(self) -> float:
        """When a quiet limit could pass next, if no byte moves before."""
        return self._deadline()

    def passed(self, now: float, sockets: Iterable[socket.socket] = ()) -> Reason | None:
        """A deadline came: the reason to end with, or None (there was traffic: wait on).
        `sockets`: the connection's TCP sockets (data the kernel sent since is activity)."""
        return self._passed(now, sockets)

    async def wait(self, until_over: Callable[[], Awaitable[object]], sockets: Iterable[socket.socket] = ()) -> Reason | None:
        """Wait for `until_over()` (the traffic ended: None) under the quiet limits; one that
        passes with no traffic since ends the wait with its reason (inactivity_timeout or
        half_close_timeout), for the caller to end the connection with. `sockets` as for
        `passed`."""
        while True:
            with trio.CancelScope(deadline=self._deadline()) as scope:
                self.scope = scope
                await until_over()
                return None
            self.scope = None
            reason = self._passed(trio.current_time(), sockets)
            if reason is not None:
                return reason

    def _deadline(self) -> float:
        last = max(self.conn.last_activity, self.kernel_last)
        if self.warn_after != math.inf:
            quiet = last + self.warn_after if self.warned_at is None else max(self.warned_at, last) + self.grace
        else:
            quiet = last + self.window
        return min(quiet, self.half_deadline)

    def _passed(self, now: float, sockets: Iterable[socket.socket]) -> Reason | None:
        """A deadline passed: the reason to end with, or None to wait on (there was traffic)."""
        if now >= self.half_deadline:
            return Reason.HALF_CLOSE_TIMEOUT
        stamped = self.conn.last_activity
        for sock in sockets:
            self.kernel_last = max(self.kernel_last, now - data_ago(sock))  # bytes the kernel moved that the program has not seen move
        last = max(stamped, self.kernel_last)
        # Each limit compared as `_deadline` computes it (last + window, not now - last): in
        # floating point the two can disagree, and a deadline that came but is not "passed"
        # would be re-armed at the same moment, for ever.
        if self.warn_after == math.inf:
            return Reason.INACTIVITY_TIMEOUT if now >= last + self.window else None
        if self.warned_at is not None and stamped > self.warned_at:
            self.warned_at = None  # traffic since the warning: the watch starts over
        if self.warned_at is None:
            if now >= last + self.warn_after:
                self.warned_at = now
                log.warning(
                    "connection %d idle for %.0fs (keepalive extended): closing after a grace period of %.0fs unless traffic resumes",
                    self.conn.id,
                    self.warn_after,
                    self.grace,
                )
            return None
        return Reason.INACTIVITY_TIMEOUT if now >= max(self.warned_at, last) + self.grace else None
