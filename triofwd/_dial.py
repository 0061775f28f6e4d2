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

from ._reasons import ConnectionEnded, Reason

if TYPE_CHECKING:
    from ._balance import Balancer
    from ._connection import Connection
    from ._table import CompiledRoute

__all__ = ["connect_failure", "dialed", "format_address"]

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


def _leaf_errors(exc: BaseException) -> list[BaseException]:
    """trio.open_tcp_stream reports "all attempts failed" as an OSError caused by a group."""
    cause = exc.__cause__
    if isinstance(cause, BaseExceptionGroup):
        return [leaf for sub in cause.exceptions for leaf in _leaf_errors(sub)]
    return [exc]


def connect_failure(exc: OSError) -> Reason:
    """The reason for a failed connect: dns_error, connect_refused, connect_timeout,
    target_reset, target_unreachable, or capacity when no socket could be made at all."""
    if isinstance(exc, socket.gaierror):
        return Reason.DNS_ERROR
    codes = {leaf.errno for leaf in _leaf_errors(exc) if isinstance(leaf, OSError)}
    if codes & _OUT_OF_RESOURCES:
        return Reason.CAPACITY
    if errno.ECONNREFUSED in codes:
        return Reason.CONNECT_REFUSED
    if codes & _RESET:
        return Reason.TARGET_RESET
    if codes & _TIMEOUT:
        return Reason.CONNECT_TIMEOUT
    return Reason.TARGET_UNREACHABLE


def format_address(address: tuple[object, ...]) -> str:
    """'ip:port', with IPv6 in brackets."""
    host, port = str(address[0]), address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _connect(host: str, port: int, timeout: float) -> tuple[trio.SocketStream, tuple[object, ...]]:
    """A connected stream and the address it reached (of the host's addresses, the one that answered)."""
    with trio.fail_after(timeout):
        stream = await trio.open_tcp_stream(host, port, happy_eyeballs_delay=HAPPY_EYEBALLS_DELAY)
    try:
        return stream, stream.socket.getpeername()
    except OSError:  # reset since the handshake (ENOTCONN): a failed connect, and no socket left open
        stream.socket.close()
        raise


@contextlib.asynccontextmanager
async def dialed(
    conn: Connection, route: CompiledRoute, balancer: Balancer, failure: Reason | None = None
) -> AsyncIterator[trio.SocketStream]:
    """A connected target stream, held in the balancer while the block runs, closed after.

    Tries up to 1 + connect_retries targets in the balancer's order. When all fail,
    the connection ends with the last attempt's reason, or with `failure` if given
    (bridge_error: the hop to a TLS terminator is not a target of the client's).
    """
    conn.state = "connecting"
    reason = Reason.TARGET_UNREACHABLE
    for index in balancer.order(1 + route.connect_retries):
        host, port = balancer.targets[index]
        conn.target = format_address((host, port))
        began = trio.current_time()
        try:
            stream, peer = await _connect(host, port, route.policy.connect_timeout)
        except trio.TooSlowError:
            reason = Reason.CONNECT_TIMEOUT
        except OSError as exc:
            reason = connect_failure(exc)
        else:
            conn.connect_time = trio.current_time() - began
            conn.target = format_address(peer)
            async with stream:
                with balancer.hold(index):
                    yield stream
            return
        log.info("connection %d: %s:%s failed (%s)", conn.id, host, port, reason)
    raise ConnectionEnded(failure or reason)
