"""The one dial: connect to a route's targets, with connect_timeout and retries over them,
and report each outcome to the target's health (`_connect` opens each connection).
"""

from __future__ import annotations

import logging
import socket
from typing import TYPE_CHECKING

import trio

from ._addresses import format_address
from ._balance import Balancer
from ._connect import connect_failed, connect_failure, open_target
from ._endings import leaves
from ._errors import ConnectionEnded
from ._health import Attempt, TargetHealth
from ._reasons import Reason
from ._targets import RouteTargets

if TYPE_CHECKING:
    from ._engine import Engine
    from ._record import Connection
    from ._table import CompiledRoute

__all__ = ["Dialed", "dial"]

log = logging.getLogger("triofwd.dial")


def _reached(sock: socket.socket) -> tuple[object, ...]:
    """The address a connected socket reached (of a host's addresses, the one that answered).

    A target that reset since the handshake fails here (ENOTCONN): a failed connect, and
    its socket is closed at once rather than left to the garbage collector.
    """
    try:
        peer: tuple[object, ...] = sock.getpeername()
    except OSError:
        sock.close()
        raise
    return peer


class Dialed:
    """A connected target socket, held in the balancer until the block ends, then closed;
    how the connection ended is reported to the target's health."""

    __slots__ = ("_balancer", "_health", "_index", "sock")

    def __init__(self, sock: socket.socket, health: TargetHealth, balancer: Balancer, index: int) -> None:
        self.sock = sock
        self._health = health
        self._balancer = balancer
        self._index = index
        balancer.active[index] += 1

    def __enter__(self) -> socket.socket:
        return self.sock

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        self._balancer.active[self._index] -= 1
        self.sock.close()
        if exc is None:
            self._health.succeeded()
        else:
            _report_end(self._health, exc)


async def dial(conn: Connection, route: CompiledRoute, targets: RouteTargets, engine: Engine, failure: Reason | None = None) -> Dialed:
    """A connected target: `with await dial(...) as sock:` holds it in the balancer while
    the block runs and closes it after.

    Tries up to 1 + connect_retries of the targets that are usable now (health checks,
    circuit breakers) in the balancer's order, a warm socket first where one is ready.
    When none is usable the connection ends at once; when all attempts fail, with the
    last attempt's reason — or with `failure` if given (bridge_error: the hop to a TLS
    terminator is not a target of the client's). Each outcome is reported to the
    target's health: connect failures and target resets count against it. The engine
    connects to IP addresses (the socket is then in its epoll, for the relay).
    """
    conn.state = "connecting"
    reason = Reason.TARGET_UNREACHABLE
    detail = "no target is up"
    # The last attempt's errno, as the cause: it says more than the reason (a SOCKS reply
    # tells an unreachable network from an unreachable host). A fresh exception, never
    # raised, so it holds no traceback, nor this frame.
    error: OSError | None = None
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
            peer: tuple[object, ...]
            if warm is None and target.literal is not None:  # connected to this very address, just now
                sock, peer = await engine.connect(target.literal, target.address, route.policy.connect_timeout), target.address
            else:  # which of a name's addresses, or whether a warm socket still is connected
                sock = warm or await open_target(host, port, route.policy.connect_timeout)
                peer = _reached(sock)
        except (trio.TooSlowError, OSError) as exc:
            reason = connect_failure(exc)
            error = OSError(exc.errno, exc.strerror) if isinstance(exc, OSError) and exc.errno else None
        except BaseException:
            target.health.abandoned(attempt)  # cancelled: no verdict on the target
            raise
        else:
            conn.connect_time = trio.current_time() - began
            target.health.connected(attempt)
            conn.target = format_address(peer)
            return Dialed(sock, target.health, targets.balancer, index)
        detail = f"{target.name} failed ({reason})"
        connect_failed(target.health, reason, attempt)
        log.info("connection %d: %s", conn.id, detail)
    raise ConnectionEnded(failure or reason, detail) from error


def _report_end(health: TargetHealth, exc: BaseException) -> None:
    """A connection through the target ended with `exc`: one it ended with target_reset
    (the first cause, the reason recorded) counts against it."""
    found = list(leaves(exc))
    ended = next((leaf for leaf in found if isinstance(leaf, ConnectionEnded)), None)
    if ended is not None and ended.reason is Reason.TARGET_RESET:
        health.failed(trio.current_time())
    elif not all(isinstance(leaf, trio.Cancelled) for leaf in found):
        health.succeeded()
