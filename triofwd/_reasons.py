"""The one-word vocabulary for why a connection ended (CONTRACT.md).

Every connection ends with exactly one of these, recorded once, by the first cause.
The access log, stats, metrics and the inspector all use these words.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Iterator

import trio


class Reason(enum.StrEnum):
    """Why a connection ended."""

    NORMAL = "normal"
    CLIENT_RESET = "client_reset"
    TARGET_RESET = "target_reset"
    INITIAL_DATA_TIMEOUT = "initial_data_timeout"
    INACTIVITY_TIMEOUT = "inactivity_timeout"
    HALF_CLOSE_TIMEOUT = "half_close_timeout"
    LIFETIME_EXCEEDED = "lifetime_exceeded"
    CONNECT_REFUSED = "connect_refused"
    CONNECT_TIMEOUT = "connect_timeout"
    TARGET_UNREACHABLE = "target_unreachable"
    DNS_ERROR = "dns_error"
    NO_ROUTE = "no_route"
    REJECTED = "rejected"
    IP_BLOCKED = "ip_blocked"
    IP_LIMIT = "ip_limit"
    RATE_LIMITED = "rate_limited"
    CAPACITY = "capacity"
    TLS_ERROR = "tls_error"
    BRIDGE_ERROR = "bridge_error"
    OFFLOADED = "offloaded"
    KILLED = "killed"
    SHUTDOWN = "shutdown"
    INTERNAL_ERROR = "internal_error"


class ConnectionEnded(Exception):
    """Raised inside a connection's scopes to end it with `reason`.

    Errors are translated into this at the layer boundary (the pump, the dial, the
    route table), so the code that records an ending sees a reason, never an errno.
    """

    def __init__(self, reason: Reason, detail: str = "") -> None:
        super().__init__(reason.value if not detail else f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


@contextlib.contextmanager
def deadline_at(deadline: float, reason: Reason) -> Iterator[trio.CancelScope]:
    """A scope ending at `deadline`; if the deadline ends the block, the connection ends with `reason`."""
    with trio.CancelScope(deadline=deadline) as scope:
        yield scope
    if scope.cancelled_caught:
        raise ConnectionEnded(reason)


def deadline_means(seconds: float, reason: Reason) -> contextlib.AbstractContextManager[trio.CancelScope]:
    """deadline_at, `seconds` from now."""
    return deadline_at(trio.current_time() + seconds, reason)


@contextlib.contextmanager
def failure_means(reason: Reason) -> Iterator[None]:
    """Translate a stream or socket failure (reset, broken pipe) into the connection's end."""
    try:
        yield
    except (trio.BrokenResourceError, OSError) as exc:
        raise ConnectionEnded(reason, str(exc.__cause__ or exc)) from exc
