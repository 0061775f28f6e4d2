"""The one dial: connect to a route's targets, with connect_timeout and retries.

Errors are translated to reasons here, at the layer boundary, by `connect_failure`:
the rest of the program never looks at an errno.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import trio

from ._reasons import Reason, leaves
from ._addresses import format_address
from ._errors import ConnectionEnded

from ._health import Attempt, TargetHealth

if TYPE_CHECKING:
    from ._record import Connection
    from ._table import CompiledRoute
    from ._targets import RouteTargets

__all__ = ["connect_failed", "connect_failure", "dialed", "format_address", "open_target"]

log = logging.getLogger("triofwd.dial")

_UNREACHABLE = {errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN, errno.ENETDOWN, errno.EADDRNOTAVAIL}
# No socket could be made here (out of fds or memory): the limit is ours, not the target's.
_OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
_TIMEOUT = {errno.ETIMEDOUT}
# The target accepted and reset at once: seen by connect() (ECONNRESET in SO_ERROR) or, a
# moment later, by getpeername() (ENOTCONN). It was reached; it said no.
_RESET = {errno.ECONNRESET, errno.ENOTCONN}

# Delay before happy eyeballs (RFC 8305) starts the next address of a hostname; trio's default.
HAPPY_EYEBALLS_DELAY = 0.25


def connect_failure(exc: OSError | trio.TooSlowError) -> Reason:
    """The reason for a failed connect: dns_error, connect_refused, connect_timeout,
    target_reset, target_unreachable, or capacity when no socket could be made at all."""
    if isinstance(exc, trio.TooSlowError):
        return Reason.CONNECT_TIMEOUT
    if isinstance(exc, socket.gaierror):
        return Reason.DNS_ERROR
    # trio.open_tcp_stream reports "all attempts failed" as an OSError caused by a group.
    cause = exc.__cause__
    found = list(leaves(cause)) if isinstance(cause, BaseExceptionGroup) else [exc]
    codes = {leaf.errno for leaf in found if isinstance(leaf, OSError)}
    if codes & _OUT_OF_RESOURCES:
        return Reason.CAPACITY
    if errno.ECONNREFUSED in codes:
        return Reason.CONNECT_REFUSED
    if codes & _RESET:
        return Reason.TARGET_RESET
    if codes & _TIMEOUT:
        return Reason.CONNECT_TIMEOUT
    return Reason.TARGET_UNREACHABLE


def _literal_family(host: str) -> int | None:
    """AF_INET or AF_INET6 when `host` is an IP address, not a name."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
        except OSError:
            continue
        return family
    return None


async def open_target(host: str, port: int, timeout: float) -> trio.SocketStream:
    """A fresh connection to a target, within `timeout` (trio.TooSlowError past it)."""
    with trio.fail_after(timeout):
        family = _literal_family(host)
        if family is None:
            return await trio.open_tcp_stream(host, port, happy_eyeballs_delay=HAPPY_EYEBALLS_DELAY)
        # An address has nothing to race: one non-blocking connect, without open_tcp_stream's
        # nursery and task per attempt (a sixth of the forwarder's time per new connection).
        sock = trio.socket.socket(family, socket.SOCK_STREAM)
        try:
            await sock.connect((host, port))
        except BaseException:
            sock.close()
            raise
        return trio.SocketStream(sock)


def _reached(stream: trio.SocketStream) -> tuple[object, ...]:
    """The address a connected stream reached (of a host's addresses, the one that answered).

    A target that reset since the handshake fails here (ENOTCONN): a failed connect, and
    its socket is closed at once rather than left to the garbage collector.
    """
    try:
        return stream.socket.getpeername()
    except OSError:
        stream.socket.close()
        raise


@contextlib.asynccontextmanager
async def dialed(
    conn: Connection, route: CompiledRoute, targets: RouteTargets, failure: Reason | None = None
) -> AsyncIterator[trio.SocketStream]:
    """A connected target stream, held in the balancer while the block runs, closed after.

    Tries up to 1 + connect_retries of the targets that are usable now (health checks,
    circuit breakers) in the balancer's order, a warm socket first where one is ready.
    When none is usable the connection ends at once; when all attempts fail, with the
    last attempt's reason — or with `failure` if given (bridge_error: the hop to a TLS
    terminator is not a target of the client's). Each outcome is reported to the
    target's health: connect failures and target resets count against it.
    """
    conn.state = "connecting"
    reason = Reason.TARGET_UNREACHABLE
    detail = "no target is up"
    for index in targets.order(1 + route.connect_retries, trio.current_time()):
        target = targets.targets[index]
        began = trio.current_time()
        attempt = target.health.begin(began)
        if attempt is None:
            continue  # taken out (or its probe taken) while an earlier attempt ran
        host, port = target.address
        conn.target = target.name
        try:
            # A half-open circuit's probe is a fresh connect: a warm socket from before proves nothing.
            warm = target.take_warm(began) if attempt is Attempt.NORMAL else None
            stream = warm or await open_target(host, port, route.policy.connect_timeout)
            peer = _reached(stream)
        except (trio.TooSlowError, OSError) as exc:
            reason = connect_failure(exc)
        except BaseException:
            target.health.abandoned(attempt)  # cancelled: no verdict on the target
            raise
        else:
            conn.connect_time = trio.current_time() - began
            target.health.connected(attempt)
            conn.target = format_address(peer)
            with contextlib.closing(stream.socket), targets.balancer.hold(index):  # closed without an await: see run_connection
                try:
                    yield stream
                except BaseException as exc:
                    _report_end(target.health, exc)
                    raise
                target.health.succeeded()
            return
        detail = f"{target.name} failed ({reason})"
        connect_failed(target.health, reason, attempt)
        log.info("connection %d: %s", conn.id, detail)
    raise ConnectionEnded(failure or reason, detail)


def connect_failed(health: TargetHealth, reason: Reason, attempt: Attempt = Attempt.NORMAL) -> None:
    """A connect to the target failed with `reason`: against its health, unless the fault
    was ours (capacity: out of fds here), which gives no verdict."""
    if reason is Reason.CAPACITY:
        health.abandoned(attempt)
    else:
        health.failed(trio.current_time(), attempt)


def _report_end(health: TargetHealth, exc: BaseException) -> None:
    """A connection through the target ended with `exc`: one it ended with target_reset
    (the first cause, the reason recorded) counts against it."""
    found = list(leaves(exc))
    ended = next((leaf for leaf in found if isinstance(leaf, ConnectionEnded)), None)
    if ended is not None and ended.reason is Reason.TARGET_RESET:
        health.failed(trio.current_time())
    elif not all(isinstance(leaf, trio.Cancelled) for leaf in found):
        health.succeeded()

